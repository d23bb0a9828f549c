"""A frozen base stored as bf16, fp8, int8 or NF4: LoRA trains on it, the base never changes,
training resumes bit for bit, and bad combinations are one-line errors."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_workspace  # noqa: E402

from ditctl.errors import ConfigError  # noqa: E402
from ditctl.train import run_training  # noqa: E402

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}
TRAIN = {"mixed_precision": "bf16", "learning_rate": 5e-3, "lr_scheduler": "constant"}


def _train(ws, resume=None, **overrides):
    return run_training(ws, ws.config(overrides), resume=resume)


def _capture_model(monkeypatch) -> dict:
    """Keep the denoiser the training loop trained (run_training does not return it)."""
    import ditctl.train as train  # run_training calls the loop through its own import

    seen = {}
    original = train.train_loop

    def train_loop(ctx, resume_from=None):
        seen["model"] = ctx.denoiser
        return original(ctx, resume_from=resume_from)

    monkeypatch.setattr(train, "train_loop", train_loop)
    return seen


def _storage(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor of the frozen base, quantized parts included, by name."""
    from ditctl.engine.precision import _tensor_parts

    out = {}
    for name, param in module.named_parameters():
        if "lora_" in name:
            continue
        for i, part in enumerate(_tensor_parts(param)):
            out[f"{name.replace('.base_layer', '')}#{i}"] = part.detach().cpu()
    return out


@pytest.fixture(scope="module")
def cached_workspace(tmp_path_factory):
    """Two images on the shipped trained tiny base, precomputed once: a LoRA on a trained base
    learns visibly within a few steps (on a random base with zero-initialised gates the
    adapters barely get a gradient), and the cache keeps the text encoder out of each run."""
    from accelerate.state import AcceleratorState

    from ditctl.precompute import run_precompute
    from ditctl.scaffold import shipped_tiny_model

    ws = make_workspace(tmp_path_factory.mktemp("bp") / "w", shipped_tiny_model(), n_train=2,
                        n_val=0, train={**TRAIN, "train_batch_size": 2, "learning_rate": 2e-2,
                                        "use_precomputed_data": True}, lora=LORA)
    run_precompute(ws, ws.config())
    AcceleratorState._reset_state(reset_partial_state=True)
    return ws


