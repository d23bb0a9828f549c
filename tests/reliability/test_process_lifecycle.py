"""No process of a command outlives it, nothing trains without the lock, and a stopped run
says so in its exit status. (Issue 14, items 3, 7 and 8.)

Kills are injected into real `ditctl` processes; `sitecustomize.py` (on PYTHONPATH, so every
Python process of the command, spawned workers included, loads it) stalls a named function, so
that the kill lands while the workers are known to be running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ditctl.errors import EXIT_INTERRUPTED, LockError
from ditctl.workspace import Workspace
from tests.conftest import family_method_path, make_workspace

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}

STALL = textwrap.dedent('''
    import os, time
    target = os.environ.get("DITCTL_TEST_STALL")
    if target:
        module_name, _, attr = target.rpartition(":")
        import importlib
        owner_path, _, name = attr.rpartition(".")
        owner = importlib.import_module(module_name)
        for part in filter(None, owner_path.split(".")):
            owner = getattr(owner, part)

        def stalled(*args, **kwargs):
            open(os.environ["DITCTL_TEST_MARK"] + "." + str(os.getpid()), "w").close()
            time.sleep(600)

        setattr(owner, name, stalled)
''')


def _env(tmp_path: Path, stall: str | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if stall:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(STALL)
        root = str(Path(__file__).resolve().parents[2])
        env.update(PYTHONPATH=os.pathsep.join([str(site), root]), DITCTL_TEST_STALL=stall,
                   DITCTL_TEST_MARK=str(tmp_path / "stalled"))
    return env


def _output(tmp_path: Path, name: str = "stderr"):
    """A file for a child's output (a pipe nobody reads would fill and block the child)."""
    return open(tmp_path / name, "w")


def _wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _gone(pids: list[int], timeout: float) -> list[int]:
    """The PIDs still running (not zombies) after `timeout` seconds."""
    deadline = time.time() + timeout
    alive = pids
    while True:
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def _lock_taken_over(root: Path, capsys) -> str:
    """Take the workspace lock at once (a LockError fails the test); what it warned."""
    with Workspace(root).lock("test"):
        pass
    return capsys.readouterr().err


# --- item 8: a stopped run exits non-zero ------------------------------------------------------

def test_sigterm_saves_the_resume_checkpoint_and_exits_75(cli, tmp_path, tiny_model_dir,
                                                           monkeypatch):
    from ditctl.engine import monitor

    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA)
    log_step = monitor.Monitor.log_step

    def terminated_after_first_step(self, step, *args, **kwargs):
        log_step(self, step, *args, **kwargs)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a job scheduler would

    monkeypatch.setattr(monitor.Monitor, "log_step", terminated_after_first_step)
    result = cli("train", "-w", ws.root, "--max-steps", "3", "--run-name", "r",
                 "--checkpoint-every", "100")
    assert result.exit_code == EXIT_INTERRUPTED == 75, result.output
    assert "ditctl train --resume latest --run r" in result.stdout
    marker = ws.root / "runs" / "r" / "checkpoints" / "step-000001" / "checkpoint.json"
    assert json.loads(marker.read_text())["step"] == 1


# --- item 3: a killed launcher takes its workers (and the lock) with it ------------------------

@pytest.mark.slow
def test_killed_launcher_leaves_no_worker_training_without_the_lock(tmp_path, tiny_model_dir,
                                                                     capsys):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=8, lora=LORA)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "ditctl", "train", "-w", str(ws.root), "--num-processes", "2",
         "--max-steps", "100000", "--checkpoint-every", "100000", "--run-name", "r"],
        env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=_output(tmp_path))
    try:
        log = ws.root / "runs" / "r" / "train_log.jsonl"
        _wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 2, 240,
                  "two training steps")
        processes = psutil.Process(launcher.pid).children(recursive=True)
        assert len(processes) >= 3  # the agent and two training processes
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert _gone([p.pid for p in processes], timeout=5) == []
        assert "stale lock" in _lock_taken_over(ws.root, capsys)
        steps = log.read_text().count("\n")
        time.sleep(1)
        assert log.read_text().count("\n") == steps  # nobody trains on
    finally:
        for child in psutil.Process().children(recursive=True):
            child.kill()


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_process_at_one_checkpoint(tmp_path,
                                                                       tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=8, lora=LORA)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "ditctl", "train", "-w", str(ws.root), "--num-processes", "2",
         "--max-steps", "100000", "--checkpoint-every", "100000", "--run-name", "r"],
        env=_env(tmp_path), stdout=_output(tmp_path, "stdout"), stderr=_output(tmp_path))
    try:
        log = ws.root / "runs" / "r" / "train_log.jsonl"
        _wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 2, 240,
                  "two training steps")
        processes = psutil.Process(launcher.pid).children(recursive=True)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
        out, err = ((tmp_path / name).read_text() for name in ("stdout", "stderr"))
        assert launcher.returncode == EXIT_INTERRUPTED, err
        assert "ditctl train --resume latest --run r" in out
        checkpoints = sorted((ws.root / "runs" / "r" / "checkpoints").glob("step-*"))
        assert len(checkpoints) == 1
        step = json.loads((checkpoints[0] / "checkpoint.json").read_text())["step"]
        assert step == log.read_text().count("\n")  # saved at the step every process stopped
        assert _gone([p.pid for p in processes], timeout=5) == []
    finally:
        for child in psutil.Process().children(recursive=True):
            child.kill()


