"""The manifest: every usable sample of the workspace, in SQLite at `.ditctl/manifest.sqlite`.

Tables:
  samples  one row per good sample: split, source row, path, caption, content hash, file size
           and mtime, oriented width/height, format, its target (bucket) size, and for an
           image inside a container (tar shard, Arrow file) its member name and byte offset
           (`path` is then the container, `mtime_ns` the container's);
  files    what validation learned per image (size, mtime, hash, size in pixels), so a
           re-ingest re-reads only images whose size or mtime changed (images and mask files
           alike);
  masks    the loss mask of a sample ([data] use_masks): a mask file, or the image's own alpha
           channel; samples without a row here train everywhere (manifests written before
           masks existed have no such table and read the same);
  meta     schema version, the [data] config used, batch sizes planned for, the fingerprint.

The file is never modified in place: `write_manifest` builds a new database in a temporary
file and renames it over the old one, so a killed ingest leaves the previous manifest intact.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..config import Config
from ..errors import DataError, WorkspaceError
from ..fsutil import atomic_write_with, connect_read_only
from ..workspace import Workspace
from .images import ImageFacts, ImageRef

# json.dumps's string encoding (ensure_ascii, the default)
_json_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]

SCHEMA_VERSION = 3  # 2: the dataset of each sample, its caption as the source wrote it;
#                     3: member and offset (images inside tar shards / Arrow files)
SPLITS = ("train", "val")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE samples (
    id INTEGER PRIMARY KEY,
    split TEXT NOT NULL CHECK (split IN ('train', 'val')),
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    caption TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    format TEXT NOT NULL,
    bucket_w INTEGER NOT NULL,
    bucket_h INTEGER NOT NULL,
    member TEXT NOT NULL DEFAULT '',
    offset INTEGER NOT NULL DEFAULT -1,
    dataset INTEGER NOT NULL DEFAULT 0,
    raw_caption TEXT            -- NULL: the same as caption
);
CREATE INDEX samples_split ON samples (split, id);
CREATE TABLE masks (
    sample_id INTEGER PRIMARY KEY REFERENCES samples (id),
    kind TEXT NOT NULL CHECK (kind IN ('file', 'alpha')),
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL
);
CREATE TABLE files (
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    format TEXT NOT NULL,
    member TEXT NOT NULL DEFAULT '',
    offset INTEGER NOT NULL DEFAULT -1,
    PRIMARY KEY (path, member)
) WITHOUT ROWID;  -- one B-tree, in key order: ~25% smaller than a table plus its index
"""
_SAMPLE_COLUMNS = ("split", "source", "path", "caption", "sha256", "size_bytes", "mtime_ns",
                   "width", "height", "format", "bucket_w", "bucket_h", "member", "offset",
                   "dataset", "raw_caption")
_FILE_COLUMNS = ("path", "size_bytes", "mtime_ns", "sha256", "width", "height", "format",
                 "member", "offset")


@dataclass(frozen=True)
class MaskRef:
    """A sample's loss mask: a mask `file` (its path, content hash, size and mtime), or the
    image's own `alpha` channel (the image's path and facts)."""

    kind: str  # "file" | "alpha"
    path: Path
    sha256: str
    size_bytes: int
    mtime_ns: int

    @property
    def identity(self) -> str:
        """What the mask's pixels depend on besides the image (a cache key part): the mask
        file's content, or "alpha" (the image's content is in the key already)."""
        return f"file:{self.sha256}" if self.kind == "file" else "alpha"


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """One good sample. `width`/`height` are the image's (EXIF-oriented) size; the bucket is
    the size it trains at. An image inside a container file has a `member` name and the
    `offset` of its bytes in `path` (the container); read it through `ref`."""

    split: str
    source: str
    path: Path
    caption: str
    sha256: str
    size_bytes: int
    mtime_ns: int
    width: int
    height: int
    format: str
    bucket_w: int
    bucket_h: int
    member: str = ""
    offset: int = -1
    mask: MaskRef | None = None  # [data] use_masks: the loss mask; None: train everywhere
    # the run's dataset it belongs to (ditctl.data.datasets), and its caption before the
    # dataset's caption tools (`caption` is after them; None: the same)
    dataset: int = 0
    raw_caption: str | None = None

    @property
    def source_caption(self) -> str:
        return self.caption if self.raw_caption is None else self.raw_caption

    @property
    def bucket(self) -> tuple[int, int]:
        return self.bucket_w, self.bucket_h

    @property
    def ref(self) -> ImageRef:
        """Where the image's bytes are (the one way every stage reads them)."""
        return ImageRef(str(self.path), self.member, self.offset,
                        self.size_bytes if self.member else -1)

    @property
    def image_name(self) -> str:
        """The image for messages: its path, or `shard.tar#member`."""
        return self.ref.name

    def values(self) -> tuple:
        """The row in the column order of the samples table."""
        return (self.split, self.source, str(self.path), self.caption, self.sha256,
                self.size_bytes, self.mtime_ns, self.width, self.height, self.format,
                self.bucket_w, self.bucket_h, self.member, self.offset, self.dataset,
                self.raw_caption)


