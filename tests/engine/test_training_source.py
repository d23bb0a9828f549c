"""`ditctl train` uses the precompute cache by itself: a complete cache is read without loading
the encoders; an incomplete one is filled first when the run sees its images more than once;
otherwise (or with --no-use-precomputed-data) training encodes on the fly — and every one of
these paths trains the same weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import family_class, make_workspace  # noqa: E402
from ditctl.training_source import fill_decision  # noqa: E402

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 2, "lora_alpha": 2}


def test_fill_decision_weighs_encodes_and_disk():
    gap = dict(missing_latents=10, missing_texts=5, estimated_bytes=1000)
    assert fill_decision(**gap, encodes_on_the_fly=30, free=10**9)[0]
    fill, why = fill_decision(**gap, encodes_on_the_fly=10, free=10**9)
    assert not fill and "no gain" in why
    fill, why = fill_decision(**gap, encodes_on_the_fly=30, free=1050)
    assert not fill and "free" in why  # 1000 bytes plus headroom do not fit in 1050


def _no_encoders(monkeypatch, model_dir):
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was constructed")

    monkeypatch.setattr(family_class(model_dir), "load_vae", refuse)
    monkeypatch.setattr(family_class(model_dir), "load_text_encoder", refuse)


def test_a_complete_cache_is_used_without_a_flag_and_no_encoder_is_built(
        tmp_path, tiny_model_dir, monkeypatch):
    from ditctl.precompute import run_precompute
    from ditctl.train import ensure_manifest, run_training

    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n_train=2, n_val=0, lora=LORA,
                        train={"max_steps": 1, "sample_every": 0})
    config = ws.config({"eval.holdout_fraction": 0.0})
    ensure_manifest(ws, config)
    run_precompute(ws, config)
    _no_encoders(monkeypatch, tiny_model_dir)
    assert run_training(ws, config).result.steps == 1


def _lora_weights(outcome):
    from safetensors.torch import load_file

    return load_file(outcome.result.checkpoint / "lora.safetensors")


@pytest.mark.slow
def test_a_repeating_run_fills_the_cache_and_trains_as_on_the_fly(tmp_path, tiny_model_dir,
                                                                  capsys):
    from ditctl.data.cache import Cache
    from ditctl.data.cache_plan import check_cache_complete
    from ditctl.models.registry import load_family
    from ditctl.train import run_training

    settings = dict(n_train=2, n_val=0, lora=LORA,
                    train={"max_steps": 4, "train_batch_size": 2, "sample_every": 0})
    auto = make_workspace(tmp_path / "auto", tiny_model_dir, **settings)
    config = auto.config({"eval.holdout_fraction": 0.0})
    filled = run_training(auto, config)  # 4 steps x 2 samples > 2 images x 2 flips
    assert "filling the precompute cache before training" in capsys.readouterr().err
    family = load_family(tiny_model_dir)
    check_cache_complete(auto, config, family, [])  # the cache now exists and is consistent
    assert Cache.open(auto, config, family).index_path.is_file()

    plain = make_workspace(tmp_path / "plain", tiny_model_dir, **settings)
    on_the_fly = run_training(plain, plain.config({"eval.holdout_fraction": 0.0,
                                                   "train.use_precomputed_data": False}))
    assert not (plain.root / "cache").exists()
    a, b = _lora_weights(filled), _lora_weights(on_the_fly)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_single_pass_run_encodes_on_the_fly_and_says_why(tmp_path, tiny_model_dir, capsys):
    from ditctl.train import run_training

    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n_train=2, n_val=0, lora=LORA,
                        train={"max_steps": 1, "sample_every": 0})
    run_training(ws, ws.config({"eval.holdout_fraction": 0.0}))
    err = capsys.readouterr().err
    assert "encoding images and captions on the fly" in err and "no gain" in err
    assert not (ws.root / "cache").exists()


def _plan_gap(ws, config, family, rows):
    """(latents, texts, missing latents, missing texts, their bytes on disk) from precompute's
    full plan of the same rows and prompts."""
    from ditctl.data.cache import Cache, CacheIndex
    from ditctl.data.cache_plan import PrecomputePlan, needed_prompts
    from ditctl.data.datasets import per_dataset

    cache = Cache.open(ws, config, family)
    with PrecomputePlan.build(cache.spec, [rows], prompts=needed_prompts(ws, config, family),
                              random_flip=per_dataset(config, "random_flip")) as plan:
        with CacheIndex(ws.root / "scratch-index.sqlite" if not cache.index_path.is_file()
                        else cache.index_path) as index:
            missing_latents, missing_texts = plan.find_missing(cache, index)
        batches = list(plan.latent_batches(8))
        counts = plan.counts
    itemsize = 2 if config.precompute.mixed_precision == "bf16" else 4
    latent, factor = family.latent, family.latent.spatial_factor
    values = 0
    for batch in batches:
        found = rows.reader.rows([sample for _, sample, _ in batch])
        values += sum((2 * latent.channels + (found[sample].mask is not None))
                      * (found[sample].bucket_h // factor) * (found[sample].bucket_w // factor)
                      for _, sample, _ in batch)
    values += missing_texts * family.text_tokens() * family.denoiser_shape().text_dim
    return (counts.latents, counts.texts, missing_latents, missing_texts, values * itemsize)


def test_the_streamed_gap_count_agrees_with_the_full_cache_plan(tmp_path, tiny_model_dir):
    """Training counts what the cache lacks while streaming the rows (nothing per row kept);
    the counts and the size estimate equal those of precompute's full plan: without a cache,
    with a complete one, and with entries missing."""
    from ditctl.data.cache import Cache, CacheIndex
    from ditctl.data.cache_plan import count_cache_gap
    from ditctl.data.sample_table import SampleTable
    from ditctl.models.registry import load_family
    from ditctl.precompute import run_precompute
    from ditctl.train import ensure_manifest

    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n_train=4, n_val=0, lora=LORA,
                        train={"max_steps": 1, "sample_every": 0})
    config = ws.config({"eval.holdout_fraction": 0.0, "data.random_flip": True,
                        "train.caption_dropout": 0.1})
    ensure_manifest(ws, config)
    family = load_family(tiny_model_dir)
    rows = SampleTable.read(ws.manifest_db, "train")

    def agree() -> None:
        counted = count_cache_gap(ws, config, family, rows)
        assert (counted.latents, counted.texts, counted.missing_latents, counted.missing_texts,
                counted.missing_bytes) == _plan_gap(ws, config, family, rows)

    agree()                                     # no cache: everything missing
    assert count_cache_gap(ws, config, family, rows).missing_latents == 8  # 4 images x 2 flips
    run_precompute(ws, config)
    agree()                                     # complete
    assert count_cache_gap(ws, config, family, rows).complete
    cache = Cache.open(ws, config, family)
    with CacheIndex(cache.index_path) as index:  # forget two latents and a caption
        doomed = [key for key, kind, _ in index.locations() if kind == "latent"][:2]
        doomed += [key for key, kind, _ in index.locations() if kind == "text"][:1]
        with index.db:
            index.db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in doomed])
    agree()
    gap = count_cache_gap(ws, config, family, rows)
    assert (gap.missing_latents, gap.missing_texts) == (2, 1)
