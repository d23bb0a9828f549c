"""A split of the manifest as training holds it: a sequence of ManifestRows without a Python
object per sample.

`read_manifest` builds every row (~0.57 KB each: 570 MB for a million samples, and again in
each forked data-loading worker as it touches them). Training only needs, for the whole run,
what its epoch plans read: each sample's bucket and dataset. `SampleTable` keeps those and the
sample ids as arrays (20 bytes per sample) and reads a row from the manifest file when it is
asked for (`table[i]`, a primary-key lookup; iterating streams them in chunks). Each process
opens its own read-only connection on first use, so forked workers read rows themselves.

The manifest file is only replaced by `ingest`, which cannot run while training holds the
workspace lock; a connection opened before a replacement would go on reading the file it
opened.
"""

from __future__ import annotations

import array
import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterator, Sequence, overload

import numpy as np

from ..fsutil import connect_read_only
from .manifest import SPLITS, ManifestRow, _row, _Shared, has_masks_table, sample_select

_CHUNK = 1024  # rows per query while iterating


def bucket_key(width: int, height: int) -> int:
    """A bucket as one integer that sorts as the (width, height) pair does."""
    return (int(width) << 32) | int(height)


class SampleTable(Sequence[ManifestRow]):
    """The samples of one split of a manifest, in a given order (see the module doc)."""

    def __init__(self, path: Path, ids: np.ndarray, buckets: np.ndarray, datasets: np.ndarray,
                 masked: int, has_masks_table: bool):
        self.path = Path(path)
        self.ids = ids                # manifest sample ids, int64
        self.bucket_keys = buckets    # `bucket_key` of each sample, int64
        self.datasets = datasets      # each sample's dataset index, int32
        self.masked = masked          # how many samples have a loss mask
        self.reader = ManifestReader(path, has_masks_table)  # rows by id

    @classmethod
    def read(cls, path: Path, split: str) -> "SampleTable":
        """The samples of `split` in the manifest at `path`, in source order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        db = connect_read_only(path)
        try:
            has_masks = has_masks_table(db)
            ids, buckets, datasets = array.array("q"), array.array("q"), array.array("i")
            masked = 0
            found = db.execute(
                "SELECT s.id, s.bucket_w, s.bucket_h, s.dataset"
                + (", m.sample_id IS NOT NULL FROM samples s LEFT JOIN masks m "
                   "ON m.sample_id = s.id" if has_masks else ", 0 FROM samples s")
                + " WHERE s.split = ? ORDER BY s.id", (split,))
            while chunk := found.fetchmany(4096):
                ids.extend(row[0] for row in chunk)
                buckets.extend(bucket_key(row[1], row[2]) for row in chunk)
                datasets.extend(row[3] for row in chunk)
                masked += sum(row[4] for row in chunk)
        finally:
            db.close()
        return cls(path, np.frombuffer(ids, dtype=np.int64).copy(),
                   np.frombuffer(buckets, dtype=np.int64).copy(),
                   np.frombuffer(datasets, dtype=np.int32).copy(), masked, has_masks)

    def subset(self, indices: Sequence[int]) -> "SampleTable":
        """The samples at `indices`, in that order."""
        picked = np.asarray(indices, dtype=np.int64)
        table = SampleTable(self.path, self.ids[picked], self.bucket_keys[picked],
                            self.datasets[picked], 0, self.reader.has_masks_table)
        table.masked = self.masked and table._count_masked()
        return table

    # --- the sequence ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> ManifestRow: ...

    @overload
    def __getitem__(self, index: slice) -> "SampleTable": ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.subset(range(*index.indices(len(self))))
        sample_id = int(self.ids[index])  # IndexError past the end, as a list
        rows = self.reader.rows([sample_id])
        if sample_id not in rows:
            raise LookupError(f"{self.path}: sample {sample_id} is gone (the manifest was "
                              "replaced while it was read)")
        return rows[sample_id]

    def __iter__(self) -> Iterator[ManifestRow]:
        for start in range(0, len(self), _CHUNK):
            ids = [int(i) for i in self.ids[start:start + _CHUNK]]
            rows = self.reader.rows(ids)
            for sample_id in ids:
                yield rows[sample_id]

    def bucket(self, index: int) -> tuple[int, int]:
        key = int(self.bucket_keys[index])
        return key >> 32, key & 0xFFFFFFFF

    def _count_masked(self) -> int:
        count = 0
        for start in range(0, len(self), _CHUNK):
            ids = [int(i) for i in self.ids[start:start + _CHUNK]]
            count += self.reader.connection().execute(
                f"SELECT COUNT(*) FROM masks WHERE sample_id IN ({', '.join('?' * len(ids))})",
                ids).fetchone()[0]
        return count


class ManifestReader:
    """Rows of the manifest at `path` by sample id. Each thread and process reads through a
    read-only connection of its own, opened on first use: a connection must not cross a fork
    (DataLoader workers) and the prefetch thread reads rows while the main thread does."""

    def __init__(self, path: Path, has_masks_table: bool):
        self.path = Path(path)
        self.has_masks_table = has_masks_table
        self._local = threading.local()

    def connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.db = connect_read_only(self.path)
            local.pid = os.getpid()
        return local.db

    def rows(self, ids: Sequence[int]) -> dict[int, ManifestRow]:
        """sample id -> its row, for those of `ids` the manifest has. (Values rows repeat are
        shared within one call only: a table read row by row over a whole run would otherwise
        keep every file's path.)"""
        found = self.connection().execute(
            f"{sample_select(masked=self.has_masks_table, first='s.id')}"
            f"WHERE s.id IN ({', '.join('?' * len(ids))})", list(ids))
        shared = _Shared()
        return {values[0]: _row(values[1:], shared) for values in found}

    def __getstate__(self) -> dict:
        # connections cannot be pickled: a spawned process opens its own
        return {"path": self.path, "has_masks_table": self.has_masks_table}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["has_masks_table"])


# --- what the epoch plans read, from a SampleTable or a list of rows ---------------------------

def bucket_keys(rows: Sequence[ManifestRow]) -> np.ndarray:
    """Each row's `bucket_key`, in order (int64)."""
    if isinstance(rows, SampleTable):
        return rows.bucket_keys
    return np.fromiter((bucket_key(*row.bucket) for row in rows), np.int64, len(rows))


def row_datasets(rows: Sequence[ManifestRow]) -> np.ndarray:
    """Each row's dataset index, in order (int32)."""
    if isinstance(rows, SampleTable):
        return rows.datasets
    return np.fromiter((row.dataset for row in rows), np.int32, len(rows))


def masked_count(rows: Sequence[ManifestRow]) -> int:
    """How many rows have a loss mask."""
    if isinstance(rows, SampleTable):
        return rows.masked
    return sum(row.mask is not None for row in rows)


def select(rows: Sequence[ManifestRow], indices: Sequence[int]) -> Sequence[ManifestRow]:
    """The rows at `indices`, in that order (a SampleTable stays one)."""
    if isinstance(rows, SampleTable):
        return rows.subset(indices)
    return [rows[i] for i in indices]
