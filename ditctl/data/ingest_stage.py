"""Ingest's per-record working set, staged in a private temporary SQLite file.

Ingest holds nothing per record in Python: each source row is written here as it is read,
then each image's facts (or problem) as validation learns them, then which rows are good (with
their caption after the dataset's caption tools, their bucket and their mask). The manifest is
written by streaming the good rows back out (`manifest.write_manifest`). Memory stays flat as
the dataset grows: SQLite keeps a bounded page cache and spills the rest to the file.

The file is SQLite's private temporary database (`sqlite3.connect("")`): on Unix it is deleted
as soon as it is opened, so a killed ingest leaves nothing behind, and the next run starts over
(the previous manifest, untouched, still lets it skip every unchanged image).
"""

from __future__ import annotations

import array
import contextlib
import itertools
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .images import ImageFacts
from .manifest import ManifestRow, MaskRef
from .sources import SourceRow

_SCHEMA = """
CREATE TABLE rows (
    seq INTEGER PRIMARY KEY,       -- the row's position among all rows read (from 0)
    dataset INTEGER NOT NULL,
    origin INTEGER NOT NULL,       -- index into Stage.origins
    split TEXT NOT NULL, source TEXT NOT NULL, listed_path TEXT NOT NULL, path TEXT NOT NULL,
    caption TEXT NOT NULL, problem_code TEXT, problem_message TEXT,
    member TEXT NOT NULL, offset INTEGER NOT NULL, size INTEGER NOT NULL,
    mask_listed TEXT NOT NULL, mask_path TEXT
);
CREATE TABLE facts (               -- what validation learned per image (rowid: learned order)
    path TEXT NOT NULL, size_bytes INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
    format TEXT NOT NULL, member TEXT NOT NULL, offset INTEGER NOT NULL,
    UNIQUE (path, member)
);
CREATE TABLE problems (path TEXT NOT NULL, member TEXT NOT NULL, code TEXT NOT NULL,
                       message TEXT NOT NULL, PRIMARY KEY (path, member));
CREATE TABLE probe (path TEXT NOT NULL, member TEXT NOT NULL, offset INTEGER NOT NULL,
                    size INTEGER NOT NULL);
CREATE TABLE good (                -- rows that passed validation
    seq INTEGER PRIMARY KEY,
    caption TEXT NOT NULL,         -- after the dataset's caption tools
    bucket_w INTEGER NOT NULL DEFAULT 0, bucket_h INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE masks (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, path TEXT NOT NULL,
                    sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);
"""
_ROW_COLUMNS = ("seq", "dataset", "origin", "split", "source", "listed_path", "path", "caption",
                "problem_code", "problem_message", "member", "offset", "size", "mask_listed",
                "mask_path")
FACT_COLUMNS = ("path", "size_bytes", "mtime_ns", "sha256", "width", "height", "format",
                "member", "offset")
# SQLite's page cache for the staging file, in KiB: what staging may hold in memory at most
# (the rest lives in the file)
CACHE_KIB = 32 * 1024
# executemany batches: large enough to amortise the calls, small enough to stay out of sight
BATCH = 4096


def batched(items: Iterable, size: int = BATCH) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class SizeColumns(Sequence):
    """Image sizes as two compact integer arrays (8 bytes per image, not a tuple each):
    what `buckets.plan_buckets` reads, item by item, as (width, height)."""

    def __init__(self, pairs: Iterable[tuple[int, int]]):
        self.widths, self.heights = array.array("l"), array.array("l")
        for width, height in pairs:
            self.widths.append(width)
            self.heights.append(height)

    def __len__(self) -> int:
        return len(self.widths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return list(zip(self.widths[index], self.heights[index]))
        return self.widths[index], self.heights[index]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.widths, self.heights)


