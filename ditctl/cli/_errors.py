"""Turn library errors into one line on stderr plus the next step.

Every `DitctlError` becomes `error: <message>` and `  next: <hint>`, exit code 1. Other
exceptions are bugs: they show a one-line summary, and their traceback with `--debug`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import typer

from ..console import console
from ..errors import DitctlError

# Set by the app's callback from `--debug` before any command runs. Not read from click's
# context: typer >= 0.2x carries its own copy of click, whose context `click` cannot see.
_show_tracebacks = False


def set_debug(on: bool) -> None:
    global _show_tracebacks
    _show_tracebacks = on


def _debug() -> bool:
    return _show_tracebacks


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
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug: say so briefly, keep the traceback for --debug
            if _debug():
                raise
            console.error(f"internal error: {type(exc).__name__}: {exc}",
                          "re-run with --debug for the traceback, and please report it")
            raise typer.Exit(1) from None

    return wrapper
