"""Exports in F-Lite's own format: the merged pipeline is exactly F-Lite's layout (its
model_index.json, dit_model/ config keys), loads through diffusers as F-Lite's reference
FLitePipeline does and into F-Lite's own DiT class without missing weights, and comfy LoRA
files keep F-Lite modules' per-module ranks. (The export behaviour shared by every family is in
tests/test_export.py and tests/models/test_family_conformance.py.)"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditctl.engine.loading import load_denoiser
from ditctl.errors import ExportError
from ditctl.export import export_checkpoint, lora_formats
from ditctl.models.flite import MODEL_INDEX
from ditctl.models.registry import load_family
from tests.test_export import make_workspace, relative_error

FLITE_DIT_KEYS = {"in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                  "cross_attn_input_size", "residual_v", "train_bias_and_rms", "use_rope",
                  "gradient_checkpoint", "dynamic_softmax_temperature", "rope_base"}


def inputs(seed: int = 7, size: int = 12, tokens: int = 5):
    """The DiT's own inputs: latents, T5 states (the tiny model's width 32) and timesteps."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 16, size, size, generator=gen),
            torch.randn(3, tokens, 32, generator=gen), torch.tensor([0.1, 0.5, 0.9]))


@torch.no_grad()
def run_model(model):
    x, context, t = inputs()
    return model.float().eval()(x, context, t)


@pytest.fixture()
def lora_ws(tmp_path, tiny_model_dir):
    """A workspace on the tiny (F-Lite) model with one LoRA run's checkpoint at step 10."""
    return make_workspace(tmp_path / "ws", tiny_model_dir)


