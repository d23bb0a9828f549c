"""Ingest's per-record working set, staged in a private temporary SQLite file.

Ingest holds nothing per record in Python: each source row is written here as it is read,
then each image's facts (or problem) as validation learns them, then which rows are good (with
their caption after the dataset's caption tools, their bucket and their mask). The manifest is
written from here by SQL (`fill_manifest`, into manifest tables attached to this database), so
no sample becomes a Python object on the way. Memory stays flat as the dataset grows: SQLite
keeps a bounded page cache and spills the rest to the file.

The file lives in the workspace's `.ditctl/` (on the workspace's disk: a million records
stage ~600 MB, which a RAM-backed /tmp would hold in memory) and is deleted as soon as it is
opened (as SQLite does with its own temporary files), so a killed ingest leaves nothing
behind (killed in that instant: a `.tmp-*` file the next ingest removes), and the next run
starts over (the previous manifest, untouched, still lets it skip every unchanged image). Two
connections hold it open: the one that writes, and a read-only one with which the
fingerprint pass reads the samples in a thread while the first writes them into the manifest
(`fill_manifest`).
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ..fsutil import connect_read_only, scratch_database, scratch_settings
from .images import ImageFacts
from .manifest import MaskRef, SampleScan, scan_sample_rows
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
CREATE TABLE facts (               -- what validation learned per image
    path TEXT NOT NULL, size_bytes INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
    format TEXT NOT NULL, member TEXT NOT NULL, offset INTEGER NOT NULL,
    UNIQUE (path, member)
);
CREATE TABLE problems (path TEXT NOT NULL, member TEXT NOT NULL, code TEXT NOT NULL,
                       message TEXT NOT NULL, PRIMARY KEY (path, member));
CREATE TABLE images (               -- every image some row names, once (rowid: first named)
    path TEXT NOT NULL, member TEXT NOT NULL, offset INTEGER NOT NULL, size INTEGER NOT NULL,
    UNIQUE (path, member)
);
CREATE TABLE good (                -- rows that passed validation
    seq INTEGER PRIMARY KEY,
    caption TEXT NOT NULL,         -- after the dataset's caption tools
    fact INTEGER NOT NULL,         -- the rowid of its image's facts (joined by integer)
    -- copies of its row's split and dataset and its image's size: bucket planning counts
    -- the sizes from this table alone
    split TEXT NOT NULL, dataset INTEGER NOT NULL, width INTEGER NOT NULL,
    height INTEGER NOT NULL
);
CREATE TABLE targets (             -- each bucket plan's target size per image size
    split TEXT NOT NULL, dataset INTEGER NOT NULL, width INTEGER NOT NULL,
    height INTEGER NOT NULL, w INTEGER, h INTEGER,  -- NULL: the plan drops that size
    PRIMARY KEY (split, dataset, width, height)
) WITHOUT ROWID;
CREATE TABLE masks (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, path TEXT NOT NULL,
                    sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);
"""
_ROW_COLUMNS = ("seq", "dataset", "origin", "split", "source", "listed_path", "path", "caption",
                "problem_code", "problem_message", "member", "offset", "size", "mask_listed",
                "mask_path")
SPLITS = ("train", "val")  # the manifest's samples: training rows first
# a good row's bucket: its plan's target for its image size (plans are per split and dataset)
_TARGET_JOIN = ("LEFT JOIN targets t ON t.split = r.split AND t.dataset = r.dataset "
                "AND t.width = f.width AND t.height = f.height")
# a manifest sample from the staged tables, in the samples table's column order
_SAMPLE_COLUMNS = ("r.split, r.source, r.path, g.caption, f.sha256, f.size_bytes, f.mtime_ns, "
                   "f.width, f.height, f.format, COALESCE(t.w, 0), COALESCE(t.h, 0), f.member, "
                   "f.offset, r.dataset, "
                   "CASE WHEN g.caption = r.caption THEN NULL ELSE r.caption END")
# what `manifest.scan_sample_rows` reads of each sample, in its order
_SCAN_COLUMNS = ("r.split, r.source, g.caption, f.sha256, f.width, f.height, COALESCE(t.w, 0), "
                 "COALESCE(t.h, 0), CASE m.kind WHEN 'file' THEN 'file:' || m.sha256 "
                 "WHEN 'alpha' THEN 'alpha' END, r.dataset, m.kind")
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