class Fingerprint:
    """The manifest's fingerprint, fed one row at a time (rows are streamed, never listed):
    it changes when any sample, caption, image content or bucket changes (not with paths, so
    moving the data folder keeps it)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, row: ManifestRow) -> None:
        self._digest.update(self.line(
            row.split, row.source, row.caption, row.sha256, row.width, row.height, row.bucket_w,
            row.bucket_h, row.mask.identity if row.mask is not None else None,
            row.dataset).encode())

    @staticmethod
    def line(split: str, source: str, caption: str, sha256: str, width: int, height: int,
             bucket_w: int, bucket_h: int, mask_identity: str | None, dataset: int) -> str:
        """One sample's contribution, `json.dumps` of its fields and a newline (lines can be
        hashed in batches: same digest). Written out with json's own string encoder: the
        same text as `json.dumps` for these types (pinned by a test), without building an
        encoder per row (a million rows: ~3 s less)."""
        text = (f"[{_json_string(split)}, {_json_string(source)}, {_json_string(caption)}, "
                f"{_json_string(sha256)}, {int(width)}, {int(height)}, {int(bucket_w)}, "
                f"{int(bucket_h)}")
        if mask_identity is not None:  # only then: mask-less manifests keep their fingerprints
            text += ", " + _json_string(mask_identity)
        if dataset:  # a one-dataset manifest keeps the fingerprint it always had
            text += f", {int(dataset)}"
        return text + "]\n"

    def add_lines(self, lines: list[str]) -> None:
        self._digest.update("".join(lines).encode())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()[:16]


def compute_fingerprint(rows: Iterable[ManifestRow]) -> str:
    """The fingerprint of `rows` (see Fingerprint)."""
    fingerprint = Fingerprint()
    for row in rows:
        fingerprint.add(row)
    return fingerprint.hexdigest()


# --- writing ----------------------------------------------------------------------------------

def write_manifest(path: Path, rows: Iterable[ManifestRow], files: Iterable[ImageFacts],
                   meta: dict[str, Any] | Callable[[], dict[str, Any]]) -> str:
    """Replace the manifest at `path` atomically; returns the fingerprint it records.

    `rows` and `files` may be iterators: each is read once, as it is written. `meta` may be a
    function, called once the rows are written (for counts taken while streaming them)."""
    def build(tmp: str) -> str:
        with contextlib.closing(sqlite3.connect(tmp)) as db:
            # No journal and no syncs while building: a crash leaves only this temporary file,
            # which is never used; the whole file is fsynced once before the rename.
            db.execute("PRAGMA journal_mode = OFF")
            db.execute("PRAGMA synchronous = OFF")
            db.executescript(_SCHEMA)
            with db:  # one transaction
                fingerprint = _insert_samples(db, rows)
                db.executemany(f"INSERT INTO files ({', '.join(_FILE_COLUMNS)}) VALUES "
                               f"({', '.join('?' * len(_FILE_COLUMNS))})",
                               ((f.path, f.size_bytes, f.mtime_ns, f.sha256, f.width, f.height,
                                 f.format, f.member, f.offset) for f in files))
                all_meta = {**(meta() if callable(meta) else meta),
                            "schema_version": SCHEMA_VERSION, "fingerprint": fingerprint}
                db.executemany("INSERT INTO meta VALUES (?, ?)",
                               ((k, json.dumps(v)) for k, v in all_meta.items()))
        return fingerprint

    return atomic_write_with(Path(path), build)


_INSERT_BATCH = 4096
WRITE_CACHE_KIB = 64 * 1024  # SQLite page cache while ingest writes the manifest


def _insert_samples(db: sqlite3.Connection, rows: Iterable[ManifestRow]) -> str:
    """Insert the rows (and their masks) in one pass; returns their fingerprint."""
    # explicit ids (source order from 1), so that the masks table can refer to them
    placeholders = ", ".join("?" * (len(_SAMPLE_COLUMNS) + 1))
    insert = (f"INSERT INTO samples (id, {', '.join(_SAMPLE_COLUMNS)}) "
              f"VALUES ({placeholders})")
    fingerprint = Fingerprint()
    samples, masks = [], []
    for i, row in enumerate(rows, start=1):
        fingerprint.add(row)
        samples.append((i, *row.values()))
        if row.mask is not None:
            masks.append((i, row.mask.kind, str(row.mask.path), row.mask.sha256,
                          row.mask.size_bytes, row.mask.mtime_ns))
        if len(samples) >= _INSERT_BATCH:
            db.executemany(insert, samples)
            db.executemany("INSERT INTO masks VALUES (?, ?, ?, ?, ?, ?)", masks)
            samples, masks = [], []
    db.executemany(insert, samples)
    db.executemany("INSERT INTO masks VALUES (?, ?, ?, ?, ?, ?)", masks)
    return fingerprint.hexdigest()


def _schema(name: str) -> str:
    """The manifest's tables in the attached database `name`."""
    return (_SCHEMA.replace("CREATE TABLE ", f"CREATE TABLE {name}.")
            .replace("CREATE INDEX ", f"CREATE INDEX {name}."))


