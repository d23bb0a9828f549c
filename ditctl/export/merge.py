"""Fold LoRA adapters into the base weights, leaving a plain denoiser.

Each peft LoRA layer merges itself (`W += scale · B @ A`, peft's own arithmetic, so rsLoRA and
per-module rank/alpha patterns are honoured) and is then replaced by its base layer. The result
has exactly the base model's modules and state-dict keys, so it saves in the native layout.
Merging happens in whatever dtype the model is in: callers load it in fp32 and cast afterwards.
"""

from __future__ import annotations

import torch

from ..errors import ExportError


def merge_lora(denoiser: torch.nn.Module) -> torch.nn.Module:
    """Merge every LoRA adapter of `denoiser` into its base layer, in place; returns it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(denoiser.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        try:
            module.merge(safe_merge=True)  # safe_merge: refuse NaN/inf instead of writing them
        except ValueError as exc:
            raise ExportError(f"merging the LoRA into {name} failed: {exc}",
                              hint="this checkpoint holds non-finite LoRA weights; export an "
                                   "earlier one") from exc
        parent_name, _, child = name.rpartition(".")
        parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
        setattr(parent, child, module.get_base_layer())
    # peft/diffusers record adapters here; a merged model has none left
    denoiser.__dict__.pop("peft_config", None)
    denoiser.__dict__.pop("_hf_peft_config_loaded", None)
    return denoiser
