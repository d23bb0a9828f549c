"""The shipped tiny base model draws what it was trained on, does not draw the held-out colour,
and the `ditctl init --example` LoRA run teaches that colour without breaking the others.

Scores come from the pixel classifier (`ditctl.demo.concepts`) on images generated with fixed
seeds by the shared sampler, so every number here is deterministic on a given machine.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from ditctl.demo.concept_check import (concept_scores, held_out_prompts, sample_settings,
                                       trained_prompts)
from ditctl.models.registry import PIPELINE_CLASSES, load_family
from ditctl.scaffold import TINY_MODEL_SETTINGS, init_workspace, shipped_tiny_model

SAMPLING = TINY_MODEL_SETTINGS["sample"]  # what `init --model tiny` configures


def measured_settings():
    return sample_settings(steps=SAMPLING["steps"], guidance_scale=SAMPLING["guidance_scale"],
                           shift=SAMPLING["shift"], seed=0)


@pytest.fixture(scope="module")
def base():
    family = load_family(shipped_tiny_model())
    return family, family.load_denoiser(torch.float32).eval(), family.load_vae(), \
        family.load_text_encoder()


def test_the_shipped_folder_is_small_complete_and_loads_as_fp32():
    folder = shipped_tiny_model()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] in PIPELINE_CLASSES
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 20 * 2**20
    weights = folder / "dit_model" / "diffusion_pytorch_model.safetensors"
    with safe_open(weights, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    dit = load_family(folder).load_denoiser(torch.float32)
    assert {p.dtype for p in dit.parameters()} == {torch.float32}
    # trained, not F-Lite's zero init: the output layer predicts something
    assert dit.final_proj.weight.abs().max() > 0


@pytest.mark.slow
def test_base_draws_the_trained_colours_and_shapes(base):
    """The acceptance measurement itself: every trained colour x shape, 4 seeds each."""
    family, denoiser, vae, text_encoder = base
    settings = sample_settings(steps=SAMPLING["steps"], guidance_scale=SAMPLING["guidance_scale"],
                               shift=SAMPLING["shift"], seed=0, images_per_prompt=4)
    result = concept_scores(family, denoiser, vae, text_encoder, trained_prompts(), settings)
    assert result["n"] == 4 * len(trained_prompts()) == 140
    # measured 79% after the 512-token adaptation (85% before, at 32 tokens; TRAINING.md)
    assert result["both"] >= 0.75, result


def test_base_does_not_draw_the_held_out_colour(base):
    family, denoiser, vae, text_encoder = base
    result = concept_scores(family, denoiser, vae, text_encoder, held_out_prompts(),
                            measured_settings())
    assert result["colour"] <= 0.2, result


def test_init_tiny_copies_the_shipped_model(tmp_path):
    result = init_workspace(tmp_path / "ws", model="tiny")
    copied, shipped = load_family(result.model_path), load_family(shipped_tiny_model())
    assert result.model_path == tmp_path.resolve() / "ws" / "model"
    assert copied.denoiser_identity() == shipped.denoiser_identity()
    assert copied.vae_identity() == shipped.vae_identity()
    assert copied.text_encoder_identity() == shipped.text_encoder_identity()


@pytest.mark.slow
def test_example_lora_teaches_the_held_out_colour(tmp_path):
    """The demo's LoRA run (`ditctl train --lora` with the example's settings; no samples or
    evaluation during training): the held-out colour appears, the trained ones stay."""
    from ditctl.data.ingest import run_ingest
    from ditctl.engine.loading import load_denoiser
    from ditctl.precompute import run_precompute
    from ditctl.train import run_training

    ws = init_workspace(tmp_path / "ws", model="tiny", example=True).workspace
    config = ws.config({"train.use_precomputed_data": True, "train.sample_every": 0,
                        "train.eval_every": 0, "train.report_to": "none",
                        "lora.use_lora": True, "lora.train_only_lora": True})  # = --lora
    run_ingest(ws, config, workers=1)
    run_precompute(ws, config)
    outcome = run_training(ws, config)
    assert outcome.result.steps == 1000

    family = load_family(ws.model_path(config))
    tuned = load_denoiser(family, outcome.result.checkpoint)
    vae, text_encoder = family.load_vae(), family.load_text_encoder()
    settings = measured_settings()
    held = concept_scores(family, tuned, vae, text_encoder, held_out_prompts(), settings)
    kept = concept_scores(family, tuned, vae, text_encoder, trained_prompts(), settings)
    assert held["colour"] >= 0.7, held  # the acceptance: the new colour is drawn
    assert held["both"] >= 0.6, held    # ... in the asked-for shape (measured: 0.8)
    assert kept["both"] >= 0.7, kept    # and the trained colours and shapes are kept
