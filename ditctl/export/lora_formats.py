"""LoRA adapters on disk: the PEFT folder layout, the single-file "comfy" layout and diffusers'
pipeline layout.

PEFT layout (a folder; what peft's `set_peft_model_state_dict` and diffusers'
`load_lora_adapter(folder, weight_name="adapter_model.safetensors", prefix=None)` read):

```
adapter_config.json          peft LoraConfig: r, lora_alpha, target_modules, ...
adapter_model.safetensors    blocks.0.self_attn.qkv.lora_A.weight  [r, in]
                             blocks.0.self_attn.qkv.lora_B.weight  [out, r]
```
Keys carry no `base_model.model.` prefix: they name modules of the bare DiT, as ditctl's
checkpoints, peft's `get_peft_model_state_dict(dit)` and diffusers' `save_lora_adapter` do.

Comfy layout (one safetensors file, the naming community UIs use for LoRA):

| PEFT (+ adapter_config.json)      | comfy                                              |
|-----------------------------------|----------------------------------------------------|
| `{module}.lora_A.weight` [r, in]  | `diffusion_model.{module}.lora_down.weight` [r, in] |
| `{module}.lora_B.weight` [out, r] | `diffusion_model.{module}.lora_up.weight` [out, r]  |
| `lora_alpha` (in the config)      | `diffusion_model.{module}.alpha` (0-dim fp32)       |
For example `blocks.0.self_attn.qkv.lora_A.weight` is
`diffusion_model.blocks.0.self_attn.qkv.lora_down.weight`.

Both mean the same update of the base weight: `W' = W + (alpha / r) · up @ down`. A PEFT adapter
trained with `use_rslora` (scale alpha/sqrt(r)) is written with the alpha that gives the same
scale under the plain convention, `alpha_comfy = scale · r`. `comfy_to_peft` is the inverse: the
rank comes from the tensor shapes, a module without an `.alpha` gets alpha = rank (scale 1, the
common convention), and ranks/alphas that differ between modules go into peft's
`rank_pattern` / `alpha_pattern`.

Diffusers layout (a folder; what `pipe.load_lora_weights(folder)` reads for a family whose
denoiser is a diffusers pipeline component, `ModelFamily.lora_component`, e.g. "transformer"):

```
pytorch_lora_weights.safetensors   transformer.transformer_blocks.0.attn.to_q.lora_A.weight
                                   (the PEFT keys under "<component>.")
                                   metadata lora_adapter_metadata: the LoraConfig fields as
                                   "<component>.r", "<component>.lora_alpha", ...
```
as diffusers' own `save_lora_weights` writes it.

Every file also carries str→str safetensors metadata (base model identity, rank, alpha, targets,
steps, dataset size, ditctl version); the PEFT file additionally carries diffusers'
`lora_adapter_metadata` so that diffusers recovers alpha exactly instead of guessing it.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import ExportError

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
COMFY_PREFIX = "diffusion_model."
DIFFUSERS_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
# diffusers reads the LoraConfig kwargs from this safetensors metadata key
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# the LoraConfig fields diffusers needs to rebuild the adapter exactly
_DIFFUSERS_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias",
                          "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                          "init_lora_weights", "lora_bias")

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_COMFY_KEY = re.compile(r"^diffusion_model\.(?P<module>.+)\.(?P<part>lora_down\.weight|"
                        r"lora_up\.weight|alpha)$")


# --- PEFT ----------------------------------------------------------------------------------------

def adapter_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The module paths a PEFT state dict adapts, sorted; anything but plain LoRA A/B is refused."""
    modules = set()
    for key in state:
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ExportError(f"adapter weight {key!r} is not a plain LoRA A/B matrix "
                              "(DoRA magnitudes and LoRA biases have no comfy/merge mapping)",
                              hint="export this run with --merge-lora instead")
        modules.add(match["module"])
    for module in modules:
        if f"{module}.lora_A.weight" not in state or f"{module}.lora_B.weight" not in state:
            raise ExportError(f"adapter for {module} lacks its lora_A or lora_B weight",
                              hint="the checkpoint is damaged; export another one")
    return sorted(modules)


def write_peft(folder: Path, state: dict[str, torch.Tensor], adapter_config: dict,
               metadata: dict[str, str]) -> list[Path]:
    """Write adapter_config.json + adapter_model.safetensors into `folder`; returns the files."""
    folder = Path(folder)
    lora_config = {k: adapter_config[k] for k in _DIFFUSERS_CONFIG_KEYS if k in adapter_config}
    full_metadata = {"format": "pt", **metadata,
                     DIFFUSERS_METADATA_KEY: json.dumps(lora_config, sort_keys=True)}
    weights = folder / PEFT_WEIGHTS_FILE
    save_file(_contiguous(state), weights, metadata=full_metadata)
    config_file = folder / PEFT_CONFIG_FILE
    config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return [config_file, weights]