class Stage:
    """The staging database of one ingest run (see the module doc)."""

    def __init__(self) -> None:
        # "": a private temporary file; autocommit, no journal, no syncs (nothing here must
        # survive a crash)
        self.db = sqlite3.connect("", isolation_level=None)
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        self.db.executescript(_SCHEMA)
        # One transaction for the whole run, never committed: in autocommit mode every row of
        # an executemany would be a transaction of its own (measured: ~40x slower). Pages that
        # do not fit the cache spill to the file all the same.
        self.db.execute("BEGIN")
        self.origins: list[str] = []  # one per source read
        self.count = 0

    def close(self) -> None:
        self.db.close()

    # --- rows --------------------------------------------------------------------------------

    def add_rows(self, rows: Iterable[SourceRow], dataset: int, origin: str) -> int:
        """Stage one source's rows as they are read; returns how many."""
        self.origins.append(origin)
        index, first = len(self.origins) - 1, self.count
        values = ((first + n, dataset, index, r.split, r.source, r.listed_path, r.path,
                   r.caption, *(r.problem or (None, None)), r.member, r.offset, r.size,
                   r.mask_listed, r.mask_path) for n, r in enumerate(rows))
        insert = (f"INSERT INTO rows VALUES ({', '.join('?' * len(_ROW_COLUMNS))})")
        for chunk in batched(values):
            self.db.executemany(insert, chunk)
            self.count += len(chunk)
        return self.count - first

    def containers(self) -> set[str]:
        """The tar shards / Arrow files some row names an image in."""
        return {p for (p,) in self.db.execute("SELECT DISTINCT path FROM rows WHERE member != ''")}

    def has_loose_files(self) -> bool:
        """Whether a row without a problem names an image file of its own."""
        return self.db.execute("SELECT 1 FROM rows WHERE member = '' AND problem_code IS NULL "
                               "LIMIT 1").fetchone() is not None

    def first_origin(self) -> str | None:
        return self.origins[0] if self.origins else None

    def distinct_images(self) -> Iterator[tuple[str, str, int, int]]:
        """(path, member, offset, size) of every image some row without a problem names, once
        each, in the order rows first name them."""
        return self.db.execute(
            "SELECT path, member, offset, size FROM (SELECT path, member, offset, size, "
            "MIN(seq) AS first FROM rows WHERE problem_code IS NULL GROUP BY path, member) "
            "ORDER BY first")

    @staticmethod
    def source_row(values: Sequence) -> SourceRow:
        """A SourceRow from the row columns split .. mask_path (in _ROW_COLUMNS order)."""
        (split, source, listed_path, path, caption, code, message, member, offset, size,
         mask_listed, mask_path) = values
        return SourceRow(split, source, listed_path, path, caption,
                         (code, message) if code is not None else None, member, offset, size,
                         mask_listed, mask_path)

    def rows_by_seq(self, seqs: Iterable[int]) -> Iterator[tuple]:
        """(seq, dataset, origin, the SourceRow columns...) of the given rows."""
        for seq in seqs:
            yield self.db.execute(f"SELECT {', '.join(_ROW_COLUMNS)} FROM rows WHERE seq = ?",
                                  (seq,)).fetchone()

    # --- facts -------------------------------------------------------------------------------

    def add_facts(self, facts: Iterable[ImageFacts]) -> None:
        self.db.executemany(f"INSERT OR REPLACE INTO facts ({', '.join(FACT_COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(FACT_COLUMNS))})",
                            ((f.path, f.size_bytes, f.mtime_ns, f.sha256, f.width, f.height,
                              f.format, f.member, f.offset) for f in facts))

    def add_problems(self, problems: Iterable[tuple[str, str, str, str]]) -> None:
        """(path, member, code, message) per image that cannot be used."""
        self.db.executemany("INSERT OR REPLACE INTO problems VALUES (?, ?, ?, ?)", problems)

    def facts(self) -> Iterator[ImageFacts]:
        """Every image's facts, in the order they were learned."""
        for values in self.db.execute(f"SELECT {', '.join(FACT_COLUMNS)} FROM facts "
                                      "ORDER BY rowid"):
            yield ImageFacts(*values)

    def has_facts(self, path: str) -> bool:
        return self.db.execute("SELECT 1 FROM facts WHERE path = ? AND member = ''",
                               (path,)).fetchone() is not None

    # --- images to decode --------------------------------------------------------------------

    def add_probes(self, refs: Iterable[tuple[str, str, int, int]]) -> None:
        self.db.executemany("INSERT INTO probe VALUES (?, ?, ?, ?)", refs)

    def probe_count(self) -> tuple[int, int]:
        """(images to decode, how many of them are inside containers)."""
        total, members = self.db.execute("SELECT COUNT(*), COALESCE(SUM(member != ''), 0) "
                                         "FROM probe").fetchone()
        return total, members

    def probes(self) -> Iterator[tuple[str, str, int, int]]:
        """The images to decode, container members in file order (each worker's chunk reads
        forward through one shard)."""
        return self.db.execute("SELECT path, member, offset, size FROM probe "
                               "ORDER BY path, offset")

    # --- classifying -------------------------------------------------------------------------

    def rows_with_facts(self, good_only: bool = False) -> Iterator[tuple]:
        """(seq, dataset, origin, SourceRow columns..., the image's facts columns or NULLs,
        its problem code and message or NULLs), in source order; `good_only`: good rows only,
        with the good caption appended."""
        columns = ", ".join(f"r.{c}" for c in _ROW_COLUMNS)
        facts = ", ".join(f"f.{c}" for c in FACT_COLUMNS)
        if good_only:
            return self.db.execute(
                f"SELECT {columns}, {facts}, g.caption FROM good g CROSS JOIN rows r "
                "ON r.seq = g.seq "
                "JOIN facts f ON f.path = r.path AND f.member = r.member ORDER BY g.seq")
        return self.db.execute(
            f"SELECT {columns}, {facts}, p.code, p.message FROM rows r "
            "LEFT JOIN facts f ON f.path = r.path AND f.member = r.member "
            "LEFT JOIN problems p ON p.path = r.path AND p.member = r.member ORDER BY r.seq")

    def add_good(self, good: Iterable[tuple[int, str]]) -> None:
        """(seq, caption after the caption tools) per good row."""
        self.db.executemany("INSERT INTO good (seq, caption) VALUES (?, ?)", good)

    def drop_good(self, seqs: Iterable[int]) -> None:
        """Rows found bad after all (a bad mask, too small for their bucket plan)."""
        for chunk in batched((s,) for s in seqs):
            self.db.executemany("DELETE FROM good WHERE seq = ?", chunk)
            self.db.executemany("DELETE FROM masks WHERE seq = ?", chunk)

    def has_split(self, split: str) -> bool:
        return self.db.execute("SELECT 1 FROM good JOIN rows USING (seq) WHERE split = ? "
                               "LIMIT 1", (split,)).fetchone() is not None

    def add_masks(self, masks: Iterable[tuple[int, MaskRef]]) -> None:
        self.db.executemany("INSERT INTO masks VALUES (?, ?, ?, ?, ?, ?)",
                            ((seq, m.kind, str(m.path), m.sha256, m.size_bytes, m.mtime_ns)
                             for seq, m in masks))

    # --- bucket planning ---------------------------------------------------------------------

    def plan_items(self, split: str, datasets: Sequence[int] | None,
                   ) -> tuple[array.array, SizeColumns]:
        """(seq of each good row of `split` (and of `datasets`, for training), their sizes),
        in source order: the compact input of one bucket plan."""
        where = "r.split = ?"
        params: list = [split]
        if datasets is not None:
            where += f" AND r.dataset IN ({', '.join('?' * len(datasets))})"
            params += list(datasets)
        seqs = array.array("q")

        def pairs():
            for seq, width, height in self.db.execute(
                    "SELECT g.seq, f.width, f.height FROM good g CROSS JOIN rows r ON r.seq = g.seq "
                    "JOIN facts f ON f.path = r.path AND f.member = r.member "
                    f"WHERE {where} ORDER BY g.seq", params):
                seqs.append(seq)
                yield width, height

        sizes = SizeColumns(pairs())
        return seqs, sizes

    def set_buckets(self, seqs: array.array, targets: Sequence[tuple[int, int] | None]) -> None:
        values = ((t[0], t[1], s) for s, t in zip(seqs, targets) if t is not None)
        for chunk in batched(values):
            self.db.executemany("UPDATE good SET bucket_w = ?, bucket_h = ? WHERE seq = ?",
                                chunk)

    # --- the samples -------------------------------------------------------------------------

    def repeated_hashes(self) -> set[str]:
        """Content hashes more than one good row shares (duplicates)."""
        return {sha for (sha,) in self.db.execute(
            "SELECT f.sha256 FROM good g JOIN rows r USING (seq) JOIN facts f "
            "ON f.path = r.path AND f.member = r.member GROUP BY f.sha256 HAVING COUNT(*) > 1")}

    def samples(self) -> Iterator[ManifestRow]:
        """The manifest's rows, streamed: training rows before validation rows, each in source
        order (two scans in `good` order: no sort). Consecutive rows of one container share
        one Path object."""
        last_path, path_object = None, None
        for split in ("train", "val"):
            for (source, path, caption, sha256, size_bytes, mtime_ns, width, height, fmt,
                 bucket_w, bucket_h, member, offset, dataset, raw, kind, mask_path, mask_sha,
                 mask_size, mask_mtime) in self.db.execute(
                    "SELECT r.source, r.path, g.caption, f.sha256, f.size_bytes, f.mtime_ns, "
                    "f.width, f.height, f.format, g.bucket_w, g.bucket_h, f.member, f.offset, "
                    "r.dataset, r.caption, m.kind, m.path, m.sha256, m.size_bytes, m.mtime_ns "
                    "FROM good g CROSS JOIN rows r ON r.seq = g.seq "
                    "JOIN facts f ON f.path = r.path AND f.member = r.member "
                    "LEFT JOIN masks m ON m.seq = g.seq WHERE r.split = ? ORDER BY g.seq",
                    (split,)):
                if path != last_path:
                    last_path, path_object = path, Path(path)
                yield ManifestRow(
                    split=split, source=source, path=path_object, caption=caption,
                    sha256=sha256, size_bytes=size_bytes, mtime_ns=mtime_ns, width=width,
                    height=height, format=fmt, bucket_w=bucket_w, bucket_h=bucket_h,
                    member=member, offset=offset,
                    mask=(MaskRef(kind, Path(mask_path), mask_sha, mask_size, mask_mtime)
                          if kind is not None else None),
                    dataset=dataset, raw_caption=None if caption == raw else raw)


@contextlib.contextmanager
def staged() -> Iterator[Stage]:
    stage = Stage()
    try:
        yield stage
    finally:
        stage.close()
