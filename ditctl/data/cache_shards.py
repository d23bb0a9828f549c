"""Shard files of the precompute cache: many entries per safetensors file.

```
cache_dir/shards/<kind>-<16 hex>.safetensors   tensors "<key>/<name>" of up to SHARD_ENTRIES
                                               entries (SHARD_BYTES of tensor data at most)
```
One file per entry would make a 200,000-image cache hundreds of thousands of small files
(slow to list, copy, back up and delete; some filesystems run out of inodes). A shard is an
ordinary safetensors file, read with `safe_open` (a memory map: only the tensors asked for are
read, and the entries of one bucket batch were written next to each other).

Crash safety: a shard is written under a `.tmp-*` name, fsynced and renamed into place, and
only then are its entries' index rows (shard name, content sha256) and its own row committed,
in one transaction. A kill leaves at worst a temporary file or a shard no row names: both are
invisible and removed by the next `ditctl precompute` (`remove_unindexed`); a kill loses at
most the one shard being filled.

Reclaiming space: an entry removed from the index leaves dead bytes in its shard. `compact`
deletes a shard none of whose entries are live, and rewrites those whose live bytes fell below
COMPACT_BELOW of what was written into them: their live entries are copied into new shards
(renamed into place), their rows repointed and the old shards' rows dropped in one
transaction, then the old files are deleted (a kill before that leaves unindexed files,
removed as above).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load, save_file

from ..fsutil import TEMP_PREFIX, atomic_write_with, clean_temp

if TYPE_CHECKING:  # cache.py imports this module
    from .cache import CacheIndex, IndexEntry

SHARDS_FOLDER = "shards"
# A shard closes at whichever comes first. 512 MB keeps a 200,000-entry cache of 1024 px
# latents (~2 MB each) near 800 files, and bounds what a kill loses to one shard's encoding;
# the entry cap keeps the header (one JSON line per tensor) small for tiny entries.
SHARD_BYTES = 512 * 1024 * 1024
SHARD_ENTRIES = 2048
COMPACT_BELOW = 0.5       # rewrite a shard once less than half of its bytes are live
OPEN_SHARDS = 64          # memory maps a reader keeps open (least recently used closed first)
SEPARATOR = "/"           # tensor name = key + SEPARATOR + the entry's own tensor name


def shard_path(root: Path, name: str) -> Path:
    return Path(root) / SHARDS_FOLDER / name


def new_shard_name(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(8)}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor], kind: str) -> None:
    """Write a shard atomically (temporary file, fsync, rename)."""
    atomic_write_with(path, lambda tmp: save_file(
        tensors, tmp, metadata={"format": "ditctl-cache-shard", "kind": kind}))


class ShardWriter:
    """Collects complete entries and writes them a shard at a time (see the module docstring).
    One kind per writer. Not thread-safe: one thread adds and flushes."""

    def __init__(self, root: Path, index: "CacheIndex", kind: str, *,
                 max_bytes: int | None = None, max_entries: int | None = None):
        self.root, self.index, self.kind = Path(root), index, kind
        self.max_bytes = SHARD_BYTES if max_bytes is None else max_bytes
        self.max_entries = SHARD_ENTRIES if max_entries is None else max_entries
        self._tensors: dict[str, torch.Tensor] = {}
        self._entries: list["IndexEntry"] = []
        self._bytes = 0
        # shards whose live entries are all queued here (compaction): their rows are dropped
        # in the transaction that commits the next shard
        self.retiring: list[str] = []

    def add(self, entry: "IndexEntry", tensors: dict[str, torch.Tensor]) -> list["IndexEntry"]:
        """Queue one entry (`entry.sha256` set); returns the entries committed by a flush this
        caused (empty while the shard is still open)."""
        for name, tensor in tensors.items():
            self._tensors[f"{entry.key}{SEPARATOR}{name}"] = tensor.detach().cpu().contiguous()
            self._bytes += tensor.numel() * tensor.element_size()
        self._entries.append(entry)
        if self._bytes >= self.max_bytes or len(self._entries) >= self.max_entries:
            return self.flush()
        return []

    def flush(self) -> list["IndexEntry"]:
        """Write the open shard and commit its rows (and drop the rows of the `retiring`
        shards) in one transaction; returns the committed entries."""
        if not self._entries:
            return []
        name = new_shard_name(self.kind)
        write_shard(shard_path(self.root, name), self._tensors, self.kind)
        entries = [dataclasses.replace(e, shard=name) for e in self._entries]
        # the shard's row counts its entries' tensor bytes (not the file's, whose header
        # would make a shard of tiny entries look mostly dead)
        self.index.add(entries, shard=(name, self.kind, sum(e.bytes for e in entries)),
                       retire=self.retiring)
        self._tensors, self._entries, self._bytes, self.retiring = {}, [], 0, []
        return entries


class ShardReader:
    """Reads entries out of shards through memory maps kept open per process (a DataLoader
    worker forked or unpickled from a reader opens its own)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        # shard name -> (safe_open handle, {key: that entry's tensor names})
        self._open: OrderedDict[str, tuple[object, dict[str, list[str]]]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # memory maps do not cross process boundaries
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    def _shard(self, shard: str) -> tuple[object, dict[str, list[str]]]:
        if self._pid != os.getpid():
            self._open, self._pid = OrderedDict(), os.getpid()
        found = self._open.get(shard)
        if found is not None:
            self._open.move_to_end(shard)
            return found
        handle = safe_open(str(shard_path(self.root, shard)), framework="pt")
        names: dict[str, list[str]] = {}
        for name in handle.keys():
            key, _, _ = name.partition(SEPARATOR)
            names.setdefault(key, []).append(name)
        found = self._open[shard] = (handle, names)
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return found

    def read(self, shard: str, key: str) -> dict[str, torch.Tensor]:
        """The entry's tensors under their own names, in memory of their own (a view would
        pin the shard's mapping). Raises FileNotFoundError, SafetensorError, KeyError."""
        handle, names = self._shard(shard)
        if key not in names:
            raise KeyError(f"{shard} holds no tensors of this entry")
        cut = len(key) + len(SEPARATOR)
        return {name[cut:]: handle.get_tensor(name).clone() for name in names[key]}

    def read_all(self, shard: str) -> dict[str, dict[str, torch.Tensor]]:
        """Every entry of a shard ({key: {name: tensor}}) from one sequential read of the file
        (verify: far fewer calls than entry by entry). Raises FileNotFoundError,
        SafetensorError."""
        entries: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in load(shard_path(self.root, shard).read_bytes()).items():
            key, _, own = name.partition(SEPARATOR)
            entries.setdefault(key, {})[own] = tensor
        return entries

    def forget(self, shard: str) -> None:
        """Close a shard's map (before it is deleted or replaced)."""
        self._open.pop(shard, None)

    def close(self) -> None:
        self._open.clear()


def stored_shards(root: Path) -> list[str]:
    folder = Path(root) / SHARDS_FOLDER
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.suffix == ".safetensors" and not p.name.startswith(TEMP_PREFIX))


