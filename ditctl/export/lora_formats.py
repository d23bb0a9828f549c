"""LoRA adapters on disk: the PEFT folder layout and the single-file "comfy" layout.

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

The other adapter kinds ([lora] lora_type) in the comfy layout, as LyCORIS and ComfyUI name
them (PEFT's keys without the `diffusion_model.` prefix are the same names):

| kind | comfy keys per module                                      | update of W               |
|------|------------------------------------------------------------|---------------------------|
| lokr | `lokr_w1` [a, c], `lokr_w2` [b, d] or `lokr_w2_a` [b, r] + `lokr_w2_b` [r, d], `alpha` | `kron(w1, w2) · s` |
| loha | `hada_w1_a` [out, r], `hada_w1_b`, `hada_w2_a`, `hada_w2_b` [r, in], `alpha`     | `(w1_a@w1_b) ⊙ (w2_a@w2_b) · s` |

with `s = alpha / r` (r: `lokr_w2_b`'s or `hada_w1_b`'s first side). A LoKr whose w2 is whole
has no r in the file, and ComfyUI then applies `s = 1`: its peft scale is folded into `lokr_w1`
and no `alpha` is written. DoRA has no exact single-file form: ComfyUI's `dora_scale` rescales by
the norm of the base weight alone where peft uses the norm of the adapted weight, so the file
would not predict what the run predicts; a DoRA run exports as PEFT or merged.

A family whose ecosystem names LoRA files otherwise says so in its `lora_layout`
(`models.base.LoraLayout`): the PEFT folder's weights file name and key prefix (diffusers'
pipeline layout: `pytorch_lora_weights.safetensors` with `transformer.<module>` keys, which
`load_lora_weights` reads), and its own single-file layout in place of comfy's (converters to
and from the PEFT state). This module holds no family's names.

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
from ..models.base import LoraLayout

DEFAULT_LAYOUT = LoraLayout()

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
COMFY_PREFIX = "diffusion_model."
# diffusers reads the LoraConfig kwargs from this safetensors metadata key
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# the LoraConfig fields diffusers needs to rebuild the adapter exactly
_DIFFUSERS_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias",
                          "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                          "init_lora_weights", "lora_bias")

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_COMFY_KEY = re.compile(r"^diffusion_model\.(?P<module>.+)\.(?P<part>lora_down\.weight|"
                        r"lora_up\.weight|alpha)$")
# every adapter kind's tensors in a PEFT state dict (peft drops the adapter name from them)
_LYCORIS_PARTS = {"lokr": ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
                  "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                          r"lora_magnitude_vector|lokr_w1|lokr_w2|lokr_w2_a|lokr_w2_b|"
                          r"hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b)$")
_COMFY_LYCORIS_KEY = re.compile(r"^diffusion_model\.(?P<module>.+)\.(?P<part>lokr_w1|lokr_w2|"
                                r"lokr_w2_a|lokr_w2_b|hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|"
                                r"alpha)$")
DORA_NO_SINGLE_FILE = ("a DoRA adapter has no exact single-file (comfy/kohya) form: those "
                       "loaders' dora_scale normalises by the base weight alone, peft by the "
                       "adapted one, so the file would not predict what the run predicts")


# --- PEFT ----------------------------------------------------------------------------------------

def state_kind(state: dict[str, torch.Tensor]) -> str:
    """lora / dora / lokr / loha: the adapter kind of a PEFT state dict, from its key names."""
    parts = set()
    for key in state:
        match = _ADAPTER_KEY.match(key)
        if match is None:
            raise ExportError(f"adapter weight {key!r} is not part of a LoRA, DoRA, LoKr or "
                              "LoHa adapter as ditctl trains them (LoRA biases, LoKr's "
                              "decomposed w1 and CP-decomposed tensors have no mapping here)",
                              hint="export this run with --merge-lora instead")
        parts.add(match["part"])
    if "lora_magnitude_vector" in parts:
        return "dora"
    return next((kind for kind, names in _LYCORIS_PARTS.items() if parts & set(names)), "lora")


def adapter_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The module paths a PEFT state dict of a plain LoRA adapts, sorted; every other kind is
    refused (the single-file converters of plain LoRA call this)."""
    kind = state_kind(state)
    if kind == "dora":
        raise ExportError(DORA_NO_SINGLE_FILE, hint="export with --format peft or --merge-lora")
    if kind != "lora":
        raise ExportError(f"this single-file layout holds plain LoRA (lora_down/lora_up) only; "
                          f"the adapter is {kind}", hint="export with --format peft or "
                          "--merge-lora")
    modules = set()
    for key in state:
        match = _PEFT_KEY.match(key)
        modules.add(match["module"])
    for module in modules:
        if f"{module}.lora_A.weight" not in state or f"{module}.lora_B.weight" not in state:
            raise ExportError(f"adapter for {module} lacks its lora_A or lora_B weight",
                              hint="the checkpoint is damaged; export another one")
    return sorted(modules)


