"""Adapters on the denoiser, through peft: LoRA, DoRA, LoKr and LoHa ([lora] lora_type).

ditctl adds adapters the way the reference trainers do (peft's own configs: `LoraConfig`
with gaussian init, `LoraConfig(use_dora=True)`, `LoKrConfig`, `LoHaConfig`; adapter name
"default") so that what it saves is plain PEFT: `adapter_config.json` (its `peft_type` says
which kind) plus a safetensors state dict with keys like `blocks.0.self_attn.qkv.lora_A.weight`
(`.lora_magnitude_vector` for DoRA, `.lokr_w1` / `.lokr_w2` for LoKr, `.hada_w1_a` ... for
LoHa).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from ..config import LoraConfig as LoraSettings
from ..config import parse_patterns
from ..errors import CheckpointError, ConfigError
from ..models.base import LoraLayout
from ..runs import ADAPTER_CONFIG, LORA_WEIGHTS

ADAPTER = "default"
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's name for the weights of a saved adapter
# what peft names every trained adapter tensor of each kind (DoRA's magnitude is
# `lora_magnitude_vector`): a parameter is an adapter's exactly when its name holds one
ADAPTER_PARAM_MARKERS = ("lora_", "lokr_", "hada_")


def is_adapter_param(name: str) -> bool:
    """Whether a parameter (or state-dict key) of an adapted denoiser belongs to an adapter."""
    return any(marker in name for marker in ADAPTER_PARAM_MARKERS)


def peft_config(settings: LoraSettings, candidates: tuple[str, ...],
                defaults: tuple[str, ...] = ()):
    """The peft config for our [lora] settings: its lora_type's kind, on [lora]
    lora_target_modules, or when it is empty the family's default targets (`defaults`);
    unknown target names are a config error."""
    targets = tuple(settings.lora_target_modules) or tuple(defaults)
    if not targets:
        raise ConfigError("[lora] lora_target_modules is empty and the model family names no "
                          "default targets", hint=f"set it to some of: {', '.join(candidates)}")
    unknown = [t for t in targets if t not in candidates]
    if unknown:
        raise ConfigError(f"[lora] lora_target_modules: unknown module(s) {', '.join(unknown)}",
                          hint=f"valid names: {', '.join(candidates)}")
    common = dict(r=settings.lora_rank, target_modules=list(targets),
                  rank_pattern=parse_patterns(settings.lora_rank_pattern, int),
                  alpha_pattern=parse_patterns(settings.lora_alpha_pattern, float))
    kind = settings.lora_type
    if kind in ("lora", "dora"):
        from peft import LoraConfig

        return LoraConfig(lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          init_lora_weights="gaussian", use_dora=kind == "dora", **common)
    if kind == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(alpha=settings.lora_alpha, decompose_factor=settings.lokr_factor,
                          **common)
    from peft import LoHaConfig

    return LoHaConfig(alpha=settings.lora_alpha, **common)


def adapter_kind(config) -> str:
    """lora / dora / lokr / loha of a peft config object or its saved dict."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    peft_type = str(get("peft_type", "LORA")).rsplit(".", 1)[-1].upper()
    if peft_type == "LORA":
        return "dora" if get("use_dora", False) else "lora"
    kind = {"LOKR": "lokr", "LOHA": "loha"}.get(peft_type)
    if kind is None:
        raise CheckpointError(f"adapter of peft type {peft_type} is not one ditctl trains",
                              hint="ditctl loads LoRA, DoRA, LoKr and LoHa adapters")
    return kind


