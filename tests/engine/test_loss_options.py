"""Training with loss masks and the timestep / loss-weighting options: exact resume, cached ==
on the fly, and each option reaching the loss (engine/objective.py, data masks)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_workspace  # noqa: E402
from data.test_masks import add_masks  # noqa: E402
from engine.test_training import (LORA, _assert_same, _losses, _train, _weights,  # noqa: E402
                                  stop_after)

MASKED = dict(lora=LORA, n_train=8, n_val=0, sizes=((32, 32), (48, 32)),
              data={"use_masks": True, "random_flip": True, "center_crop": False})
OPTIONS = {"timestep_sampling": "mode", "mode_scale": 0.8, "timestep_shift": 2.0,
           "loss_weighting": "cosmap", "masked_loss_floor": 0.1}


def _masked_workspace(root, model_dir, train=None):
    ws = make_workspace(root, model_dir, train=train, **MASKED)
    add_masks(ws.root)
    return ws


def test_masked_training_with_every_option_resumes_bit_identically(tmp_path, tiny_model_dir,
                                                                    monkeypatch):
    settings = {"train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
                **OPTIONS}
    straight = _masked_workspace(tmp_path / "a", tiny_model_dir, settings)
    full = _train(straight, max_steps=4, checkpoint_every=100, run_name="r")
    split = _masked_workspace(tmp_path / "b", tiny_model_dir, settings)
    stop_after(2, monkeypatch)
    assert _train(split, max_steps=4, checkpoint_every=100, run_name="r").result.steps == 2
    monkeypatch.undo()
    resumed = _train(split, max_steps=4, checkpoint_every=100, resume="latest")
    _assert_same(_weights(full.result.checkpoint), _weights(resumed.result.checkpoint))
    assert _losses(straight.root / "runs" / "r") == _losses(split.root / "runs" / "r")


def test_masked_training_from_the_cache_equals_on_the_fly(tmp_path, tiny_model_dir):
    from ditctl.precompute import run_precompute
    from ditctl.train import ensure_manifest

    fly = _masked_workspace(tmp_path / "fly", tiny_model_dir, OPTIONS)
    a = _train(fly, max_steps=3, train_batch_size=2, learning_rate=1e-3,
               use_precomputed_data=False)
    cached = _masked_workspace(tmp_path / "cached", tiny_model_dir, OPTIONS)
    config = cached.config()
    ensure_manifest(cached, config)
    run_precompute(cached, config)
    b = _train(cached, max_steps=3, train_batch_size=2, learning_rate=1e-3)
    _assert_same(_weights(a.result.checkpoint), _weights(b.result.checkpoint))
    assert _losses(fly.root / "runs" / a.run.name) == _losses(cached.root / "runs" / b.run.name)


@pytest.mark.parametrize("change", [
    {"data.use_masks": False},
    {"train.loss_weighting": "none"},
    {"train.timestep_sampling": "uniform", "train.mode_scale": 1.29},
    {"train.timestep_shift": None},
    {"train.masked_loss_floor": 0.0},
])
def test_each_option_changes_the_first_steps_loss(tmp_path, tiny_model_dir, change):
    """Same weights, same noise: the step-1 loss differs exactly because of the option."""
    ws = _masked_workspace(tmp_path / "w", tiny_model_dir, {**OPTIONS, "train_batch_size": 4})
    base = _train(ws, max_steps=1, run_name="base")
    other = _train(ws, max_steps=1, run_name="other",
                   **{**({"train.masked_loss_floor": 0.0} if change.get("data.use_masks") is False
                         else {}), **change})
    a, b = _losses(ws.root / "runs" / base.run.name), _losses(ws.root / "runs" / other.run.name)
    assert a[1] != b[1], change


def test_dry_run_names_the_objective(tmp_path, tiny_model_dir, cli, monkeypatch):
    ws = _masked_workspace(tmp_path / "w", tiny_model_dir, OPTIONS)
    monkeypatch.chdir(ws.root)
    plan = json.loads(cli("train", "--dry-run", "--json").stdout)["objective"]
    # 8 images, the last (maskless) held out for validation; masks on 3 of every 4
    assert plan == {"timesteps": "mode (scale 0.8), shifted by a fixed 2",
                    "loss_weighting": "cosmap",
                    "loss_mask": "6 of 7 images masked, masked-out areas weigh 0.1"}
    text = cli("train", "--dry-run").stdout
    assert "loss mask" in text and "mode (scale 0.8)" in text
