"""A family whose unconditional input is a prompt's encoding (`unconditional_prompt`): precompute
caches it, a cached run needs it when captions are dropped, sampling uses it as the default
negative, and cached and on-the-fly training drop captions to the same tensors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache_entries import drop_entry  # noqa: E402
from conftest import family_class, make_workspace  # noqa: E402
from ditctl.data.cache_plan import check_cache_complete, prompts_to_cache  # noqa: E402
from ditctl.errors import CacheError  # noqa: E402
from ditctl.models.registry import load_family  # noqa: E402

EMPTY = "plain background"  # not "": a family may encode "" as zeros, which would prove nothing


@pytest.fixture
def prompt_family(monkeypatch, tiny_model_dir):
    """The tiny model's family, made one whose unconditional input is EMPTY's encoding."""
    monkeypatch.setattr(family_class(tiny_model_dir), "unconditional_prompt", EMPTY)


def test_sampling_defaults_the_negative_to_the_unconditional_prompt(prompt_family,
                                                                     tiny_model_dir):
    from ditctl.sampling import encode_prompts

    family = load_family(tiny_model_dir)
    text_encoder = family.load_text_encoder()
    embeddings = encode_prompts(family, text_encoder, ["a red circle"])
    expected = family.encode_prompts(text_encoder, [EMPTY])
    assert torch.equal(embeddings.negative.sequence, expected.sequence)
    explicit = encode_prompts(family, text_encoder, ["a red circle"], "blurry")
    assert torch.equal(explicit.negative.sequence,
                       family.encode_prompts(text_encoder, ["blurry"]).sequence)


def test_precompute_caches_it_and_a_dropping_run_needs_it(prompt_family, tmp_path,
                                                          tiny_model_dir):
    from ditctl.data.cache import Cache
    from ditctl.precompute import run_precompute
    from ditctl.train import ensure_manifest

    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n_train=2, n_val=0)
    config = ws.config({"train.caption_dropout": 0.5, "train.sample_every": 0})
    family = load_family(ws.model_path(config))
    assert EMPTY in prompts_to_cache(ws, config, family)
    rows = ensure_manifest(ws, config)
    run_precompute(ws, config)
    check_cache_complete(ws, config, family, rows)
    cache = Cache.open(ws, config, family)
    drop_entry(cache, cache.spec.text_key(EMPTY))
    with pytest.raises(CacheError, match="1 of 3 captions"):
        check_cache_complete(ws, config, family, rows)
    # without caption dropout training does not need it
    check_cache_complete(ws, ws.config({"train.sample_every": 0, "train.caption_dropout": 0.0}),
                         family, rows)


@pytest.mark.slow
def test_cached_and_on_the_fly_runs_drop_captions_to_the_same_tensors(prompt_family, tmp_path,
                                                                      tiny_model_dir):
    from safetensors.torch import load_file

    from ditctl.precompute import run_precompute
    from ditctl.train import ensure_manifest, run_training

    lora = {"use_lora": True, "train_only_lora": True, "lora_rank": 2, "lora_alpha": 2}
    weights = []
    for cached in (False, True):
        ws = make_workspace(tmp_path / f"ws-{cached}", tiny_model_dir, n_train=2, n_val=0,
                            lora=lora, train={"max_steps": 2, "caption_dropout": 1.0})
        config = ws.config({"train.use_precomputed_data": cached, "eval.holdout_fraction": 0.0})
        if cached:
            ensure_manifest(ws, config)
            run_precompute(ws, config)
        weights.append(load_file(run_training(ws, config).result.checkpoint
                                 / "lora.safetensors"))
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
