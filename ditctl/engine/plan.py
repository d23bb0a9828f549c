"""`ditctl train --dry-run`: the plan of a run and its peak memory by component, without
training; and the advice printed when training runs out of memory.

The memory plan is a model of one training step on one device (batch = train_batch_size x
batch_multiplicity, the run's largest bucket, the text encoder's token count), checked against
measurement by `python -m bench memory_plan` (within 10%) and bench/gpu_check.py:

  base weights     frozen base as stored ([lora] base_precision): per linear layer of the
                   blocks bf16 2 B/weight; fp8 1 B + 4 B per output row; int8 1 B + 5 B per row;
                   NF4 0.5 B + 1/64 B (8-bit block scales) + 4/16384 B (their fp32 scales);
                   everything else bf16 (or the compute dtype for `auto`). Full fine-tuning:
                   fp32 (the weights train). With offload_base_blocks only 2 blocks are on the
                   device.
  trainable        fp32 masters (LoRA adapters, or the whole DiT), their fp32 gradients and
                   AdamW's two fp32 moments (8-bit AdamW: 2 B per parameter).
  activations      what autograd saves, counted tensor by tensor from the block (a test checks
                   it with saved_tensors_hooks), per token (T, registers included) and hidden
                   size H under bf16 autocast: 52·T·H bytes (the T x 4H MLP hidden in bf16: 8;
                   the fp32 residual stream entering the three norms: 12; q and k in fp32 for
                   RoPE: 8; cross-attention q in fp32 for its norm: 4; the four LoRA-wrapped
                   inputs in bf16: 8; self-attention q, k, v and output, cross q and output in
                   bf16: 12) + 8·T·head_dim (RoPE tables) + 4·T·(5·heads + 3) (norm and
                   softmax statistics) + the text side (L tokens: 10·L·H + 2·L·D_text) + the
                   LoRA path (2·r per token and target, and a bf16 copy of the adapters).
                   Other adapter kinds ([lora] lora_type): DoRA adds its rescaled base and
                   LoRA outputs (2 x 2 B per token and adapted output feature); LoKr and LoHa
                   have no per-token path but keep each adapted layer's whole update (a bf16
                   out x in matrix) once per step, whatever the batch.
                   With gradient checkpointing only each block's fp32 input (4·T·H) is kept,
                   and one block is recomputed at a time.
  working set      the transients at the peak (the backward of one block): its gradient
                   buffers, 38·T·H bytes (measured once per block kind, see bench/RESULTS.md
                   memory_plan), plus, for a quantized base, its largest weight dequantized
                   to the compute dtype (adaLN, H x 9H: 2 B x 9·H² under bf16).
Under [distributed] strategy = fsdp with N processes (per process): base weights, trainable
masters, gradients and optimiser state / N (in host memory with cpu_offload: `host_offloaded`,
not counted in `total`), plus `gathered_weights`: two blocks' whole weights (the running one
and the prefetched next) and the root's, in the compute dtype, and one block's unsharded fp32
gradients before the reduce-scatter. Activations are per process as under ddp.
With [train] ema_decay > 0 the EMA copy of the trainable weights (fp32, 4 B each) is
`ema_weights` on the device, or `ema_host` (host memory, not in `total`) with ema_on_cpu.
Everything is bytes; `total` is the device's sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..config import Config
from ..models.base import DenoiserShape, ModelFamily
from ..models.blocks import block_names, in_block, repeated_blocks
from .setup import Schedule

# bytes per (token x hidden) of the backward working set of one block under bf16 autocast (its
# gradient buffers: grad of the residual, of q/k/v and the attention output, of the MLP hidden);
# measured on 3072-wide blocks (hidden size of the released 10B model) by `python -m bench memory_plan` (see docs/performance.md)
WORKING_SET_PER_TOKEN_HIDDEN = 38
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
ROW_SCALE_BYTES = {"fp8": 4, "int8": 5}  # fp32 scale (+ int8 zero point) per output row
HOST_MEMORY = ("host_offloaded", "ema_host")  # planned components held outside the device


@dataclass(frozen=True)
class StepShape:
    """What one training step processes on one device."""

    tokens: int  # tokens per sample in every block (image patches and the family's extras)
    text_tokens: int
    batch: int


def _linear_layers(denoiser: torch.nn.Module) -> list[tuple[str, int, int, bool]]:
    """(name, in, out, has bias) of every base linear layer (LoRA wrappers looked through)."""
    from .lora import is_adapter_param

    layers = []
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and not is_adapter_param(name):
            layers.append((name.replace(".base_layer", ""), module.in_features,
                           module.out_features, module.bias is not None))
    return layers


def base_weight_bytes(denoiser: torch.nn.Module, precision: str,
                      blocks_resident: int | None = None, mixed_precision: str = "bf16") -> int:
    """Bytes of the frozen base stored as `precision` (see the module doc). `blocks_resident`:
    only that many blocks' weights count (block streaming)."""
    from .lora import is_adapter_param
    from .precision import QUANTIZED, is_quantized_layer_name, storage_dtype

    blocks = tuple(block_names(denoiser))
    depth = len(blocks) or 1

    other = storage_dtype(precision, mixed_precision).itemsize
    lora = {id(p) for n, p in denoiser.named_parameters() if is_adapter_param(n)}
    linear_weights = set()
    block_bytes = rest_bytes = 0.0
    for name, fan_in, fan_out, bias in _linear_layers(denoiser):
        n = fan_in * fan_out
        if precision in QUANTIZED and is_quantized_layer_name(name, blocks):
            weight = n * NF4_BYTES_PER_WEIGHT if precision == "nf4" else \
                n + ROW_SCALE_BYTES[precision] * fan_out
        else:
            weight = n * other
        size = weight + (fan_out * other if bias else 0)
        if in_block(name, blocks):
            block_bytes += size
        else:
            rest_bytes += size
        linear_weights.add(name)
    for name, param in denoiser.named_parameters():
        module_name = name.rsplit(".", 1)[0].replace(".base_layer", "")
        if id(param) in lora or module_name in linear_weights:
            continue
        size = param.numel() * other
        if in_block(name, blocks):
            block_bytes += size
        else:
            rest_bytes += size
    # buffers are stored too, floating ones cast like every unquantized tensor: SD3's
    # positional table alone is 113 MB in bf16 at its released size
    for name, buffer in denoiser.named_buffers():
        size = buffer.numel() * (other if buffer.is_floating_point() else buffer.element_size())
        if in_block(name, blocks):
            block_bytes += size
        else:
            rest_bytes += size
    if blocks_resident is not None:
        block_bytes *= min(blocks_resident, depth) / depth
    return int(block_bytes + rest_bytes)


