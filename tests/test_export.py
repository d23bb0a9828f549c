"""ditctl.export: merged/full pipelines, PEFT and comfy adapters, parity, atomicity, model card."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from ditctl.config import Config
from ditctl.engine.loading import load_denoiser
from ditctl.errors import ExportError
from ditctl.export import export_checkpoint
from ditctl.export import exporter, lora_formats, merge
from ditctl.export.model_card import find_licence, hub_id
from ditctl.export.parity import compare
from ditctl.models.flite import MODEL_INDEX, FLiteFamily
from ditctl.models.registry import load_family
from ditctl.scaffold import init_workspace
from tests.conftest import write_test_checkpoint

FLITE_DIT_KEYS = {"in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                  "cross_attn_input_size", "residual_v", "train_bias_and_rms", "use_rope",
                  "gradient_checkpoint", "dynamic_softmax_temperature", "rope_base"}
RUN = "run-a"


def make_workspace(root: Path, model_dir: Path, *, lora: bool = True, run: str = RUN,
                   model_path_in_run: bool = False):
    """A workspace on the tiny model with one run and its checkpoint at step 10."""
    ws = init_workspace(root, model=str(model_dir)).workspace
    run_dir = root / "runs" / run
    run_dir.mkdir(parents=True)
    config = Config().to_dict()
    if model_path_in_run:
        config["model"]["pretrained_model_path"] = str(model_dir)
    (run_dir / "config.toml").write_text(tomli_w.dumps(config))
    checkpoint = write_test_checkpoint(model_dir, run_dir / "checkpoints" / "step-000010",
                                       lora=lora)
    return ws, checkpoint


def inputs(seed: int = 7, size: int = 12, tokens: int = 5):
    """Test inputs other than the parity check's own (another seed, size and text length)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 16, size, size, generator=gen),
            torch.randn(3, tokens, 32, generator=gen), torch.tensor([0.1, 0.5, 0.9]))


@torch.no_grad()
def run_model(model):
    x, context, t = inputs()
    return model.float().eval()(x, context, t)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture()
def lora_ws(tmp_path, tiny_model_dir):
    return make_workspace(tmp_path / "ws", tiny_model_dir)


# --- merged pipeline -----------------------------------------------------------------------------

def test_merged_export_predicts_base_plus_lora_in_fp32(lora_ws, tiny_model_dir):
    ws, checkpoint = lora_ws
    result = export_checkpoint(ws, ws.config({"export.merge_lora": True, "export.dtype": "fp32"}))
    assert result.path == ws.root / "exports" / f"{RUN}-step10-merged"
    assert result.kind == "merged" and result.parity.passed
    assert result.parity.relative_diff < 1e-5

    family = load_family(tiny_model_dir)
    exported = load_family(result.path).load_denoiser()
    expected = run_model(load_denoiser(family, checkpoint))
    got = run_model(exported)
    assert relative_error(got, expected) < 1e-5
    # the LoRA really changed the model, and the merged DiT is a plain DiT again
    assert relative_error(run_model(family.load_denoiser()), expected) > 1e-3
    assert set(exported.state_dict()) == set(family.load_denoiser().state_dict())


def test_merge_is_w_plus_scale_b_a(lora_ws, tiny_model_dir):
    _, checkpoint = lora_ws
    family = load_family(tiny_model_dir)
    merged = merge.merge_lora(load_denoiser(family, checkpoint))
    base = family.load_denoiser().state_dict()
    saved = load_file(checkpoint / "lora.safetensors")
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    module = "blocks.1.cross_attn.context_kv"
    expected = base[f"{module}.weight"] + scale * (saved[f"{module}.lora_B.weight"]
                                                   @ saved[f"{module}.lora_A.weight"])
    torch.testing.assert_close(merged.state_dict()[f"{module}.weight"], expected,
                               rtol=1e-6, atol=1e-7)
    assert not hasattr(merged, "peft_config")
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())


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


