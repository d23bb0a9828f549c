"""What reading a container file (a tar shard, an Arrow file) learned, kept between ingests.

An `Entry` per member: its name, the offset and size of its bytes in the container, and a text
when the reader wants one (a WebDataset caption member's data, an Arrow row's caption).
`ContainerCache` keeps the entries of every container read, keyed by the container's path,
size and modification time, in `.ditctl/containers.sqlite`: an unchanged shard is not read
again on re-ingest (`read`/`reused` count both cases). It is a cache, not a record: a missing
or unreadable file only means every container is read again, so it is written in place
(SQLite transactions) rather than replaced like the manifest.

`MemberResolver` turns `shard.tar#key.jpg`, as a CSV, JSONL or Parquet image column may
write it, into the member's offset and size, through the same cache.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .tar_shards import index_tar

# a listed image path naming a member of a tar shard: `shards/000.tar#0001.jpg`
MEMBER_SEPARATOR = "#"
TEXT_SUFFIXES = (".txt", ".json")

# 2: a container's entries packed into one row (names and texts as JSON lists, offsets and
#    sizes as int64 arrays): ~10x cheaper to write than a row per entry
_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS containers (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    reader TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    problem_code TEXT,
    problem_member TEXT,
    problem TEXT,
    names TEXT NOT NULL,           -- JSON list, in container order
    offsets BLOB NOT NULL,         -- int64 per entry (native byte order)
    sizes BLOB NOT NULL,
    texts TEXT NOT NULL,           -- JSON list: a caption text or null per entry
    UNIQUE (path, reader)
);
"""


@dataclass(slots=True)  # read-only by convention; frozen would make __init__ 4x dearer
class Entry:
    name: str
    offset: int   # -1: `name` is a file path, not bytes inside the container
    size: int
    text: str | None = None


@dataclass
class Contents:
    """A container's entries in container order; `problem` = (code, member, message) when
    reading stopped early (a truncated or corrupt shard)."""

    entries: list[Entry]
    problem: tuple[str, str, str] | None = None


Reader = Callable[[str], Contents]


class ContainerCache:
    """Container contents by (path, reader, size, mtime); see the module docstring."""

    def __init__(self, path: Path | None):
        self.read = 0
        self.reused = 0
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._db = _connect(Path(path))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def contents(self, path: str, reader_name: str, reader: Reader) -> Contents:
        """The contents of container `path`: from the cache when its size and mtime are the
        ones recorded, else read (and recorded). Raises OSError when it cannot be stat'ed."""
        stat = os.stat(path)
        found = self._lookup(path, reader_name, stat)
        if found is not None:
            self.reused += 1
            return found
        contents = reader(path)
        self.read += 1
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            self._store(path, reader_name, stat, contents)  # not while it is being written
        return contents

    def _lookup(self, path: str, reader_name: str, stat: os.stat_result) -> Contents | None:
        if self._db is None:
            return None
        try:
            row = self._db.execute(
                "SELECT problem_code, problem_member, problem, names, offsets, sizes, texts "
                "FROM containers WHERE path = ? AND reader = ? AND size_bytes = ? AND "
                "mtime_ns = ?", (path, reader_name, stat.st_size, stat.st_mtime_ns)).fetchone()
            if row is None:
                return None
            offsets, sizes = array.array("q"), array.array("q")
            offsets.frombytes(row[4])
            sizes.frombytes(row[5])
            entries = [Entry(*values) for values in zip(json.loads(row[3]), offsets, sizes,
                                                         json.loads(row[6]), strict=True)]
        except (sqlite3.DatabaseError, ValueError):
            self._broken()
            return None
        return Contents(entries, tuple(row[:3]) if row[0] else None)

    def _store(self, path: str, reader_name: str, stat: os.stat_result,
               contents: Contents) -> None:
        if self._db is None:
            return
        problem = contents.problem or (None, None, None)
        entries = contents.entries
        try:
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO containers (path, reader, size_bytes, mtime_ns, "
                    "problem_code, problem_member, problem, names, offsets, sizes, texts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (path, reader_name, stat.st_size, stat.st_mtime_ns, *problem,
                     json.dumps([e.name for e in entries]),
                     array.array("q", [e.offset for e in entries]).tobytes(),
                     array.array("q", [e.size for e in entries]).tobytes(),
                     json.dumps([e.text for e in entries])))
        except sqlite3.DatabaseError:
            self._broken()

    def _broken(self) -> None:
        """A damaged cache file: carry on without it (everything is read again)."""
        self.close()


