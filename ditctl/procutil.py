"""Child processes die with their parent and never keep the workspace lock.

A mutating command holds the workspace lock through an open file (`flock`, see workspace.py).
Its helper processes must not outlive it: a forked worker inherits the lock's file descriptor
(so a killed command's lock would stay taken, naming a dead PID, until the worker noticed), and
any worker left running would go on writing into a workspace that another command now holds.
So every worker a command starts calls `worker_started` first thing (DataLoader
`worker_init_fn`, a process pool's `initializer`), and launched training processes call
`die_with_parent`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# File descriptors of workspace locks this process holds (workspace.Workspace.lock registers
# them); a forked child closes its copies so that only the parent keeps the lock.
_lock_fds: set[int] = set()


def register_lock_fd(fd: int) -> None:
    _lock_fds.add(fd)


def unregister_lock_fd(fd: int) -> None:
    _lock_fds.discard(fd)


def release_inherited_locks() -> None:
    """In a forked child: close the inherited lock descriptors. (Closing, not `flock(LOCK_UN)`:
    unlocking would release the parent's lock, which shares the open file.)"""
    for fd in list(_lock_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _lock_fds.clear()


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux: prctl
    PR_SET_PDEATHSIG; elsewhere a no-op returning False). With `parent`, the PID the caller
    expects as its parent, a parent that already died before the request counts as dying now."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:  # orphaned before the request
        os.kill(os.getpid(), sig)
    return True


def worker_started(*_: object) -> None:
    """First call of a helper process (a DataLoader worker, a pool worker): die with the
    command that started it, and hold none of its locks."""
    die_with_parent(signal.SIGKILL)
    release_inherited_locks()