def test_sharded_export_without_encoder_copies_loads(lora_ws, tiny_model_dir):
    ws, checkpoint = lora_ws
    result = export_checkpoint(ws, ws.config({
        "export.merge_lora": True, "export.dtype": "fp32", "export.max_shard_size": "50KB",
        "export.copy_encoders": False}))
    dit_dir = result.path / "dit_model"
    shards = sorted(dit_dir.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 5
    assert (dit_dir / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert all(p.stat().st_size <= 60_000 or len(load_file(p)) == 1 for p in shards)
    for component in ("text_encoder", "tokenizer", "vae"):
        link = result.path / component
        assert link.is_symlink() and link.resolve() == (tiny_model_dir / component).resolve()
    expected = run_model(load_denoiser(load_family(tiny_model_dir), checkpoint))
    assert relative_error(run_model(load_family(result.path).load_denoiser()), expected) < 1e-5


# --- LoRA-only: PEFT -----------------------------------------------------------------------------

def test_peft_export_round_trips_through_peft(lora_ws, tiny_model_dir):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    ws, checkpoint = lora_ws
    result = export_checkpoint(ws, ws.config({"export.dtype": "fp32"}))
    assert result.path.name == f"{RUN}-step10-lora" and result.format == "peft"
    assert sorted(p.name for p in result.path.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 4.0)
    assert sorted(config["target_modules"]) == ["context_kv", "proj", "q", "qkv"]

    family = load_family(tiny_model_dir)
    fresh = family.load_denoiser()
    inject_adapter_in_model(LoraConfig.from_pretrained(str(result.path)), fresh)
    state = load_file(result.path / "adapter_model.safetensors")
    assert state.keys() == load_file(checkpoint / "lora.safetensors").keys()
    set_peft_model_state_dict(fresh, state)
    assert torch.equal(run_model(fresh), run_model(load_denoiser(family, checkpoint)))


def test_peft_export_loads_with_diffusers_load_lora_adapter(lora_ws, tiny_model_dir):
    ws, checkpoint = lora_ws
    result = export_checkpoint(ws, ws.config({"export.dtype": "fp32"}))
    family = load_family(tiny_model_dir)
    dit = family.load_denoiser()
    dit.load_lora_adapter(str(result.path), weight_name="adapter_model.safetensors", prefix=None)
    expected = run_model(load_denoiser(family, checkpoint))
    assert relative_error(run_model(dit), expected) < 1e-6


def test_adapter_metadata_records_base_rank_alpha_targets_steps(lora_ws, tiny_model_dir):
    ws, _ = lora_ws
    ws.update_state("ingest", {"train_count": 37})
    result = export_checkpoint(ws, ws.config())
    meta = lora_formats.read_metadata(result.path / "adapter_model.safetensors")
    family = load_family(tiny_model_dir)
    assert meta["base_model_identity"] == family.denoiser_identity()
    assert meta["base_model"] == str(tiny_model_dir.resolve())
    assert (meta["rank"], meta["alpha"], meta["steps"]) == ("4", "4", "10")
    assert meta["target_modules"] == "context_kv,proj,q,qkv"
    assert meta["dataset_size"] == "37" and meta["ditctl_version"] and meta["format"] == "pt"
    assert json.loads(meta["lora_adapter_metadata"])["lora_alpha"] == 4.0
    weights = load_file(result.path / "adapter_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}  # default [export] dtype


# --- LoRA-only: comfy ----------------------------------------------------------------------------

def test_comfy_key_mapping_and_round_trip(lora_ws):
    _, checkpoint = lora_ws
    state = load_file(checkpoint / "lora.safetensors")
    modules = lora_formats.adapter_modules(state)
    comfy = lora_formats.peft_to_comfy(state, {m: 4.0 for m in modules})
    assert len(comfy) == 3 * len(modules) == 30
    m = "blocks.0.self_attn.qkv"
    assert torch.equal(comfy[f"diffusion_model.{m}.lora_down.weight"], state[f"{m}.lora_A.weight"])
    assert torch.equal(comfy[f"diffusion_model.{m}.lora_up.weight"], state[f"{m}.lora_B.weight"])
    alpha = comfy[f"diffusion_model.{m}.alpha"]
    assert alpha.dim() == 0 and alpha.item() == 4.0

    config, back = lora_formats.comfy_to_peft(comfy)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert (config["r"], config["lora_alpha"]) == (4, 4.0)
    assert config["target_modules"] == modules and config["rank_pattern"] == {}


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


def test_comfy_export_file_loads_back_onto_the_base(lora_ws, tiny_model_dir):
    ws, checkpoint = lora_ws
    result = export_checkpoint(ws, ws.config({"export.format": "comfy", "export.dtype": "fp32"}))
    file = result.path / f"{RUN}-step10-lora.safetensors"
    assert result.files == [file.name]
    state = load_file(file)
    assert "diffusion_model.blocks.1.cross_attn.context_kv.lora_up.weight" in state
    assert all(k.startswith("diffusion_model.") for k in state)
    meta = lora_formats.read_metadata(file)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["rank"]) == ("4", "4", "4")

    family = load_family(tiny_model_dir)
    fresh = family.load_denoiser()
    config, peft_state = lora_formats.comfy_to_peft(state)
    lora_formats.inject_adapter(fresh, config, peft_state)
    assert torch.equal(run_model(fresh), run_model(load_denoiser(family, checkpoint)))


# --- full runs -----------------------------------------------------------------------------------

def test_full_run_exports_the_fine_tuned_pipeline(tmp_path, tiny_model_dir):
    ws, checkpoint = make_workspace(tmp_path / "ws", tiny_model_dir, lora=False,
                                    model_path_in_run=True)
    result = export_checkpoint(ws, ws.config({"export.dtype": "fp32"}))
    assert result.kind == "full" and result.path.name == f"{RUN}-step10-full"
    family = load_family(tiny_model_dir)
    expected = run_model(load_denoiser(family, checkpoint))
    assert relative_error(run_model(load_family(result.path).load_denoiser()), expected) < 1e-6
    assert relative_error(run_model(family.load_denoiser()), expected) > 1e-3

    with pytest.raises(ExportError, match="full fine-tune") as info:
        export_checkpoint(ws, ws.config({"export.format": "comfy"}), name="x", lora_only=True)
    assert "--format" in info.value.hint


def test_lora_only_export_refuses_a_run_that_also_trained_base_weights(lora_ws):
    from ditctl.runs import CheckpointWriter, read_checkpoint_meta

    ws, checkpoint = lora_ws
    meta = read_checkpoint_meta(checkpoint)  # the plan reads what the manifest says it holds
    files = CheckpointWriter(checkpoint, files=meta.pop("files"))
    files.write_bytes("trainable.safetensors", b"")
    files.finish(meta)
    with pytest.raises(ExportError, match="as well as the LoRA") as info:
        export_checkpoint(ws, ws.config())
    assert "--merge-lora" in info.value.hint


# --- atomicity and parity ------------------------------------------------------------------------

def _leftovers(ws):
    exports = ws.root / "exports"
    return sorted(p.name for p in exports.iterdir()) if exports.is_dir() else []


def test_interrupted_export_leaves_nothing(lora_ws, monkeypatch):
    ws, _ = lora_ws

    def crash(*args, **kwargs):  # after dit_model/ is written, before the check and the card
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "_listing", crash)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(ws, ws.config({"export.merge_lora": True}))
    assert _leftovers(ws) == []
    assert "export" not in ws.read_state()


def test_parity_failure_fails_the_export_and_leaves_nothing(lora_ws, monkeypatch):
    ws, _ = lora_ws
    real_merge = merge.merge_lora

    def corrupting_merge(denoiser):
        merged = real_merge(denoiser)
        with torch.no_grad():
            merged.blocks[0].self_attn.qkv.weight[0, 0] += 1.0  # one wrong weight
        return merged

    monkeypatch.setattr(merge, "merge_lora", corrupting_merge)
    with pytest.raises(ExportError, match=r"parity check failed: .*: relative difference \S+ > "
                                          r"limit 0\.0001 \(fp32 weights; max abs diff \S+\); "
                                          "nothing was written"):
        export_checkpoint(ws, ws.config({"export.merge_lora": True, "export.dtype": "fp32"}))
    assert _leftovers(ws) == []
    # --no-verify writes it anyway (the check is what caught it)
    result = export_checkpoint(ws, ws.config({"export.merge_lora": True, "export.verify": False}))
    assert result.parity is None and result.path.is_dir()


def test_parity_tolerance_depends_on_dtype_and_scale():
    reference = torch.tensor([[2.0, -4.0]])
    assert compare(reference, reference + 1e-3, "fp32").passed is False
    assert compare(reference, reference + 1e-3, "bf16").passed is True
    assert compare(reference, reference + 0.1, "bf16").passed is False
    assert compare(reference * 100, reference * 100 + 1e-3, "fp32").passed is True
    assert compare(reference, torch.full_like(reference, float("nan")), "bf16").passed is False
    # the line names the number that is tested, the limit, and which side of it it is
    assert compare(reference, reference + 0.1, "bf16").describe() == \
        "relative difference 0.025 > limit 0.02 (bf16 weights; max abs diff 0.1)"
    assert compare(reference, reference + 0.04, "bf16").describe() == \
        "relative difference 0.01 <= limit 0.02 (bf16 weights; max abs diff 0.04)"


def test_existing_export_is_refused_unless_forced(lora_ws):
    ws, _ = lora_ws
    (ws.exports_dir / ".tmp-killed.x1y2").mkdir(parents=True)  # a killed export's leftover
    first = export_checkpoint(ws, ws.config())
    (first.path / "marker").write_text("old")
    with pytest.raises(ExportError, match="already exists") as info:
        export_checkpoint(ws, ws.config())
    assert "--force" in info.value.hint
    again = export_checkpoint(ws, ws.config(), force=True)
    assert again.path == first.path and not (again.path / "marker").exists()
    assert _leftovers(ws) == [first.path.name]


def test_checkpoint_by_step_name_and_out_path(lora_ws, tmp_path):
    ws, _ = lora_ws
    result = export_checkpoint(ws, ws.config(), run=RUN, checkpoint="10", out=tmp_path / "mine")
    assert result.path == tmp_path / "mine" and result.name == "mine"
    assert (tmp_path / "mine" / "adapter_model.safetensors").is_file()
    state = ws.read_state()["export"]
    assert state["path"] == str(tmp_path / "mine") and state["kind"] == "lora"
    assert state["step"] == 10 and state["parity"]["passed"] is True
    with pytest.raises(ExportError, match="plain folder name"):
        export_checkpoint(ws, ws.config(), name="../escape")


# --- model card ----------------------------------------------------------------------------------

def test_model_card_lists_base_data_config_metrics_samples_licence_usage(lora_ws, tiny_model_dir):
    ws, _ = lora_ws
    run_dir = ws.root / "runs" / RUN
    (run_dir / "run.json").write_text(json.dumps({  # as training writes it
        "family": "flite", "base_model": str(tiny_model_dir), "seed": 3, "train_images": 12,
        "val_images": 2, "buckets": {"64x64": 8, "80x48": 4}, "step_batch": 2}))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({  # as `ditctl eval` writes it
        "validation": {"description": "held-out 10% of train", "images": 2},
        "models": [{"label": "base", "step": 0, "val_loss": 0.5123},
                   {"label": "step-000010", "step": 10, "val_loss": 0.4321}],
        "clip": {"status": "computed", "columns": {"base": 20.25, "step-000010": 27.5}}}))
    for label in ("step-000005", "step-000010"):
        (run_dir / "samples" / label).mkdir(parents=True)
        (run_dir / "samples" / label / "grid.png").write_bytes(label.encode())

    result = export_checkpoint(ws, ws.config({"export.merge_lora": True}))
    card = (result.path / "README.md").read_text()
    assert card.startswith("---\nlicense: creativeml-openrail-m\n")
    assert "CreativeML Open RAIL-M" in card
    assert str(tiny_model_dir.resolve()) in card
    assert load_family(tiny_model_dir).denoiser_identity() in card
    assert "- train_images: 12" in card and "- val_images: 2" in card
    assert "  - 64x64: 8" in card and "  - 80x48: 4" in card
    assert "learning_rate = 0.0001" in card  # the run's config.toml, verbatim
    assert "| base | 0 | 0.5123 | 20.25 |" in card
    assert "| step-000010 (this export) | 10 | 0.4321 | 27.5 |" in card
    assert "held-out 10% of train (2 images)" in card
    assert "![samples step-000010](samples.png)" in card
    assert (result.path / "samples.png").read_bytes() == b"step-000010"  # this step's grid
    assert f"ditctl sample --model {result.path}" in card
    assert "LoRA rank 4, alpha 4" in card and "merged into the DiT weights" in card
    assert re.search(r"Export check passed: .* relative difference \S+ <= limit 0\.02 \(bf16 "
                     r"weights; max abs diff \S+\)", card)