@contextlib.contextmanager
def attached_manifest(db: sqlite3.Connection, path: str = "",
                      name: str = "manifest") -> Iterator[str]:
    """Empty manifest tables attached to `db` (which has no open transaction) as `name`: in
    the file at `path`, or in a private temporary file (""). Ingest fills them by SQL from its
    staging tables (`write_manifest_by_sql`), so a million samples never pass through Python
    objects. Yields `name`; detached on the way out."""
    db.execute("ATTACH DATABASE ? AS " + name, (path,))
    try:
        # no journal and no syncs: the file is fsynced once, whole, before it is renamed
        db.execute(f"PRAGMA {name}.journal_mode = OFF")
        db.execute(f"PRAGMA {name}.synchronous = OFF")
        # a bounded page cache as large as staging's: the default (2 MB) re-reads pages of a
        # million-sample file from the OS while it is filled and read back
        db.execute(f"PRAGMA {name}.cache_size = -{WRITE_CACHE_KIB}")
        db.executescript(_schema(name))
        yield name
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.execute("DETACH DATABASE " + name)


@dataclass(frozen=True)
class SampleScan:
    """One pass over the samples of an attached manifest: their fingerprint, how many there
    are of each (split, dataset, mask kind or None, caption empty?), and the content hashes
    (their first 15 hex digits) that more than one sample has: candidates for duplicates."""

    fingerprint: str
    kinds: Counter
    repeated_prefixes: list[str]


_PREFIX = 15  # hex digits of a content hash kept per sample while scanning: 60 bits, an int64


def scan_samples(db: sqlite3.Connection, name: str) -> SampleScan:
    """Fingerprint (see Fingerprint) and count the samples of the attached manifest `name`."""
    found = db.execute(
        "SELECT s.split, s.source, s.caption, s.sha256, s.width, s.height, s.bucket_w, "
        "s.bucket_h, CASE m.kind WHEN 'file' THEN 'file:' || m.sha256 WHEN 'alpha' THEN "
        f"'alpha' END, s.dataset, m.kind FROM {name}.samples s LEFT JOIN {name}.masks m "
        "ON m.sample_id = s.id ORDER BY s.id")
    return scan_sample_rows(iter(lambda: found.fetchmany(_INSERT_BATCH), []))


def scan_sample_rows(batches: Iterable[list[tuple]]) -> SampleScan:
    """The SampleScan of samples given in manifest order, in batches of tuples: (split,
    source, caption, sha256, width, height, bucket_w, bucket_h, mask identity or None,
    dataset, mask kind or None)."""
    import numpy as np  # here: reading a manifest (every command's start-up) needs no numpy

    fingerprint, kinds, prefixes = Fingerprint(), Counter(), array.array("q")
    line = Fingerprint.line
    for rows in batches:
        fingerprint.add_lines([line(*row[:10]) for row in rows])
        kinds.update((row[0], row[9], row[10], not row[2]) for row in rows)
        # 8 bytes per sample, sorted once at the end: no set of a million hashes, no SQL sort
        prefixes.extend(int(row[3][:_PREFIX], 16) for row in rows)
    values, counts = np.unique(np.frombuffer(prefixes, dtype=np.int64), return_counts=True)
    repeated = [f"{int(value):0{_PREFIX}x}" for value in values[counts > 1]]
    return SampleScan(fingerprint.hexdigest(), kinds, repeated)