# --- item 7: killed precompute / ingest leave no workers, and no lock naming a dead PID -------

def _kill_while_stalled(tmp_path: Path, root: Path, command: list[str], stall: str,
                        mark_count: int) -> tuple[int, list[int]]:
    """Run `ditctl COMMAND` with `stall` stalled, SIGKILL it once `mark_count` processes
    reached the stall; (its PID, the PIDs of its children when it was killed)."""
    proc = subprocess.Popen([sys.executable, "-m", "ditctl", *command, "-w", str(root)],
                            env=_env(tmp_path, stall), stdout=subprocess.DEVNULL,
                            stderr=_output(tmp_path))
    try:
        _wait_for(lambda: len(list(tmp_path.glob("stalled.*"))) >= mark_count, 120,
                  f"{command[0]} to reach {stall}")
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return proc.pid, children
    except BaseException:
        proc.kill()
        raise


@pytest.mark.slow
def test_killed_precompute_frees_the_lock_at_once(tmp_path, tiny_model_dir, capsys):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, n_val=0)
    project = ws.project_file
    project.write_text(project.read_text() + "\n[precompute]\nnum_workers = 2\n")
    # the VAE "loads" forever while the decoding workers have started
    pid, children = _kill_while_stalled(
        tmp_path, ws.root, ["precompute"], family_method_path(tiny_model_dir, "load_vae"), 1)
    assert len(children) >= 2
    warned = _lock_taken_over(ws.root, capsys)  # no wait: no worker holds the lock's file
    assert f"PID {pid}" in warned and "stale lock" in warned
    assert _gone(children, timeout=3) == []


@pytest.mark.slow
def test_killed_ingest_leaves_no_worker_processes(tmp_path, tiny_model_dir):
    from ditctl.data import ingest

    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=ingest.POOL_MIN_FILES + 4,
                        n_val=0)
    # every worker stalls inside its first chunk
    pid, children = _kill_while_stalled(
        tmp_path, ws.root, ["ingest"], "ditctl.data.images:probe_rows", 2)
    assert len(children) >= 2
    assert _gone(children, timeout=5) == []


def test_lock_error_names_the_live_holders_not_a_dead_pid(tmp_path):
    """A lock still held by a child of an exited command (a worker that inherited the lock's
    file before workers closed it) names the live child."""
    ws = Workspace(tmp_path)
    (tmp_path / "project.toml").write_text("")
    script = textwrap.dedent(f'''
        import os, sys, time
        from ditctl.workspace import Workspace
        with Workspace({str(tmp_path)!r}).lock("precompute"):
            if os.fork() == 0:   # keeps the inherited descriptor, as an old worker did
                time.sleep(60)
                os._exit(0)
            print("ready", flush=True)
            os._exit(0)          # the command dies; its child lives on
    ''')
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    dead = proc.pid
    proc.wait()
    try:
        with pytest.raises(LockError) as caught:
            with ws.lock("test"):
                pass
        message = str(caught.value)
        holders = [p.pid for p in psutil.process_iter()
                   if p.pid != os.getpid() and _has_open(p, ws.lock_file)]
        assert holders and all(str(h) in message for h in holders)
        assert f"PID {dead}, started" in message and "no longer running" in message
    finally:
        for p in psutil.process_iter():
            if p.pid != os.getpid() and _has_open(p, ws.lock_file):
                p.kill()


def _has_open(process: psutil.Process, path: Path) -> bool:
    try:
        return any(f.path == str(path.resolve()) for f in process.open_files())
    except (psutil.Error, OSError):
        return False
