"""How the frozen base of a LoRA run is stored: `[lora] base_precision`.

  auto  the compute dtype ([train] mixed_precision: fp32, bf16 or fp16), as before
  bf16  bf16 weights whatever the autocast precision
  fp8   float8 e4m3 weights, one fp32 scale per output row (torchao Float8Tensor)
  int8  int8 weights, one fp32 scale per output row (torchao Int8Tensor, weight-only)
  nf4   4-bit NormalFloat, blocks of 64, double-quantized scales (bitsandbytes, as QLoRA)

Only the linear layers of the DiT's blocks are quantized (99% of a 10B DiT's parameters); the
patch embedding, time embedding, final layers and everything that is not a Linear stay in the
compute dtype (bf16 under autocast; fp32 with mixed_precision 'no', e.g. on CPUs without bf16
matrix units).
Layers are quantized one at a time while the weights stream in (`quantizer` is the loader's
`convert` hook), on the device they will run on, each weight read from the file and quantized
a slice of rows at a time (`quantize_weight`), so neither the host nor the GPU ever holds the
bf16 model, nor one whole bf16 layer, nor the libraries' whole-layer fp32 intermediates
(measured before slicing: 3.7x the quantized bytes for fp8, 5.1x for NF4). The result is
bit-identical to quantizing whole weights. Quantization is a pure function of the weights, so
a resumed run rebuilds the same base bit for bit.

Why our own linear instead of the libraries' forward: torchao's quantized tensors (and
diffusers' layerwise casting) dequantize inside `F.linear`, and autograd then saves that bf16
weight for the input gradient: a training step without checkpointing holds a bf16 copy of
every layer again (measured with saved_tensors_hooks). `QuantizedLinear` dequantizes in its
forward and again in its backward and saves nothing, so the quantized storage is all that
stays resident; the price is one dequantization more per layer and step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.blocks import block_names, in_block

BASE_PRECISIONS = ("auto", "bf16", "fp8", "int8", "nf4")
QUANTIZED = ("fp8", "int8", "nf4")
COMPUTE_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NF4_BLOCK = 64  # weights per NF4 scale (bitsandbytes' and QLoRA's default)


def resolve_base_precision(base_precision: str, mixed_precision: str) -> str:
    """What the frozen base is stored as: fp32, bf16, fp16, fp8, int8 or nf4."""
    if base_precision == "auto":
        return COMPUTE_NAMES[mixed_precision]
    return base_precision


def check_base_precision(base_precision: str, *, frozen_base: bool) -> None:
    """One-line errors for combinations that cannot work (before anything is loaded)."""
    if base_precision == "auto":
        return
    if not frozen_base:
        raise ConfigError(f"[lora] base_precision = '{base_precision}' needs a frozen base: "
                          "only LoRA training (the base untouched) can store it reduced",
                          hint="add --lora (train only LoRA adapters), or drop "
                               "--base-precision for full fine-tuning")
    if base_precision == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise ConfigError(f"[lora] base_precision = 'fp8' needs torch.float8_e4m3fn, which "
                          f"torch {torch.__version__} lacks",
                          hint="upgrade torch (>= 2.1), or use --base-precision int8 or nf4")
    if base_precision in ("fp8", "int8"):
        try:
            import torchao.quantization  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"[lora] base_precision = '{base_precision}' needs torchao, which "
                              f"failed to import ({exc})",
                              hint="pip install 'torchao>=0.18', or use --base-precision nf4"
                              ) from None
    if base_precision == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"[lora] base_precision = 'nf4' needs bitsandbytes, which failed "
                              f"to import ({exc})",
                              hint="pip install bitsandbytes, or use --base-precision fp8/int8"
                              ) from None


def storage_dtype(precision: str, mixed_precision: str = "bf16") -> torch.dtype:
    """The dtype the base's weights stream in as (and non-quantized frozen tensors keep): the
    precision itself, or for a quantized base the compute dtype (bf16 under autocast; fp32
    without, where the quantized layers dequantize to fp32 too)."""
    if precision in QUANTIZED:
        return torch.float32 if mixed_precision == "no" else torch.bfloat16
    return STORAGE_DTYPES[precision]


def is_quantized_layer_name(name: str, block_prefixes: tuple[str, ...]) -> bool:
    """The layers a quantized base stores reduced: every Linear inside a repeated block
    (`block_prefixes`: the blocks' names, `ditctl.models.blocks.block_names`)."""
    return in_block(name, block_prefixes)


def quantizer(precision: str) -> "Quantizer | None":
    """The loader's `convert` hook for a base stored as `precision` (None: nothing to do)."""
    return Quantizer(precision) if precision in QUANTIZED else None


def quantize_loaded(model: nn.Module, precision: str) -> nn.Module:
    """Quantize an already loaded model's block Linears in place (tests, in-memory models; the
    loader's path is the streaming `Quantizer`, which never holds the unquantized weights)."""
    convert = quantizer(precision)
    if convert is None:
        return model
    convert.bind(model)
    for name, module in list(model.named_modules()):
        replacement = convert(name, module)
        if replacement is not None and replacement is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, replacement)
    return model