def adapter_alpha(config) -> float:
    """The scaling numerator of a peft config or its dict (LoRA's lora_alpha, LyCORIS' alpha)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return float(get("lora_alpha") if adapter_kind(config) in ("lora", "dora") else get("alpha"))


def _adapter_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in module.named_parameters()
            if is_adapter_param(name) and f".{ADAPTER}" in f".{name}"]


def _adapter_layers(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer) and _adapter_params(m)]


def add_lora(denoiser: torch.nn.Module, config) -> None:
    """Inject adapters (a peft config, any kind) into `denoiser` in place, in fp32 whatever
    the base is stored as.

    peft moves each new adapter to its base layer's dtype: bf16 next to a bf16 base (fp8 next
    to an fp8 one). Adapters are trained weights and keep fp32 masters, so any adapter that did
    not stay fp32 is cast back and initialised again in fp32 (peft's own init, so the result
    is what an fp32 base gets: peft draws every adapter on the CPU in fp32 before it casts, so
    replaying those draws from the same RNG state gives exactly those values)."""
    import warnings

    from peft import inject_adapter_in_model

    rng = torch.random.get_rng_state()
    with warnings.catch_warnings():
        # peft warns that LoRA layers on torchao weights cannot merge: ditctl never merges into
        # a quantized base (exports merge into a freshly loaded full-precision one)
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        try:
            inject_adapter_in_model(config, denoiser, adapter_name=ADAPTER)
        except (TypeError, ValueError, NotImplementedError) as exc:
            raise ConfigError(f"[lora] lora_type = {adapter_kind(config)!r} cannot adapt this "
                              f"model's layers: {str(exc).splitlines()[0]}",
                              hint="use lora_type = 'lora', or a full-precision base "
                                   "(--base-precision auto)") from exc
    denoiser.peft_config = {ADAPTER: config}  # as peft/diffusers record it on the model
    layers = _adapter_layers(denoiser)
    adapters = [p for m in layers for p in _adapter_params(m)]
    if all(p.dtype == torch.float32 for p in adapters) or any(p.is_meta for p in adapters):
        return
    torch.random.set_rng_state(rng)  # replay peft's draws, in its order, on the CPU in fp32
    for module in layers:
        _init_in_fp32(module, config)


def _init_in_fp32(module: torch.nn.Module, config) -> None:
    """Cast one layer's adapter to fp32 and run peft's init of it again, on the CPU, drawing
    what `update_layer` draws in the order it draws it."""
    device = _adapter_params(module)[0].device
    kind = adapter_kind(config)
    if kind in ("lora", "dora"):  # nn.Linear's own init of A, then of B, then peft's LoRA init
        module.lora_A[ADAPTER].to("cpu", torch.float32).reset_parameters()
        module.lora_B[ADAPTER].to("cpu", torch.float32).reset_parameters()
        module.reset_lora_parameters(ADAPTER, config.init_lora_weights)
        module.lora_A[ADAPTER].to(device)
        module.lora_B[ADAPTER].to(device)
        if kind == "dora":  # the magnitude: the row norms of the base weight, now in fp32
            from peft.tuners.lora.variants import DoraLinearVariant

            names = module.adapter_layer_names  # init re-registers the magnitude's name
            del module.lora_magnitude_vector[ADAPTER]
            DoraLinearVariant.init(module, adapter_name=ADAPTER)
            module.adapter_layer_names = names
            module.lora_magnitude_vector[ADAPTER].to(device, torch.float32)
        return
    for name in module.adapter_layer_names:  # LyCORIS: parameters created empty, then init
        holder = getattr(module, name)
        if ADAPTER in holder:
            holder[ADAPTER] = torch.nn.Parameter(holder[ADAPTER].detach().to("cpu", torch.float32))
    if config.init_weights == "lycoris":
        module.reset_adapter_parameters_lycoris_way(ADAPTER)
    elif config.init_weights:
        module.reset_adapter_parameters(ADAPTER)
    else:
        module.reset_adapter_parameters_random(ADAPTER)
    for name in module.adapter_layer_names:
        holder = getattr(module, name)
        if ADAPTER in holder:
            holder[ADAPTER] = torch.nn.Parameter(holder[ADAPTER].detach().to(device))


def has_lora(denoiser: torch.nn.Module) -> bool:
    """Whether the denoiser carries an adapter (of any kind)."""
    return any(is_adapter_param(name) for name, _ in denoiser.named_parameters())


def freeze_base(denoiser: torch.nn.Module) -> None:
    """Train only the adapters: every non-adapter parameter stops requiring gradients."""
    for name, param in denoiser.named_parameters():
        param.requires_grad_(is_adapter_param(name))


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
    saved_kind, live_kind = adapter_kind(saved_config), adapter_kind(live)
    if saved_kind != live_kind:
        raise CheckpointError(f"the adapter in {folder} is a {saved_kind} adapter, this run "
                              f"trains {live_kind}",
                              hint=f"set [lora] lora_type = {saved_kind!r} to continue it")
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
    """The peft config (LoraConfig, LoKrConfig or LoHaConfig, by its `peft_type`) rebuilt
    from a saved adapter_config.json; keys this peft version does not know are dropped."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    cls = {"lora": LoraConfig, "dora": LoraConfig, "lokr": LoKrConfig,
           "loha": LoHaConfig}[adapter_kind(saved)]
    known = cls.__dataclass_fields__
    kwargs = {k: v for k, v in saved.items() if k in known and k != "peft_type"}
    if cls is LoraConfig:  # checkpoints written before DoRA existed lack the init key
        kwargs.setdefault("init_lora_weights", "gaussian")
    kwargs["inference_mode"] = False
    return cls(**kwargs)


def set_lora_scale(denoiser: torch.nn.Module, scale: float) -> None:
    """Scale every adapter's contribution (1.0: as trained); every kind's layer knows how."""
    if scale == 1.0:
        return
    for module in _adapter_layers(denoiser):
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
