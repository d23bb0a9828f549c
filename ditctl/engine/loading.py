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
                    verify_checkpoint)
from .lora import adapter_from_config_dict, add_lora, load_adapter_weights, set_lora_scale


def load_denoiser(family: ModelFamily, checkpoint: Path | None = None, *, lora_scale: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The base denoiser with a checkpoint's trained weights applied (LoRA and/or full)."""
    denoiser = family.load_denoiser(torch.float32)
    if checkpoint is not None:
        apply_checkpoint(family, denoiser, Path(checkpoint))
        set_lora_scale(denoiser, lora_scale)
    return denoiser.to(dtype).eval().requires_grad_(False)


def apply_checkpoint(family: ModelFamily, denoiser: torch.nn.Module, checkpoint: Path) -> dict:
    """Load a checkpoint's trained weights into a freshly loaded base denoiser; returns its meta.

    The checkpoint's files are checked against its manifest first, and what is loaded is what
    the manifest says it holds: a checkpoint holding no trained weights is refused, never
    taken for the base model."""
    checkpoint = Path(checkpoint)
    meta = verify_checkpoint(checkpoint)
    has_adapter = checkpoint_holds(checkpoint, meta, ADAPTER_CONFIG)
    has_trainable = checkpoint_holds(checkpoint, meta, TRAINABLE_FILE)
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
        load_adapter_weights(denoiser, checkpoint)
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