def duplicate_groups(db: sqlite3.Connection, name: str,
                     scan: SampleScan) -> list[list[ManifestRow]]:
    """The groups of samples of the attached manifest `name` that share a content hash, each
    in source order, ordered by their first sample."""
    if not scan.repeated_prefixes:
        return []
    db.execute("CREATE TEMP TABLE repeated_prefixes (prefix TEXT PRIMARY KEY)")
    try:
        db.executemany("INSERT INTO temp.repeated_prefixes VALUES (?)",
                       ((p,) for p in scan.repeated_prefixes))
        groups: dict[str, list[ManifestRow]] = {}
        for row in select_rows(db, f"substr(s.sha256, 1, {_PREFIX}) IN "
                                   "(SELECT prefix FROM temp.repeated_prefixes)", name=name):
            groups.setdefault(row.sha256, []).append(row)
    finally:
        db.execute("DROP TABLE temp.repeated_prefixes")
    return [group for group in groups.values() if len(group) > 1]


def write_manifest_by_sql(path: Path, db: sqlite3.Connection,
                          fill: Callable[[str], SampleScan],
                          meta: Callable[[str, SampleScan], dict[str, Any]]) -> str:
    """Replace the manifest at `path` atomically, its tables filled by SQL on `db` (a
    connection without an open transaction): `fill(name)` inserts the samples, masks and files
    into the attached manifest `name` and returns their scan (`scan_samples`), then
    `meta(name, scan)` returns the meta table (it may count the samples just written).
    Returns the fingerprint it records."""
    def build(tmp: str) -> str:
        with attached_manifest(db, tmp) as name:
            db.execute("BEGIN")
            scan = fill(name)
            db.execute("COMMIT")
            fingerprint = scan.fingerprint
            all_meta = {**meta(name, scan), "schema_version": SCHEMA_VERSION,
                        "fingerprint": fingerprint}
            db.execute("BEGIN")
            db.executemany(f"INSERT INTO {name}.meta VALUES (?, ?)",
                           ((k, json.dumps(v)) for k, v in all_meta.items()))
            db.execute("COMMIT")
        return fingerprint

    return atomic_write_with(Path(path), build)


# --- reading ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _open(ws: Workspace) -> Iterator[sqlite3.Connection]:
    path = ws.manifest_db
    if not path.is_file():
        raise WorkspaceError(f"no manifest in {ws.root}: the data has not been ingested",
                             hint="run `ditctl ingest`")
    try:
        with contextlib.closing(connect_read_only(path)) as db:
            version = _meta_value(db, "schema_version")
            if version != SCHEMA_VERSION:
                raise DataError(f"{path}: manifest schema {version}, this ditctl reads "
                                f"{SCHEMA_VERSION}", hint="run `ditctl ingest` to rebuild it")
            yield db
    except sqlite3.DatabaseError as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})",
                        hint="run `ditctl ingest` to rebuild it") from None


def read_meta(path: Path) -> dict[str, Any] | None:
    """The meta table of the manifest at `path` (without reading a sample), or None when there
    is no readable manifest of this schema."""
    if not Path(path).is_file():
        return None
    try:
        with contextlib.closing(connect_read_only(path)) as db:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    except (sqlite3.DatabaseError, ValueError):
        return None
    return meta if meta.get("schema_version") == SCHEMA_VERSION else None


def _meta_value(db: sqlite3.Connection, key: str) -> Any:
    found = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return json.loads(found[0]) if found else None


