"""ditctl.runs: the run/checkpoint layout, and the one resolver every command reads
--checkpoint/--resume with."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ditctl.data.ingest import run_ingest
from ditctl.errors import CheckpointError
from ditctl.runs import (CheckpointWriter, checkpoint_dir, list_checkpoints, list_runs,
                         resolve_checkpoint, resolve_run)
from tests.conftest import make_workspace, write_test_checkpoint


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    """A complete checkpoint (a manifest, one small file) without any model."""
    folder = checkpoint_dir(run_dir, step)
    folder.mkdir(parents=True)
    files = CheckpointWriter(folder)
    files.write_bytes("trainable.safetensors", b"weights %d" % step)
    files.finish({"step": step, "lora": False})
    return folder


def fake_run(runs_dir: Path, name: str, steps=(), age: float = 0.0) -> Path:
    run = runs_dir / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text("")
    for step in steps:
        fake_checkpoint(run, step)
    when = time.time() - age
    for path in (run / "config.toml", run / "checkpoints"):
        os.utime(path, (when, when))
    return run


@pytest.fixture()
def runs_dir(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "old", (100, 200), age=100)
    fake_run(runs, "new", (100, 300, 1000), age=10)
    return runs


def test_runs_are_listed_by_activity_and_checkpoints_by_step(runs_dir):
    assert [p.name for p in list_runs(runs_dir)] == ["old", "new"]
    assert [p.name for p in list_checkpoints(runs_dir / "new")] == \
        ["step-000100", "step-000300", "step-001000"]  # by number, not by name
    (runs_dir / "old" / "train_log.jsonl").write_text("{}\n")  # "old" logs a step: now latest
    assert [p.name for p in list_runs(runs_dir)] == ["new", "old"]


@pytest.mark.parametrize("given, run, expected", [
    (None, None, "new/step-001000"),
    ("latest", None, "new/step-001000"),
    ("latest", "old", "old/step-000200"),
    ("100", None, "new/step-000100"),
    ("100", "old", "old/step-000100"),
    ("step-000100", "old", "old/step-000100"),
    ("old", None, "old/step-000200"),
    ("{runs}/old/checkpoints/step-000100", None, "old/step-000100"),
    ("{runs}/old", None, "old/step-000200"),
])
def test_one_resolver_reads_every_form(runs_dir, given, run, expected):
    if given is not None:
        given = given.format(runs=runs_dir)
    found = resolve_checkpoint(runs_dir, given, run=run)
    run_name, name = expected.split("/")
    assert found == runs_dir / run_name / "checkpoints" / name


def test_resolver_errors_say_what_exists(runs_dir):
    with pytest.raises(CheckpointError, match="run new has no checkpoint step-000150") as info:
        resolve_checkpoint(runs_dir, "150")
    assert "100, 300, 1000" in info.value.hint
    with pytest.raises(CheckpointError, match="no checkpoint 'nope'"):
        resolve_checkpoint(runs_dir, "nope")
    with pytest.raises(CheckpointError, match="no run named 'gone'") as info:
        resolve_run(runs_dir, "gone")
    assert "old, new" in info.value.hint


def test_the_latest_run_without_a_checkpoint_is_named_not_skipped(runs_dir):
    fake_run(runs_dir, "killed")  # newest, killed before its first checkpoint
    with pytest.raises(CheckpointError, match="run killed has no complete checkpoint") as info:
        resolve_checkpoint(runs_dir, "latest")
    assert "--run" in info.value.hint and "old, new" in info.value.hint


# --- every command reads --checkpoint the same way ------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    """Run r with LoRA checkpoints at steps 100 and 200 (200 is the latest)."""
    ws = make_workspace(tmp_path_factory.mktemp("runs") / "w", tiny_model_dir,
                        train={"eval_batch_size": 2})
    with open(ws.root / "project.toml", "a") as fh:  # one validation timestep: quick
        fh.write("\n[eval]\ntimestep_quantiles = [0.5]\n")
    run_ingest(ws, ws.config())
    run = ws.root / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text((ws.root / "project.toml").read_text())
    for i, step in enumerate((100, 200)):
        folder = write_test_checkpoint(tiny_model_dir, run / "checkpoints" / f"step-{step:06d}",
                                       seed=i)
        marker = folder / "checkpoint.json"
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "step": step}))
    return ws.root


@pytest.mark.parametrize("command", ["sample", "eval", "export"])
def test_checkpoint_100_means_step_100_for_every_command(cli, workspace, command):
    args = {"sample": ["sample", "--steps", "1", "--json"],
            "eval": ["eval", "--steps", "1", "--json"],
            "export": ["export", "--json", "--name", "by-step"]}[command]
    result = cli(*args, "-w", workspace, "--checkpoint", "100")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    used = {"sample": lambda: out["checkpoint"],
            "eval": lambda: out["models"][-1]["checkpoint"],
            "export": lambda: out["checkpoint"]}[command]()
    assert Path(used).resolve() == (workspace / "runs" / "r" / "checkpoints" /
                                    "step-000100").resolve()