class AdapterLayout(NamedTuple):
    """What the adapters of one block (the first) add to a step, as peft built them."""

    params: int = 0  # adapter parameters of the block
    layers: int = 0  # adapted layers of the block
    rank: int = 0  # LoRA/DoRA rank (the low-rank path's width per token)
    delta_elements: int = 0  # LoKr/LoHa: every adapted layer's whole weight update, summed
    dora_outputs: int = 0  # DoRA: the adapted layers' output widths, summed


def lora_layout(denoiser: torch.nn.Module) -> AdapterLayout:
    """The adapter layout of the model's first block (see AdapterLayout): LoRA and DoRA run
    a rank-r path per token; LoKr and LoHa build each layer's whole weight update (out x in)
    and multiply by it, so autograd keeps that matrix (a bf16 copy under autocast) whatever
    the batch; DoRA also keeps the base and LoRA outputs it rescales."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .lora import is_adapter_param

    first = tuple(block_names(denoiser)[:1])
    params = layers = rank = delta = dora = 0
    for name, param in denoiser.named_parameters():
        if is_adapter_param(name) and in_block(name, first):
            params += param.numel()
    for name, module in denoiser.named_modules():
        if not (isinstance(module, BaseTunerLayer) and in_block(name, first)
                and getattr(module, "r", None)):
            continue
        base = module.get_base_layer()
        layers += 1
        rank = next(iter(module.r.values()))
        if hasattr(module, "lora_A"):
            dora += base.out_features if getattr(module, "lora_magnitude_vector", None) else 0
        else:
            delta += base.out_features * base.in_features
    return AdapterLayout(params, layers, rank, delta, dora)


def saved_per_block(config: DenoiserShape, shape: StepShape, precision: str,
                    lora: AdapterLayout = AdapterLayout()) -> int:
    """Bytes autograd saves for one block's backward (see the module doc), per step."""
    hidden, heads = config.hidden_size, config.num_heads
    head_dim = hidden // heads
    t, text, text_dim = shape.tokens, shape.text_tokens, config.text_dim
    lora = AdapterLayout(*lora)
    adapters, adapted, rank = lora.params, lora.layers, lora.rank
    if precision == "no":  # fp32: no casts, so no fp32 duplicates of bf16 tensors
        per_token_hidden = 80
        unit = 4
    else:
        per_token_hidden = 52
        unit = 2
    image = per_token_hidden * t * hidden + 8 * t * head_dim + 4 * t * (5 * heads + 3)
    text_side = 5 * unit * text * hidden + unit * text * text_dim + 4 * text * heads
    lora_side = unit * rank * (adapted - 1) * t + unit * rank * text + unit * adapters \
        if adapted and not lora.delta_elements else 0
    modulation = unit * 12 * hidden
    # DoRA rescales each adapted layer's base and LoRA outputs by the magnitude over the
    # weight norm: both stay for the backward (the magnitude's gradient needs them)
    dora_side = 2 * unit * t * lora.dora_outputs
    per_sample = image + text_side + lora_side + dora_side + modulation
    per_step = unit * lora.delta_elements  # LoKr/LoHa: each layer's update, once per step
    return int(shape.batch * per_sample + per_step)