@pytest.mark.slow  # ~10 s each alone (bf16 and the dequantizing layers are slow on a CPU)
@pytest.mark.parametrize("precision", ["bf16", "fp8", "int8", "nf4"])
def test_lora_trains_on_each_base_precision_and_the_base_stays_bit_identical(
        cached_workspace, monkeypatch, precision):
    from ditctl.data.batches import CachedSource
    from ditctl.data.cache import Cache
    from ditctl.data.manifest import read_manifest
    from ditctl.engine.loading import load_denoiser
    from ditctl.engine.precision import QuantizedLinear, quantizer, storage_dtype
    from ditctl.engine.validation import validation_loss
    from ditctl.models.registry import load_family

    ws = cached_workspace
    seen = _capture_model(monkeypatch)
    out = _train(ws, **{"train.max_steps": 6, "eval.holdout_fraction": 0.0,
                        "train.run_name": f"r-{precision}", "lora.base_precision": precision})
    model = seen["model"]
    family = load_family(ws.model_path(ws.config()))
    fresh = family.load_denoiser(storage_dtype(precision), convert=quantizer(precision))
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert bool(quantized) == (precision != "bf16")
    assert all(m.precision == precision for m in quantized)
    trained, expected = _storage(model), _storage(fresh)
    assert trained.keys() == expected.keys()
    for key in expected:
        assert torch.equal(trained[key], expected[key]), key
    # adapters and their optimiser state are fp32 whatever the base is stored as
    checkpoint = out.result.checkpoint
    assert {v.dtype for v in load_file(checkpoint / "lora.safetensors").values()} == {torch.float32}
    moments = [v for k, v in load_file(checkpoint / "optimizer.safetensors").items()
               if v.is_floating_point() and v.dim() > 0]
    assert moments and {v.dtype for v in moments} == {torch.float32}
    assert json.loads((checkpoint / "checkpoint.json").read_text())["base_precision"] == precision
    # it learned: the fixed-noise training loss of the trained model is below the base's
    config = ws.config({"eval.holdout_fraction": 0.0})
    rows, source = read_manifest(ws, "train"), CachedSource(Cache.open(ws, config, family))
    quantiles = (0.3, 0.5, 0.7)
    base = family.load_denoiser(torch.float32, convert=quantizer(precision))
    before = validation_loss(family, base, rows, source, quantiles)["overall"]
    after = validation_loss(family, load_denoiser(family, checkpoint), rows, source,
                            quantiles)["overall"]
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_resume_on_a_quantized_base_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch,
                                                     precision):
    import os
    import signal

    from ditctl.engine.monitor import Monitor

    settings = dict(train={**TRAIN, "train_batch_size": 2, "checkpoint_every": 100,
                           "run_name": "r", "gradient_checkpointing": True},
                    lora={**LORA, "base_precision": precision}, n_train=6)
    straight = make_workspace(tmp_path / "a", tiny_model_dir, **settings)
    full = _train(straight, **{"train.max_steps": 4})
    split = make_workspace(tmp_path / "b", tiny_model_dir, **settings)
    original = Monitor.log_step

    def log_step(self, at, *args, **kwargs):
        original(self, at, *args, **kwargs)
        if at == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Monitor, "log_step", log_step)
    assert _train(split, **{"train.max_steps": 4}).result.steps == 2
    monkeypatch.undo()
    resumed = _train(split, resume="latest", **{"train.max_steps": 4})
    a = load_file(full.result.checkpoint / "lora.safetensors")
    b = load_file(resumed.result.checkpoint / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = lambda ws: (ws.root / "runs" / "r" / "train_log.jsonl").read_text()  # noqa: E731
    losses = lambda ws: [json.loads(l)["train/loss"] for l in log(ws).splitlines()]  # noqa: E731,E741
    assert losses(straight) == losses(split)


@pytest.mark.parametrize("settings, message, hint", [
    ({"lora.use_lora": True, "lora.base_precision": "nf4", "train.mixed_precision": "bf16"},
     r"base_precision = 'nf4' needs a frozen base", "--lora"),
    ({"lora.base_precision": "int8", "train.mixed_precision": "bf16"},
     r"needs a frozen base", "--lora"),
    ({**{f"lora.{k}": v for k, v in LORA.items()}, "lora.base_precision": "bf16"},
     r"mixed_precision = 'no' computes in fp32", "--mixed-precision bf16"),
    ({**{f"lora.{k}": v for k, v in LORA.items()}, "lora.offload_base_blocks": True,
      "train.mixed_precision": "bf16"}, r"needs gradient checkpointing",
     "--gradient-checkpointing"),
    ({"lora.offload_base_blocks": True}, r"needs a frozen base", "--lora"),
])
def test_bad_combinations_are_one_line_errors_naming_the_fix(tmp_path, tiny_model_dir, settings,
                                                             message, hint):
    ws = make_workspace(tmp_path / "w", tiny_model_dir)
    with pytest.raises(ConfigError, match=message) as info:
        run_training(ws, ws.config(settings), dry_run=True)
    assert "\n" not in str(info.value) and hint in info.value.hint


def test_fp8_on_a_torch_without_float8_is_a_one_line_error(tmp_path, tiny_model_dir,
                                                          monkeypatch):
    ws = make_workspace(tmp_path / "w", tiny_model_dir)
    monkeypatch.delattr(torch, "float8_e4m3fn")
    config = ws.config({**{f"lora.{k}": v for k, v in LORA.items()},
                        "lora.base_precision": "fp8", "train.mixed_precision": "bf16"})
    with pytest.raises(ConfigError, match=r"needs torch.float8_e4m3fn") as info:
        run_training(ws, config, dry_run=True)
    assert "\n" not in str(info.value) and "int8 or nf4" in info.value.hint


def test_peft_adapters_stay_fp32_next_to_a_reduced_base(tiny_model_dir):
    """peft casts new adapters to the base layer's dtype; ditctl keeps them fp32 and draws
    them in fp32 (their values do not depend on how the base is stored)."""
    from ditctl.config import build_config
    from ditctl.engine.setup import build_denoiser
    from ditctl.models.registry import load_family

    family = load_family(tiny_model_dir)
    adapters = {}
    for precision in ("auto", "bf16", "fp8", "nf4"):
        config = build_config({"lora": {**LORA, "base_precision": precision},
                               "train": {"mixed_precision": "bf16" if precision != "auto"
                                         else "no"}})
        torch.manual_seed(0)
        model = build_denoiser(family, config)
        lora = {k: v for k, v in model.named_parameters() if "lora_" in k}
        assert lora and all(v.dtype == torch.float32 and v.requires_grad for v in lora.values())
        assert all(not v.requires_grad for k, v in model.named_parameters() if "lora_" not in k)
        adapters[precision] = lora
    # peft's fp32 draw is replayed for reduced bases: the adapters start the same on every base
    for precision in ("bf16", "fp8", "nf4"):
        for key, value in adapters["auto"].items():
            assert torch.equal(value, adapters[precision][key]), (precision, key)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("chunk", [48 * 7, None])
def test_sliced_dequantization_equals_torchaos(precision, chunk):
    """ditctl dequantizes a slice of rows at a time (bounded transients; 7 rows a slice here:
    several slices and a ragged end) or, when the weight fits one slice (None), in place in its
    fp32 buffer, with torchao's own arithmetic: the result is bit-identical to torchao's."""
    from ditctl.engine import precision as module

    torch.manual_seed(0)
    layer = module.QuantizedLinear.from_linear(torch.nn.Linear(48, 300).to(torch.bfloat16),
                                               precision)
    original = module.DEQUANTIZE_CHUNK
    try:
        module.DEQUANTIZE_CHUNK = chunk or original
        for dtype in (torch.bfloat16, torch.float32):
            ours = module.dequantize(layer.weight, precision, dtype)
            if precision == "fp8":
                assert torch.equal(ours, layer.weight.dequantize(output_dtype=dtype))
            else:  # torchao's int8 dequantize() returns the original dtype (bf16)
                assert torch.equal(ours.to(torch.bfloat16), layer.weight.dequantize())
    finally:
        module.DEQUANTIZE_CHUNK = original


@pytest.mark.parametrize("float8", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_table_widening_equals_torchs_conversion_for_every_bit_pattern(float8):
    """On CPUs fp8 widens to fp32 through a 256-entry table: every one of the 256 codes (NaNs
    and infinities included) gives torch's own conversion, bit for bit, in any layout."""
    from ditctl.engine.precision import _to_float32

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = torch.cat([codes, codes.flip(0)]).view(2, 256)  # a 2-D weight, every code twice
    weight = codes.view(getattr(torch, float8))
    for stored in (weight, weight[:, 3:250]):  # contiguous, and a non-contiguous slice
        ours, torchs = _to_float32(stored), stored.to(torch.float32)
        assert ours.dtype == torch.float32 and ours.shape == torchs.shape
        assert torch.equal(ours.view(torch.int32), torchs.view(torch.int32))


@pytest.mark.parametrize("precision", ["fp8", "int8", "nf4"])
def test_a_quantized_layer_gives_the_same_output_with_and_without_autograd(precision):
    """Without an input gradient to compute (sampling) the layer skips its autograd node: the
    output is bit-identical to the training path's, in fp32 and under bf16 autocast, and the
    training path's input gradient is the dequantized weight's."""
    from ditctl.engine.precision import QuantizedLinear

    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 96).to(torch.bfloat16), precision)
    x = torch.randn(5, 64)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                plain = layer(x)
            tracked = layer(x.clone().requires_grad_(True))
        assert tracked.grad_fn is not None and torch.equal(plain, tracked.detach())
    x = x.clone().requires_grad_(True)
    layer(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(5, 96) @ layer.dequantized(torch.float32))


