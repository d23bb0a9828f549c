"""ditctl.console: progress lines without a terminal, and `python -m ditctl`."""

from __future__ import annotations

import io
import subprocess
import sys

from rich.console import Console

from ditctl.console import Output, ProgressTask


def plain_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("training")]


def test_the_final_plain_line_is_printed_once(capsys, monkeypatch):
    output = Output()
    assert not output.err.is_terminal  # pytest captures stderr: plain lines
    monkeypatch.setattr(ProgressTask, "PLAIN_EVERY_S", 0.0)  # a periodic line at every step
    with output.progress("training", 3, unit="step") as task:
        for _ in range(3):
            task.advance()
    assert [line.split(" (")[0] for line in plain_lines(capsys)] == [
        "training: 1/3", "training: 2/3", "training: 3/3"]

    monkeypatch.setattr(ProgressTask, "PLAIN_EVERY_S", 3600.0)  # no periodic line at all
    with output.progress("training", 3, unit="step") as task:
        for _ in range(3):
            task.advance()
    assert [line.split(" (")[0] for line in plain_lines(capsys)] == ["training: 3/3"]


def test_a_resumed_progress_counts_on_from_where_it_was(capsys):
    output = Output()
    with output.progress("training", 10, unit="step", done=7) as task:
        for _ in range(3):
            task.advance()
        task.started -= 100.0  # as if these 3 steps took 100 s: the rate counts only them
        assert abs(task.rate() - 3 / 100) < 1e-3
    assert [line.split(" (")[0] for line in plain_lines(capsys)] == ["training: 10/10"]

    output.err = Console(file=io.StringIO(), force_terminal=True)  # a terminal: the rich bar
    with output.progress("training", 10, unit="step", done=7) as task:
        task.advance(3)
        assert task._progress.tasks[0].completed == 10


def test_python_m_ditctl_runs_the_cli_and_importing_it_does_not():
    done = subprocess.run([sys.executable, "-m", "ditctl", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("ditctl "), done.stderr
    imported = subprocess.run([sys.executable, "-c", "import ditctl.__main__; print('imported')"],
                              capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0 and imported.stdout == "imported\n", imported.stderr
