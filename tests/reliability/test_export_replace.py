"""`export --force` replaces an export so that at every instant the old or the new one is
complete under a known name, and a kill between its two renames is recovered by the next run
restoring the old export, never deleting it. (Issue 14, item 6.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import make_workspace, write_test_checkpoint

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


def _contents(folder: Path) -> dict[str, str]:
    """sha256 of every weight and config file (the model card carries dates)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".md"}


@pytest.fixture()
def exported(cli, tmp_path, tiny_model_dir) -> Path:
    """Run r with checkpoints 10 and 20, and checkpoint 10 exported as exports/e."""
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA)
    run = ws.root / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text(ws.project_file.read_text())
    write_test_checkpoint(tiny_model_dir, run / "checkpoints" / "step-000010", seed=1)
    write_test_checkpoint(tiny_model_dir, run / "checkpoints" / "step-000020", seed=2)
    result = cli("export", "-w", ws.root, "--checkpoint", "10", "--name", "e", "--no-verify")
    assert result.exit_code == 0, result.output
    return ws.root


def _export_killed_between_renames(root: Path) -> subprocess.CompletedProcess:
    """`export --force` of checkpoint 20 over e, SIGKILLed the instant e is moved aside."""
    script = textwrap.dedent(f'''
        import os, signal, sys
        import ditctl.fsutil as fsutil
        fsutil._between_renames = lambda final: os.kill(os.getpid(), signal.SIGKILL)
        from ditctl.cli.app import app
        sys.argv = ["ditctl"]
        app(["export", "-w", {str(root)!r}, "--checkpoint", "20", "--name", "e", "--force",
             "--no-verify"])
    ''')
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.mark.slow
def test_a_kill_between_the_renames_loses_no_export(cli, exported):
    old = _contents(exported / "exports" / "e")
    killed = _export_killed_between_renames(exported)
    assert killed.returncode == -9, killed.stderr
    # the instant between the renames: e is absent, the old one complete under a known name
    assert not (exported / "exports" / "e").exists()
    assert _contents(exported / "exports" / ".tmp-e.old") == old

    # the next export restores it (and so refuses to write over it without --force)
    again = cli("export", "-w", exported, "--checkpoint", "20", "--name", "e", "--no-verify")
    assert again.exit_code == 1, again.output
    assert "restored the export" in again.stderr and "already exists" in again.stderr
    assert _contents(exported / "exports" / "e") == old
    assert not (exported / "exports" / ".tmp-e.old").exists()

    # and a finished --force replaces it, leaving nothing aside
    replaced = cli("export", "-w", exported, "--checkpoint", "20", "--name", "e", "--force",
                   "--no-verify")
    assert replaced.exit_code == 0, replaced.output
    assert _contents(exported / "exports" / "e") != old
    assert [p.name for p in (exported / "exports").iterdir()] == ["e"]


class _Failed(Exception):
    """An error raised at the instant between the renames."""


def test_replace_keeps_the_old_folder_recoverable_at_the_instant_between_renames(
        tmp_path, monkeypatch):
    from ditctl import fsutil

    final = tmp_path / "exports" / "e"
    final.mkdir(parents=True)
    (final / "weights").write_text("old")
    seen = []

    def failing(path):
        seen.append((path.exists(), (fsutil.replaced_name(path) / "weights").read_text()))
        raise _Failed

    monkeypatch.setattr(fsutil, "_between_renames", failing)
    with pytest.raises(_Failed):
        with fsutil.atomic_dir(final, replace=True) as tmp:
            (tmp / "weights").write_text("new")
    assert seen == [(False, "old")]  # at that instant: e absent, the old one complete aside
    assert (final / "weights").read_text() == "old"  # an error there puts it back at once
    assert fsutil.temp_leftovers(final.parent) == []


def test_restore_puts_back_what_a_killed_replace_moved_aside(tmp_path):
    """The state SIGKILL leaves between the renames (no handler runs): e missing, the old one
    as .tmp-e.old, the new one torn; restore puts the old one back, touching nothing else."""
    from ditctl import fsutil

    exports = tmp_path / "exports"
    aside = fsutil.replaced_name(exports / "e")
    aside.mkdir(parents=True)
    (aside / "weights").write_text("old")
    (exports / ".tmp-e.k1ll3d").mkdir()
    (exports / "other").mkdir()
    assert fsutil.restore_replaced(exports) == [exports / "e"]
    assert (exports / "e" / "weights").read_text() == "old"
    assert sorted(p.name for p in exports.iterdir()) == [".tmp-e.k1ll3d", "e", "other"]
    assert fsutil.restore_replaced(exports) == []  # nothing more to restore