def read_manifest(ws: Workspace, split: str = "train") -> list[ManifestRow]:
    """The good samples of one split, in source order.

    Rows are built as the cursor yields them (never a list of raw tuples beside the rows), and
    values many rows repeat (split, format, sizes, buckets, dataset, a container's path and
    mtime) are one object each: ~0.3 KB less per row (measured in docs/performance.md)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    with _open(ws) as db:
        return list(select_rows(db, "s.split = ?", (split,), masked=has_masks_table(db)))


def has_masks_table(db: sqlite3.Connection) -> bool:
    """Whether the manifest has a masks table (manifests written before masks have none)."""
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                      "name = 'masks'").fetchone() is not None


def sample_select(name: str = "main", masked: bool = True, first: str = "") -> str:
    """`SELECT [first,] <a sample's columns, then its mask's> FROM samples s [LEFT JOIN
    masks m]` of manifest `name`: each result row, past `first`, builds a row with `_row`."""
    mask_columns = ("m.kind", "m.path", "m.sha256", "m.size_bytes", "m.mtime_ns")
    columns = ([first] if first else []) + [f"s.{c}" for c in _SAMPLE_COLUMNS] + (
        list(mask_columns) if masked else [])
    return (f"SELECT {', '.join(columns)} FROM {name}.samples s "
            + (f"LEFT JOIN {name}.masks m ON m.sample_id = s.id " if masked else ""))


def select_rows(db: sqlite3.Connection, where: str, params: tuple = (), *,
                name: str = "main", masked: bool = True) -> Iterator[ManifestRow]:
    """The samples (`s`) of manifest `name` that match `where`, in source order."""
    found = db.execute(f"{sample_select(name, masked)}WHERE {where} ORDER BY s.id", params)
    shared = _Shared()
    return (_row(values, shared) for values in found)


class _Shared:
    """One object per distinct value of the columns many rows repeat."""

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}
        self.values: dict[Any, Any] = {}

    def path(self, path: str) -> Path:
        return self.paths.get(path) or self.paths.setdefault(path, Path(path))

    def value(self, value: Any) -> Any:
        return self.values.setdefault(value, value)


# columns with few distinct values in any dataset (never a hash, caption or file name)
_SHARED_COLUMNS = frozenset(("split", "format", "width", "height", "bucket_w", "bucket_h",
                             "dataset"))


def _row(values: tuple, shared: _Shared | None = None) -> ManifestRow:
    fields = dict(zip(_SAMPLE_COLUMNS, values))
    if shared is None:
        fields["path"] = Path(fields["path"])
    else:  # one Path object per container, not one per member
        fields["path"] = shared.path(fields["path"])
        for name in _SHARED_COLUMNS:
            fields[name] = shared.value(fields[name])
        if fields["member"]:  # every member of a container has the container's mtime
            fields["mtime_ns"] = shared.value(fields["mtime_ns"])
    mask = values[len(_SAMPLE_COLUMNS):]
    if mask and mask[0] is not None:
        kind, path, sha256, size_bytes, mtime_ns = mask
        fields["mask"] = MaskRef(kind, Path(path), sha256, size_bytes, mtime_ns)
    return ManifestRow(**fields)


def manifest_counts(ws: Workspace) -> dict[str, int] | None:
    """Good samples per split, counted in the manifest itself; None without a readable one."""
    try:
        with _open(ws) as db:
            found = dict(db.execute("SELECT split, COUNT(*) FROM samples GROUP BY split"))
    except (WorkspaceError, DataError):
        return None
    return {split: int(found.get(split, 0)) for split in SPLITS}


def distinct_images(ws: Workspace) -> tuple[int, int]:
    """(distinct image contents, their bytes: each content once) over both splits."""
    with _open(ws) as db:
        count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM (SELECT "
                                 "MAX(size_bytes) AS size FROM samples GROUP BY sha256)"
                                 ).fetchone()
    return int(count), int(size)


def manifest_fingerprint(ws: Workspace) -> str:
    """The fingerprint of the current manifest (training checkpoints record it)."""
    with _open(ws) as db:
        return _meta_value(db, "fingerprint")


def manifest_meta(ws: Workspace) -> dict[str, Any]:
    """Everything in the meta table (data_config, batch sizes, counts, fingerprint, ...)."""
    with _open(ws) as db:
        return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}


# [data] keys (and keys of its dataset tables) that only change how training reads the
# samples (crop position, flips, caption shuffling, how often and how much each one counts,
# how many processes read them), not what ingest writes: changing them never makes the
# manifest stale.
NOT_INGEST_KEYS = ("center_crop", "random_flip", "shuffle_tags", "keep_tokens", "num_workers")
NOT_INGEST_DATASET_KEYS = NOT_INGEST_KEYS + ("repeats", "weight", "role", "loss_weight",
                                             "caption_dropout")


def ingest_settings(data_config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a [data] dict (as the manifest stores it) that change what ingest writes."""
    out = {k: v for k, v in data_config.items() if k not in NOT_INGEST_KEYS}
    if "datasets" in out:
        out["datasets"] = [{k: v for k, v in table.items() if k not in NOT_INGEST_DATASET_KEYS}
                           for table in out["datasets"] or ()]
    return out