def test_pipeline_layout_is_exactly_flite(lora_ws, tiny_model_dir):
    ws, _ = lora_ws
    result = export_checkpoint(ws, ws.config({"export.merge_lora": True}))
    index = json.loads((result.path / "model_index.json").read_text())
    assert index == MODEL_INDEX  # the tiny base writes MODEL_INDEX: class names carried exactly
    config = json.loads((result.path / "dit_model" / "config.json").read_text())
    assert set(config) == FLITE_DIT_KEYS | {"_class_name", "_diffusers_version"}
    assert config["_class_name"] == "DiT"
    base_config = json.loads((tiny_model_dir / "dit_model" / "config.json").read_text())
    assert {k: config[k] for k in FLITE_DIT_KEYS} == {k: base_config[k] for k in FLITE_DIT_KEYS}
    # encoders hard-linked (same inode) from the base model
    for component in ("text_encoder", "tokenizer", "vae"):
        assert not (result.path / component).is_symlink()
        for file in (tiny_model_dir / component).iterdir():
            assert os.stat(result.path / component / file.name).st_ino == os.stat(file).st_ino
    weights = load_file(result.path / "dit_model" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert sorted(p.name for p in result.path.iterdir()) == [
        "README.md", "dit_model", "model_index.json", "text_encoder", "tokenizer", "vae"]


def test_pipeline_loads_through_diffusers_as_the_reference_pipeline_does(lora_ws, tiny_model_dir,
                                                                        monkeypatch):
    """F-Lite's FLitePipeline is a plain DiffusionPipeline: from_pretrained reads model_index.json
    and loads dit_model with `f_lite.model.DiT`. Here a stand-in `f_lite.model` module serves
    ditctl's DiT (same class name and config keys), as the reference package would."""
    import sys
    import types

    from diffusers import DiffusionPipeline
    from diffusers.models.modeling_utils import ModelMixin

    from ditctl.models.flite_dit import DiT

    ws, checkpoint = lora_ws
    result = export_checkpoint(ws, ws.config({"export.merge_lora": True, "export.dtype": "fp32",
                                              "export.max_shard_size": "100KB"}))
    f_lite, f_lite_model = types.ModuleType("f_lite"), types.ModuleType("f_lite.model")
    f_lite_model.ModelMixin, f_lite_model.DiT, f_lite.model = ModelMixin, DiT, f_lite_model
    monkeypatch.setitem(sys.modules, "f_lite", f_lite)
    monkeypatch.setitem(sys.modules, "f_lite.model", f_lite_model)

    class FLitePipeline(DiffusionPipeline):
        def __init__(self, dit_model, vae, text_encoder, tokenizer):
            super().__init__()
            self.register_modules(dit_model=dit_model, vae=vae, text_encoder=text_encoder,
                                  tokenizer=tokenizer)

    pipeline = FLitePipeline.from_pretrained(str(result.path))
    assert type(pipeline.dit_model) is DiT
    assert type(pipeline.vae).__name__ == "AutoencoderKL"
    assert type(pipeline.text_encoder).__name__ == "T5EncoderModel"
    expected = run_model(load_denoiser(load_family(tiny_model_dir), checkpoint))
    assert relative_error(run_model(pipeline.dit_model), expected) < 1e-5


def flite_reference_dit_class():
    """A stand-in of F-Lite's own `f_lite.model.DiT` as far as loading goes: its RoPE module
    registers `freqs_hw_cos` / `freqs_hw_sin` [512, 512, head_dim/2] as persistent buffers and
    loads them like any other state (ditctl's DiT recomputes them and drops them on load)."""
    from torch import nn

    from ditctl.models.flite_dit import DiT as DitctlDiT, RoPE2D

    class BufferedRoPE(RoPE2D):
        def __init__(self, head_dim: int, base: float):
            super().__init__(head_dim, base)
            for name in ("freqs_hw_cos", "freqs_hw_sin"):  # filled by the checkpoint, or NaN
                self.register_buffer(name, torch.full((512, 512, head_dim // 2), float("nan")))

        def _save_to_state_dict(self, *args):
            nn.Module._save_to_state_dict(self, *args)

        def _load_from_state_dict(self, *args, **kwargs):
            nn.Module._load_from_state_dict(self, *args, **kwargs)

    class DiT(DitctlDiT):  # the class name model_index.json names
        @functools.wraps(DitctlDiT.__init__)  # diffusers reads the config keys off the signature
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rope = BufferedRoPE(self.config.hidden_size // self.config.num_heads,
                                     self.config.rope_base)

    return DiT


class CollectMessages(logging.Handler):
    """Keeps the text of every log record it receives."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def strip_rope_buffers(dit_dir: Path) -> None:
    """Rewrite a single-file dit_model/ without the RoPE buffers (as ditctl wrote it before)."""
    from safetensors.torch import save_file

    file = dit_dir / "diffusion_pytorch_model.safetensors"
    weights = {k: v for k, v in load_file(file).items() if not k.startswith("rope.")}
    save_file(weights, file, metadata={"format": "pt"})


def test_export_loads_into_flites_dit_class_without_missing_weights(lora_ws, tiny_model_dir,
                                                                     tmp_path):
    """F-Lite's DiT registers its RoPE tables as persistent buffers, so its from_pretrained
    reports them missing ("Some weights of DiT were not initialized ... TRAIN this model") unless
    the folder holds them. An export holds them, with the values F-Lite computes."""
    from diffusers.utils import logging as diffusers_logging

    from tests.models.test_flite_dit import reference_rope_buffers

    reference_dit = flite_reference_dit_class()
    ws, _ = lora_ws
    result = export_checkpoint(ws, ws.config({"export.merge_lora": True, "export.dtype": "bf16"}))
    dit_dir = result.path / "dit_model"
    config = json.loads((dit_dir / "config.json").read_text())
    expected = reference_rope_buffers(config)

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    handler = CollectMessages()
    captured = handler.messages
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        for low_cpu_mem_usage in (True, False):
            model, info = reference_dit.from_pretrained(
                dit_dir, output_loading_info=True, low_cpu_mem_usage=low_cpu_mem_usage)
            assert info["missing_keys"] == [] and info["unexpected_keys"] == []
            for name, table in expected.items():  # bf16 export: F-Lite's fp32 values, cast
                torch.testing.assert_close(model.state_dict()[name],
                                           table.to(torch.bfloat16).float(), rtol=0, atol=0,
                                           msg=name)
        assert not [m for m in captured if "not initialized" in m], captured

        # The control: the same folder without the buffers is what F-Lite complains about.
        copy = tmp_path / "without-rope"
        shutil.copytree(dit_dir, copy)
        strip_rope_buffers(copy)
        _, info = reference_dit.from_pretrained(copy, output_loading_info=True,
                                                low_cpu_mem_usage=False)
        assert sorted(info["missing_keys"]) == ["rope.freqs_hw_cos", "rope.freqs_hw_sin"]
        assert [m for m in captured if "not initialized" in m and "rope.freqs_hw_sin" in m]
        # ... and ditctl still loads it, predicting exactly what the full export predicts
        torch.testing.assert_close(run_model(load_ditctl_dit(copy)),
                                   run_model(load_ditctl_dit(dit_dir)), rtol=0, atol=0)
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
        diffusers_logging.set_verbosity(verbosity)


def load_ditctl_dit(folder: Path):
    from ditctl.models.flite_dit import DiT

    return DiT.from_pretrained(folder)


def test_comfy_to_peft_keeps_per_module_ranks_and_alphas(tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(0)
    state = {}
    for module, rank, out in (("blocks.0.self_attn.qkv", 4, 192), ("blocks.0.cross_attn.q", 4, 64),
                              ("blocks.1.self_attn.qkv", 2, 192)):
        state[f"{module}.lora_A.weight"] = torch.randn(rank, 64, generator=gen)
        state[f"{module}.lora_B.weight"] = torch.randn(out, rank, generator=gen)
    comfy = lora_formats.peft_to_comfy(state, {"blocks.0.self_attn.qkv": 8.0,
                                               "blocks.0.cross_attn.q": 8.0,
                                               "blocks.1.self_attn.qkv": 1.0})
    config, back = lora_formats.comfy_to_peft(comfy)
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["rank_pattern"] == {r"blocks\.1\.self_attn\.qkv": 2}
    assert config["alpha_pattern"] == {r"blocks\.1\.self_attn\.qkv": 1.0}
    dit = load_family(tiny_model_dir).load_denoiser()
    lora_formats.inject_adapter(dit, config, back)  # peft reads the escaped patterns
    layers = {n: m for n, m in dit.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == sorted(lora_formats.adapter_modules(state))
    assert layers["blocks.1.self_attn.qkv"].scaling["default"] == 1.0 / 2
    assert layers["blocks.0.self_attn.qkv"].scaling["default"] == 8.0 / 4
    del comfy["diffusion_model.blocks.1.self_attn.qkv.alpha"]  # no alpha: scale 1 (alpha = rank)
    config, _ = lora_formats.comfy_to_peft(comfy)
    assert config["alpha_pattern"] == {r"blocks\.1\.self_attn\.qkv": 2.0}
    with pytest.raises(ExportError, match="not a comfy LoRA key"):
        lora_formats.comfy_to_peft({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)})
