"""Torn temporary folders left by killed checkpoint saves (`checkpoints/.tmp-step-*`) and
exports (`exports/.tmp-<name>.*`) are shown by `status` and removed by the next train or
export, which reports the space reclaimed. (Issue 14, item 9.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_workspace, write_test_checkpoint

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


def _torn(folder: Path, name: str, size: int) -> Path:
    """A temporary folder as a killed atomic_dir leaves it, with `size` bytes inside."""
    torn = folder / name
    torn.mkdir(parents=True)
    (torn / "lora.safetensors").write_bytes(b"\0" * size)
    return torn


@pytest.fixture()
def workspace(tmp_path, tiny_model_dir) -> Path:
    """Run r (one checkpoint) with a torn checkpoint save, and a torn export."""
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA)
    run = ws.root / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text((ws.root / "project.toml").read_text())
    write_test_checkpoint(tiny_model_dir, run / "checkpoints" / "step-000010")
    _torn(run / "checkpoints", ".tmp-step-000020.k1ll3d", 3000)
    _torn(ws.root / "exports", ".tmp-r-step10-lora.x9y8", 2000)
    return ws.root


def test_status_shows_torn_temporaries(cli, workspace):
    summary = json.loads(cli("status", "-w", workspace, "--json").stdout)
    found = {Path(item["path"]).name: item["bytes"] for item in summary["leftovers"]}
    assert found == {".tmp-step-000020.k1ll3d": 3000, ".tmp-r-step10-lora.x9y8": 2000}
    text = cli("status", "-w", workspace).stdout
    assert "2 torn temporary folder(s), 5.0 kB" in text and ".tmp-step-000020.k1ll3d" in text


def test_training_removes_torn_checkpoint_saves_and_says_how_much(cli, workspace):
    result = cli("train", "-w", workspace, "--max-steps", "1", "--run-name", "next")
    assert result.exit_code == 0, result.output
    assert "removed 1 torn temporary checkpoint folder(s)" in result.stderr
    assert "3.0 kB reclaimed" in result.stderr
    assert not (workspace / "runs" / "r" / "checkpoints" / ".tmp-step-000020.k1ll3d").exists()
    assert (workspace / "runs" / "r" / "checkpoints" / "step-000010").is_dir()


def test_export_removes_torn_exports_and_says_how_much(cli, workspace):
    result = cli("export", "-w", workspace)
    assert result.exit_code == 0, result.output
    assert "removed 1 torn temporary export folder(s)" in result.stderr
    assert "2.0 kB reclaimed" in result.stderr
    assert sorted(p.name for p in (workspace / "exports").iterdir()) == ["r-step10-lora"]
    summary = json.loads(cli("status", "-w", workspace, "--json").stdout)
    assert [Path(item["path"]).name for item in summary["leftovers"]] == \
        [".tmp-step-000020.k1ll3d"]
