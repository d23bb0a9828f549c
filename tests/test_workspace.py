import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ditctl import fsutil
from ditctl.errors import LockError, WorkspaceError
from ditctl.workspace import Workspace


@pytest.fixture()
def ws(tmp_path):
    (tmp_path / "project.toml").write_text("")
    return Workspace(tmp_path)


def test_find_searches_upwards_and_explains_when_missing(ws, tmp_path):
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    assert Workspace.find(sub).root == tmp_path
    with pytest.raises(WorkspaceError, match="no workspace here") as err:
        Workspace.find(tmp_path.parent)
    assert "ditctl init" in err.value.hint


def test_state_update_is_atomic_under_a_crash(ws, monkeypatch):
    ws.update_state("ingest", {"train_count": 3})
    before = ws.state_file.read_text()

    def crash(*args, **kwargs):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(fsutil.os, "replace", crash)
    with pytest.raises(OSError):
        ws.update_state("ingest", {"train_count": 4})
    monkeypatch.undo()
    assert ws.state_file.read_text() == before
    assert ws.read_state()["ingest"]["train_count"] == 3
    assert not [p for p in ws.state_dir.iterdir() if p.name.startswith(".tmp-")]


HOLDER = textwrap.dedent("""
    import sys, time
    from ditctl.workspace import Workspace
    from pathlib import Path
    with Workspace(Path(sys.argv[1])).lock("train --lora"):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_second_command_is_refused_naming_the_holder(ws):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws.root)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockError) as err:
            with ws.lock("ingest"):
                pass
        assert f"PID {proc.pid}" in str(err.value) and "train --lora" in str(err.value)
    finally:
        proc.kill()
        proc.wait()
    # the kernel released the dead holder's lock: the next command takes it over
    with ws.lock("ingest"):
        holder = json.loads(ws.lock_file.read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "ingest"


def test_stale_lock_is_reported_and_taken_over(ws, capsys):
    ws.state_dir.mkdir()
    ws.lock_file.write_text(json.dumps({"pid": 999999, "command": "precompute",
                                        "started": "2026-01-01T00:00:00"}))
    with ws.lock("train"):
        pass
    err = capsys.readouterr().err
    assert "stale lock" in err and "999999" in err and "precompute" in err
    assert json.loads(ws.lock_file.read_text()) == {}


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with fsutil.atomic_dir(final) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with fsutil.atomic_dir(final) as tmp:
        (tmp / "whole").write_text("x")
    assert (final / "whole").read_text() == "x"