def remove_unindexed(root: Path, index: "CacheIndex") -> int:
    """Delete `.tmp-*` leftovers and shard files the index does not name (a kill between a
    shard's rename and its commit, or after a compaction's commit). Returns the files removed.
    The caller holds the workspace lock: no other writer is between rename and commit."""
    removed = clean_temp(Path(root) / SHARDS_FOLDER)
    known = index.shard_names()
    for name in stored_shards(root):
        if name not in known:
            shard_path(root, name).unlink(missing_ok=True)
            removed += 1
    return removed


def compact(root: Path, index: "CacheIndex", *, below: float = COMPACT_BELOW
            ) -> tuple[int, int]:
    """Delete shards with no live entry; rewrite those whose live bytes fell below `below` of
    the bytes written into them, their live entries merged into new shards of the usual size.
    Returns (shards deleted, shards rewritten)."""
    deleted = rewritten = 0
    reader = ShardReader(root)
    writers: dict[str, ShardWriter] = {}
    retired: list[str] = []
    for name, kind, written, live_entries, live_bytes in index.shard_usage():
        if live_entries and live_bytes >= below * written:
            continue
        if not live_entries:
            index.remove_shard(name)  # row first: a kill leaves an unindexed file
            shard_path(root, name).unlink(missing_ok=True)
            deleted += 1
            continue
        writer = writers.setdefault(kind, ShardWriter(root, index, kind))
        for entry in index.entries_in_shard(name):
            writer.add(entry, reader.read(name, entry.key))  # a flush repoints their rows
        writer.retiring.append(name)  # every live entry queued: its row goes with the next
        retired.append(name)          # commit (a kill before leaves it indexed and intact)
        rewritten += 1
    for writer in writers.values():
        writer.flush()
    reader.close()
    for name in retired:  # committed: unindexed now (a kill here: removed by the next run)
        shard_path(root, name).unlink(missing_ok=True)
    return deleted, rewritten
