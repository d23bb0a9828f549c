"""Training on several datasets: regularization loss weights, exact resume, cache == on the fly,
and the --dry-run plan."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_workspace  # noqa: E402
from test_training import (LORA, _assert_same, _losses, _train, _weights,  # noqa: E402
                           stop_after)


def _two_datasets(root, model_dir, reg=None, data=None, train=None, n_train=4, n_reg=4):
    """train.csv (32x32 scenes) plus reg.csv (48x32 scenes, tag captions), the second a
    regularization set."""
    from ditctl.demo.scenes import random_scenes, write_dataset

    table = {"path": "data/reg.csv", "role": "regularization", "loss_weight": 0.25,
             **(reg or {})}
    ws = make_workspace(root, model_dir, n_train=n_train, n_val=0, lora=LORA, train=train,
                        data={"datasets": [table], **(data or {})})
    csv = write_dataset(ws.root / "data", random_scenes(n_reg, 11, sizes=((48, 32),)),
                        csv_name="reg.csv")
    # tag-style captions ("a, red, circle, on, a, white, background"): shuffling moves them
    header, *lines = csv.read_text().splitlines()
    csv.write_text("\n".join([header] + [f'{path},"{", ".join(caption.split())}"'
                                          for path, caption in (l.split(",", 1) for l in lines)])
                   + "\n")
    return ws


def test_regularization_images_get_their_loss_weight(tmp_path, tiny_model_dir, monkeypatch):
    from ditctl.engine import loop, objective

    seen = []

    def recording(prediction, batch, *args):
        seen.append(batch.weight.clone())
        return objective.per_sample_loss(prediction, batch, *args)

    monkeypatch.setattr(loop, "per_sample_loss", recording)
    ws = _two_datasets(tmp_path / "w", tiny_model_dir, train={"train_batch_size": 8})
    _train(ws, max_steps=1, learning_rate=1e-3)
    (weight,) = seen
    assert sorted(weight.tolist()) == [0.25] * 4 + [1.0] * 4

    # the weight reaches the gradient: the regularization set alone (no train_data_path), with
    # loss weight 0 (and no weight decay) trains nothing, with 1 it trains
    monkeypatch.undo()
    lora_b = {}
    for w in (0.0, 1.0):
        ws = _two_datasets(tmp_path / f"z{w}", tiny_model_dir, reg={"loss_weight": w},
                           train={"weight_decay": 0.0, "train_batch_size": 4})
        trained = _weights(_train(ws, max_steps=2, learning_rate=1e-2,
                                  **{"data.train_data_path": None}).result.checkpoint)
        lora_b[w] = [v for k, v in trained.items() if "lora_B" in k]  # peft starts B at 0
    assert lora_b[0.0] and all(torch.count_nonzero(v) == 0 for v in lora_b[0.0])
    assert any(torch.count_nonzero(v) > 0 for v in lora_b[1.0])


def test_resume_with_two_datasets_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch):
    """Repeats, weights, per-dataset crops and flips, caption dropout, tag shuffling and a
    regularization loss weight, stopped mid-epoch and resumed."""
    settings = dict(
        reg={"repeats": 2, "center_crop": True, "random_flip": False, "caption_dropout": 0.5,
             "shuffle_tags": True, "keep_tokens": 1, "trigger_word": "prior"},
        data={"random_flip": True, "center_crop": False},
        train={"train_batch_size": 2, "gradient_accumulation_steps": 2,
               "learning_rate": 1e-3, "lr_scheduler": "cosine"})
    straight = _two_datasets(tmp_path / "a", tiny_model_dir, **settings)
    full = _train(straight, max_steps=5, checkpoint_every=100, run_name="r")
    split = _two_datasets(tmp_path / "b", tiny_model_dir, **settings)
    stop_after(2, monkeypatch)
    stopped = _train(split, max_steps=5, checkpoint_every=100, run_name="r")
    assert stopped.result.interrupted and stopped.result.steps == 2
    monkeypatch.undo()
    resumed = _train(split, max_steps=5, checkpoint_every=100, resume="latest")
    assert resumed.result.steps == 5
    _assert_same(_weights(full.result.checkpoint), _weights(resumed.result.checkpoint))
    assert _losses(straight.root / "runs" / "r") == _losses(split.root / "runs" / "r")


@pytest.mark.parametrize("shuffle", [False, True])
def test_cached_and_on_the_fly_training_are_identical_with_two_datasets(tmp_path,
                                                                         tiny_model_dir,
                                                                         shuffle):
    """Per-dataset crops and flips reach the latent keys; with shuffled tags the latents come
    from the cache and the captions are encoded while training."""
    from ditctl.precompute import run_precompute
    from ditctl.train import ensure_manifest

    settings = dict(reg={"center_crop": False, "random_flip": True, "repeats": 2,
                         "shuffle_tags": shuffle, "trigger_word": "prior"},
                    data={"center_crop": True, "random_flip": False},
                    train={"train_batch_size": 2})
    fly = _two_datasets(tmp_path / "fly", tiny_model_dir, **settings)
    a = _train(fly, max_steps=3, learning_rate=1e-3, use_precomputed_data=False)
    cached = _two_datasets(tmp_path / "cached", tiny_model_dir, **settings)
    config = cached.config()
    ensure_manifest(cached, config)
    run_precompute(cached, config)
    b = _train(cached, max_steps=3, learning_rate=1e-3, use_precomputed_data=True)
    _assert_same(_weights(a.result.checkpoint), _weights(b.result.checkpoint))


def test_dry_run_shows_each_dataset_and_its_share(tmp_path, tiny_model_dir):
    from ditctl.train import run_training

    ws = _two_datasets(tmp_path / "w", tiny_model_dir,
                       reg={"repeats": 3, "shuffle_tags": True, "caption_dropout": 0.0},
                       train={"train_batch_size": 2})
    plan = run_training(ws, ws.config(), dry_run=True).plan
    first, reg = plan["datasets"]
    assert (first["name"], first["images"], first["images_per_epoch"]) == ("train", 4, 4)
    assert (reg["name"], reg["role"], reg["images"], reg["repeats"], reg["images_per_epoch"],
            reg["loss_weight"], reg["caption_dropout"]) == \
        ("reg", "regularization", 4, 3, 12, 0.25, 0.0)
    # 12 of 16 samples per epoch are shuffled: 2 x 12/16 captions encoded per step
    assert reg["captions_encoded_per_step"] == 1.5 and first["captions_encoded_per_step"] == 0
    assert plan["steps_per_epoch"] == 8


def test_accumulation_equals_the_larger_batch_with_weighted_datasets(tmp_path, tiny_model_dir):
    """Weights and repeats are planned per global batch: accumulating 2 x 2 trains on the same
    samples, with the same noise, dropout and loss weights, as one batch of 4."""
    settings = dict(reg={"weight": 3.0, "repeats": 2, "caption_dropout": 0.5,
                         "shuffle_tags": True},
                    n_train=4, n_reg=3)
    big = _two_datasets(tmp_path / "big", tiny_model_dir, train={"train_batch_size": 4},
                        **settings)
    small = _two_datasets(tmp_path / "small", tiny_model_dir,
                          train={"train_batch_size": 2, "gradient_accumulation_steps": 2},
                          **settings)
    a = _train(big, max_steps=3, learning_rate=1e-3)
    b = _train(small, max_steps=3, learning_rate=1e-3)
    wa, wb = _weights(a.result.checkpoint), _weights(b.result.checkpoint)
    for k in wa:  # equal up to summation order (see test_training's accumulation test)
        torch.testing.assert_close(wa[k], wb[k], atol=5e-6, rtol=1e-5)


def test_validation_during_training_reports_each_dataset(tmp_path, tiny_model_dir):
    """Without a val split each dataset's last tenth is held out, and measured on its own."""
    import json

    ws = _two_datasets(tmp_path / "w", tiny_model_dir, n_train=10, n_reg=10,
                       train={"eval_every": 1})
    out = _train(ws, max_steps=1, run_name="r")
    (line,) = (ws.root / "runs" / "r" / "eval" / "during_training.jsonl").read_text() \
        .splitlines()
    record = json.loads(line)
    assert {"val_loss", "val_loss_train", "val_loss_reg"} <= set(record)
    assert record["val_loss"] == pytest.approx((record["val_loss_train"]
                                                + record["val_loss_reg"]) / 2)
    assert out.run.info["train_images"] == 18  # 9 + 9 train, 1 + 1 held out


