"""Reaching into the precompute cache's storage from tests: find one entry, read it, damage it
in place inside its shard, or turn a cache back into the one-file layout of older ditctl
versions (to test that those keep working and are converted)."""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path

import torch

from ditctl.data.cache import Cache, CacheIndex, IndexEntry, tensors_sha256
from ditctl.data.cache_shards import SEPARATOR, shard_path
from ditctl.fsutil import atomic_write_bytes


def stored(cache: Cache, key: str) -> IndexEntry:
    entry = cache.lookup(key)
    assert entry is not None, f"{key} is not in the index"
    return entry


def read_stored(cache: Cache, key: str) -> dict[str, torch.Tensor]:
    return cache.read_stored(stored(cache, key))[0]


def _tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of a safetensors file's tensors."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    start = 8 + length
    return {name: (start + info["data_offsets"][0], start + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


def overwrite_in_shard(cache: Cache, key: str, tensors: dict[str, torch.Tensor], *,
                       rehash: bool = False) -> Path:
    """Write `tensors` (same dtypes and shapes) over the entry's bytes inside its shard, the
    rest of the shard untouched. `rehash`: also store their hash in the index (values an
    encoder really produced, e.g. NaN), else the index keeps the original hash (garbage)."""
    entry = stored(cache, key)
    path = shard_path(cache.root, entry.shard)
    ranges = _tensor_ranges(path)
    with open(path, "r+b") as fh:
        for name, tensor in tensors.items():
            begin, end = ranges[f"{key}{SEPARATOR}{name}"]
            data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
            assert len(data) == end - begin
            fh.seek(begin)
            fh.write(data)
    if rehash:
        with CacheIndex(cache.index_path) as index:
            index.db.execute("UPDATE entries SET sha256 = ? WHERE key = ?",
                             (tensors_sha256(tensors), key))
            index.db.commit()
    return path


def garble_in_shard(cache: Cache, key: str, value: float = 0.25) -> Path:
    """Plausible same-size garbage over the entry's tensors: only the content hash can tell."""
    tensors = read_stored(cache, key)
    return overwrite_in_shard(cache, key, {n: torch.full_like(t, value)
                                           for n, t in tensors.items()})


def drop_entry(cache: Cache, key: str) -> None:
    with CacheIndex(cache.index_path) as index:
        index.remove([key])


# the index of ditctl versions before shards (index layout 1)
_LAYOUT_1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('latent', 'text')),
    shape TEXT NOT NULL, dtype TEXT NOT NULL, bytes INTEGER NOT NULL, flip INTEGER NOT NULL,
    source TEXT NOT NULL, created REAL NOT NULL);
"""


def to_one_file_layout(cache: Cache) -> int:
    """Rewrite the cache as an older ditctl left it: one file per entry (with its sha256 in
    the file's metadata), an index without shards. Returns the entries written."""
    from ditctl.data.cache import _entry_bytes

    with CacheIndex(cache.index_path) as index:
        entries = list(index.entries())
        shards = index.shard_names()
    for entry in entries:
        tensors = cache.read_stored(entry)[0]
        atomic_write_bytes(cache.path(entry.kind, entry.key), _entry_bytes(tensors, entry.kind))
    for name in shards:
        shard_path(cache.root, name).unlink()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache.index_path}{suffix}").unlink(missing_ok=True)
    with sqlite3.connect(cache.index_path) as db:
        db.executescript(_LAYOUT_1_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       ((e.key, e.kind, json.dumps(list(e.shape)), e.dtype,
                         cache.path(e.kind, e.key).stat().st_size, int(e.flip), e.source, 0.0)
                        for e in entries))
    db.close()
    return len(entries)