def _parts_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every stored part (data, scales, zero points, NF4's nested state) equal bit for bit."""
    from ditctl.engine.precision import _tensor_parts

    pa, pb = _tensor_parts(a), _tensor_parts(b)
    if len(pa) != len(pb):
        return False
    for x, y in zip(pa, pb):
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.dtype.itemsize == 1:  # float8 has no equality kernel on every build: compare bytes
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        if not torch.equal(x, y):
            return False
    return True


@pytest.mark.parametrize("precision", ["fp8", "int8", "nf4"])
@pytest.mark.parametrize("shape", [(300, 48), (323, 40), (70, 3072)])
def test_quantizing_a_slice_of_rows_at_a_time_equals_the_whole_weight(precision, shape):
    """Streaming quantizes a weight a few rows at a time (bounded memory); the stored result is
    bit-identical to the libraries quantizing the whole weight at once (torchao's quantize_,
    bitsandbytes' Params4bit), including ragged last slices and NF4 blocks that straddle rows
    (40 weights a row: slices are rounded to whole 64-weight blocks) and its double-quantized
    scales (their mean is over every block)."""
    from ditctl.engine.precision import QuantizedLinear, dequantize, quantize_weight

    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    linear = torch.nn.Linear(shape[1], shape[0], bias=False).to(torch.bfloat16)
    linear.weight.data.copy_(weight)
    whole = QuantizedLinear.from_linear(linear, precision).weight
    calls = []

    def rows(start, stop):
        calls.append(stop - start)
        return weight[start:stop].clone()

    sliced = quantize_weight(rows, shape, precision, chunk=shape[1] * 7)
    assert len(calls) > 3 and max(calls) < shape[0]  # several slices, never the whole weight
    assert _parts_equal(whole, sliced)
    assert torch.equal(dequantize(whole, precision, torch.float32),
                       dequantize(sliced, precision, torch.float32))


@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_a_streamed_quantized_base_equals_one_quantized_after_loading(tiny_model_dir, precision,
                                                                      monkeypatch):
    """The family's loader (load_streaming) hands the quantizer each block Linear's weight unread
    and it quantizes it from the file in slices: the model is the one quantizing the loaded
    bf16 model gives."""
    from ditctl.engine import precision as module
    from ditctl.models import streaming
    from ditctl.models.registry import load_family

    family = load_family(tiny_model_dir)
    reference = module.quantize_loaded(family.load_denoiser(torch.bfloat16), precision)
    monkeypatch.setattr(module, "QUANTIZE_CHUNK", 64 * 5)  # a few rows a slice
    read = []
    original = module.QuantizedLinear.from_rows.__func__

    def from_rows(cls, linear, source, precision):
        read.append(source.shape)
        return original(cls, linear, source, precision)

    monkeypatch.setattr(module.QuantizedLinear, "from_rows", classmethod(from_rows))
    slices = []
    read_rows = streaming.read_rows

    def spy(stored, start, stop, *args, **kwargs):
        slices.append((stored.key, stop - start, stored.shape[0]))
        return read_rows(stored, start, stop, *args, **kwargs)

    monkeypatch.setattr(streaming, "read_rows", spy)
    streamed = family.load_denoiser(torch.bfloat16, convert=module.quantizer(precision))
    quantized = {n: m for n, m in reference.named_modules()
                 if isinstance(m, module.QuantizedLinear)}
    assert len(read) == len(quantized) > 0  # every block Linear came through the sliced path
    # each weight was read from the file a few rows at a time, never whole
    assert {key for key, _, _ in slices} == {n + ".weight" for n in quantized}
    assert len(slices) > len(quantized) and all(rows < total for _, rows, total in slices), slices
    for name, layer in streamed.named_modules():
        assert isinstance(layer, module.QuantizedLinear) == (name in quantized), name
        if name in quantized:
            assert _parts_equal(layer.weight, quantized[name].weight), name
    expected = {k: v for k, v in reference.state_dict().items() if ".weight" not in k
                or not any(k.startswith(q + ".") for q in quantized)}
    state = streamed.state_dict()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key