@pytest.mark.slow
def test_two_processes_match_one_with_two_datasets(tmp_path, tiny_model_dir):
    """Each dataset's share, repeats, caption dropout, shuffled tags and loss weight are planned
    per global batch: two processes of 2 train as one of 4."""
    import json
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    logs = []
    for processes, batch in ((1, 4), (2, 2)):
        ws = _two_datasets(tmp_path / f"p{processes}", tiny_model_dir,
                           reg={"weight": 2.0, "repeats": 2, "caption_dropout": 0.5,
                                "shuffle_tags": True})
        subprocess.run([sys.executable, "-m", "ditctl", "train", "-w", str(ws.root),
                        "--num-processes", str(processes), "--train-batch-size", str(batch),
                        "--max-steps", "3", "--learning-rate", "1e-3", "--run-name", "r"],
                       env=env, check=True, capture_output=True)
        lines = (ws.root / "runs" / "r" / "train_log.jsonl").read_text().splitlines()
        logs.append([json.loads(line)["train/loss"] for line in lines])
    assert len(logs[0]) == len(logs[1]) == 3
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)


def test_dataset_loss_weights_multiply_the_timestep_weighting(tiny_model_dir):
    from ditctl.engine.objective import TimestepDensity, loss_weights, noised_batch
    from ditctl.models.base import Conditioning, LatentDist
    from ditctl.models.registry import load_family

    family = load_family(tiny_model_dir)
    dist = LatentDist(torch.zeros(3, family.latent.channels, 4, 4),
                      torch.ones(3, family.latent.channels, 4, 4) * 0.1)
    cond = Conditioning(torch.zeros(3, 8, family.denoiser_shape().text_dim))
    args = (family, dist, cond, [1, 2, 3], TimestepDensity(), 0.0, True)
    plain = noised_batch(*args)
    assert plain.weight is None
    only_datasets = noised_batch(*args, sample_weights=[1.0, 0.25, 0.0])
    assert only_datasets.weight.tolist() == [1.0, 0.25, 0.0]
    both = noised_batch(*args, weighting="sigma_sqrt", sample_weights=[1.0, 0.25, 0.0])
    expected = loss_weights(both.t, "sigma_sqrt") * torch.tensor([1.0, 0.25, 0.0])
    assert torch.equal(both.weight, expected) and torch.equal(both.t, plain.t)
