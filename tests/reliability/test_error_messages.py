"""Hostile or damaged inputs give one line naming the file or key and the fix, never "internal
error". (Issue 14, item 11; truncated checkpoint weights and a garbled checkpoint.json are in
test_checkpoint_integrity.py.)"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_workspace, write_test_checkpoint

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


def _one_line(result, *needles: str, code: int = 1) -> None:
    stderr = result.stderr
    assert result.exit_code == code, result.output
    assert "internal error" not in stderr and "Traceback" not in stderr, stderr
    assert stderr.count("error:") == 1, stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)


@pytest.fixture()
def workspace(tmp_path) -> Path:
    """A workspace that needs no model for the commands below (status, ingest)."""
    return make_workspace(tmp_path / "w", tmp_path / "model", n_train=2, n_val=0).root


# --- files ditctl reads -----------------------------------------------------------------------

def test_non_utf8_project_toml(cli, workspace):
    (workspace / "project.toml").write_bytes(b"[train]\nrun_name = \"caf\xe9\"\n")
    _one_line(cli("status", "-w", workspace), "project.toml: not valid UTF-8",
              "save project.toml as UTF-8")


def test_a_non_utf8_lock_file_blocks_nothing(cli, workspace):
    (workspace / ".ditctl").mkdir(exist_ok=True)
    (workspace / ".ditctl" / "lock").write_bytes(b"\xff\xfe garbage \x80")
    result = cli("ingest", "-w", workspace)
    assert result.exit_code == 0, result.output


def test_state_json_holding_a_list(cli, workspace):
    (workspace / ".ditctl").mkdir(exist_ok=True)
    (workspace / ".ditctl" / "state.json").write_text("[]")
    _one_line(cli("ingest", "-w", workspace), "state.json holds a JSON list",
              "delete", "state.json")


def test_non_utf8_state_json(cli, workspace):
    (workspace / ".ditctl").mkdir(exist_ok=True)
    (workspace / ".ditctl" / "state.json").write_bytes(b"{\"a\": \"\xff\"}")
    _one_line(cli("ingest", "-w", workspace), "state.json is not valid JSON")


def test_truncated_text_encoder_weights(cli, tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = sorted((model / "text_encoder").glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:-1000])
    ws = make_workspace(tmp_path / "w", model, n_train=2, n_val=0)
    _one_line(cli("precompute", "-w", ws.root), weights.name, "truncated",
              "re-download or re-export the model folder")


# --- settings, validated up front with the other config errors -------------------------------

def test_nan_learning_rate_is_a_config_error_with_the_others(cli, workspace):
    project = workspace / "project.toml"
    project.write_text(project.read_text().replace(
        "[train]\n", "[train]\nlearning_rate = nan\nnum_epochs = 0\n"))
    result = cli("train", "-w", workspace, "--dry-run")
    _one_line(result, "2 configuration problems",
              "[train] learning_rate = nan: expected a finite number",
              "[train] num_epochs = 0: must be >= 1")


@pytest.mark.parametrize("flag, value, expected", [
    ("--adam-beta2", "1.0", "--adam-beta2 = 1.0: must be < 1"),
    ("--adam-beta1", "1", "--adam-beta1 = 1.0: must be < 1"),
    ("--seed", "99999999999999999999", "--seed = 99999999999999999999: must be <= 4294967295"),
    ("--learning-rate", "inf", "--learning-rate = inf: expected a finite number"),
])
def test_out_of_range_flags(cli, workspace, flag, value, expected):
    _one_line(cli("train", "-w", workspace, "--dry-run", flag, value),
              "configuration problem", expected)


def test_empty_resume_is_refused(cli, workspace):
    _one_line(cli("train", "-w", workspace, "--resume", ""), "--resume '' names no checkpoint",
              "--resume latest")


# --- writes that fail for lack of room --------------------------------------------------------

def test_disk_full_during_precompute(cli, tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=2, n_val=0)
    assert cli("ingest", "-w", ws.root).exit_code == 0
    from ditctl import fsutil

    fsync = os.fsync

    def full(fd):  # the cache's disk is full (the lock and state live elsewhere)
        if "/cache/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", full)
    result = cli("precompute", "-w", ws.root)
    _one_line(result, "cannot write", str(ws.root / "cache"), "no space left on the device",
              "free some space")
    assert not [p for p in (ws.root / "cache").rglob(".tmp-*")]  # nothing half-written


@pytest.mark.slow
def test_write_over_the_file_size_limit(tmp_path, tiny_model_dir):
    """A real EFBIG: export under `ulimit -f` (SIGXFSZ ignored, as Python does by default)."""
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=2, lora=LORA)
    run = ws.root / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text(ws.project_file.read_text())
    write_test_checkpoint(tiny_model_dir, run / "checkpoints" / "step-000010")
    limit_kb = 64  # the merged DiT weights are larger; state and configs are smaller
    command = (f"trap '' XFSZ; ulimit -f {limit_kb}; exec {sys.executable} -m ditctl export "
               f"-w {ws.root} --merge-lora --no-verify")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                              "COLUMNS": "250"})
    assert result.returncode == 1, result.stderr
    assert "internal error" not in result.stderr
    assert "cannot write" in result.stderr and "file-size limit" in result.stderr
    assert str(ws.root / "exports") in result.stderr
    assert not (ws.root / "exports").exists() or not any((ws.root / "exports").iterdir())


def test_a_full_disk_under_the_cache_index_names_it(tmp_path):
    import sqlite3

    from ditctl.data.cache import CacheIndex, IndexEntry
    from ditctl.errors import CacheError

    index = CacheIndex(tmp_path / "index.sqlite")

    class FullDatabase:  # sqlite's answer when the WAL cannot grow
        def __getattr__(self, name):
            return getattr(index_db, name)

        def executemany(self, *args):
            raise sqlite3.OperationalError("database or disk is full")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    index_db, index.db = index.db, FullDatabase()
    with pytest.raises(CacheError, match="cannot write the cache index .*index.sqlite "
                                         r"\(database or disk is full\)"):
        index.add([IndexEntry("k", "text", (1, 2), "fp32", 8, False, "a caption")])
    index_db.close()
