"""The data loader's worker processes hand the loop exactly what it would have read itself, in
the planned order, from any position: training is the same bits with 0, 1 or 2 workers, also
across a resume. A worker's error names the file; workers ignore Ctrl-C and stop with the loop.
"""

import itertools
import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_workspace  # noqa: E402

from ditctl.data.batches import LatentDist, PixelReader  # noqa: E402
from ditctl.engine.checkpoint import Position  # noqa: E402
from ditctl.engine.context import TrainingData  # noqa: E402
from ditctl.engine.loader import InputLoader  # noqa: E402
from ditctl.engine.loop import micro_jobs  # noqa: E402
from ditctl.engine.setup import Schedule  # noqa: E402
from ditctl.errors import DataError  # noqa: E402
from ditctl.train import ensure_manifest, run_training  # noqa: E402

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


class PixelsOnly:
    """A source whose model-free half is on-the-fly training's (no encoder is needed to read)."""

    def __init__(self):
        self.reader = PixelReader((False,), 10**8, 8)


@pytest.fixture
def planned(tmp_path, tiny_model_dir):
    """(training data read on the fly, a function giving the run's jobs from a position)."""
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=6, n_val=0,
                        data={"random_flip": True, "center_crop": False})
    rows = ensure_manifest(ws, ws.config())
    data = TrainingData(rows, PixelsOnly(), seed=3, step_batch=4, random_flip=True)
    schedule = Schedule(micro_batch=2, accumulation=2, steps_per_epoch=2, total_steps=6)

    def jobs(position=Position(0, 0, 0)):
        return lambda: micro_jobs(data, position, schedule, 0, 1, 1, 3)

    return data, jobs


def _children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def _assert_same_inputs(a, b):
    assert a.indices == b.indices and a.texts == b.texts
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images):
        assert not isinstance(x, LatentDist) and torch.equal(x, y)


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_read_every_planned_micro_batch_in_order_from_any_position(planned, workers):
    data, jobs = planned
    before = _children()
    start = Position(2, 1, 0)  # a resume: step 2 done, the next batch is epoch 1's first
    with InputLoader(data, jobs(start), last_step=5, num_workers=workers) as loader:
        if workers:
            assert len(_children() - before) == workers
        expected = list(itertools.takewhile(lambda job: job.step <= 5, jobs(start)()))
        assert len(expected) == 3 * 2  # steps 3, 4, 5, two micro-batches each
        for job in expected:
            _assert_same_inputs(loader.read(job), data.read(list(job.rows), job.epoch))
    assert _children() == before  # the workers are gone with the loader


def test_workers_ignore_ctrl_c_the_training_process_decides(planned):
    data, jobs = planned
    before = _children()
    with InputLoader(data, jobs(), last_step=3, num_workers=2) as loader:
        for pid in _children() - before:
            os.kill(pid, signal.SIGINT)  # the terminal's Ctrl-C reaches the process group
        for job in jobs()():
            if job.step > 3:
                break
            _assert_same_inputs(loader.read(job), data.read(list(job.rows), job.epoch))
    assert _children() == before


def test_an_error_in_a_worker_names_the_file_and_stops_the_workers(planned):
    data, jobs = planned
    first = next(jobs()())
    row = data.rows[first.rows[0]]
    os.utime(row.path, ns=(row.mtime_ns + 10**9, row.mtime_ns + 10**9))  # edited after ingest
    before = _children()
    with pytest.raises(DataError, match="changed since ingest") as info:
        with InputLoader(data, jobs(), last_step=3, num_workers=2) as loader:
            loader.read(first)
    assert str(row.path) in str(info.value) and "ditctl ingest" in info.value.hint
    assert _children() == before


def test_an_image_that_no_longer_decodes_is_a_one_line_error_naming_it(planned):
    data, jobs = planned
    first = next(jobs()())
    row = data.rows[first.rows[0]]
    path = Path(row.path)
    path.write_bytes(b"\0" * path.stat().st_size)  # same size and mtime: only decoding fails
    os.utime(path, ns=(row.mtime_ns, row.mtime_ns))
    with pytest.raises(DataError, match="readable at ingest") as info:
        with InputLoader(data, jobs(), last_step=1, num_workers=2) as loader:
            loader.read(first)
    assert str(info.value).startswith(row.image_name) and "ditctl ingest" in info.value.hint


