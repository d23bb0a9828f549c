"""FLUX LoRA files in the ecosystem's layouts: diffusers' and kohya/ComfyUI's.

diffusers (the PEFT-format export): `pytorch_lora_weights.safetensors` holding
`transformer.<module>.lora_A.weight` / `.lora_B.weight`, its LoraConfig in the metadata under
`transformer.` keys: what `FluxPipeline.load_lora_weights(folder)` reads.

kohya / ComfyUI (the single-file export): Black Forest Labs' module names with `.` as `_`,
`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha`.
BFL fuses layers diffusers keeps apart, so their LoRAs are fused exactly:

| diffusers (transformer_blocks.i / single_transformer_blocks.i) | BFL (double_blocks.i / single_blocks.i) |
|---------------------------------------------------------------|------------------------------------------|
| attn.to_q, attn.to_k, attn.to_v                                | img_attn.qkv                             |
| attn.add_q_proj, attn.add_k_proj, attn.add_v_proj              | txt_attn.qkv                             |
| attn.to_out.0 / attn.to_add_out                                | img_attn.proj / txt_attn.proj            |
| ff.net.0.proj, ff.net.2 / ff_context.net.0.proj, ff_context.net.2 | img_mlp.0, img_mlp.2 / txt_mlp.0, txt_mlp.2 |
| norm1.linear / norm1_context.linear                            | img_mod.lin / txt_mod.lin                |
| single: attn.to_q, attn.to_k, attn.to_v, proj_mlp              | linear1                                  |
| single: proj_out / norm.linear                                 | linear2 / modulation.lin                 |

The final layer (`proj_out` outside the blocks, BFL's final_layer.linear) is left out:
diffusers' kohya converter loses its LoRA (its keys come out without the `transformer.`
prefix), so no target name reaches it (`proj_out` is not a target candidate).

A fused layer's output is its parts' outputs stacked, so the fused LoRA is the parts' downs
concatenated (rank = the ranks summed) and their ups placed block-diagonally: up @ down is
exactly the stacked per-part updates. A part without an adapter gets a zero block of the same
rank (diffusers' kohya converter then recognises the block-diagonal form and splits it back
into per-part LoRAs); alpha = scale x fused rank when every part has the same scale, else the
scales are folded into the ups and alpha = fused rank (scale 1).
"""

from __future__ import annotations

import re

import torch

from ..errors import ExportError
from .base import LoraLayout

DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE),
          "single_transformer_blocks": ("single_blocks", SINGLE)}
PREFIX = "lora_unet_"

_BLOCK_MODULE = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\."
                           r"(?P<index>\d+)\.(?P<rest>.+)$")
_KOHYA_KEY = re.compile(r"^lora_unet_(?P<name>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|"
                        r"alpha)$")
_KOHYA_BLOCK = re.compile(r"^(?P<kind>double_blocks|single_blocks)_(?P<index>\d+)_(?P<rest>.+)$")


def kohya_target(module: str) -> tuple[str, tuple[str, ...]]:
    """(kohya name, the diffusers module paths fused into it, in order) of a diffusers module."""
    match = _BLOCK_MODULE.match(module)
    if match:
        bfl_kind, table = BLOCKS[match["kind"]]
        for name, parts in table.items():
            if match["rest"] in parts:
                prefix = f"{match['kind']}.{match['index']}."
                return f"{bfl_kind}_{match['index']}_{name}", tuple(prefix + p for p in parts)
    raise ExportError(f"the kohya layout has no counterpart for the adapted module {module}",
                      hint="export the diffusers (peft) format, or train other target modules")


def diffusers_parts(name: str) -> tuple[str, ...]:
    """The diffusers module paths a kohya name (without `lora_unet_`) stands for."""
    match = _KOHYA_BLOCK.match(name)
    if match:
        kind = next(k for k, (bfl, _) in BLOCKS.items() if bfl == match["kind"])
        table = BLOCKS[kind][1]
        if match["rest"] in table:
            return tuple(f"{kind}.{match['index']}.{p}" for p in table[match["rest"]])
    raise ExportError(f"{PREFIX}{name} is not a FLUX LoRA module this reader knows",
                      hint="only LoRAs of the FLUX transformer's linear layers can be read")


def _out_features(denoiser: torch.nn.Module, module: str) -> int:
    return int(denoiser.get_submodule(module).out_features)


