"""Every error a user can cause, as one class each.

Library code raises these; the CLI turns them into one line on stderr plus the next step
(`hint`), exit code 1. Anything else is a bug and keeps its traceback under `--debug`.
"""

from __future__ import annotations

# Exit status of a command stopped by SIGTERM or Ctrl-C after saving what it needs to continue
# (train: the resume checkpoint). sysexits' EX_TEMPFAIL: "try again later" — not success, so
# `ditctl train && ditctl export` and job schedulers see an unfinished run.
EXIT_INTERRUPTED = 75


class DitctlError(Exception):
    """A problem the user can fix. `hint` says how (the next command or the flag to change)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(DitctlError):
    """project.toml or a flag holds an unknown key, a wrong type or an out-of-range value."""


class WorkspaceError(DitctlError):
    """No workspace here, or the workspace is not in the state a command needs."""


class LockError(WorkspaceError):
    """Another ditctl command holds the workspace lock."""


class ModelError(DitctlError):
    """A model folder is missing, incomplete or of an unknown family."""


class DataError(DitctlError):
    """A data source (CSV, folder, image) cannot be read as given."""


class CacheError(DitctlError):
    """The precomputed cache is missing, stale or corrupt for what was asked."""


class CheckpointError(DitctlError):
    """A checkpoint is missing, torn, or does not fit the run it is used with."""


class TrainingError(DitctlError):
    """Training cannot go on (non-finite loss, out of memory, ...)."""


class DiskError(DitctlError):
    """A write failed for lack of room: the disk or quota is full, or a file-size limit hit."""


class ExportError(DitctlError):
    """An export could not be written or failed its parity check."""
