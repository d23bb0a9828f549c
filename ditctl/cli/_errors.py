"""Turn library errors into one line on stderr plus the next step.

Every `DitctlError` becomes `error: <message>` and `  next: <hint>`, exit code 1. Other
exceptions are bugs: they show a one-line summary, and their traceback with `--debug`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import click
import typer

from ..console import console
from ..errors import DitctlError


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def reports_errors(command: Callable) -> Callable:
    """Wrap a command so that user errors print as one line and exit 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DitctlError as exc:
            if _debug():
                raise
            console.error(str(exc), exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.error("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug: say so briefly, keep the traceback for --debug
            if _debug():
                raise
            console.error(f"internal error: {type(exc).__name__}: {exc}",
                          "re-run with --debug for the traceback, and please report it")
            raise typer.Exit(1) from None

    return wrapper