def peft_layout(layout: LoraLayout, kind: str) -> LoraLayout:
    """The layout a PEFT-format export of a `kind` adapter is written in: the family's for
    LoRA and DoRA (diffusers' `load_lora_weights` reads both), the bare PEFT layout for LoKr
    and LoHa, which diffusers does not load (peft does)."""
    return layout if kind in ("lora", "dora") else DEFAULT_LAYOUT


def write_peft(folder: Path, state: dict[str, torch.Tensor], adapter_config: dict,
               metadata: dict[str, str], layout: LoraLayout = DEFAULT_LAYOUT) -> list[Path]:
    """Write adapter_config.json + the layout's weights file (adapter_model.safetensors by
    default) into `folder`; returns the files."""
    folder = Path(folder)
    prefix = layout.key_prefix
    full_metadata = {"format": "pt", **metadata}
    if str(adapter_config.get("peft_type", "LORA")).upper().endswith("LORA"):
        # diffusers rebuilds LoRA (and DoRA) adapters from this; it loads no LyCORIS kinds
        lora_config = {prefix + k: adapter_config[k] for k in _DIFFUSERS_CONFIG_KEYS
                       if k in adapter_config}
        full_metadata[DIFFUSERS_METADATA_KEY] = json.dumps(lora_config, sort_keys=True)
    weights = folder / layout.weights_file
    save_file(_contiguous({prefix + k: v for k, v in state.items()}), weights,
              metadata=full_metadata)
    config_file = folder / PEFT_CONFIG_FILE
    config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return [config_file, weights]


