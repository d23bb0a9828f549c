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
from ..fsutil import no_room_error

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
        except OSError as exc:
            no_room = no_room_error(exc.filename or "a file", exc)
            if no_room is None or _debug():  # not a full disk: a bug, as below
                return _internal_error(exc)
            console.error(str(no_room), no_room.hint)
            raise typer.Exit(no_room.exit_code) from None
        except Exception as exc:  # a bug: say so briefly, keep the traceback for --debug
            return _internal_error(exc)

    return wrapper


def _internal_error(exc: Exception):
    if _debug():
        raise exc
    console.error(f"internal error: {type(exc).__name__}: {exc}",
                  "re-run with --debug for the traceback, and please report it")
    raise typer.Exit(1) from None