class Quantizer:
    """Turns the DiT blocks' Linears into QuantizedLinears. Called on a loaded module (tests,
    in-memory models) it quantizes the weight it holds; with the streaming loader
    (ditctl.models.streaming) it claims the weight before it is read (`streamed_tensors`) and
    quantizes it from the file a slice of rows at a time (`convert_streamed`), so the layer's
    bf16 weight is never whole in memory, nor are the libraries' fp32 intermediates."""

    def __init__(self, precision: str):
        self.precision = precision
        self.block_prefixes: tuple[str, ...] | None = None

    def bind(self, root: nn.Module) -> None:
        """Learn which modules are the repeated blocks from the (meta) model before loading."""
        self.block_prefixes = tuple(block_names(root))

    def _claims(self, name: str, module: nn.Module) -> bool:
        if self.block_prefixes is None:
            raise RuntimeError("Quantizer.bind(model) must run before it converts modules")
        return type(module) is nn.Linear and is_quantized_layer_name(name, self.block_prefixes)

    def __call__(self, name: str, module: nn.Module) -> nn.Module | None:
        if self._claims(name, module):
            return QuantizedLinear.from_linear(module, self.precision)
        return None

    def streamed_tensors(self, name: str, module: nn.Module) -> tuple[str, ...]:
        """The tensors of `module` this hook reads itself (from `convert_streamed`'s sources)."""
        return ("weight",) if self._claims(name, module) else ()

    def convert_streamed(self, name: str, module: nn.Module, sources: dict) -> nn.Module:
        return QuantizedLinear.from_rows(module, sources["weight"], self.precision)


# Elements of a weight quantized at once when streaming (2 MiB of bf16): the libraries' fp32
# intermediates of one slice are a few times that, a fixed few MiB whatever the layer's size.
QUANTIZE_CHUNK = 2**20


