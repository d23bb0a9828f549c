"""ditctl.export: merged/full pipelines, PEFT and comfy adapters, parity, atomicity, model card."""

from __future__ import annotations

import json
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
from ditctl.models.registry import detect_family, load_family
from ditctl.scaffold import init_workspace
from tests.conftest import write_test_checkpoint

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


@torch.no_grad()
def run_model(family, model):
    """The model's fp32 prediction on the family's inputs (another seed than the export's own
    parity check uses)."""
    model = model.float().eval()
    x, t, cond = family.parity_inputs(model, seed=7)
    return family.predict(model, x, t, cond)


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
    expected = run_model(family, load_denoiser(family, checkpoint))
    got = run_model(family, exported)
    assert relative_error(got, expected) < 1e-5
    # the LoRA really changed the model, and the merged denoiser is a plain one again
    assert relative_error(run_model(family, family.load_denoiser()), expected) > 1e-3
    assert set(exported.state_dict()) == set(family.load_denoiser().state_dict())


def test_merge_is_w_plus_scale_b_a(lora_ws, tiny_model_dir):
    _, checkpoint = lora_ws
    family = load_family(tiny_model_dir)
    merged = merge.merge_lora(load_denoiser(family, checkpoint))
    base = family.load_denoiser().state_dict()
    saved = load_file(checkpoint / "lora.safetensors")
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    module = lora_formats.adapter_modules(saved)[-1]
    expected = base[f"{module}.weight"] + scale * (saved[f"{module}.lora_B.weight"]
                                                   @ saved[f"{module}.lora_A.weight"])
    torch.testing.assert_close(merged.state_dict()[f"{module}.weight"], expected,
                               rtol=1e-6, atol=1e-7)
    assert not hasattr(merged, "peft_config")
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())


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
    family = load_family(tiny_model_dir)
    expected = run_model(family, load_denoiser(family, checkpoint))
    assert relative_error(run_model(family, load_family(result.path).load_denoiser()),
                          expected) < 1e-5


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
    family = load_family(tiny_model_dir)
    assert sorted(config["target_modules"]) == sorted(family.lora_targets)

    fresh = family.load_denoiser()
    inject_adapter_in_model(LoraConfig.from_pretrained(str(result.path)), fresh)
    state = load_file(result.path / "adapter_model.safetensors")
    assert state.keys() == load_file(checkpoint / "lora.safetensors").keys()
    set_peft_model_state_dict(fresh, state)
    trained = load_denoiser(family, checkpoint)
    assert torch.equal(run_model(family, fresh), run_model(family, trained))


def test_peft_export_loads_with_diffusers_load_lora_adapter(lora_ws, tiny_model_dir):
    ws, checkpoint = lora_ws
    result = export_checkpoint(ws, ws.config({"export.dtype": "fp32"}))
    family = load_family(tiny_model_dir)
    dit = family.load_denoiser()
    dit.load_lora_adapter(str(result.path), weight_name="adapter_model.safetensors", prefix=None)
    expected = run_model(family, load_denoiser(family, checkpoint))
    assert relative_error(run_model(family, dit), expected) < 1e-6


def test_adapter_metadata_records_base_rank_alpha_targets_steps(lora_ws, tiny_model_dir):
    ws, _ = lora_ws
    ws.update_state("ingest", {"train_count": 37})
    result = export_checkpoint(ws, ws.config())
    meta = lora_formats.read_metadata(result.path / "adapter_model.safetensors")
    family = load_family(tiny_model_dir)
    assert meta["base_model_identity"] == family.denoiser_identity()
    assert meta["base_model"] == str(tiny_model_dir.resolve())
    assert (meta["rank"], meta["alpha"], meta["steps"]) == ("4", "4", "10")
    assert meta["target_modules"] == ",".join(sorted(family.lora_targets))
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
    assert len(comfy) == 3 * len(modules) > 0
    m = modules[0]
    assert torch.equal(comfy[f"diffusion_model.{m}.lora_down.weight"], state[f"{m}.lora_A.weight"])
    assert torch.equal(comfy[f"diffusion_model.{m}.lora_up.weight"], state[f"{m}.lora_B.weight"])
    alpha = comfy[f"diffusion_model.{m}.alpha"]
    assert alpha.dim() == 0 and alpha.item() == 4.0

    config, back = lora_formats.comfy_to_peft(comfy)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert (config["r"], config["lora_alpha"]) == (4, 4.0)
    assert config["target_modules"] == modules and config["rank_pattern"] == {}


def test_comfy_export_file_loads_back_onto_the_base(lora_ws, tiny_model_dir):
    ws, checkpoint = lora_ws
    result = export_checkpoint(ws, ws.config({"export.format": "comfy", "export.dtype": "fp32"}))
    file = result.path / f"{RUN}-step10-lora.safetensors"
    assert result.files == [file.name]
    state = load_file(file)
    adapted = lora_formats.adapter_modules(load_file(checkpoint / "lora.safetensors"))
    assert {f"diffusion_model.{m}.lora_up.weight" for m in adapted} <= state.keys()
    assert all(k.startswith("diffusion_model.") for k in state)
    meta = lora_formats.read_metadata(file)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["rank"]) == ("4", "4", "4")

    family = load_family(tiny_model_dir)
    fresh = family.load_denoiser()
    config, peft_state = lora_formats.comfy_to_peft(state)
    lora_formats.inject_adapter(fresh, config, peft_state)
    trained = load_denoiser(family, checkpoint)
    assert torch.equal(run_model(family, fresh), run_model(family, trained))


# --- full runs -----------------------------------------------------------------------------------

def test_full_run_exports_the_fine_tuned_pipeline(tmp_path, tiny_model_dir):
    ws, checkpoint = make_workspace(tmp_path / "ws", tiny_model_dir, lora=False,
                                    model_path_in_run=True)
    result = export_checkpoint(ws, ws.config({"export.dtype": "fp32"}))
    assert result.kind == "full" and result.path.name == f"{RUN}-step10-full"
    family = load_family(tiny_model_dir)
    expected = run_model(family, load_denoiser(family, checkpoint))
    assert relative_error(run_model(family, load_family(result.path).load_denoiser()),
                          expected) < 1e-6
    assert relative_error(run_model(family, family.load_denoiser()), expected) > 1e-3

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
        "family": detect_family(tiny_model_dir), "base_model": str(tiny_model_dir), "seed": 3,
        "train_images": 12,
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
    licence_id, licence_name = load_family(tiny_model_dir).licence  # the family's default
    assert card.startswith(f"---\nlicense: {licence_id}\n")
    assert licence_name in card
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
    family = load_family(tiny_model_dir)
    assert find_licence(base, family.name, family.licence).id == family.licence[0]  # its default
    (base / "LICENSE.md").write_text("# Example Model License v2\n\nterms...\n")
    licence = find_licence(base, family.name, family.licence)
    assert (licence.id, licence.name) == ("other", "Example Model License v2")
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- x\n---\n# model\n")
    licence = find_licence(base, family.name, family.licence)
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
    assert relative_error(run_model(family, exported), run_model(family, full)) < 1e-5
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
