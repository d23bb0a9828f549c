"""All user-facing output goes through one object: `console`.

Results go to stdout; warnings, errors and progress to stderr, so `--json` output stays clean.
Progress is a rich bar (rate and ETA) on a terminal and plain periodic lines otherwise
(CI logs, pipes).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.markup import escape

T = TypeVar("T")


class Output:
    def __init__(self) -> None:
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = False

    def print(self, *objects, **kwargs) -> None:
        if not self.quiet:
            self.out.print(*objects, **kwargs)

    def info(self, message: str) -> None:
        """A plain status line on stderr (no markup: messages quote [sections] and paths)."""
        if not self.quiet:
            self.err.print(escape(message))

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {escape(message)}")

    def error(self, message: str, hint: str | None = None) -> None:
        self.err.print(f"[red]error:[/] {escape(message)}")
        if hint:
            self.err.print(f"  next: {escape(hint)}")

    def progress(self, description: str, total: int | None, unit: str = "it",
                 done: int = 0) -> "ProgressTask":
        """A progress display; `done` items were finished before (a resumed run)."""
        return ProgressTask(self, description, total, unit, done)

    def track(self, items: Iterable[T], description: str, total: int | None = None,
              unit: str = "it") -> Iterator[T]:
        with self.progress(description, total, unit) as task:
            for item in items:
                yield item
                task.advance()


class ProgressTask:
    """A progress display for one job: `advance(n)`, `set_postfix(text)`, used as a context."""

    PLAIN_EVERY_S = 10.0

    def __init__(self, output: Output, description: str, total: int | None, unit: str,
                 done: int = 0):
        self.output, self.description, self.total, self.unit = output, description, total, unit
        self.done = self._start = done  # the rate counts only what is done from here on
        self._printed: int | None = None  # `done` at the last plain line
        self.postfix = ""
        self.started = time.perf_counter()
        self._last_line = self.started
        self.rich = output.err.is_terminal and not output.quiet
        self._progress = None  # a rich Progress, on a terminal

    def __enter__(self) -> "ProgressTask":
        if self.rich:
            # imported here: commands that show no progress (status, --help) start faster
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), TextColumn("{task.fields[postfix]}"),
                console=self.output.err, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total,
                                                 completed=self.done, rate="", postfix="")
        return self

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return (self.done - self._start) / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n, rate=f"{self.rate():.1f} {self.unit}/s",
                                  postfix=self.postfix)
        elif not self.output.quiet:
            now = time.perf_counter()
            if now - self._last_line >= self.PLAIN_EVERY_S:
                self._last_line = now
                self._plain_line()

    def set_postfix(self, text: str) -> None:
        self.postfix = text

    def set_total(self, total: int) -> None:
        """The total, once it is known (work that starts before it is counted)."""
        self.total = total
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def _plain_line(self) -> None:
        self._printed = self.done
        rate = self.rate()
        total = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {max(0.0, (self.total - self.done) / rate):.0f}s"
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.description}: {self.done}{total} ({rate:.1f} {self.unit}/s{eta}){extra}",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif not self.output.quiet and self.done and self._printed != self.done:
            self._plain_line()  # the final count, unless the last periodic line showed it


console = Output()


def quiet_libraries() -> None:
    """Keep library chatter (download bars, optional-kernel notices) out of ditctl's output.

    Called by the CLI before any model library is imported; ditctl shows its own progress.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # torchao reports optional CUDA kernels it cannot load on every import (diffusers imports
    # it when installed), and torch warns about its enum registrations: neither is actionable
    for name in ("bitsandbytes", "accelerate", "peft", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
