"""Crash-safe file writes: nothing half-written is ever visible under its final name.

Files are written to a temporary sibling, flushed, fsynced and renamed into place; folders are
built under a temporary sibling name and renamed when complete. A kill at any moment leaves
either the old content or the new, plus at worst a `.tmp-*` leftover that `clean_temp` removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

TEMP_PREFIX = ".tmp-"
T = TypeVar("T")

# A write that fails for lack of room, whatever the file: the user frees space or raises a limit.
_NO_ROOM = {errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "the file would exceed the file-size limit (`ulimit -f`) or what the "
                         "filesystem allows"}


def no_room_error(path: Path | str, exc: BaseException):
    """A DiskError naming `path` when `exc` is a write that failed for lack of room, else None."""
    from .errors import DiskError

    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:  # writers in Rust (safetensors) report the OS error in their message
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found.group(1)) if found else None
    if code not in _NO_ROOM:
        return None
    return DiskError(f"cannot write {path}: {_NO_ROOM[code]}; nothing was half-written "
                     "(the previous content is intact)",
                     hint="free some space (e.g. `ditctl precompute --gc`, a lower "
                          "checkpoints_total_limit) or raise the limit, then run the command "
                          "again")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_with(path: Path, write: Callable[[str], T]) -> T:
    """Create `path` all at once: `write(tmp)` fills a temporary file beside it, which is
    fsynced and renamed over `path` (then the folder is fsynced); returns what `write` returns.
    A failure or a kill leaves `path` as it was (and at most a temporary file that `clean_temp`
    removes); a full disk is a one-line `no_room_error`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from other users
        os.close(fd)
        fd = -1
        result = write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        no_room = no_room_error(path, exc)
        if no_room is not None:
            raise no_room from None
        raise
    fsync_dir(path.parent)
    return result


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; rename it to `final` when the block succeeds.

    With `replace`, an existing `final` is swapped out only after the new folder is complete:
    it is renamed to `.tmp-<name>.old`, the new folder renamed into place, and the old one
    deleted. At every instant the old or the new folder is complete under a known name; a kill
    between the two renames leaves `final` missing and the old one as `.tmp-<name>.old`, which
    `restore_replaced` (run by the next command before it removes leftovers) puts back.
    On any error (or a kill) the temporary folder is removed or left as a `.tmp-*` leftover,
    and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + final.name + ".", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists() and replace:
            old = replaced_name(final)
            if old.exists():  # a leftover of an earlier replace that finished its renames
                shutil.rmtree(old)
            os.replace(final, old)
            fsync_dir(final.parent)
            _between_renames(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)  # fails if final exists: never overwrite silently
        fsync_dir(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if replace:  # failed between the renames: the old folder goes back at once
            restore_replaced(final.parent, only=final.name)
        no_room = no_room_error(final, exc)
        if no_room is not None:
            raise no_room from None
        raise


def replaced_name(final: Path) -> Path:
    """Where `atomic_dir(replace=True)` keeps the old `final` while it swaps in the new one."""
    return Path(final).with_name(TEMP_PREFIX + Path(final).name + ".old")


def _between_renames(final: Path) -> None:
    """Kill injection point for tests (the instant `final` is absent); does nothing."""


def restore_replaced(folder: Path, only: str | None = None) -> list[Path]:
    """Put back folders that a replace killed between its renames had moved aside
    (`.tmp-<name>.old` whose `<name>` is missing): the old content is complete, the new one
    never finished. Returns the restored paths. Call before removing `.tmp-*` leftovers.
    `only`: just the folder of that name."""
    restored = []
    for entry in temp_leftovers(folder):
        if not entry.name.endswith(".old") or not entry.is_dir():
            continue
        final = entry.with_name(entry.name[len(TEMP_PREFIX):-len(".old")])
        if only is not None and final.name != only:
            continue
        if final.name and not final.exists():
            os.replace(entry, final)
            restored.append(final)
    if restored:
        fsync_dir(Path(folder))
    return restored


class HashingWriter:
    """A binary file that counts and sha256-hashes what is written through it, so a large file
    gets its content hash without being read back."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._fh.write(view)
        self._digest.update(view)
        self.size += view.nbytes
        return view.nbytes

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def temp_leftovers(folder: Path) -> list[Path]:
    """`.tmp-*` leftovers of killed writes directly inside `folder`."""
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if p.name.startswith(TEMP_PREFIX))


def entry_size(path: Path) -> int:
    """Bytes of a file, or of the regular files under a folder (0 if it vanished)."""
    try:
        return folder_size(path) if path.is_dir() and not path.is_symlink() else \
            path.lstat().st_size
    except OSError:
        return 0


def remove_leftovers(paths: list[Path]) -> int:
    """Delete temporary leftovers (files or folders); returns the bytes reclaimed."""
    reclaimed = 0
    for entry in paths:
        reclaimed += entry_size(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return reclaimed


def clean_temp(folder: Path) -> int:
    """Remove `.tmp-*` leftovers of killed writes directly inside `folder`; returns how many."""
    found = temp_leftovers(folder)
    remove_leftovers(found)
    return len(found)


def format_bytes(n: float) -> str:
    """1234567 -> "1.2 MB" (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def folder_size(path: Path) -> int:
    """Total bytes of the regular files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Raise before writing `needed` bytes into `folder` if the disk cannot hold them."""
    from .errors import DitctlError

    folder = Path(folder)
    probe = folder if folder.exists() else folder.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.1:
        raise DitctlError(
            f"not enough disk space for {what}: needs about {needed / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB free under {probe}",
            hint="free some space (e.g. lower checkpoints_total_limit, `ditctl precompute --gc`)")


def read_only_uri(path: Path | str) -> str:
    """The SQLite URI that opens `path` read-only. The path is percent-encoded: in a URI, `?`,
    `#` and `%` in a folder name would otherwise end the path or start an escape."""
    return f"file:{urllib.parse.quote(str(path))}?mode=ro"


def connect_read_only(path: Path | str, **kwargs) -> sqlite3.Connection:
    """A read-only SQLite connection to the database at `path` (`read_only_uri`)."""
    return sqlite3.connect(read_only_uri(path), uri=True, **kwargs)


@contextlib.contextmanager
def scratch_database(folder: Path | None, name: str) -> Iterator[str]:
    """The path of a new, empty SQLite scratch file `.tmp-<name>-*.sqlite` in `folder` (None:
    the system's temporary folder), for the caller to open inside the block; the file is
    deleted when the block ends, so only the open connections keep it (as SQLite does with
    its own temporary files): a kill leaves nothing, and where open files cannot be deleted,
    or killed within the block, a `.tmp-*` leftover that `clean_temp` removes."""
    descriptor, path = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name}-", suffix=".sqlite",
                                        dir=folder)
    os.close(descriptor)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def scratch_settings(db: sqlite3.Connection, cache_kib: int) -> None:
    """A scratch database's writer: no journal and no syncs (nothing in it must survive a
    crash), and a page cache of `cache_kib` (the most it holds in memory; the rest spills to
    the file)."""
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.execute(f"PRAGMA cache_size = -{cache_kib}")