def _connect(path: Path) -> sqlite3.Connection | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            db = sqlite3.connect(path)
            db.execute("PRAGMA synchronous = OFF")  # a cache: a crash at worst loses entries
            if db.execute("PRAGMA user_version").fetchone()[0] != _VERSION:
                # another layout (or a new file): start empty, every container is read again
                db.executescript("DROP TABLE IF EXISTS entries; DROP TABLE IF EXISTS containers;"
                                 f"{_SCHEMA} PRAGMA user_version = {_VERSION};")
            else:
                db.executescript(_SCHEMA)
            return db
        except sqlite3.DatabaseError:
            with contextlib.suppress(OSError):
                os.unlink(path)  # damaged: start a new one
    return None


# --- tar shards -------------------------------------------------------------------------------

def read_tar(path: str) -> Contents:
    """A tar shard's regular members (caption members with their text)."""
    index = index_tar(path, TEXT_SUFFIXES, _tar_entry)
    return Contents(index.members, index.problem)


def _tar_entry(name: str, offset: int, size: int, text: bytes | None) -> Entry:
    return Entry(name, offset, size, None if text is None else text.decode("utf-8", "replace"))


class MemberResolver:
    """Offsets of `shard.tar#member` references, one shard index at a time in memory.

    Rows usually list a shard's members together, so only the last few shards' indexes are
    kept (memory does not grow with the dataset)."""

    KEEP = 4

    def __init__(self, cache: ContainerCache):
        self.cache = cache
        self._recent: OrderedDict[str, tuple[dict[str, Entry], str] | str] = OrderedDict()
        self._paths: dict[tuple[str, str], str] = {}

    def shard_path(self, base: str, listed: str) -> str:
        """The absolute shard path of a listed one (one string per shard, computed once)."""
        found = self._paths.get((base, listed))
        if found is None:
            found = os.path.normpath(os.path.join(base, os.path.expanduser(listed)))
            self._paths[(base, listed)] = found
        return found

    def entry(self, shard: str, member: str) -> Entry | tuple[str, str]:
        """The member's entry, or (code, message) why there is none."""
        found = self._recent.get(shard)
        if found is None:
            found = self._index(shard)
            self._recent[shard] = found
            if len(self._recent) > self.KEEP:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(shard)
        if isinstance(found, str):
            return ("missing", found)
        entries, cut = found
        entry = entries.get(member)
        if entry is None:
            if cut:  # the member may be in the part of the shard that is missing
                return ("truncated", f"no member {member!r} in shard "
                                     f"{os.path.basename(shard)}, which is damaged: {cut}")
            return ("missing", f"no member {member!r} in shard {os.path.basename(shard)}")
        return entry

    def _index(self, shard: str) -> tuple[dict[str, Entry], str] | str:
        try:
            contents = self.cache.contents(shard, "tar", read_tar)
        except FileNotFoundError:
            return "shard not found"
        except OSError as exc:
            return f"cannot read the shard ({exc.strerror or exc})"
        cut = f"{contents.problem[2]}; re-create or re-copy the shard" if contents.problem else ""
        return {entry.name: entry for entry in contents.entries}, cut


def split_member(listed: str) -> tuple[str, str] | None:
    """`shards/000.tar#0001.jpg` -> (`shards/000.tar`, `0001.jpg`); None for a plain path."""
    shard, sep, member = listed.partition(".tar" + MEMBER_SEPARATOR)
    if not sep or not member:
        return None
    return shard + ".tar", member