def read_peft(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config dict, state dict) of a PEFT adapter folder."""
    folder = Path(folder)
    config_file, weights = folder / PEFT_CONFIG_FILE, folder / PEFT_WEIGHTS_FILE
    if not config_file.is_file() or not weights.is_file():
        raise ExportError(f"{folder} is not a PEFT adapter folder (needs {PEFT_CONFIG_FILE} "
                          f"and {PEFT_WEIGHTS_FILE})", hint="pass the folder an export wrote")
    return json.loads(config_file.read_text()), load_file(weights)


# --- diffusers ------------------------------------------------------------------------------------

def write_diffusers(folder: Path, state: dict[str, torch.Tensor], adapter_config: dict,
                    metadata: dict[str, str], component: str) -> list[Path]:
    """Write pytorch_lora_weights.safetensors with `component`-prefixed keys and diffusers'
    prefixed adapter metadata; returns the files."""
    prefix = component + "."
    lora_config = {prefix + k: adapter_config[k] for k in _DIFFUSERS_CONFIG_KEYS
                   if k in adapter_config}
    weights = Path(folder) / DIFFUSERS_WEIGHTS_FILE
    save_file(_contiguous({prefix + k: v for k, v in state.items()}), weights,
              metadata={"format": "pt", **metadata,
                        DIFFUSERS_METADATA_KEY: json.dumps(lora_config, sort_keys=True)})
    return [weights]


def read_diffusers(folder: Path, component: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LoraConfig kwargs, PEFT state dict) of a diffusers-layout LoRA folder."""
    weights = Path(folder) / DIFFUSERS_WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{folder} is not a diffusers LoRA folder (needs "
                          f"{DIFFUSERS_WEIGHTS_FILE})", hint="pass the folder an export wrote")
    prefix = component + "."
    state = load_file(weights)
    foreign = [k for k in state if not k.startswith(prefix)]
    if foreign:
        raise ExportError(f"{weights}: keys outside {component!r}, e.g. {foreign[0]!r}",
                          hint="only LoRAs of the denoiser can be read")
    config = json.loads(read_metadata(weights).get(DIFFUSERS_METADATA_KEY, "{}"))
    return ({k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)},
            {k[len(prefix):]: v for k, v in state.items()})


# --- comfy ---------------------------------------------------------------------------------------

def peft_to_comfy(state: dict[str, torch.Tensor],
                  alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """PEFT state dict -> comfy state dict; `alphas[module]` is the comfy alpha (scale · rank)."""
    out: dict[str, torch.Tensor] = {}
    for module in adapter_modules(state):
        if module not in alphas:
            raise ExportError(f"no LoRA alpha known for {module}",
                              hint="the adapter config does not match its weights")
        out[f"{COMFY_PREFIX}{module}.lora_down.weight"] = state[f"{module}.lora_A.weight"]
        out[f"{COMFY_PREFIX}{module}.lora_up.weight"] = state[f"{module}.lora_B.weight"]
        out[f"{COMFY_PREFIX}{module}.alpha"] = torch.tensor(float(alphas[module]),
                                                            dtype=torch.float32)
    return out


def comfy_to_peft(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Comfy state dict -> (LoraConfig kwargs, PEFT state dict); the inverse of `peft_to_comfy`."""
    peft_state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, value in state.items():
        match = _COMFY_KEY.match(key)
        if match is None:
            raise ExportError(f"{key!r} is not a comfy LoRA key (diffusion_model.<module>"
                              ".lora_down.weight / .lora_up.weight / .alpha)",
                              hint="only LoRA files for the diffusion model can be read")
        module, part = match["module"], match["part"]
        if part == "alpha":
            alphas[module] = float(value.item())
        else:
            peft_state[f"{module}.lora_{'A' if part == 'lora_down.weight' else 'B'}.weight"] = value
    modules = adapter_modules(peft_state)
    ranks = {m: int(peft_state[f"{m}.lora_A.weight"].shape[0]) for m in modules}
    alphas = {m: alphas.get(m, float(ranks[m])) for m in modules}
    rank, rank_pattern = _common_value(ranks)
    alpha, alpha_pattern = _common_value(alphas)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": modules,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False}
    return config, peft_state


def _common_value(per_module: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The most common value, and a peft pattern (escaped full module path) for the others."""
    common = collections.Counter(per_module.values()).most_common(1)[0][0]
    # peft matches pattern keys as regexes against module paths: escape the dots
    return common, {re.escape(m): v for m, v in sorted(per_module.items()) if v != common}


def write_comfy(file: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    save_file(_contiguous(state), file, metadata=metadata)
    return Path(file)


def read_comfy(file: Path) -> dict[str, torch.Tensor]:
    return load_file(file)


def read_metadata(file: Path) -> dict[str, str]:
    """The str→str metadata of a safetensors file."""
    with safe_open(str(file), framework="pt") as handle:
        return dict(handle.metadata() or {})


# --- adapters on a live model --------------------------------------------------------------------

def inject_adapter(denoiser: torch.nn.Module, adapter_config,
                   state: dict[str, torch.Tensor]) -> None:
    """Add a saved adapter (config: a peft LoraConfig or its kwargs) to a freshly loaded base
    denoiser, through peft's public API only."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config = adapter_config
    if isinstance(adapter_config, dict):
        known = LoraConfig.__dataclass_fields__
        config = LoraConfig(**{k: v for k, v in adapter_config.items() if k in known})
    inject_adapter_in_model(config, denoiser, adapter_name="default")
    result = set_peft_model_state_dict(denoiser, state, adapter_name="default")
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    missing = [k for k in (getattr(result, "missing_keys", None) or []) if "lora_" in k]
    if unexpected or missing:
        raise ExportError(f"adapter does not fit the base model: unexpected {unexpected[:3]}, "
                          f"missing {missing[:3]}",
                          hint="the export was written for another base model")


def comfy_alphas(denoiser: torch.nn.Module) -> dict[str, float]:
    """Per adapted module of a live model: the comfy alpha (scale · rank) that reproduces its
    peft scaling; the plain lora_alpha when the scale is the usual alpha / rank."""
    from peft.tuners.lora import LoraLayer

    alphas = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            rank, alpha = module.r["default"], float(module.lora_alpha["default"])
            scale = float(module.scaling["default"])
            alphas[name] = alpha if scale == alpha / rank else scale * rank
    return alphas


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}
