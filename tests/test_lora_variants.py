"""[lora] lora_type: DoRA, LoKr and LoHa (peft's own configs) wherever LoRA works: training on
every base precision peft supports (one-line errors where it does not), exact resume, loading
a saved adapter, the memory plan's adapter count, and every export format (or a one-line error
naming the format to use)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from ditctl.config import build_config
from ditctl.engine.loading import load_denoiser
from ditctl.engine.lora import peft_state_dict
from ditctl.errors import CheckpointError, ConfigError, ExportError
from ditctl.export import export_checkpoint, lora_formats
from ditctl.models.registry import load_family
from ditctl.scaffold import init_workspace, shipped_tiny_model
from ditctl.train import run_training
from tests.conftest import make_workspace, write_test_checkpoint

VARIANTS = ("dora", "lokr", "loha")
LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}
TRAIN = {"train_batch_size": 2, "learning_rate": 2e-2, "lr_scheduler": "constant",
         "use_precomputed_data": True}
RUN = "run-a"


@torch.no_grad()
def run_model(family, model):
    model = model.float().eval()
    x, t, cond = family.parity_inputs(model, seed=7)
    return family.predict(model, x, t, cond)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _adapters(model) -> dict[str, torch.Tensor]:
    from ditctl.engine.lora import is_adapter_param

    return {k: v.detach().clone() for k, v in model.named_parameters() if is_adapter_param(k)}


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("lora, message", [
    ({"lora_type": "lora", "lokr_factor": 4}, r"lokr_factor = 4 only applies to lora_type = 'lokr'"),
    ({"lora_type": "loha", "lora_dropout": 0.1}, r"lora_type = 'loha' has none"),
    ({"lora_type": "lokr", "base_precision": "nf4"}, r"cannot train on base_precision = 'nf4'"),
    ({"lora_type": "lokra"}, r"lora_type = 'lokra': must be one of"),
    ({"lora_rank_pattern": ["qkv"]}, r"'qkv' is not \"regex=value\""),
    ({"lora_rank_pattern": ["qkv=high"]}, r"'high' is not an integer"),
    ({"lora_alpha_pattern": ["(qkv=2"]}, r"is not a regular expression"),
    ({"lora_rank_pattern": ["qkv=0"]}, r"the value must be > 0"),
])
def test_bad_variant_settings_are_one_line_errors_naming_the_key(lora, message):
    with pytest.raises(ConfigError) as info:
        build_config({"lora": {**LORA, **lora}})
    assert len(str(info.value).splitlines()) == 2  # the count line and the one problem
    assert re.search(message, str(info.value))


@pytest.mark.parametrize("kind, config_class, extra", [
    ("lora", "LoraConfig", {"use_dora": False}),
    ("dora", "LoraConfig", {"use_dora": True}),
    ("lokr", "LoKrConfig", {"decompose_factor": 4}),
    ("loha", "LoHaConfig", {}),
])
def test_each_lora_type_is_peft_s_own_config_with_the_patterns(kind, config_class, extra):
    from ditctl.engine.lora import peft_config

    settings = build_config({"lora": {**LORA, "lora_type": kind, "lora_alpha": 8,
                                      "lora_rank_pattern": ["ff.*=16", r"blocks\.0\.q=2"],
                                      "lora_alpha_pattern": ["ff.*=32"],
                                      **({"lokr_factor": 4} if kind == "lokr" else {})}}).lora
    config = peft_config(settings, ("qkv", "ff"), ("qkv",))
    assert type(config).__name__ == config_class
    assert config.r == 4 and config.target_modules == {"qkv"}
    assert config.rank_pattern == {"ff.*": 16, r"blocks\.0\.q": 2}
    assert config.alpha_pattern == {"ff.*": 32.0}
    assert (config.lora_alpha if kind in ("lora", "dora") else config.alpha) == 8
    assert all(getattr(config, k) == v for k, v in extra.items())


def test_rank_pattern_gives_the_matched_modules_their_rank(tiny_model_dir):
    from ditctl.engine.setup import build_denoiser

    family = load_family(tiny_model_dir)
    target = family.lora_targets[0]
    config = build_config({"lora": {**LORA, "lora_type": "loha",
                                    "lora_rank_pattern": [f"{target}=8"]}})
    model = build_denoiser(family, config)
    ranks = {name.rsplit(".", 1)[-1]: m.r["default"] for name, m in model.named_modules()
             if hasattr(m, "hada_w1_a")}
    assert ranks[target] == 8 and set(ranks.values()) == {4, 8}


# --- training ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cached_workspace(tmp_path_factory):
    """Two images on the shipped trained tiny base, precomputed once (as the base-precision
    tests: a trained base gives adapters a gradient from the first step)."""
    from accelerate.state import AcceleratorState

    from ditctl.precompute import run_precompute

    ws = make_workspace(tmp_path_factory.mktemp("lv") / "w", shipped_tiny_model(), n_train=2,
                        n_val=0, train=TRAIN, lora=LORA)
    run_precompute(ws, ws.config())
    AcceleratorState._reset_state(reset_partial_state=True)
    return ws


def _capture_model(monkeypatch) -> dict:
    import ditctl.train as train

    seen = {}
    original = train.train_loop

    def train_loop(ctx, resume_from=None):
        seen["model"] = ctx.denoiser
        return original(ctx, resume_from=resume_from)

    monkeypatch.setattr(train, "train_loop", train_loop)
    return seen


def _stored_base(model) -> dict[str, torch.Tensor]:
    """Every stored tensor of the frozen base (quantized parts included), by name."""
    from ditctl.engine.lora import is_adapter_param
    from ditctl.engine.precision import _tensor_parts

    return {f"{name.replace('.base_layer', '')}#{i}": part.detach().cpu()
            for name, param in model.named_parameters() if not is_adapter_param(name)
            for i, part in enumerate(_tensor_parts(param))}


@pytest.mark.slow  # ~10 s each
@pytest.mark.parametrize("kind, precision", [("dora", "auto"), ("lokr", "auto"),
                                             ("loha", "auto"), ("dora", "nf4"),
                                             ("lokr", "int8"), ("loha", "fp8")])
def test_each_variant_trains_and_the_base_stays_untouched(cached_workspace, monkeypatch, kind,
                                                          precision):
    from ditctl.data.batches import CachedSource
    from ditctl.data.cache import Cache
    from ditctl.data.manifest import read_manifest
    from ditctl.engine.precision import quantizer, resolve_base_precision, storage_dtype
    from ditctl.engine.validation import validation_loss

    ws = cached_workspace
    seen = _capture_model(monkeypatch)
    mixed = "bf16" if precision != "auto" else "no"
    settings = {"train.max_steps": 6, "eval.holdout_fraction": 0.0, "lora.lora_type": kind,
                "train.run_name": f"{kind}-{precision}", "lora.base_precision": precision,
                "train.mixed_precision": mixed}
    out = run_training(ws, ws.config(settings))
    model = seen["model"]
    family = load_family(ws.model_path(ws.config()))
    stored = resolve_base_precision(precision, mixed)
    fresh = family.load_denoiser(storage_dtype(stored, mixed), convert=quantizer(stored))
    trained, expected = _stored_base(model), _stored_base(fresh)
    assert trained.keys() == expected.keys()
    assert all(torch.equal(trained[k], expected[k]) for k in expected)
    checkpoint = out.result.checkpoint
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"dora": "LORA", "lokr": "LOKR", "loha": "LOHA"}[kind]
    assert saved.get("use_dora", False) == (kind == "dora")
    weights = load_file(checkpoint / "lora.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}
    rows, source = read_manifest(ws, "train"), CachedSource(Cache.open(ws, ws.config(), family))
    quantiles = (0.3, 0.5, 0.7)
    untrained = family.load_denoiser(torch.float32, convert=quantizer(precision))
    before = validation_loss(family, untrained, rows, source, quantiles)["overall"]
    after = validation_loss(family, load_denoiser(family, checkpoint), rows, source,
                            quantiles)["overall"]
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("kind, precision", [
    ("dora", "auto"), ("lokr", "auto"),
    pytest.param("dora", "nf4", marks=pytest.mark.slow),
    pytest.param("lokr", "int8", marks=pytest.mark.slow)])
def test_resume_of_each_variant_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch, kind,
                                                 precision):
    from ditctl.engine.monitor import Monitor

    settings = dict(train={"mixed_precision": "bf16" if precision != "auto" else "no",
                           "learning_rate": 5e-3, "lr_scheduler": "constant",
                           "train_batch_size": 2, "checkpoint_every": 100, "run_name": "r"},
                    lora={**LORA, "lora_type": kind, "base_precision": precision}, n_train=6)
    straight = make_workspace(tmp_path / "a", tiny_model_dir, **settings)
    full = run_training(straight, straight.config({"train.max_steps": 4}))
    split = make_workspace(tmp_path / "b", tiny_model_dir, **settings)
    original = Monitor.log_step

    def log_step(self, at, *args, **kwargs):
        original(self, at, *args, **kwargs)
        if at == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Monitor, "log_step", log_step)
    assert run_training(split, split.config({"train.max_steps": 4})).result.steps == 2
    monkeypatch.undo()
    resumed = run_training(split, split.config({"train.max_steps": 4}), resume="latest")
    a = load_file(full.result.checkpoint / "lora.safetensors")
    b = load_file(resumed.result.checkpoint / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = lambda ws: (ws.root / "runs" / "r" / "train_log.jsonl").read_text()  # noqa: E731
    losses = lambda ws: [json.loads(l)["train/loss"] for l in log(ws).splitlines()]  # noqa: E731,E741
    assert losses(straight) == losses(split)


@pytest.mark.parametrize("kind", ("lora", *VARIANTS))
def test_the_dry_run_plan_counts_the_adapter_peft_builds(tiny_model_dir, kind):
    """The plan builds the denoiser on the meta device: its adapter parameters are the ones
    training would have, for every kind."""
    from ditctl.engine.plan import lora_layout
    from ditctl.engine.setup import build_denoiser

    family = load_family(tiny_model_dir)
    config = build_config({"lora": {**LORA, "lora_type": kind}})
    real, meta = build_denoiser(family, config), build_denoiser(family, config, device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(meta) == count(real) == sum(v.numel() for v in _adapters(real).values())
    layout = lora_layout(meta)
    assert layout.params > 0 and layout.layers > 0
    assert (layout.delta_elements > 0) == (kind in ("lokr", "loha"))
    assert (layout.dora_outputs > 0) == (kind == "dora")


# --- loading -------------------------------------------------------------------------------------

def _run_with_checkpoint(root: Path, model_dir: Path, lora_settings: dict) -> tuple:
    ws = init_workspace(root, model=str(model_dir)).workspace
    run_dir = root / "runs" / RUN
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(tomli_w.dumps(ws.config().to_dict()))
    checkpoint = write_test_checkpoint(model_dir, run_dir / "checkpoints" / "step-000010",
                                       lora_settings=lora_settings)
    return ws, checkpoint


@pytest.mark.parametrize("kind", VARIANTS)
def test_lora_checkpoint_starts_a_run_from_a_saved_adapter_of_each_kind(tmp_path,
                                                                        tiny_model_dir, kind):
    from ditctl.engine.setup import build_denoiser

    ws, checkpoint = _run_with_checkpoint(tmp_path / "ws", tiny_model_dir, {"lora_type": kind})
    family = load_family(tiny_model_dir)
    saved = load_file(checkpoint / "lora.safetensors")
    config = build_config({"lora": {**LORA, "lora_type": kind,
                                    "lora_checkpoint": str(checkpoint)}})
    model = build_denoiser(family, config)
    loaded = peft_state_dict(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    other = "lokr" if kind != "lokr" else "loha"
    with pytest.raises(CheckpointError) as info:
        build_denoiser(family, build_config({"lora": {**LORA, "lora_type": other,
                                                      "lora_checkpoint": str(checkpoint)}}))
    assert f"is a {kind} adapter, this run trains {other}" in str(info.value)
    assert f"lora_type = '{kind}'" in info.value.hint and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ("lokr", "loha"))
def test_lora_scale_zero_samples_the_base_model(tmp_path, tiny_model_dir, kind):
    _, checkpoint = _run_with_checkpoint(tmp_path / "ws", tiny_model_dir, {"lora_type": kind})
    family = load_family(tiny_model_dir)
    base = run_model(family, family.load_denoiser())
    assert relative_error(run_model(family, load_denoiser(family, checkpoint)), base) > 1e-3
    off = run_model(family, load_denoiser(family, checkpoint, lora_scale=0.0))
    assert torch.equal(off, base)


# --- export --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, settings, fmt", [
    ("dora", {}, "merged"), ("lokr", {}, "merged"), ("loha", {}, "merged"),
    ("dora", {}, "peft"), ("lokr", {}, "peft"), ("loha", {}, "peft"),
    # LoKr with a whole w2 (rank 16 >= half its side: no r in the file, the scale folded
    # into w1) and a decomposed one elsewhere; alpha != rank so the scale is not 1
    ("lokr", {"lora_rank": 16, "lora_alpha": 8, "lora_rank_pattern": ["q=2"]}, "comfy"),
    ("loha", {"lora_alpha": 2}, "comfy"),
])
def test_every_variant_exports_and_predicts_what_the_run_predicts(tmp_path, tiny_model_dir, kind,
                                                                  settings, fmt):
    ws, checkpoint = _run_with_checkpoint(tmp_path / "ws", tiny_model_dir,
                                          {"lora_type": kind, **settings})
    family = load_family(tiny_model_dir)
    expected = run_model(family, load_denoiser(family, checkpoint))
    base = run_model(family, family.load_denoiser())
    assert relative_error(base, expected) > 1e-3  # the adapter visibly changes the model
    result = export_checkpoint(ws, ws.config({"export.dtype": "fp32",
                                              "export.merge_lora": fmt == "merged",
                                              "export.format": "comfy" if fmt == "comfy"
                                              else "peft"}))
    assert result.parity.passed and result.parity.relative_diff < 1e-5
    card = (result.path / "README.md").read_text()
    assert f'`[lora] lora_type = "{kind}"`' in card
    if fmt == "merged":  # a plain denoiser predicting what base + adapter predicts
        exported = load_family(result.path).load_denoiser()
        assert set(exported.state_dict()) == set(family.load_denoiser().state_dict())
        assert relative_error(run_model(family, exported), expected) < 1e-5
    elif fmt == "peft":  # peft's own config class reads it back
        import peft
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        cls = {"dora": peft.LoraConfig, "lokr": peft.LoKrConfig, "loha": peft.LoHaConfig}[kind]
        assert f"{cls.__name__}.from_pretrained" in card
        fresh = family.load_denoiser()
        inject_adapter_in_model(cls.from_pretrained(str(result.path)), fresh)
        set_peft_model_state_dict(fresh, load_file(result.path / "adapter_model.safetensors"))
        assert torch.equal(run_model(family, fresh), expected)
        meta = lora_formats.read_metadata(result.path / "adapter_model.safetensors")
        assert meta["lora_type"] == kind
        assert ("lora_adapter_metadata" in meta) == (kind == "dora")  # diffusers: LoRA/DoRA
    else:
        file = result.path / f"{RUN}-step10-lora.safetensors"
        state = load_file(file)
        prefix = {"lokr": "lokr_w", "loha": "hada_w"}[kind]
        assert all(k.startswith("diffusion_model.") for k in state)
        assert any(f".{prefix}" in k for k in state)
        meta = lora_formats.read_metadata(file)
        assert json.loads(meta["ss_network_args"]) == {"algo": kind}
        fresh = family.load_denoiser()
        config, peft_state = lora_formats.comfy_to_peft(state)
        lora_formats.inject_adapter(fresh, config, peft_state)
        assert relative_error(run_model(family, fresh), expected) < 1e-6


def test_lokr_comfy_file_follows_comfyui_s_scaling(tmp_path, tiny_model_dir):
    """ComfyUI's LoKr loader: scale alpha / r when w2 is decomposed (r = lokr_w2_b's first
    side), 1 when both factors are whole; the written file gives peft's update either way."""
    _, checkpoint = _run_with_checkpoint(tmp_path / "ws", tiny_model_dir,
                                         {"lora_type": "lokr", "lora_rank": 16, "lora_alpha": 8,
                                          "lora_rank_pattern": ["q=2"]})
    family = load_family(tiny_model_dir)
    model = load_denoiser(family, checkpoint)
    comfy = lora_formats.to_single_file(peft_state_dict(model), lora_formats.comfy_alphas(model),
                                        model)
    seen = set()
    for name, module in model.named_modules():
        if not hasattr(module, "lokr_w1") or "default" not in module.lokr_w1:
            continue
        key = f"diffusion_model.{name}."
        w1 = comfy[key + "lokr_w1"]
        if key + "lokr_w2" in comfy:
            w2, scale = comfy[key + "lokr_w2"], 1.0
            assert key + "alpha" not in comfy
            seen.add("whole")
        else:
            w2 = comfy[key + "lokr_w2_a"] @ comfy[key + "lokr_w2_b"]
            scale = comfy[key + "alpha"].item() / comfy[key + "lokr_w2_b"].shape[0]
            seen.add("decomposed")
        update = torch.kron(w1, w2) * scale
        assert torch.allclose(update, module.get_delta_weight("default"), atol=1e-6)
    assert seen == {"whole", "decomposed"}