def stale_manifest_reason(ws: Workspace, config: Config) -> str | None:
    """Why the manifest must be (re)built before training or precompute reads it, or None.

    The one rule for every command: it is missing, or it was built with another value of a
    [data] key that changes what ingest writes (every key but NOT_INGEST_KEYS).
    """
    if not ws.manifest_db.is_file():
        return "the data has not been ingested yet"
    try:
        recorded = ingest_settings(manifest_meta(ws).get("data_config") or {})
    except DataError as exc:  # another schema version, unreadable: rebuilt the same way
        return str(exc)
    # Through JSON, as the manifest stored it, so that tuples and lists compare equal.
    current = ingest_settings(json.loads(json.dumps(dataclasses.asdict(config.data))))
    changed = [f"{key} = {recorded.get(key)!r} -> {value!r}" for key, value in current.items()
               if recorded.get(key) != value]
    if changed:
        return "the manifest was built with other [data] settings (" + "; ".join(changed) + ")"
    return None


class PreviousManifest:
    """What the last ingest recorded, for incremental re-ingest (empty when there is none).

    Image facts are looked up one image at a time in the file (primary-key lookups), never
    loaded whole: a re-ingest's memory does not grow with the previous manifest."""

    def __init__(self, path: Path | None, problem: str | None = None):
        self.path = path
        self.problem = problem
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._db = connect_read_only(path)

    def facts(self, path: str, member: str) -> ImageFacts | None:
        if self._db is None:
            return None
        found = self._db.execute(f"SELECT {', '.join(_FILE_COLUMNS)} FROM files "
                                 "WHERE path = ? AND member = ?", (path, member)).fetchone()
        return ImageFacts(*found) if found else None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def read_previous(path: Path) -> PreviousManifest:
    """The previous manifest at `path`; an unreadable one counts as none (with the reason)."""
    path = Path(path)
    if not path.is_file():
        return PreviousManifest(None)
    try:
        with contextlib.closing(connect_read_only(path)) as db:
            # earlier schemas' files tables lack member/offset: every image is read again
            if _meta_value(db, "schema_version") != SCHEMA_VERSION:
                return PreviousManifest(None, "written by another ditctl version")
            db.execute("SELECT path FROM files LIMIT 1").fetchall()
        return PreviousManifest(path)
    except sqlite3.DatabaseError as exc:
        return PreviousManifest(None, f"unreadable ({exc})")


_CHANGES_SQL = """
WITH n AS (SELECT split, path, member, sha256, caption, bucket_w, bucket_h,
                  ROW_NUMBER() OVER (PARTITION BY split, path, member ORDER BY id) AS k
           FROM {new}),
     o AS (SELECT split, path, member, sha256, caption, bucket_w, bucket_h,
                  ROW_NUMBER() OVER (PARTITION BY split, path, member ORDER BY id) AS k
           FROM old.samples)
SELECT COUNT(*), COALESCE(SUM(n.sha256 IS NOT o.sha256 OR n.caption IS NOT o.caption
                              OR n.bucket_w IS NOT o.bucket_w OR n.bucket_h IS NOT o.bucket_h), 0)
FROM n JOIN o ON n.split = o.split AND n.path = o.path AND n.member = o.member AND n.k = o.k
"""


def count_changes_by_sql(db: sqlite3.Connection, name: str, previous: PreviousManifest,
                         ) -> tuple[int, int, int, int]:
    """(added, changed, removed, unchanged) samples of the manifest `name` attached to `db` (no
    open transaction) against `previous`, matched by (split, image, n-th use of that image)
    and compared by content, caption and bucket (by SQL: no dictionary per sample)."""
    total = db.execute(f"SELECT COUNT(*) FROM {name}.samples").fetchone()[0]
    if previous.path is None:
        return total, 0, 0, 0
    db.execute("ATTACH DATABASE ? AS old", (str(previous.path),))
    try:
        both, changed = db.execute(_CHANGES_SQL.format(new=f"{name}.samples")).fetchone()
        old_total = db.execute("SELECT COUNT(*) FROM old.samples").fetchone()[0]
    finally:
        db.execute("DETACH DATABASE old")
    return total - both, changed, old_total - both, both - changed
