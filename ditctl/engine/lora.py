"""LoRA adapters on the denoiser, through peft.

ditctl adds adapters the way the reference trainers do (peft `LoraConfig`, gaussian init,
adapter name "default") so that what it saves is plain PEFT: `adapter_config.json` plus a safetensors
state dict with keys like `blocks.0.self_attn.qkv.lora_A.weight`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from ..config import LoraConfig as LoraSettings
from ..errors import CheckpointError, ConfigError
from ..models.base import LoraLayout
from ..runs import ADAPTER_CONFIG, LORA_WEIGHTS

ADAPTER = "default"
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's name for the weights of a saved adapter


def peft_config(settings: LoraSettings, candidates: tuple[str, ...],
                defaults: tuple[str, ...] = ()):
    """The peft LoraConfig for our [lora] settings: [lora] lora_target_modules, or when it is
    empty the family's default targets (`defaults`); unknown target names are a config error."""
    from peft import LoraConfig

    targets = tuple(settings.lora_target_modules) or tuple(defaults)
    if not targets:
        raise ConfigError("[lora] lora_target_modules is empty and the model family names no "
                          "default targets", hint=f"set it to some of: {', '.join(candidates)}")
    unknown = [t for t in targets if t not in candidates]
    if unknown:
        raise ConfigError(f"[lora] lora_target_modules: unknown module(s) {', '.join(unknown)}",
                          hint=f"valid names: {', '.join(candidates)}")
    return LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                      lora_dropout=settings.lora_dropout, target_modules=list(targets),
                      init_lora_weights="gaussian")


def add_lora(denoiser: torch.nn.Module, config) -> None:
    """Inject adapters (peft LoraConfig `config`) into `denoiser` in place, in fp32 whatever
    the base is stored as.

    peft moves each new adapter to its base layer's dtype: bf16 next to a bf16 base (fp8 next
    to an fp8 one). Adapters are trained weights and keep fp32 masters, so any adapter that did
    not stay fp32 is cast back and initialised again in fp32 (peft's own init, so the result
    is what an fp32 base gets: peft draws every adapter on the CPU in fp32 before it casts, so
    replaying those draws from the same RNG state gives exactly those values)."""
    import warnings

    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    rng = torch.random.get_rng_state()
    with warnings.catch_warnings():
        # peft warns that LoRA layers on torchao weights cannot merge: ditctl never merges into
        # a quantized base (exports merge into a freshly loaded full-precision one)
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        inject_adapter_in_model(config, denoiser, adapter_name=ADAPTER)
    denoiser.peft_config = {ADAPTER: config}  # as peft/diffusers record it on the model
    layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
    adapters = [p for m in layers for p in (*m.lora_A[ADAPTER].parameters(),
                                            *m.lora_B[ADAPTER].parameters())]
    if all(p.dtype == torch.float32 for p in adapters) or any(p.is_meta for p in adapters):
        return
    torch.random.set_rng_state(rng)  # replay peft's draws, in its order, on the CPU in fp32:
    for module in layers:  # nn.Linear's own init of A, then of B, then peft's LoRA init
        device = module.lora_A[ADAPTER].weight.device
        module.lora_A[ADAPTER].to("cpu", torch.float32).reset_parameters()
        module.lora_B[ADAPTER].to("cpu", torch.float32).reset_parameters()
        module.reset_lora_parameters(ADAPTER, config.init_lora_weights)
        module.lora_A[ADAPTER].to(device)
        module.lora_B[ADAPTER].to(device)


def has_lora(denoiser: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in denoiser.named_parameters())


def freeze_base(denoiser: torch.nn.Module) -> None:
    """Train only the adapters: every non-LoRA parameter stops requiring gradients."""
    for name, param in denoiser.named_parameters():
        param.requires_grad_("lora_" in name)


def peft_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in PEFT's saved format (adapter name removed from the keys)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous()
            for k, v in get_peft_model_state_dict(denoiser, adapter_name=ADAPTER).items()}


def adapter_config_dict(denoiser: torch.nn.Module) -> dict:
    config = denoiser.peft_config[ADAPTER].to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def read_adapter(folder: Path, layout: LoraLayout | None = None
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, PEFT state dict) from a folder holding adapter_config.json and
    adapter_model.safetensors (an export) or lora.safetensors (a checkpoint), or an export in
    the family's LoRA layout (`layout`: its weights file, keys under its prefix)."""
    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if layout is not None and (folder / layout.weights_file).is_file():
        prefix = layout.key_prefix
        state = load_file(folder / layout.weights_file)
        if config_file.is_file() and all(k.startswith(prefix) for k in state):
            return (json.loads(config_file.read_text()),
                    {k[len(prefix):]: v for k, v in state.items()})
    weights = next((folder / n for n in (PEFT_WEIGHTS, LORA_WEIGHTS)
                    if (folder / n).is_file()), None)
    if not config_file.is_file() or weights is None:
        raise CheckpointError(f"{folder} holds no LoRA adapter ({ADAPTER_CONFIG} + "
                              f"{PEFT_WEIGHTS})",
                              hint="pass a ditctl checkpoint folder or a PEFT adapter folder")
    return json.loads(config_file.read_text()), load_file(weights)


def load_adapter_weights(denoiser: torch.nn.Module, folder: Path,
                         layout: LoraLayout | None = None) -> None:
    """Load saved LoRA weights into a denoiser that already has matching adapters (`layout`:
    the family's, for an export in its own LoRA layout)."""
    from peft import set_peft_model_state_dict

    saved_config, state = read_adapter(folder, layout)
    live = denoiser.peft_config[ADAPTER]
    mismatch = []
    if int(saved_config.get("r", -1)) != live.r:
        mismatch.append(f"rank {saved_config.get('r')} vs {live.r}")
    if sorted(saved_config.get("target_modules") or []) != sorted(live.target_modules):
        mismatch.append(f"targets {sorted(saved_config.get('target_modules') or [])} vs "
                        f"{sorted(live.target_modules)}")
    if mismatch:
        raise CheckpointError(f"LoRA in {folder} does not fit this run: " + "; ".join(mismatch),
                              hint="set [lora] lora_rank / lora_target_modules to the saved "
                                   "adapter's values")
    result = set_peft_model_state_dict(denoiser, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise CheckpointError(f"LoRA in {folder} has weights for modules this model lacks: "
                              f"{unexpected[:3]}", hint="it was trained on another model")


def adapter_from_config_dict(saved: dict):
    """A peft LoraConfig rebuilt from a saved adapter_config.json."""
    from peft import LoraConfig

    return LoraConfig(r=int(saved["r"]), lora_alpha=saved["lora_alpha"],
                      lora_dropout=saved.get("lora_dropout", 0.0),
                      target_modules=list(saved["target_modules"]),
                      init_lora_weights=saved.get("init_lora_weights", "gaussian"))


def set_lora_scale(denoiser: torch.nn.Module, scale: float) -> None:
    """Scale every adapter's contribution (1.0: as trained)."""
    from peft.tuners.lora import LoraLayer

    if scale == 1.0:
        return
    for module in denoiser.modules():
        if isinstance(module, LoraLayer):
            module.scale_layer(scale)


@contextmanager
def adapters_disabled(denoiser: torch.nn.Module) -> Iterator[None]:
    """The base model's predictions: every adapter skipped for the duration (nothing changes,
    requires_grad included)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, value in zip(layers, previous):
            m._disable_adapters = value