def test_dora_single_file_export_is_a_one_line_error_naming_the_formats(tmp_path, tiny_model_dir):
    ws, _ = _run_with_checkpoint(tmp_path / "ws", tiny_model_dir, {"lora_type": "dora"})
    with pytest.raises(ExportError) as info:
        export_checkpoint(ws, ws.config({"export.format": "comfy"}))
    assert "DoRA adapter has no exact single-file" in str(info.value)
    assert "--format peft" in info.value.hint and "--merge-lora" in info.value.hint
    assert "\n" not in str(info.value)
    assert not any((ws.root / "exports").glob("*"))


@pytest.mark.parametrize("kind, precision", [
    ("dora", "nf4"), pytest.param("lokr", "int8", marks=pytest.mark.slow),
    pytest.param("loha", "fp8", marks=pytest.mark.slow)])
def test_a_variant_trained_on_a_quantized_base_merges_into_the_full_precision_one(
        tmp_path, tiny_model_dir, kind, precision):
    """As for LoRA: sample/eval rebuild the quantized base it trained on; the export merges into
    the full-precision base and differs from the run's model by about the quantization error."""
    from ditctl.engine.precision import QuantizedLinear

    ws, checkpoint = _run_with_checkpoint(tmp_path / "ws", tiny_model_dir, {"lora_type": kind})
    marker = checkpoint / "checkpoint.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "base_precision": precision}))
    family = load_family(tiny_model_dir)
    assert any(isinstance(m, QuantizedLinear) for m in load_denoiser(family, checkpoint).modules())
    result = export_checkpoint(ws, ws.config({"export.merge_lora": True, "export.dtype": "fp32"}))
    assert result.parity.passed and result.trained_parity.passed
    full = run_model(family, load_denoiser(family, checkpoint, as_trained=False))
    exported = load_family(result.path).load_denoiser()
    assert relative_error(run_model(family, exported), full) < 1e-5


@pytest.mark.slow  # ~10 s each
@pytest.mark.parametrize("kind, precision", [("dora", "nf4"), ("lokr", "int8")])
def test_streamed_base_blocks_train_each_variant_as_resident_ones(tmp_path, tiny_model_dir, kind,
                                                                 precision):
    """offload_base_blocks streams the frozen blocks in; DoRA reads the base weight itself
    (its norm), LoKr its shape: both train exactly as with the base resident."""
    settings = dict(train={"mixed_precision": "bf16", "gradient_checkpointing": True,
                           "learning_rate": 1e-3}, n_train=4)
    lora = {**LORA, "lora_type": kind, "base_precision": precision}
    weights = []
    for name, offload in (("a", False), ("b", True)):
        ws = make_workspace(tmp_path / name, tiny_model_dir,
                            lora={**lora, "offload_base_blocks": offload}, **settings)
        out = run_training(ws, ws.config({"train.max_steps": 2}))
        weights.append(load_file(out.result.checkpoint / "lora.safetensors"))
    a, b = weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