def activation_bytes(config: DenoiserShape, shape: StepShape, precision: str,
                     checkpointing: bool, lora: AdapterLayout = AdapterLayout()) -> int:
    """Saved activations at the peak: every block's, or (checkpointing) every block's fp32
    input plus one recomputed block's."""
    depth, hidden = config.depth, config.hidden_size
    block = saved_per_block(config, shape, precision, lora)
    if checkpointing:
        return int(shape.batch * 4 * shape.tokens * hidden * depth + block)
    return int(block * depth)


def working_set_bytes(config: DenoiserShape, shape: StepShape, precision: str, base: str) -> int:
    """Transients at the peak: one block's backward buffers and a dequantized weight."""
    from .precision import QUANTIZED

    hidden = config.hidden_size
    unit = 4 if precision == "no" else 2
    grads = WORKING_SET_PER_TOKEN_HIDDEN * unit // 2 * shape.batch * shape.tokens * hidden
    # the largest linear of a block (the family says which), dequantized for its matmul
    dequantized = unit * config.largest_linear if base in QUANTIZED else 0
    return int(grads + dequantized)


def _params(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


def sharded_memory(memory: dict[str, int], denoiser: torch.nn.Module, config: Config,
                   shards: int) -> dict[str, int]:
    """Per-process memory under [distributed] strategy = fsdp with `shards` processes (see
    the module doc): the base, trainable masters, gradients and optimiser state are split
    `shards` ways (held in host memory with cpu_offload), plus what FSDP gathers: the running
    block's and the prefetched next block's whole weights and the root's (in the compute
    dtype), and the running block's unsharded fp32 gradients before they are reduce-scattered."""
    blocks = repeated_blocks(denoiser)
    largest = max((_params(b) for b in blocks), default=0)
    largest_trained = max((_params(b, True) for b in blocks), default=0)
    root = _params(denoiser) - sum(_params(b) for b in blocks)
    unit = 2 if config.train.mixed_precision == "bf16" else 4
    split = {k: -(-memory[k] // shards)
             for k in ("base_weights", "trainable_weights", "gradients", "optimizer")}
    host = sum(split.values()) if config.distributed.cpu_offload else 0
    if host:
        split = dict.fromkeys(split, 0)
    gathered = (2 * largest + root) * unit + largest_trained * 4
    return {**memory, **split, "gathered_weights": gathered, "host_offloaded": host}


def memory_estimate(denoiser: torch.nn.Module, dit_config: DenoiserShape, config: Config,
                    latent_hw: tuple[int, int], text_tokens: int,
                    shards: int = 1) -> tuple[dict[str, int], int]:
    """The planned peak of one training step on one process, by component (bytes), and the
    activations the other gradient-checkpointing setting would give. Under fsdp, `shards`
    processes share the model (`sharded_memory`); `host_offloaded` is host memory, not part
    of the device total."""
    from .setup import base_storage

    train, lora_settings = config.train, config.lora
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    patch = dit_config.patch_size
    shape = StepShape(tokens=(latent_hw[0] // patch) * (latent_hw[1] // patch)
                      + dit_config.extra_tokens,
                      text_tokens=text_tokens,
                      batch=train.train_batch_size * train.batch_multiplicity)
    base = base_storage(config)
    frozen_base = lora_settings.use_lora and lora_settings.train_only_lora
    lora = lora_layout(denoiser) if lora_settings.use_lora else AdapterLayout()
    resident = 2 if lora_settings.offload_base_blocks else None
    if frozen_base:
        weights = base_weight_bytes(denoiser, base, resident, train.mixed_precision)
    else:
        weights = 0  # everything trains: counted as trainable fp32 masters
    other = activation_bytes(dit_config, shape, train.mixed_precision,
                             not train.gradient_checkpointing, lora)
    memory = {
        "base_weights": weights,
        "trainable_weights": trainable * 4,
        "gradients": trainable * 4,
        "optimizer": trainable * (2 if train.use_8bit_adam else 8),
        "activations": activation_bytes(dit_config, shape, train.mixed_precision,
                                        train.gradient_checkpointing, lora),
        "working_set": working_set_bytes(dit_config, shape, train.mixed_precision, base),
    }
    if config.distributed.strategy == "fsdp":
        memory = sharded_memory(memory, denoiser, config, shards)
    if train.ema_decay > 0:  # the fp32 EMA of every trainable weight (engine/ema.py)
        memory["ema_host" if train.ema_on_cpu else "ema_weights"] = trainable * 4
    return memory, other


def device_total(memory: dict[str, int]) -> int:
    """The planned peak on the accelerator: every component but what is held in host memory."""
    return sum(v for k, v in memory.items() if k not in HOST_MEMORY)


def training_plan(schedule: Schedule, denoiser: torch.nn.Module, family: ModelFamily,
                  config: Config, buckets: dict[str, int], world_size: int) -> dict[str, Any]:
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in denoiser.parameters() if not p.requires_grad)
    largest = max(buckets, key=lambda b: int(b.split("x")[0]) * int(b.split("x")[1]))
    w, h = (int(v) for v in largest.split("x"))
    _, latent_h, latent_w = family.latent.latent_shape(w, h)
    text_tokens = family.text_tokens()
    fsdp = config.distributed.strategy == "fsdp"
    memory, other = memory_estimate(denoiser, family.denoiser_shape(), config,
                                    (latent_h, latent_w), text_tokens,
                                    shards=world_size if fsdp else 1)
    from .setup import base_storage

    train = config.train
    return {
        "processes": world_size,
        "strategy": config.distributed.strategy,
        "shards": world_size if fsdp else 1,
        "steps_per_epoch": schedule.steps_per_epoch,
        "total_steps": schedule.total_steps,
        "epochs": round(schedule.total_steps / schedule.steps_per_epoch, 2),
        "effective_batch": schedule.step_batch * train.batch_multiplicity,
        "buckets": buckets,
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "base_precision": base_storage(config),
        "memory_estimate_bytes": {**memory, "total": device_total(memory),
                                  "largest_bucket": largest, "text_tokens": text_tokens,
                                  "gradient_checkpointing": train.gradient_checkpointing,
                                  "activations_if_checkpointing_toggled": other,
                                  "offload_base_blocks": config.lora.offload_base_blocks},
    }


def memory_advice(config: Config) -> list[str]:
    """The memory-saving options this run does not use yet, as exact flags."""
    train, lora = config.train, config.lora
    advice = []
    if train.train_batch_size > 1:
        advice.append(f"--train-batch-size {max(1, train.train_batch_size // 2)} with "
                      f"--gradient-accumulation-steps {train.gradient_accumulation_steps * 2} "
                      "(same effective batch)")
    if not train.gradient_checkpointing:
        advice.append("--gradient-checkpointing")
    if train.mixed_precision == "no":
        advice.append("--mixed-precision bf16")
    if not train.use_8bit_adam:
        advice.append("--use-8bit-adam")
    if train.ema_decay > 0 and not train.ema_on_cpu:
        advice.append("--ema-on-cpu (keep the EMA copy in host memory)")
    if not (lora.use_lora and lora.train_only_lora):
        advice.append("--lora (train only LoRA adapters; the base is frozen)")
    elif lora.base_precision in ("auto", "bf16"):
        advice.append("--base-precision fp8 (or nf4: 4-bit base, QLoRA)")
    elif lora.base_precision in ("fp8", "int8"):
        advice.append("--base-precision nf4 (4-bit base, QLoRA)")
    if lora.use_lora and lora.train_only_lora and not lora.offload_base_blocks:
        advice.append("--offload-base-blocks with --gradient-checkpointing (stream the base's "
                      "blocks from host memory)")
    elif lora.lora_rank > 16:
        advice.append(f"--lora-rank 16 (now {lora.lora_rank})")
    if not train.use_precomputed_data:
        advice.append("`ditctl precompute` and train without --no-use-precomputed-data (no "
                      "VAE/text encoder in memory)")
    return advice