def quantize_weight(rows, shape: tuple[int, int], precision: str,
                    chunk: int | None = None) -> torch.Tensor:
    """The quantized storage of a weight [out, in] whose rows `rows(start, stop)` returns (bf16,
    on the target device), quantized a slice of rows at a time into preallocated storage.

    Bit-identical to quantizing the whole weight at once (tests/engine/test_base_precision.py):
    fp8 and int8 scale each row on its own (torchao's PerRow), and NF4 quantizes blocks of 64
    consecutive weights, so a slice whose size is a multiple of 64 ends on a block boundary;
    NF4's double quantization (the block scales quantized to 8 bits around their mean) needs
    every block's scale, so it runs once at the end on the collected fp32 scales (1/32 of the
    bf16 weight's bytes), with bitsandbytes' own steps. `chunk`: weights a slice (default
    QUANTIZE_CHUNK)."""
    out_features, in_features = shape
    step = max(1, (chunk or QUANTIZE_CHUNK) // max(1, in_features))
    if precision == "nf4":
        step = _round_up(step, NF4_BLOCK // math.gcd(in_features, NF4_BLOCK))
        return _nf4_from_rows(rows, shape, step)
    return _torchao_from_rows(rows, shape, precision, step)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _nf4_from_rows(rows, shape: tuple[int, int], step: int) -> torch.Tensor:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    out_features, in_features = shape
    numel = out_features * in_features
    packed = absmax = None
    done_elements = done_blocks = 0
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        piece = rows(start, stop)
        part, state = bnbf.quantize_4bit(piece, blocksize=NF4_BLOCK, compress_statistics=False,
                                         quant_type="nf4", quant_storage=torch.uint8)
        del piece
        if packed is None:  # bitsandbytes packs two weights a byte, as [bytes, 1]
            packed = torch.empty(((numel + 1) // 2, 1), dtype=part.dtype, device=part.device)
            absmax = torch.empty(-(-numel // NF4_BLOCK), dtype=state.absmax.dtype,
                                 device=part.device)
        packed[done_elements // 2:done_elements // 2 + part.shape[0]] = part
        absmax[done_blocks:done_blocks + state.absmax.numel()] = state.absmax
        done_elements += (stop - start) * in_features
        done_blocks += state.absmax.numel()
        del part, state
    # bitsandbytes.functional.quantize_4bit(compress_statistics=True), from its absmax on
    offset = absmax.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    del absmax
    state = bnbf.QuantState(absmax=qabsmax, shape=torch.Size(shape), dtype=torch.bfloat16,
                            blocksize=NF4_BLOCK,
                            code=bnbf.get_4bit_type("nf4", device=packed.device),
                            quant_type="nf4", offset=offset, state2=state2)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK,
                             compress_statistics=True, quant_type="nf4",
                             quant_storage=torch.uint8, bnb_quantized=True)


def _torchao_quantize(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """torchao's weight-only quantization of a bf16 weight, as `quantize_` with ditctl's config
    applies it (Float8WeightOnlyConfig / Int8WeightOnlyConfig: per-row scales)."""
    from torchao.quantization import (Float8Tensor, Float8WeightOnlyConfig, Int8Tensor,
                                      Int8WeightOnlyConfig)

    if precision == "fp8":
        config = Float8WeightOnlyConfig()
        return Float8Tensor.from_hp(weight, float8_dtype=config.weight_dtype,
                                    granularity=config.granularity)
    return Int8Tensor.from_hp(weight, granularity=Int8WeightOnlyConfig().granularity)


def _torchao_from_rows(rows, shape: tuple[int, int], precision: str, step: int) -> torch.Tensor:
    out_features = shape[0]
    parts: dict[str, torch.Tensor] = {}
    kind = context = None
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        piece = _torchao_quantize(rows(start, stop), precision)
        names, piece_context = piece.__tensor_flatten__()
        if kind is None:
            kind, context = type(piece), piece_context
        for name in names:
            inner = getattr(piece, name)
            if inner.dim() == 0 or inner.shape[0] != stop - start:
                raise ConfigError(f"[lora] base_precision = '{precision}': this torchao's "
                                  f"{kind.__name__}.{name} is not per-row ({list(inner.shape)} "
                                  f"for {stop - start} rows), so ditctl cannot quantize it while "
                                  "streaming", hint="install torchao 0.18 (the version ditctl "
                                  "is tested with), or use --base-precision nf4")
            if name not in parts:
                parts[name] = torch.empty((out_features, *inner.shape[1:]), dtype=inner.dtype,
                                          device=inner.device)
            parts[name][start:stop] = inner
        del piece
    full = torch.Size(shape)
    return kind.__tensor_unflatten__(parts, context, full, (full[1], 1))


class _DequantizingLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized on the fly. The weight is frozen, so the backward needs
    only W (dequantized again), not x: nothing is saved but a reference to the stored weight
    this forward used (with block streaming, the accelerator copy, which the layer itself may
    no longer point at by the time the backward runs).

    Autocast is switched off around the matmul only when it is on: entering `torch.autocast`
    costs more than a small layer's matmul on a CPU, and a step calls this for every layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.weight, ctx.precision, ctx.input_dtype = layer.weight, layer.precision, x.dtype
        out, ctx.dtype = _dequantizing_linear(x, layer)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = dequantize(ctx.weight, ctx.precision, ctx.dtype)  # [out, in]
        if not torch.is_autocast_enabled(grad.device.type):
            return (grad.to(ctx.dtype) @ weight).to(ctx.input_dtype), None
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = grad.to(ctx.dtype) @ weight  # [..., in]
        return grad_x.to(ctx.input_dtype), None


def _dequantizing_linear(x: torch.Tensor, layer: "QuantizedLinear"
                         ) -> tuple[torch.Tensor, torch.dtype]:
    """x Wᵀ + b computed in the autocast dtype (else the input's), and that dtype."""
    device_type = x.device.type
    autocasting = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocasting else x.dtype
    bias = None if layer.bias is None else layer.bias.to(dtype)
    weight = dequantize(layer.weight, layer.precision, dtype)
    if not autocasting:
        return F.linear(x.to(dtype), weight, bias), dtype
    with torch.autocast(device_type, enabled=False):
        return F.linear(x.to(dtype), weight, bias), dtype


DEQUANTIZE_CHUNK = 4 * 2**20  # fp32 elements per slice of rows dequantized at once (16 MiB)


def dequantize(weight: torch.Tensor, precision: str, dtype: torch.dtype) -> torch.Tensor:
    """A stored quantized weight [out, in] as a fresh `dtype` tensor.

    fp8/int8: the same arithmetic as torchao's `dequantize()` (to fp32, minus the zero point,
    times the row scale, rounded once to `dtype`), but a slice of rows at a time: torchao's
    materialises the whole layer in fp32 and more (measured: ~1 GB of transients for the 10B model's
    3072 x 27648 adaLN layer), ours holds the `dtype` result plus one 16 MiB fp32 slice. A weight
    within one slice is dequantized in place in its fp32 slice (no second buffer, no copy); fp8
    widens through a 256-entry table on CPUs (`_to_float32`)."""
    if precision == "nf4":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    qdata, scale = weight.qdata, weight.scale  # [out, in], [out, 1] (per-row)
    zero = getattr(weight, "zero_point", None) if precision == "int8" else None
    rows = max(1, DEQUANTIZE_CHUNK // max(1, qdata.shape[1]))
    if rows >= qdata.shape[0]:
        return _dequantize_rows(qdata, scale, zero).to(dtype)
    out = torch.empty(qdata.shape, dtype=dtype, device=qdata.device)
    for start in range(0, qdata.shape[0], rows):
        out[start:start + rows] = _dequantize_rows(
            qdata[start:start + rows], scale[start:start + rows],
            None if zero is None else zero[start:start + rows])
    return out


def _dequantize_rows(qdata: torch.Tensor, scale: torch.Tensor,
                     zero: torch.Tensor | None) -> torch.Tensor:
    """(qdata - zero) * scale in a fresh fp32 tensor, torchao's arithmetic and rounding."""
    part = _to_float32(qdata)
    if zero is not None:
        part -= zero.to(torch.float32)
    return part.mul_(scale.to(torch.float32))


_FLOAT8_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _to_float32(qdata: torch.Tensor) -> torch.Tensor:
    """`qdata.to(torch.float32)`, bit for bit. PyTorch widens float8 element by element on CPUs
    (measured ~5 ns a weight, 6x an int8 -> fp32 conversion); every float8 value is one of 256
    bit patterns, so on a CPU a lookup in the table of their fp32 values (each widened by that
    same conversion) gives the same numbers several times faster. GPUs convert natively."""
    if qdata.device.type != "cpu" or qdata.element_size() != 1 or not qdata.is_floating_point():
        return qdata.to(torch.float32, copy=True)  # always fresh: the caller works in place
    key = (qdata.dtype, qdata.device)
    table = _FLOAT8_TABLES.get(key)
    if table is None:
        table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(qdata.dtype) \
            .to(torch.float32)
        _FLOAT8_TABLES[key] = table
    codes = qdata.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return table.index_select(0, codes).view(qdata.shape)


class QuantizedLinear(nn.Linear):
    """A frozen nn.Linear whose weight is stored as fp8, int8 or NF4 and dequantized per call
    (compute in the autocast dtype, else the input's). A subclass of nn.Linear, so peft wraps
    it with an ordinary LoRA layer; it never trains and is never merged into."""

    precision: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, precision: str) -> "QuantizedLinear":
        weight = linear.weight.detach()
        if precision == "nf4":
            import bitsandbytes as bnb

            stored = bnb.nn.Params4bit(weight.to(torch.bfloat16), requires_grad=False,
                                       quant_type="nf4", blocksize=NF4_BLOCK,
                                       compress_statistics=True, quant_storage=torch.uint8)
            stored = stored.to(weight.device)  # bitsandbytes quantizes when it is placed
        else:
            from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

            config = Float8WeightOnlyConfig() if precision == "fp8" else Int8WeightOnlyConfig()
            linear.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
            quantize_(linear, config)  # replaces linear.weight by its quantized tensor
            stored = linear.weight
        return cls._adopt(linear, stored, precision)

    @classmethod
    def _adopt(cls, linear: nn.Linear, stored: torch.Tensor, precision: str) -> "QuantizedLinear":
        """Make `linear` a frozen QuantizedLinear holding `stored` as its weight, in place."""
        linear.weight = stored if isinstance(stored, nn.Parameter) else \
            nn.Parameter(stored, requires_grad=False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        linear.__class__ = cls
        linear.precision = precision
        return linear

    @classmethod
    def from_rows(cls, linear: nn.Linear, source, precision: str) -> "QuantizedLinear":
        """`linear` (its weight still on the meta device, its bias loaded) with its weight
        quantized from `source`, a stored weight read a slice of rows at a time
        (ditctl.models.streaming.RowSource): see `quantize_weight`."""
        def rows(start: int, stop: int) -> torch.Tensor:
            # the dtype the whole-weight path would have held, then bf16 as it quantizes
            return source.rows(start, stop).to(torch.bfloat16)

        stored = quantize_weight(rows, tuple(source.shape), precision)
        return cls._adopt(linear, stored, precision)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype` (a fresh tensor each call)."""
        return dequantize(self.weight, self.precision, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantizingLinear.apply(x, self)
        # no input gradient wanted (sampling, evaluation): no autograd node to build
        return _dequantizing_linear(x, self)[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored={self.precision}"


def quantized_storage_bytes(module: nn.Module) -> int:
    """Bytes a module's parameters and buffers occupy, quantized ones included (the packed
    data, the scales and every other part of bitsandbytes' and torchao's tensors)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        for part in _tensor_parts(tensor):
            key = part.untyped_storage().data_ptr()
            if key not in seen and part.device.type != "meta":
                seen.add(key)
                total += part.untyped_storage().nbytes()
    return total


def _tensor_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    state = getattr(tensor, "quant_state", None)
    if state is not None:  # bitsandbytes Params4bit: packed data + its quantization state
        parts = [tensor.data, state.absmax, state.code]
        if getattr(state, "offset", None) is not None:
            parts.append(state.offset)
        if getattr(state, "state2", None) is not None:
            parts += [state.state2.absmax, state.state2.code]
        return [p for p in parts if isinstance(p, torch.Tensor)]
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return [p for n in names for p in _tensor_parts(getattr(tensor, n))]
    return [tensor]


def cpu_lacks_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True where this is an x86 Linux CPU without bf16 matrix instructions (neither
    AVX512-BF16 nor AMX-BF16): there bf16 autocast emulates every bf16 matmul and a training
    step is slower than in fp32. False where it has them, or where it cannot be told (other
    systems): ditctl then does not guess. (bench/bench_cpu_precision.py measures the parts of a
    step on a CPU that has them: docs/performance.md.)"""
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return not flags & {"avx512_bf16", "amx_bf16"}
    except OSError:
        pass
    return False