class Stage:
    """The staging database of one ingest run (see the module doc)."""

    def __init__(self, folder: Path | None = None) -> None:
        with scratch_database(folder, "ingest") as path:
            self.db = sqlite3.connect(path, isolation_level=None)  # autocommit
            self._reader = connect_read_only(path, isolation_level=None,
                                             check_same_thread=False)
        scratch_settings(self.db, CACHE_KIB)
        self._reader.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        self.db.executescript(_SCHEMA)
        # One transaction for the whole run, never committed: in autocommit mode every row of
        # an executemany would be a transaction of its own (measured: ~40x slower). Pages that
        # do not fit the cache spill to the file all the same.
        self.db.execute("BEGIN")
        self.origins: list[str] = []  # one per source read
        self.count = 0
        self._rows_seen = 0  # rows `new_images` has looked at

    def close(self) -> None:
        self._reader.close()
        self.db.close()

    # --- rows --------------------------------------------------------------------------------

    def add_rows(self, rows: Iterable[SourceRow], dataset: int, origin: str,
                 on_batch: Callable[[], None] | None = None) -> int:
        """Stage one source's rows as they are read; returns how many. `on_batch` is called
        after each batch is staged (ingest validates the images named so far meanwhile)."""
        self.origins.append(origin)
        index, first = len(self.origins) - 1, self.count
        values = ((first + n, dataset, index, r.split, r.source, r.listed_path, r.path,
                   r.caption, *(r.problem or (None, None)), r.member, r.offset, r.size,
                   r.mask_listed, r.mask_path) for n, r in enumerate(rows))
        insert = (f"INSERT INTO rows VALUES ({', '.join('?' * len(_ROW_COLUMNS))})")
        for chunk in batched(values):
            self.db.executemany(insert, chunk)
            self.count += len(chunk)
            if on_batch is not None:
                on_batch()
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

    def new_images(self) -> list[tuple[str, str, int, int]]:
        """(path, member, offset, size) of each image that rows staged since the last call
        name for the first time (rows without a problem), in the order rows name them."""
        first_row = self._rows_seen
        first_image = self.db.execute("SELECT COALESCE(MAX(rowid), 0) FROM images").fetchone()[0]
        self.db.execute("INSERT OR IGNORE INTO images SELECT path, member, offset, size FROM rows "
                        "WHERE seq >= ? AND problem_code IS NULL ORDER BY seq", (first_row,))
        self._rows_seen = self.count
        return self.db.execute("SELECT path, member, offset, size FROM images WHERE rowid > ? "
                               "ORDER BY rowid", (first_image,)).fetchall()

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
        self.add_fact_rows((f.path, f.size_bytes, f.mtime_ns, f.sha256, f.width, f.height,
                            f.format, f.member, f.offset) for f in facts)

    def add_fact_rows(self, rows: Iterable[tuple]) -> None:
        """Facts as tuples in FACT_COLUMNS order (`images.probe_rows`)."""
        self.db.executemany(f"INSERT OR REPLACE INTO facts ({', '.join(FACT_COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(FACT_COLUMNS))})", rows)

    def add_problems(self, problems: Iterable[tuple[str, str, str, str]]) -> None:
        """(path, member, code, message) per image that cannot be used."""
        self.db.executemany("INSERT OR REPLACE INTO problems VALUES (?, ?, ?, ?)", problems)

    # --- classifying -------------------------------------------------------------------------

    def rows_with_facts(self, good_only: bool = False, not_good: bool = False,
                        ) -> Iterator[tuple]:
        """(seq, dataset, origin, SourceRow columns..., the image's facts columns or NULLs,
        its problem code and message or NULLs), in source order; `good_only`: good rows only,
        with the good caption appended (in place of the problem); `not_good`: the others."""
        columns = ", ".join(f"r.{c}" for c in _ROW_COLUMNS)
        facts = ", ".join(f"f.{c}" for c in FACT_COLUMNS)
        if good_only:
            return self.db.execute(
                f"SELECT {columns}, {facts}, g.caption FROM good g CROSS JOIN rows r "
                "ON r.seq = g.seq JOIN facts f ON f.rowid = g.fact ORDER BY g.seq")
        return self.db.execute(
            f"SELECT {columns}, {facts}, p.code, p.message FROM rows r "
            "LEFT JOIN facts f ON f.path = r.path AND f.member = r.member "
            "LEFT JOIN problems p ON p.path = r.path AND p.member = r.member "
            + ("WHERE NOT EXISTS (SELECT 1 FROM good g WHERE g.seq = r.seq) " if not_good
               else "") + "ORDER BY r.seq")

    def add_good_rows(self, caption: tuple[str, list[str]], max_pixels: int,
                      keep_empty_captions: bool) -> None:
        """Stage as good every row without a problem whose image decoded, has at most
        `max_pixels` and (unless `keep_empty_captions`) a caption: `caption` is the SQL
        expression of its caption after the caption tools (and its parameters)."""
        expression, params = caption
        self.db.execute(
            "INSERT INTO good SELECT * FROM ("
            f"SELECT r.seq AS seq, {expression} AS caption, f.rowid AS fact, r.split, "
            "r.dataset, f.width, f.height FROM rows r "
            "JOIN facts f ON f.path = r.path AND f.member = r.member "
            "WHERE r.problem_code IS NULL AND f.width * f.height <= ? AND NOT EXISTS "
            "(SELECT 1 FROM problems p WHERE p.path = r.path AND p.member = r.member) "
            "ORDER BY r.seq) WHERE caption != '' OR ?", [*params, max_pixels,
                                                        keep_empty_captions])

    def drop_good(self, seqs: Iterable[int]) -> None:
        """Rows found bad after all (a bad mask, too small for their bucket plan)."""
        for chunk in batched((s,) for s in seqs):
            self.db.executemany("DELETE FROM good WHERE seq = ?", chunk)
            self.db.executemany("DELETE FROM masks WHERE seq = ?", chunk)

    def has_split(self, split: str) -> bool:
        return self.db.execute("SELECT 1 FROM good WHERE split = ? LIMIT 1",
                               (split,)).fetchone() is not None

    def add_masks(self, masks: Iterable[tuple[int, MaskRef]]) -> None:
        self.db.executemany("INSERT INTO masks VALUES (?, ?, ?, ?, ?, ?)",
                            ((seq, m.kind, str(m.path), m.sha256, m.size_bytes, m.mtime_ns)
                             for seq, m in masks))

    # --- bucket planning ---------------------------------------------------------------------

    def _plan_rows(self, split: str, datasets: Sequence[int], join: str = "",
                   ) -> tuple[str, list]:
        """The FROM and WHERE clauses (and parameters) of one plan's good rows: `g` joined
        with their row `r`, image facts `f` (and `join`)."""
        return ("FROM good g CROSS JOIN rows r ON r.seq = g.seq JOIN facts f "
                f"ON f.rowid = g.fact {join} WHERE r.split = ? AND r.dataset IN "
                f"({', '.join('?' * len(datasets))})", [split, *datasets])

    def size_counts(self, split: str, datasets: Sequence[int]) -> dict[tuple[int, int], int]:
        """(width, height) -> how many good rows of `split` and of `datasets` (validation
        rows: dataset 0) have an image of that size: the input of one bucket plan."""
        return {(w, h): n for w, h, n in self.db.execute(
            "SELECT width, height, COUNT(*) FROM good WHERE split = ? AND dataset IN "
            f"({', '.join('?' * len(datasets))}) GROUP BY width, height", [split, *datasets])}

    def set_targets(self, split: str, datasets: Sequence[int],
                    targets: dict[tuple[int, int], tuple[int, int]],
                    dropped: Iterable[tuple[int, int]]) -> list[tuple[int, tuple[int, int]]]:
        """Stage a plan's target size (bucket) per image size (`targets`; the manifest's rows
        join them by size); returns (seq, size) of the rows whose size the plan `dropped`,
        in source order."""
        dropped = list(dropped)
        self.db.executemany("INSERT INTO targets VALUES (?, ?, ?, ?, ?, ?)",
                            [(split, dataset, *size, *target) for dataset in datasets
                             for size, target in targets.items()]
                            + [(split, dataset, *size, None, None) for dataset in datasets
                               for size in dropped])
        if not dropped:
            return []
        rows, params = self._plan_rows(split, datasets, _TARGET_JOIN)
        return [(seq, (w, h)) for seq, w, h in self.db.execute(
            f"SELECT g.seq, f.width, f.height {rows} AND t.w IS NULL ORDER BY g.seq", params)]

    # --- the samples -------------------------------------------------------------------------

    def _samples(self, split: str, columns: str) -> str:
        """The SELECT of the manifest samples of `split` (`columns` of the good rows `g`, their
        row `r`, facts `f`, target `t` and mask `m`), in the manifest's order."""
        return (f"SELECT {columns} FROM good g CROSS JOIN rows r ON r.seq = g.seq "
                f"JOIN facts f ON f.rowid = g.fact {_TARGET_JOIN} "
                f"LEFT JOIN masks m ON m.seq = g.seq WHERE r.split = '{split}' ORDER BY g.seq")

    def _scan(self) -> SampleScan:
        """`manifest.scan_samples` of the manifest `fill_manifest` writes, read from here."""
        def batches() -> Iterator[list[tuple]]:
            for split in SPLITS:
                found = self._reader.execute(self._samples(split, _SCAN_COLUMNS))
                while rows := found.fetchmany(BATCH):
                    yield rows
        return scan_sample_rows(batches())

    def fill_manifest(self, name: str, extra_files: Iterable[ImageFacts] = ()) -> SampleScan:
        """Insert the manifest's rows into the manifest tables attached as `name`, by SQL
        (no Python object per row): the samples (training rows before validation rows, each
        in source order, ids from 1), their masks, and the facts of every image validated,
        then `extra_files` (mask files) not among them. Returns the scan of the samples
        (fingerprint, counts, duplicate candidates), made meanwhile in a thread from the
        staged rows: the inserts run inside SQLite, without Python's lock, so the two take
        two cores. Call `end_transaction` before attaching."""
        scanned: list[SampleScan] = []
        failed: list[BaseException] = []

        def scan() -> None:
            try:
                scanned.append(self._scan())
            except BaseException as exc:  # re-raised on the calling thread
                failed.append(exc)

        scanner = threading.Thread(target=scan, name="ditctl-ingest-scan", daemon=True)
        scanner.start()
        try:
            self._fill(name, extra_files)
        finally:
            scanner.join()
        if failed:
            raise failed[0]
        return scanned[0]

    def _fill(self, name: str, extra_files: Iterable[ImageFacts]) -> None:
        has_masks = self.db.execute("SELECT 1 FROM masks LIMIT 1").fetchone() is not None
        for split in SPLITS:
            first = self.db.execute(f"SELECT COALESCE(MAX(id), 0) FROM {name}.samples"
                                    ).fetchone()[0]
            # ids are given in scan order (good's seq order): no sort
            self.db.execute(f"INSERT INTO {name}.samples (split, source, path, caption, sha256, "
                            "size_bytes, mtime_ns, width, height, format, bucket_w, bucket_h, "
                            "member, offset, dataset, raw_caption) "
                            + self._samples(split, _SAMPLE_COLUMNS))
            if has_masks:
                self.db.execute(
                    f"INSERT INTO {name}.masks SELECT x.id, m.kind, m.path, m.sha256, "
                    "m.size_bytes, m.mtime_ns FROM (SELECT g.seq, ? + ROW_NUMBER() OVER "
                    "(ORDER BY g.seq) AS id FROM good g CROSS JOIN rows r ON r.seq = g.seq "
                    "WHERE r.split = ?) x JOIN masks m ON m.seq = x.seq", (first, split))
        # in key order (facts' own index): the files table's key grows as rows are appended
        self.db.execute(f"INSERT INTO {name}.files ({', '.join(FACT_COLUMNS)}) SELECT "
                        f"{', '.join(FACT_COLUMNS)} FROM facts ORDER BY path, member")
        self.db.executemany(f"INSERT OR IGNORE INTO {name}.files ({', '.join(FACT_COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(FACT_COLUMNS))})",
                            ((f.path, f.size_bytes, f.mtime_ns, f.sha256, f.width, f.height,
                              f.format, f.member, f.offset) for f in extra_files))

    def end_transaction(self) -> None:
        """Commit the run's one transaction (ATTACH cannot happen inside one); statements
        after it are transactions of their own."""
        if self.db.in_transaction:
            self.db.execute("COMMIT")


@contextlib.contextmanager
def staged(folder: Path | None = None) -> Iterator[Stage]:
    """A Stage whose file is in `folder` (the workspace's state folder, so that it lands on
    the workspace's disk rather than a RAM-backed /tmp; None: the system's temporary folder)."""
    stage = Stage(folder)
    try:
        yield stage
    finally:
        stage.close()