def peft_to_kohya(state: dict[str, torch.Tensor], alphas: dict[str, float],
                  denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT state (bare module paths) -> kohya state; `alphas[module]` is scale x rank."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    groups: dict[str, tuple[tuple[str, ...], list[str]]] = {}
    for module in modules:
        name, parts = kohya_target(module)
        groups.setdefault(name, (parts, []))[1].append(module)
    out: dict[str, torch.Tensor] = {}
    for name, (parts, present) in sorted(groups.items()):
        downs = {m: state[f"{m}.lora_A.weight"] for m in present}
        ups = {m: state[f"{m}.lora_B.weight"] for m in present}
        scales = {m: alphas[m] / downs[m].shape[0] for m in present}
        if len(parts) == 1:
            (module,) = present
            down, up, alpha = downs[module], ups[module], alphas[module]
        else:
            ranks = {downs[m].shape[0] for m in present}
            pad_rank = ranks.pop() if len(ranks) == 1 else None
            common = len(set(scales.values())) == 1
            like = downs[present[0]]
            down_blocks, up_blocks = [], []
            for part in parts:
                if part in downs:
                    down_blocks.append(downs[part])
                    up = ups[part]
                    up_blocks.append(up if common else up * scales[part])
                elif pad_rank is not None:  # a zero block keeps the block-diagonal form
                    down_blocks.append(like.new_zeros(pad_rank, like.shape[1]))
                    up_blocks.append(like.new_zeros(_out_features(denoiser, part), pad_rank))
                else:
                    up_blocks.append(like.new_zeros(_out_features(denoiser, part), 0))
            down = torch.cat(down_blocks)
            up = torch.block_diag(*up_blocks)
            rank = down.shape[0]
            alpha = next(iter(scales.values())) * rank if common else float(rank)
        key = PREFIX + name
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def kohya_to_peft(state: dict[str, torch.Tensor], denoiser: torch.nn.Module
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya state -> (PEFT state, alpha per module): the inverse of `peft_to_kohya` (a fused
    LoRA in block-diagonal form splits back into per-part LoRAs; any other fused LoRA gives
    each part the whole down and its rows of the up, which is the same update)."""
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _KOHYA_KEY.match(key)
        if match is None:
            raise ExportError(f"{key!r} is not a kohya FLUX LoRA key (lora_unet_<module>"
                              ".lora_down.weight / .lora_up.weight / .alpha)",
                              hint="only LoRA files for the FLUX transformer can be read")
        entries.setdefault(match["name"], {})[match["part"]] = value
    peft: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for name, entry in sorted(entries.items()):
        if "lora_down.weight" not in entry or "lora_up.weight" not in entry:
            raise ExportError(f"{PREFIX}{name} lacks its lora_down or lora_up weight",
                              hint="the LoRA file is damaged; export it again")
        down, up = entry["lora_down.weight"], entry["lora_up.weight"]
        rank = down.shape[0]
        alpha = float(entry["alpha"].item()) if "alpha" in entry else float(rank)
        parts = diffusers_parts(name)
        if len(parts) == 1:
            peft[f"{parts[0]}.lora_A.weight"], peft[f"{parts[0]}.lora_B.weight"] = down, up
            alphas[parts[0]] = alpha
            continue
        dims = [_out_features(denoiser, p) for p in parts]
        rows = torch.split(up, dims)
        split = rank % len(parts) == 0 and _block_diagonal(rows, rank // len(parts))
        for i, (part, part_up) in enumerate(zip(parts, rows)):
            if split:
                size = rank // len(parts)
                part_down = down[i * size:(i + 1) * size]
                part_up = part_up[:, i * size:(i + 1) * size]
                if not part_down.any():
                    continue  # a zero block written for a part without an adapter
                alphas[part] = alpha / rank * size
            else:
                part_down = down
                alphas[part] = alpha
            peft[f"{part}.lora_A.weight"] = part_down.contiguous()
            peft[f"{part}.lora_B.weight"] = part_up.contiguous()
    return peft, alphas


def _block_diagonal(rows: tuple[torch.Tensor, ...], size: int) -> bool:
    for i, block in enumerate(rows):
        outside = torch.cat([block[:, :i * size], block[:, (i + 1) * size:]], dim=1)
        if outside.any():
            return False
    return True


FLUX_LORA_LAYOUT = LoraLayout(
    weights_file="pytorch_lora_weights.safetensors", key_prefix="transformer.",
    to_single_file=peft_to_kohya, from_single_file=kohya_to_peft, pipeline_class="FluxPipeline",
    single_file_keys="Black Forest Labs' module names, "
                     "`lora_unet_double_blocks_0_img_attn_qkv.lora_down/lora_up.weight/.alpha`")
