"""The one way to get a denoiser for inference: base, base + LoRA, or fine-tuned weights.

`sample`, `eval`, `export` and samples during training all load through here, so a checkpoint
means the same thing everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..models.base import ModelFamily
from ..runs import (ADAPTER_CONFIG, LORA_WEIGHTS, TRAINABLE_FILE, checkpoint_holds,
                    holds_trained_base, is_sharded, verify_checkpoint)
from .ema import EMA_WEIGHTS, WEIGHT_CHOICES, apply_ema_weights
from .lora import adapter_from_config_dict, add_lora, load_adapter_weights, set_lora_scale
from .precision import QUANTIZED, QuantizedLinear, quantizer


def load_denoiser(family: ModelFamily, checkpoint: Path | None = None, *, lora_scale: float = 1.0,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  as_trained: bool = True, weights: str = "auto") -> torch.nn.Module:
    """The base denoiser with a checkpoint's trained weights applied (LoRA and/or full),
    streamed straight into `dtype` on `device`.

    `weights` picks which trained weights (see `checkpoint_weights`): "ema" the checkpoint's
    moving average, "raw" the weights as last trained, "auto" the EMA when it has one.

    A LoRA trained on a quantized base (checkpoint.json `base_precision` fp8/int8/nf4) gets that
    same base, quantized the same way (bit for bit what it trained against, and what fits the
    GPU it trained on), unless `as_trained=False`: then the base is read in `dtype` (exports
    merge into a full-precision base, never into quantized weights)."""
    precision = trained_base_precision(checkpoint) if as_trained else None
    denoiser = family.load_denoiser(dtype, device, convert=quantizer(precision))
    if checkpoint is not None:
        apply_checkpoint(family, denoiser, Path(checkpoint))
        if checkpoint_weights(Path(checkpoint), weights) == "ema":
            apply_ema_weights(denoiser, Path(checkpoint))
        set_lora_scale(denoiser, lora_scale)
    cast_unquantized(denoiser, dtype)  # adapters and trained weights arrive as fp32
    return denoiser.eval().requires_grad_(False)


def has_ema(checkpoint: Path | None) -> bool:
    """Whether a checkpoint holds an EMA of its trained weights (per its manifest)."""
    if checkpoint is None:
        return False
    return checkpoint_holds(Path(checkpoint), verify_checkpoint(Path(checkpoint)), EMA_WEIGHTS)


def checkpoint_weights(checkpoint: Path | None, choice: str = "auto") -> str | None:
    """Which weights `choice` (auto / ema / raw) means for `checkpoint`: "ema" or "raw"; None
    for the base model (no checkpoint). Asking for ema of a checkpoint without one is an error."""
    if choice not in WEIGHT_CHOICES:
        raise CheckpointError(f"--weights {choice!r}: must be one of {', '.join(WEIGHT_CHOICES)}")
    if checkpoint is None:
        return None
    present = has_ema(checkpoint)
    if choice == "ema" and not present:
        raise CheckpointError(f"--weights ema: {checkpoint} holds no EMA (the run had "
                              "[train] ema_decay = 0)", hint="use --weights raw (or auto)")
    if choice == "auto":
        return "ema" if present else "raw"
    return choice


def trained_base_precision(checkpoint: Path | None) -> str | None:
    """The quantized storage (fp8/int8/nf4) a checkpoint's LoRA trained against, else None
    (after checking the checkpoint's files against its manifest: before any weight loads)."""
    if checkpoint is None:
        return None
    precision = verify_checkpoint(Path(checkpoint)).get("base_precision")
    return precision if precision in QUANTIZED else None


def cast_unquantized(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module.to(dtype)` for every floating-point tensor except quantized weights (which
    `.to(dtype)` would dequantize or refuse)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            if isinstance(sub, QuantizedLinear) and name == "weight":
                continue
            sub._parameters[name] = torch.nn.Parameter(param.detach().to(dtype),
                                                      requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                sub._buffers[name] = buffer.to(dtype)
    return module


def apply_checkpoint(family: ModelFamily, denoiser: torch.nn.Module, checkpoint: Path) -> dict:
    """Load a checkpoint's trained weights into a freshly loaded base denoiser; returns its meta.

    The checkpoint's files are checked against its manifest first, and what is loaded is what
    the manifest says it holds: a checkpoint holding no trained weights is refused, never
    taken for the base model."""
    checkpoint = Path(checkpoint)
    meta = verify_checkpoint(checkpoint)
    sharded = is_sharded(meta)
    has_adapter = checkpoint_holds(checkpoint, meta, ADAPTER_CONFIG)
    has_trainable = holds_trained_base(checkpoint, meta)
    if not (has_adapter or has_trainable):
        raise CheckpointError(f"{checkpoint} holds no trained weights (neither {ADAPTER_CONFIG} "
                              f"+ {LORA_WEIGHTS} nor {TRAINABLE_FILE})",
                              hint="pick another checkpoint (ditctl status lists them)")
    base = meta.get("base_identity")
    if base and base != family.denoiser_identity():
        raise CheckpointError(f"{checkpoint} was trained on another base model ({base}), "
                              f"not {family.path} ({family.denoiser_identity()})",
                              hint="use the workspace whose model it was trained on, or set "
                                   "[model] pretrained_model_path to that model")
    if has_adapter:
        saved = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
        add_lora(denoiser, adapter_from_config_dict(saved))
        if not sharded:
            load_adapter_weights(denoiser, checkpoint)
    if sharded:  # an FSDP run's shards, reassembled piece by piece into the whole weights
        from .sharded_checkpoint import load_trained_weights

        load_trained_weights(checkpoint, denoiser)
        return meta
    trainable = checkpoint / TRAINABLE_FILE
    if has_trainable:
        state = load_file(trainable)
        own = dict(denoiser.named_parameters())
        unknown = [k for k in state if k not in own]
        if unknown:
            raise CheckpointError(f"{trainable} has weights this model lacks: {unknown[:3]}",
                                  hint="it was trained on another model configuration")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
    return meta
