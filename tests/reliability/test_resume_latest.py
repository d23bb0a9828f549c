"""`--resume latest` continues the run being resumed: `--run NAME` picks it; without it, the
most recently active run, and when that one was killed before its first checkpoint the answer
is an error naming it, never another run's checkpoint. The run and step it continues are
printed. (Issue 14, item 10.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ditctl.engine.run import new_run
from ditctl.runs import list_checkpoints
from ditctl.workspace import Workspace
from tests.conftest import make_workspace

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    """A workspace whose run A finished at step 2."""
    from typer.testing import CliRunner

    from ditctl.cli.app import app

    ws = make_workspace(tmp_path_factory.mktemp("resume") / "w", tiny_model_dir, n_train=4,
                        lora=LORA)
    result = CliRunner().invoke(app, ["train", "-w", str(ws.root), "--max-steps", "2",
                                      "--run-name", "A"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return ws.root


@pytest.fixture()
def workspace(trained, tmp_path) -> Path:
    """Run A finished at step 2; then run B started and was killed before its first checkpoint
    (its folder as training creates it: config.toml, run.json, no checkpoint)."""
    root = shutil.copytree(trained, tmp_path / "w", symlinks=True)
    config = Workspace(root).config({"train.run_name": "B"})
    new_run(Workspace(root).runs_dir(config), config, {"seed": 7})
    return root


def _steps(root: Path, run: str) -> list[str]:
    return [p.name for p in list_checkpoints(root / "runs" / run)]


def test_latest_is_the_latest_run_and_a_run_without_checkpoint_is_named(cli, workspace):
    result = cli("train", "-w", workspace, "--resume", "latest", "--max-steps", "3")
    assert result.exit_code == 1, result.output
    assert "run B has no complete checkpoint" in result.stderr
    assert "--run" in result.stderr and "A" in result.stderr  # the runs that can be resumed
    assert _steps(workspace, "A") == ["step-000002"]  # A was not extended behind our back


def test_run_picks_the_run_to_continue_and_says_where_it_continues(cli, workspace):
    result = cli("train", "-w", workspace, "--resume", "latest", "--run", "A", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    assert "continuing run A from step-000002 (step 2 of 3)" in result.stderr
    assert _steps(workspace, "A") == ["step-000002", "step-000003"]
    assert _steps(workspace, "B") == []
    state = json.loads((workspace / ".ditctl" / "state.json").read_text())
    assert state["train"]["run"] == "A" and state["train"]["step"] == 3


def test_run_without_resume_is_refused(cli, workspace):
    result = cli("train", "-w", workspace, "--run", "A")
    assert result.exit_code == 1 and "--run picks the run to resume" in result.stderr