def test_a_cache_read_error_in_a_worker_is_the_caches_one_line_error(tmp_path, tiny_model_dir):
    from ditctl.data.batches import CachedSource
    from ditctl.data.cache import Cache
    from ditctl.errors import CacheError
    from ditctl.models.registry import load_family

    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, n_val=0)
    config = ws.config()
    rows = ensure_manifest(ws, config)
    cached = CachedSource(Cache.open(ws, config, load_family(tiny_model_dir)))  # never filled
    data = TrainingData(rows, cached, seed=3, step_batch=2, random_flip=False)
    schedule = Schedule(micro_batch=2, accumulation=1, steps_per_epoch=2, total_steps=2)
    plan = lambda: micro_jobs(data, Position(0, 0, 0), schedule, 0, 1, 1, 3)  # noqa: E731
    with pytest.raises(CacheError) as in_process:
        data.read(list(next(plan()).rows), 0)
    before = _children()
    with pytest.raises(CacheError) as in_worker:
        with InputLoader(data, plan, last_step=2, num_workers=2) as loader:
            loader.read(next(plan()))
    assert str(in_worker.value) == str(in_process.value)  # the same line, the same file named
    assert in_worker.value.hint == in_process.value.hint
    assert _children() == before


def test_another_worker_count_needs_no_new_ingest(tmp_path, tiny_model_dir):
    from ditctl.data.manifest import stale_manifest_reason

    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=2, n_val=0)
    ensure_manifest(ws, ws.config())
    assert stale_manifest_reason(ws, ws.config({"data.num_workers": 0})) is None
    assert stale_manifest_reason(ws, ws.config({"data.resolution": 48})) is not None


def test_the_loader_refuses_a_job_out_of_the_plans_order(planned):
    data, jobs = planned
    plan = jobs()()
    next(plan)
    with InputLoader(data, jobs(), last_step=3, num_workers=0) as loader:
        with pytest.raises(RuntimeError, match="the loop wants"):
            loader.read(next(plan))


# --- training ---------------------------------------------------------------------------------

def _train(ws, **overrides):
    resume = overrides.pop("resume", None)
    config = ws.config({k if "." in k else f"train.{k}": v for k, v in overrides.items()})
    return run_training(ws, config, resume=resume)


def _losses(run_dir):
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {d["step"]: d.get("train/loss") for d in map(json.loads, lines)}


def _weights(checkpoint):
    return load_file(checkpoint / "lora.safetensors")


def test_on_the_fly_training_is_the_same_with_any_worker_count_and_across_a_resume(
        tmp_path, tiny_model_dir, monkeypatch):
    from ditctl.engine.monitor import Monitor

    settings = dict(train={"train_batch_size": 2, "gradient_accumulation_steps": 2,
                           "learning_rate": 1e-3, "use_precomputed_data": False},
                    lora=LORA, data={"random_flip": True, "center_crop": False}, n_train=6)
    straight = make_workspace(tmp_path / "a", tiny_model_dir, **settings)
    full = _train(straight, max_steps=4, run_name="r", **{"data.num_workers": 0})

    split = make_workspace(tmp_path / "b", tiny_model_dir, **settings)
    original = Monitor.log_step

    def log_step(self, at, *args, **kwargs):  # SIGTERM during step 2: checkpoint and stop
        original(self, at, *args, **kwargs)
        if at == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Monitor, "log_step", log_step)
    before = _children()
    stopped = _train(split, max_steps=4, run_name="r", **{"data.num_workers": 2})
    assert stopped.result.interrupted and stopped.result.steps == 2
    assert _children() == before  # the stop shut the workers down
    monkeypatch.undo()
    resumed = _train(split, max_steps=4, resume="latest", **{"data.num_workers": 1})
    assert resumed.result.steps == 4

    a, b = _weights(full.result.checkpoint), _weights(resumed.result.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(straight.root / "runs" / "r") == _losses(split.root / "runs" / "r")


def test_a_changed_image_stops_training_with_workers_naming_it(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA,
                        train={"use_precomputed_data": False})
    rows = ensure_manifest(ws, ws.config())
    for row in rows:  # every image edited after ingest: the first micro-batch meets one
        os.utime(row.path, ns=(row.mtime_ns + 10**9, row.mtime_ns + 10**9))
    before = _children()
    with pytest.raises(DataError, match="changed since ingest") as info:
        _train(ws, max_steps=2, **{"data.num_workers": 2})
    assert any(str(row.path) in str(info.value) for row in rows)
    assert _children() == before
