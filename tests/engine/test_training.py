"""Exactness of the training engine: resume, accumulation, LoRA freezing, sources, NaN guard."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import family_class, make_workspace  # noqa: E402

from ditctl.errors import CheckpointError, TrainingError  # noqa: E402
from ditctl.runs import list_checkpoints  # noqa: E402
from ditctl.train import run_training  # noqa: E402


def _train(ws, **overrides):
    resume = overrides.pop("resume", None)
    force = overrides.pop("force", False)
    config = ws.config({k if "." in k else f"train.{k}": v for k, v in overrides.items()})
    return run_training(ws, config, resume=resume, force=force)


def _losses(run_dir, key="train/loss"):
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {d["step"]: d.get(key) for d in map(json.loads, lines)}


def _weights(checkpoint):
    out = {}
    for name in ("lora.safetensors", "trainable.safetensors"):
        if (checkpoint / name).is_file():
            out.update(load_file(checkpoint / name))
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


def stop_after(step, monkeypatch):
    """Send this process SIGTERM while logging `step`, as a scheduler stopping a job would."""
    import os
    import signal

    from ditctl.engine.monitor import Monitor

    original = Monitor.log_step

    def log_step(self, at, *args, **kwargs):
        original(self, at, *args, **kwargs)
        if at == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Monitor, "log_step", log_step)


def test_resume_is_bit_identical_mid_epoch_with_accumulation(tmp_path, tiny_model_dir, monkeypatch):
    settings = dict(train={"train_batch_size": 2, "gradient_accumulation_steps": 2,
                           "learning_rate": 1e-3, "lr_scheduler": "cosine", "num_warmup_steps": 1},
                    lora=LORA, data={"random_flip": True})
    straight = make_workspace(tmp_path / "a", tiny_model_dir, n_train=10, **settings)
    full = _train(straight, max_steps=5, checkpoint_every=100, run_name="r")
    split = make_workspace(tmp_path / "b", tiny_model_dir, n_train=10, **settings)
    stop_after(2, monkeypatch)  # SIGTERM during step 2: checkpoint, then stop (mid-epoch 1)
    stopped = _train(split, max_steps=5, checkpoint_every=100, run_name="r")
    assert stopped.result.interrupted and stopped.result.steps == 2
    monkeypatch.undo()
    resumed = _train(split, max_steps=5, checkpoint_every=100, resume="latest")
    assert resumed.run.name == "r" and resumed.result.steps == 5
    _assert_same(_weights(full.result.checkpoint), _weights(resumed.result.checkpoint))
    assert _losses(straight.root / "runs" / "r") == _losses(split.root / "runs" / "r")
    # the smoothed curve continues over the resume (its state is in the checkpoint)
    smoothed = _losses(split.root / "runs" / "r", "train/loss_smoothed")
    assert list(smoothed) == [1, 2, 3, 4, 5] and None not in smoothed.values()
    assert smoothed == _losses(straight.root / "runs" / "r", "train/loss_smoothed")
    a = json.loads((full.result.checkpoint / "checkpoint.json").read_text())
    b = json.loads((resumed.result.checkpoint / "checkpoint.json").read_text())
    assert (a["epoch"], a["batch_index"]) == (b["epoch"], b["batch_index"])


def test_resume_with_changed_config_is_refused_unless_forced(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, lora=LORA)
    _train(ws, max_steps=1, run_name="r")
    with pytest.raises(CheckpointError, match=r"\[train\] learning_rate 0.0001 -> 0.01"):
        _train(ws, max_steps=2, learning_rate=1e-2, resume="latest")
    assert _train(ws, max_steps=2, learning_rate=1e-2, resume="latest", force=True).result.steps == 2


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_model_dir):
    common = dict(lora=LORA, n_train=8)
    big = make_workspace(tmp_path / "big", tiny_model_dir, train={"train_batch_size": 4}, **common)
    small = make_workspace(tmp_path / "small", tiny_model_dir,
                           train={"train_batch_size": 2, "gradient_accumulation_steps": 2}, **common)
    # batches are planned per global batch: same samples, same per-sample noise
    a = _train(big, max_steps=2, learning_rate=1e-3)
    b = _train(small, max_steps=2, learning_rate=1e-3)
    wa, wb = _weights(a.result.checkpoint), _weights(b.result.checkpoint)
    # equal up to summation order: one batch of 4 vs two of 2 (max difference measured 1.6e-6
    # with F-Lite's 512 text states per prompt)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=5e-6, rtol=1e-5)


def test_train_only_lora_freezes_the_base_and_use_lora_trains_both(tmp_path, tiny_model_dir):
    from ditctl.engine.loading import load_denoiser
    from ditctl.models.registry import load_family

    family = load_family(tiny_model_dir)
    base = {k: v.clone() for k, v in family.load_denoiser().state_dict().items()}
    only = make_workspace(tmp_path / "only", tiny_model_dir, lora=LORA)
    out = _train(only, max_steps=2, learning_rate=1e-2)
    assert not (out.result.checkpoint / "trainable.safetensors").exists()
    both = make_workspace(tmp_path / "both", tiny_model_dir,
                          lora={"use_lora": True, "lora_rank": 4, "lora_alpha": 4})
    out2 = _train(both, max_steps=2, learning_rate=1e-2)
    trained_base = load_file(out2.result.checkpoint / "trainable.safetensors")
    changed = [k for k, v in trained_base.items() if "base_layer" not in k and k in base
               and not torch.equal(v, base[k])]
    assert changed, "use_lora without train_only_lora must train the base too"
    # the LoRA-only run's merged model still holds the untouched base weights
    model = load_denoiser(family, out.result.checkpoint)
    for name, value in model.state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in base:
            assert torch.equal(value, base[key]), name


def test_cached_and_on_the_fly_training_are_identical(tmp_path, tiny_model_dir):
    from ditctl.precompute import run_precompute

    settings = dict(lora=LORA, data={"random_flip": True, "center_crop": False},
                    sizes=((32, 32), (48, 32)), n_train=6)
    fly = make_workspace(tmp_path / "fly", tiny_model_dir, **settings)
    a = _train(fly, max_steps=3, train_batch_size=2, learning_rate=1e-3)
    cached = make_workspace(tmp_path / "cached", tiny_model_dir, **settings)
    config = cached.config()
    from ditctl.train import ensure_manifest
    ensure_manifest(cached, config)
    run_precompute(cached, config)
    b = _train(cached, max_steps=3, train_batch_size=2, learning_rate=1e-3,
               use_precomputed_data=True)
    _assert_same(_weights(a.result.checkpoint), _weights(b.result.checkpoint))


def test_nonfinite_loss_steps_are_skipped_then_training_stops(tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, lora=LORA)
    family = family_class(tiny_model_dir)
    predict = family.predict
    monkeypatch.setattr(family, "predict",
                        lambda self, model, x, t, c: predict(self, model, x, t, c) * float("nan"))
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss"):
        _train(ws, max_steps=10, max_nonfinite_steps=3, checkpoint_every=1, run_name="nan")
    assert list_checkpoints(ws.root / "runs" / "nan") == []


def test_eight_bit_adam_and_full_finetuning_run(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir)
    out = _train(ws, max_steps=2, use_8bit_adam=True, learning_rate=1e-3)
    state = json.loads((out.result.checkpoint / "optimizer.json").read_text())
    assert "state1" in json.dumps(state)  # bitsandbytes' quantised moments were saved
    assert (out.result.checkpoint / "trainable.safetensors").is_file()


def test_max_steps_extends_beyond_num_epochs(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA)
    out = _train(ws, max_steps=5, train_batch_size=2, num_epochs=1)
    meta = json.loads((out.result.checkpoint / "checkpoint.json").read_text())
    assert out.result.steps == 5 and meta["epoch"] == 2 and meta["batch_index"] == 1


def test_out_of_memory_saves_nothing_and_lists_the_options_not_in_use(tmp_path, tiny_model_dir,
                                                                      monkeypatch):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, train={"train_batch_size": 2})

    def oom(self, model, x, t, c):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(family_class(tiny_model_dir), "predict", oom)
    with pytest.raises(TrainingError, match="out of memory") as err:
        _train(ws, max_steps=3, checkpoint_every=1, run_name="oom", gradient_checkpointing=True)
    hint = err.value.hint
    for flag in ("--train-batch-size 1", "--gradient-accumulation-steps 2", "--use-8bit-adam",
                 "--mixed-precision bf16", "--lora"):
        assert flag in hint, flag
    assert "--gradient-checkpointing" not in hint  # already in use
    assert "precompute" not in hint  # the cache is used by default
    from ditctl.engine.plan import memory_advice

    on_the_fly = ws.config({"train.use_precomputed_data": False})
    assert any("ditctl precompute" in line for line in memory_advice(on_the_fly))
    assert list_checkpoints(ws.root / "runs" / "oom") == []


def test_a_stop_request_arriving_late_in_a_step_still_saves_a_checkpoint(tmp_path,
                                                                         tiny_model_dir,
                                                                         monkeypatch):
    """SIGTERM after the step decided it was not the last (here: while it samples) is honoured
    at the next step, with a checkpoint — never a stop without one."""
    import os
    import signal

    from ditctl.engine.monitor import Monitor

    def sample_then_signal(self, model, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Monitor, "sample", sample_then_signal)
    ws = make_workspace(tmp_path / "w", tiny_model_dir, lora=LORA)
    outcome = _train(ws, max_steps=6, checkpoint_every=100, sample_every=1, run_name="late")
    assert outcome.result.interrupted and outcome.result.steps == 3
    assert [c.name for c in list_checkpoints(ws.root / "runs" / "late")] == ["step-000003"]


def test_logs_are_read_back_every_log_every_steps_and_hold_every_step(tmp_path, tiny_model_dir,
                                                                     monkeypatch):
    """Losses stay on the accelerator between log steps (no host synchronisation); the records
    written later are the same, step for step, as when every step is read back at once."""
    from ditctl.engine.monitor import Monitor

    flushed_at = []
    flush = Monitor.flush

    def counting_flush(self):
        flushed_at.append(self.pending[-1].step if self.pending else None)
        return flush(self)

    monkeypatch.setattr(Monitor, "flush", counting_flush)
    logs, smoothed = [], []
    for every in (1, 3):
        ws = make_workspace(tmp_path / f"w{every}", tiny_model_dir, lora=LORA)
        out = _train(ws, max_steps=7, log_every=every, checkpoint_every=5, run_name="r",
                     learning_rate=1e-3)
        lines = (ws.root / "runs" / "r" / "train_log.jsonl").read_text().splitlines()
        logs.append([{k: v for k, v in json.loads(line).items()
                      if not k.startswith(("time/", "throughput/", "memory/"))}
                     for line in lines])
        smoothed.append(json.loads((ws.root / "runs" / "r" / "checkpoints" / "step-000005"
                                    / "checkpoint.json").read_text())["monitor"])
        assert out.result.final_loss == logs[-1][-1]["train/loss"]
    assert flushed_at == [1, 2, 3, 4, 5, 6, 7] + [3, 5, 6, 7]  # log steps, checkpoint, last
    assert [entry["step"] for entry in logs[1]] == list(range(1, 8))
    assert logs[0] == logs[1]
    assert smoothed[0] == smoothed[1]  # a checkpoint's monitor state includes every step