def test_hub_id_only_for_models_in_the_hugging_face_cache():
    cached = Path("/h/hub/models--Freepik--F-Lite/snapshots/abc123")
    assert hub_id(cached) == "Freepik/F-Lite"
    assert hub_id(Path("/data/models/f-lite")) is None


def test_licence_comes_from_the_base_model_folder(tmp_path, tiny_model_dir):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    assert find_licence(base, "flite", FLiteFamily.licence).id == "creativeml-openrail-m"  # family default
    (base / "LICENSE.md").write_text("# Example Model License v2\n\nterms...\n")
    licence = find_licence(base, "flite", FLiteFamily.licence)
    assert (licence.id, licence.name) == ("other", "Example Model License v2")
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- x\n---\n# model\n")
    licence = find_licence(base, "flite", FLiteFamily.licence)
    assert (licence.id, licence.name, licence.file) == ("apache-2.0", "Apache 2.0",
                                                        base / "LICENSE.md")

    ws, _ = make_workspace(tmp_path / "ws", base)
    result = export_checkpoint(ws, ws.config())
    assert (result.path / "LICENSE.md").read_text().startswith("# Example Model License v2")
    assert "license: apache-2.0" in (result.path / "README.md").read_text()


# --- a LoRA trained on a quantized base ------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp8", "int8", "nf4"])
def test_export_of_a_quantized_run_merges_into_the_full_precision_base(lora_ws, tiny_model_dir,
                                                                        precision):
    from ditctl.engine.precision import QuantizedLinear

    ws, checkpoint = lora_ws
    marker = checkpoint / "checkpoint.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "base_precision": precision}))
    family = load_family(tiny_model_dir)
    as_trained = load_denoiser(family, checkpoint)  # sample/eval reproduce the trained model
    assert any(isinstance(m, QuantizedLinear) for m in as_trained.modules())
    result = export_checkpoint(ws, ws.config({"export.merge_lora": True, "export.dtype": "fp32"}))
    assert result.parity.passed and result.parity.relative_diff < 1e-5
    assert result.base_precision == precision
    trained = result.trained_parity
    assert trained.passed and trained.base_precision == precision and trained.base_error > 0
    # the export differs from the run's model by about the base's own quantization error
    assert 0.5 * trained.base_error < trained.relative_diff <= trained.tolerance
    # merged into the full-precision base: what base + LoRA predicts, not the quantized model
    full = load_denoiser(family, checkpoint, as_trained=False)
    exported = load_family(result.path).load_denoiser()
    assert not any(isinstance(m, QuantizedLinear) for m in exported.modules())
    assert relative_error(run_model(exported), run_model(full)) < 1e-5
    card = (result.path / "README.md").read_text()
    assert f"stored as **{precision}**" in card and "not into the quantized weights" in card
    assert f"base stored as {precision}" in card


def test_trained_base_parity_allows_the_quantization_error_and_no_more():
    from ditctl.export.parity import QUANTIZED_BASE_MARGIN, compare_to_trained

    trained = torch.ones(2, 4)
    within = compare_to_trained(trained, trained * 1.05, 0.04, "nf4", "bf16")
    assert within.passed and within.tolerance == pytest.approx(QUANTIZED_BASE_MARGIN * 0.04 + 2e-2)
    assert not compare_to_trained(trained, trained * 1.2, 0.04, "nf4", "bf16").passed
    assert not compare_to_trained(trained, trained * float("nan"), 0.04, "nf4", "bf16").passed