def read_peft(folder: Path, layout: LoraLayout = DEFAULT_LAYOUT
              ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config dict, state dict with bare module paths) of a PEFT adapter folder."""
    folder = Path(folder)
    config_file, weights = folder / PEFT_CONFIG_FILE, folder / layout.weights_file
    if not config_file.is_file() or not weights.is_file():
        raise ExportError(f"{folder} is not a PEFT adapter folder (needs {PEFT_CONFIG_FILE} "
                          f"and {layout.weights_file})", hint="pass the folder an export wrote")
    prefix = layout.key_prefix
    state = load_file(weights)
    stray = [k for k in state if not k.startswith(prefix)]
    if stray:
        raise ExportError(f"{weights}: key {stray[0]!r} lacks the prefix {prefix!r}",
                          hint="pass the folder an export wrote")
    return json.loads(config_file.read_text()), {k[len(prefix):]: v for k, v in state.items()}


# --- comfy ---------------------------------------------------------------------------------------

def peft_to_comfy(state: dict[str, torch.Tensor], alphas: dict[str, float],
                  ranks: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """PEFT state dict -> comfy state dict; `alphas[module]` is the comfy alpha (scale · rank),
    `ranks[module]` the adapter's rank (LoKr/LoHa: peft's r)."""
    kind = state_kind(state)
    if kind in _LYCORIS_PARTS:
        return _lycoris_to_comfy(state, alphas, ranks or {})
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


def _grouped(state: dict[str, torch.Tensor], pattern: re.Pattern) -> dict[str, dict]:
    modules: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in state.items():
        match = pattern.match(key)
        if match is None:
            raise ExportError(f"adapter weight {key!r} does not belong to a LoKr or LoHa "
                              "adapter as ditctl writes them",
                              hint="export this run with --merge-lora instead")
        modules[match["module"]][match["part"]] = value
    return dict(sorted(modules.items()))


def _lycoris_to_comfy(state: dict[str, torch.Tensor], alphas: dict[str, float],
                      ranks: dict[str, int]) -> dict[str, torch.Tensor]:
    """LoKr / LoHa PEFT state -> comfy keys (the module doc's table)."""
    out: dict[str, torch.Tensor] = {}
    for module, parts in _grouped(state, _ADAPTER_KEY).items():
        if module not in alphas or module not in ranks:
            raise ExportError(f"no alpha or rank known for {module}",
                              hint="the adapter config does not match its weights")
        parts = dict(parts)
        if "lokr_w1" in parts and "lokr_w2" in parts:  # no r in the file: ComfyUI scales by 1
            parts["lokr_w1"] = parts["lokr_w1"] * (alphas[module] / ranks[module])
        else:
            out[f"{COMFY_PREFIX}{module}.alpha"] = torch.tensor(float(alphas[module]),
                                                                dtype=torch.float32)
        for part, value in parts.items():
            out[f"{COMFY_PREFIX}{module}.{part}"] = value
    return out


def _comfy_lycoris_to_peft(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Comfy LoKr / LoHa state -> (config kwargs, PEFT state): the inverse of
    `_lycoris_to_comfy` (peft rebuilds the same shapes: the LoKr factor is read back from
    them)."""
    from peft.tuners.lokr.layer import factorization

    peft_state: dict[str, torch.Tensor] = {}
    ranks: dict[str, float] = {}
    alphas: dict[str, float] = {}
    shapes = {}
    lokr = False
    for module, parts in _grouped(state, _COMFY_LYCORIS_KEY).items():
        alpha = parts.pop("alpha", None)
        for part, value in parts.items():
            peft_state[f"{module}.{part}"] = value
        if "hada_w1_b" in parts:
            ranks[module] = int(parts["hada_w1_b"].shape[0])
        else:
            lokr = True
            w1 = parts["lokr_w1"]
            w2_out, w2_in = ((parts["lokr_w2"].shape[0], parts["lokr_w2"].shape[1])
                             if "lokr_w2" in parts else
                             (parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1]))
            shapes[module] = ((int(w1.shape[0]), int(w2_out)), (int(w1.shape[1]), int(w2_in)))
            # a whole w2: any r of at least half its larger side keeps it whole in peft
            ranks[module] = (int(parts["lokr_w2_b"].shape[0]) if "lokr_w2_b" in parts
                             else max(int(w2_out), int(w2_in)))
        alphas[module] = float(alpha.item()) if alpha is not None else float(ranks[module])
    rank, rank_pattern = _common_value(ranks)
    alpha, alpha_pattern = _common_value(alphas)
    config = {"peft_type": "LOKR" if lokr else "LOHA", "r": int(rank), "alpha": alpha,
              "target_modules": sorted({m for m in ranks}), "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern}
    if lokr:
        def fits(factor: int) -> bool:
            return all(factorization(out_l * out_k, factor) == (out_l, out_k) and
                       factorization(in_m * in_n, factor) == (in_m, in_n)
                       for (out_l, out_k), (in_m, in_n) in shapes.values())

        first = next(iter(shapes.values()))
        factor = next((f for f in (-1, first[0][0], first[0][1]) if fits(f)), None)
        if factor is None:
            raise ExportError("the LoKr factors of this file differ between modules",
                              hint="read files of one [lora] lokr_factor")
        config["decompose_factor"] = factor
    return config, peft_state


def comfy_to_peft(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Comfy state dict -> (adapter config kwargs, PEFT state dict); the inverse of
    `peft_to_comfy`."""
    if any(_COMFY_LYCORIS_KEY.match(k) and not k.endswith(".alpha") for k in state):
        return _comfy_lycoris_to_peft(state)
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
    return lora_config_kwargs(peft_state, alphas), peft_state


def lora_config_kwargs(peft_state: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict:
    """LoraConfig kwargs of a PEFT state whose modules have the comfy alphas `alphas` (scale x
    rank; a module without one: alpha = rank)."""
    modules = adapter_modules(peft_state)
    ranks = {m: int(peft_state[f"{m}.lora_A.weight"].shape[0]) for m in modules}
    alphas = {m: alphas.get(m, float(ranks[m])) for m in modules}
    rank, rank_pattern = _common_value(ranks)
    alpha, alpha_pattern = _common_value(alphas)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": modules,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False}
    return config


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


def to_single_file(state: dict[str, torch.Tensor], alphas: dict[str, float],
                   denoiser: torch.nn.Module, layout: LoraLayout = DEFAULT_LAYOUT
                   ) -> dict[str, torch.Tensor]:
    """The single-file state of a PEFT state: the layout's own, else the comfy layout."""
    if layout.to_single_file is None:
        return peft_to_comfy(state, alphas, adapter_ranks(denoiser))
    kind = state_kind(state)
    if kind in _LYCORIS_PARTS:  # the family's layout fuses and renames plain LoRA pairs only
        raise ExportError(f"this model family's single-file layout ({layout.single_file_keys}) "
                          f"holds plain LoRA only, not a {kind} adapter",
                          hint="export with --format peft or --merge-lora")
    adapter_modules(state)  # plain LoRA A/B only (DoRA: its own error)
    return layout.to_single_file(state, alphas, denoiser)


def from_single_file(state: dict[str, torch.Tensor], denoiser: torch.nn.Module,
                     layout: LoraLayout = DEFAULT_LAYOUT) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LoraConfig kwargs, PEFT state) of a single-file state: the inverse of `to_single_file`."""
    if layout.from_single_file is None:
        return comfy_to_peft(state)
    peft_state, alphas = layout.from_single_file(state, denoiser)
    return lora_config_kwargs(peft_state, alphas), peft_state


def read_metadata(file: Path) -> dict[str, str]:
    """The str→str metadata of a safetensors file."""
    with safe_open(str(file), framework="pt") as handle:
        return dict(handle.metadata() or {})


# --- adapters on a live model --------------------------------------------------------------------

def inject_adapter(denoiser: torch.nn.Module, adapter_config,
                   state: dict[str, torch.Tensor]) -> None:
    """Add a saved adapter (config: a peft config of any kind ditctl trains, or its kwargs
    with `peft_type`) to a freshly loaded base denoiser, through peft's public API only."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from ..engine.lora import adapter_from_config_dict, is_adapter_param

    config = adapter_config
    if isinstance(adapter_config, dict):
        config = adapter_from_config_dict(adapter_config)
    inject_adapter_in_model(config, denoiser, adapter_name="default")
    result = set_peft_model_state_dict(denoiser, state, adapter_name="default")
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    missing = [k for k in (getattr(result, "missing_keys", None) or []) if is_adapter_param(k)]
    if unexpected or missing:
        raise ExportError(f"adapter does not fit the base model: unexpected {unexpected[:3]}, "
                          f"missing {missing[:3]}",
                          hint="the export was written for another base model")


def comfy_alphas(denoiser: torch.nn.Module) -> dict[str, float]:
    """Per adapted module of a live model: the comfy alpha (scale · rank) that reproduces its
    peft scaling; the plain alpha when the scale is the usual alpha / rank."""
    alphas = {}
    for name, module, rank, scale in _scaled_layers(denoiser):
        alpha = float(module.lora_alpha["default"] if hasattr(module, "lora_alpha")
                      else module.alpha["default"])
        alphas[name] = alpha if scale == alpha / rank else scale * rank
    return alphas


def adapter_ranks(denoiser: torch.nn.Module) -> dict[str, int]:
    """Per adapted module of a live model: its adapter's rank (peft's r)."""
    return {name: rank for name, _, rank, _ in _scaled_layers(denoiser)}


def _scaled_layers(denoiser: torch.nn.Module):
    """(name, layer, rank, scale) of every layer holding the "default" adapter, any kind."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in denoiser.named_modules():
        if isinstance(module, BaseTunerLayer) and "default" in (getattr(module, "r", None) or {}):
            yield name, module, int(module.r["default"]), float(module.scaling["default"])


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}
