"""The precompute cache: content-addressed VAE posteriors and text embeddings.

```
cache_dir/
  index.sqlite                          which entries are complete, where each one is stored and
                                        its content sha256 (WAL, one commit per shard)
  shards/<kind>-<id>.safetensors        many entries each (data/cache_shards.py): tensors named
                                        "<key>/<name>"
  latents/<k[:2]>/<k>.safetensors       one entry per file: caches written before shards
  text/<k[:2]>/<k>.safetensors          existed (read as they are; `ditctl precompute` packs
                                        them into shards)
```
An entry's tensors: a latent entry holds "mean", "std" [C, h, w] of one image variant, and
"mask" [1, h, w] (its loss mask on the latent grid) when the image has one ([data] use_masks);
a text entry holds one caption's Conditioning record: "sequence" [L, D], and "mask",
"pooled", "extra.*" when the family has them (entries written before the Conditioning type
call the sequence "embedding"; they are read the same way).

A key is the SHA-256 of everything the stored tensor depends on, and nothing else:

- latent: the image's content hash, its bucket size, the crop offsets, the flip, the VAE's
  identity, the storage dtype (and the transform's version), and its loss mask's identity
  when it has one (the mask file's sha256, or "alpha"): editing a mask re-keys its entries;
  each dataset's resolution and crop settings reach the key through the bucket and offsets;
- text: the caption (after its dataset's trigger word and template), the text encoder's
  identity (weights, tokenizer, layer), the token length,
  the storage dtype.

So changing an image, a caption, the resolution, the crop or a model changes exactly the keys of
the affected entries; moving the data folder or changing training settings changes none.

Crash safety: a shard is written atomically (temporary file, fsync, rename) *before* its
entries' index rows are committed, and readers trust only the index. A kill at any moment
leaves at worst a shard without rows (invisible, removed by the next run, its entries
re-encoded) or a `.tmp-*` leftover (removed by the next run).

Content checks: the index holds the sha256 of every entry's tensor bytes (entry files of the
one-file layout carry it in their safetensors metadata), so garbage written over the tensors
with the header intact is caught by `precompute --verify` and when training reads the entry;
training also refuses latents outside the range a VAE posterior can take (`LATENT_MEAN_LIMIT`,
`LATENT_STD_RANGE`), naming the entry.

Reading needs the models' identities (fingerprints of their files) but never their weights.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..config import Config
from ..errors import CacheError
from ..fsutil import connect_read_only
from ..models.base import Conditioning, LatentDist, ModelFamily
from ..workspace import Workspace
from .batches import crop_for
from .cache_shards import ShardReader, shard_path
from .datasets import of_row, per_dataset
from .manifest import ManifestRow
from .transforms import center_crop_offset

SCHEMA_VERSION = 1
# Bump when `load_training_image` changes its output for the same arguments (resize filter,
# normalisation, ...): every latent key changes with it.
TRANSFORM_VERSION = 1
INDEX_NAME = "index.sqlite"
# The index's layout, apart from the keys (SCHEMA_VERSION, part of every key): 2 added where
# an entry is stored (its shard) and its content hash. Indexes of layout 1 are upgraded in place.
INDEX_LAYOUT = 2
FOLDERS = {"latent": "latents", "text": "text"}

# [precompute] mixed_precision -> the dtype the encoders run in and the tensors are stored in.
STORAGE_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "no": ("fp32", torch.float32),
    "bf16": ("bf16", torch.bfloat16),
    "fp16": ("fp16", torch.float16),
}
_DTYPE_BY_NAME = {name: dtype for name, dtype in STORAGE_DTYPES.values()}

# The range of a VAE posterior, for catching corrupt latents. The std comes from diffusers'
# DiagonalGaussianDistribution, which clamps logvar to [-30, 20]: std = exp(logvar / 2) lies in
# [exp(-15), exp(10)] (widened by the rounding of fp16/bf16 storage). The mean is not clamped,
# but trained KL VAEs put it within a few tens (their scaling_factor maps it to unit variance);
# 1e4 is far beyond anything a posterior gives and far below what garbage bytes decode to.
LATENT_MEAN_LIMIT = 1e4
LATENT_STD_RANGE = (math.exp(-15) * 0.5, math.exp(10) * 1.01)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('latent', 'text')),
    shape TEXT NOT NULL,      -- JSON [C, h, w], or [L, D] of a text entry's sequence
    dtype TEXT NOT NULL,      -- fp32 | bf16 | fp16
    bytes INTEGER NOT NULL,   -- its tensor bytes in a shard; a one-file entry's file size
    flip INTEGER NOT NULL,    -- 1 for the mirrored variant of an image
    source TEXT NOT NULL,     -- image path or caption, for people (not part of the key)
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY,    -- file name under shards/
    kind TEXT NOT NULL,
    bytes INTEGER NOT NULL,   -- tensor bytes of the entries written into it (live or not)
    created REAL NOT NULL
);
"""
# Columns added by layout 2 (ALTER TABLE: indexes of layout 1 keep their rows, which have no
# shard: they name one-file entries).
_LAYOUT_2_COLUMNS = {
    "shard": "TEXT",    # NULL: the entry is its own file (latents/ or text/)
    "sha256": "TEXT",   # tensors_sha256 of the entry (NULL for one-file entries: in the file)
}
_ENTRY_COLUMNS = "key, kind, shape, dtype, bytes, flip, source, shard, sha256"


# --- keys -------------------------------------------------------------------------------------

# A key is the sha256 of json.dumps(parts, sort_keys=True, ensure_ascii=False). Planning a
# million-sample dataset hashes ~3 million keys, so the JSON text is written by the templates
# below (~5x faster than the encoder's sorting and dispatch); `_digest` is the definition they
# are tested against, and it is what any other kind of key would use.
_KEY_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False)
_json_text = json.encoder.encode_basestring  # type: ignore[attr-defined]  # ensure_ascii=False


def _digest(parts: dict) -> str:
    return hashlib.sha256(_KEY_ENCODER.encode(parts).encode()).hexdigest()


def _number(value: int) -> int:
    """An int as JSON writes it (bools and floats are not key parts of these kinds)."""
    if type(value) is not int:
        value = int(value)  # numpy integers; json would refuse them
    return value


def latent_key(*, image_sha256: str, bucket: tuple[int, int], crop: tuple[int, int], flip: bool,
               vae_identity: str, dtype: str, mask: str | None = None) -> str:
    """Key of one image variant's posterior. `crop` is the (left, top) offset actually used;
    `mask` the identity of its loss mask (`MaskRef.identity`), None without one (the key is
    then what it was before masks existed). The parts, in sorted order: bucket, crop, dtype,
    flip, format, image, kind, mask, transform, vae."""
    text = (f'{{"bucket": [{_number(bucket[0])}, {_number(bucket[1])}], '
            f'"crop": [{_number(crop[0])}, {_number(crop[1])}], "dtype": {_json_text(dtype)}, '
            f'"flip": {"true" if flip else "false"}, "format": {SCHEMA_VERSION}, '
            f'"image": {_json_text(image_sha256)}, "kind": "latent", '
            + (f'"mask": {_json_text(mask)}, ' if mask is not None else "")
            + f'"transform": {TRANSFORM_VERSION}, "vae": {_json_text(vae_identity)}}}')
    return hashlib.sha256(text.encode()).hexdigest()


def text_key(*, caption: str, text_identity: str, max_length: int | None, dtype: str) -> str:
    """Key of one caption's embedding (max_length None: unknown yet, matches no entry). The
    parts, in sorted order: caption, dtype, encoder, format, kind, max_length."""
    length = "null" if max_length is None else _number(max_length)
    text = (f'{{"caption": {_json_text(caption)}, "dtype": {_json_text(dtype)}, '
            f'"encoder": {_json_text(text_identity)}, "format": {SCHEMA_VERSION}, '
            f'"kind": "text", "max_length": {length}}}')
    return hashlib.sha256(text.encode()).hexdigest()


def crop_offsets(row: ManifestRow, center_crop: bool | tuple[bool, ...]) -> tuple[int, int]:
    """The crop offset the transform will use ("center" resolved to numbers, so that a centred
    crop and the same explicit offset share one entry). `center_crop`: one value, or one per
    dataset."""
    if not isinstance(center_crop, bool):
        center_crop = of_row(center_crop, row.dataset)
    crop = crop_for(row, center_crop)
    if crop == "center":
        return center_crop_offset(row.width, row.height, row.bucket_w, row.bucket_h)
    return crop


@dataclass(frozen=True)
class KeySpec:
    """Everything besides the sample itself that the cache keys depend on."""

    vae_identity: str
    text_identity: str
    text_max_length: int | None
    dtype: str            # storage dtype name: fp32 | bf16 | fp16
    center_crop: bool | tuple[bool, ...]  # one per dataset (datasets.per_dataset)

    @classmethod
    def for_config(cls, config: Config, family: ModelFamily,
                   text_max_length: int | None) -> "KeySpec":
        return cls(vae_identity=family.vae_identity(),
                   text_identity=family.text_encoder_identity(),
                   text_max_length=text_max_length,
                   dtype=STORAGE_DTYPES[config.precompute.mixed_precision][0],
                   center_crop=per_dataset(config, "center_crop"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPE_BY_NAME[self.dtype]

    def latent_key(self, row: ManifestRow, flip: bool,
                   crop: tuple[int, int] | None = None) -> str:
        """`crop`: the row's `crop_offsets`, when the caller already has them."""
        return latent_key(image_sha256=row.sha256, bucket=row.bucket,
                          crop=crop_offsets(row, self.center_crop) if crop is None else crop,
                          flip=flip, vae_identity=self.vae_identity, dtype=self.dtype,
                          mask=row.mask.identity if row.mask is not None else None)

    def text_key(self, caption: str) -> str:
        return text_key(caption=caption, text_identity=self.text_identity,
                        max_length=self.text_max_length, dtype=self.dtype)


# --- the index --------------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexEntry:
    key: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    flip: bool
    source: str
    shard: str | None = None      # the shard holding it; None: its own file (older caches)
    sha256: str | None = None     # tensors_sha256 of its tensors (shard entries)

    @property
    def what(self) -> str:
        """The entry for people: its image (and flip) or caption."""
        if self.kind == "latent":
            return f"the latents of {self.source}" + (" (flipped)" if self.flip else "")
        return f"the text embedding of {self.source!r}"


def _entry(row) -> IndexEntry:
    key, kind, shape, dtype, size, flip, source, shard, sha = row
    return IndexEntry(key, kind, tuple(json.loads(shape)), dtype, size, bool(flip), source,
                      shard, sha)


class CacheIndex:
    """The SQLite index of complete entries. One connection; not shared between processes."""

    def __init__(self, path: Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise CacheError(f"no cache index at {self.path}", hint="run `ditctl precompute`")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # The precompute writer thread commits while the main thread encodes; the caller
            # serialises access, so the connection may cross threads.
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL survives a killed process; a power loss may lose the last commits,
            # which only makes finished files invisible (they are re-encoded).
            self.db.execute("PRAGMA synchronous=NORMAL")
            with self.db:
                self.db.executescript(_SCHEMA)
                columns = {row[1] for row in self.db.execute("PRAGMA table_info(entries)")}
                for name, sql_type in _LAYOUT_2_COLUMNS.items():
                    if name not in columns:
                        self.db.execute(f"ALTER TABLE entries ADD COLUMN {name} {sql_type}")
                self.db.execute("CREATE INDEX IF NOT EXISTS entries_by_shard ON entries (shard)")
                self.set_meta("index_layout", INDEX_LAYOUT, commit=False)
                version = self.get_meta("schema_version")
                if version is None:
                    self.set_meta("schema_version", SCHEMA_VERSION, commit=False)
                elif version != SCHEMA_VERSION:
                    raise CacheError(f"{self.path}: cache schema {version}, this ditctl uses "
                                     f"{SCHEMA_VERSION}",
                                     hint=f"delete {self.path.parent} and run `ditctl precompute`")
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path}: unreadable cache index ({exc})",
                             hint=f"delete {self.path} and run `ditctl precompute --gc` "
                                  "(entries are re-encoded)") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "CacheIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # meta: the schema version
    def get_meta(self, key: str):
        found = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(found[0]) if found else None

    def set_meta(self, key: str, value, *, commit: bool = True) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        if commit:
            self.db.commit()

    # entries
    def keys(self, kind: str | None = None) -> set[str]:
        if kind is None:
            return {k for (k,) in self.db.execute("SELECT key FROM entries")}
        return {k for (k,) in self.db.execute("SELECT key FROM entries WHERE kind = ?", (kind,))}

    def entries(self, *, by_location: bool = False, one_file: bool = False
                ) -> Iterator[IndexEntry]:
        """Every entry, by key (`by_location`: shard by shard, one-file entries last, so that
        reading them all reads each shard once, front to back; `one_file`: only entries that
        are files of their own)."""
        order = "shard IS NULL, shard, rowid" if by_location else "key"
        where = "WHERE shard IS NULL" if one_file else ""
        for row in self.db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries {where} ORDER BY {order}"):
            yield _entry(row)

    def count(self, *, one_file: bool = False) -> int:
        """How many entries (`one_file`: of those that are files of their own)."""
        where = " WHERE shard IS NULL" if one_file else ""
        return self.db.execute(f"SELECT COUNT(*) FROM entries{where}").fetchone()[0]

    def one_file_entries(self, chunk: int = 4096) -> Iterator[IndexEntry]:
        """The entries that are files of their own, by key, read a chunk at a time: the
        caller may move them into shards (committing through this connection) as it goes."""
        last = ""
        while found := self.db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE shard IS NULL AND key > ? "
                "ORDER BY key LIMIT ?", (last, chunk)).fetchall():
            yield from (_entry(row) for row in found)
            last = found[-1][0]

    def locations(self) -> Iterator[tuple[str, str, str | None]]:
        """(key, kind, shard or None) of every entry."""
        yield from self.db.execute("SELECT key, kind, shard FROM entries")

    def entry(self, key: str) -> IndexEntry | None:
        row = self.db.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE key = ?",
                              (key,)).fetchone()
        return _entry(row) if row else None

    def add(self, entries: Sequence[IndexEntry], *, shard: tuple[str, str, int] | None = None,
            retire: Sequence[str] = ()) -> None:
        """Record complete entries (their shard or files are already in place), with the
        shard that holds them (name, kind, bytes) and without the shards `retire` (compacted
        into this one), in one transaction."""
        now = time.time()
        try:
            with self.db:
                if shard is not None:
                    self.db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?)",
                                    (*shard, now))
                self.db.executemany("DELETE FROM shards WHERE name = ?",
                                    ((name,) for name in retire))
                self.db.executemany(
                    f"INSERT OR REPLACE INTO entries ({_ENTRY_COLUMNS}, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    ((e.key, e.kind, json.dumps(list(e.shape)), e.dtype, e.bytes, int(e.flip),
                      e.source, e.shard, e.sha256, now) for e in entries))
        except sqlite3.OperationalError as exc:  # SQLITE_FULL, or an I/O error writing the WAL
            raise CacheError(f"cannot write the cache index {self.path} ({exc}); the entries "
                             "written so far are intact",
                             hint="free some space or raise the file-size limit, then run "
                                  "`ditctl precompute` again (it continues)") from None

    def remove(self, keys: Iterable[str]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM entries WHERE key = ?", ((k,) for k in keys))

    # shards
    def shard_names(self) -> set[str]:
        return {name for (name,) in self.db.execute("SELECT name FROM shards")}

    def shard_usage(self) -> list[tuple[str, str, int, int, int]]:
        """(name, kind, bytes written, live entries, live bytes) of every shard."""
        return [tuple(row) for row in self.db.execute(
            "SELECT s.name, s.kind, s.bytes, COUNT(e.key), COALESCE(SUM(e.bytes), 0) "
            "FROM shards s LEFT JOIN entries e ON e.shard = s.name "
            "GROUP BY s.name ORDER BY s.name")]

    def entries_in_shard(self, name: str) -> list[IndexEntry]:
        return [_entry(row) for row in self.db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE shard = ? ORDER BY rowid", (name,))]

    def remove_shard(self, name: str) -> None:
        """Forget a shard and any entries still pointing into it."""
        with self.db:
            self.db.execute("DELETE FROM entries WHERE shard = ?", (name,))
            self.db.execute("DELETE FROM shards WHERE name = ?", (name,))


# --- the cache folder -------------------------------------------------------------------------

class Cache:
    """One cache folder read through the keys of one model and data config.

    Reading looks each key up in the index (a read-only connection per process, opened on
    first use) and reads the entry out of its shard, or out of its own file (older caches)."""

    def __init__(self, root: Path, spec: KeySpec):
        self.root = Path(root)
        self.spec = spec
        self._shards = ShardReader(self.root)
        self._db: sqlite3.Connection | None = None
        self._db_pid = 0
        # the prefetch thread and the main thread (sample prompts) may read at once
        self._lock = threading.RLock()

    def __getstate__(self) -> dict:  # DataLoader workers: connections do not cross processes
        return {"root": self.root, "spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["spec"])

    @classmethod
    def open(cls, ws: Workspace, config: Config, family: ModelFamily) -> "Cache":
        """The workspace's cache for `config` and `family` (identities only, no weights).

        The text token length is the family's fact (`text_tokens`), so entries encoded at
        another length (an older ditctl that read the tokenizer's model_max_length) are
        stale: reported as missing, re-encoded by `ditctl precompute`.
        """
        return cls(ws.cache_dir(config), KeySpec.for_config(config, family, family.text_tokens()))

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def path(self, kind: str, key: str) -> Path:
        """Where a one-file entry (the layout before shards) lives."""
        return self.root / FOLDERS[kind] / key[:2] / f"{key}.safetensors"

    # where entries are
    def _query(self, sql: str, params: tuple) -> list[tuple] | None:
        """The rows of a query on the index (None without an index, or one not yet upgraded
        to shards), through this process's read-only connection."""
        with self._lock:
            if self._db is None or self._db_pid != os.getpid():
                if not self.index_path.is_file():
                    return None
                self._db = connect_read_only(self.index_path, check_same_thread=False)
                self._db_pid = os.getpid()
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.OperationalError:  # an index not yet upgraded: one-file entries
                return None

    def close(self) -> None:
        """Close this process's connection to the index (reopened when needed): the index's
        writer, closing last, then folds its write-ahead log back into the file."""
        with self._lock:
            if self._db is not None and self._db_pid == os.getpid():
                self._db.close()
            self._db = None

    def lookup(self, key: str) -> IndexEntry | None:
        """The index row of `key`, or None (not cached, or an index without shards)."""
        found = self._query(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE key = ?", (key,))
        return _entry(found[0]) if found else None

    def shard_entries(self, name: str) -> list[IndexEntry]:
        """The index rows of the entries in shard `name`, in the order they were written."""
        found = self._query(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE shard = ? "
                            "ORDER BY rowid", (name,))
        return [_entry(row) for row in found or ()]

    def has(self, kind: str, key: str) -> bool:
        """Whether the entry can be read: indexed in a shard that exists, or its own file."""
        entry = self.lookup(key)
        if entry is not None and entry.shard is not None:
            return shard_path(self.root, entry.shard).is_file()
        return self.path(kind, key).is_file()

    def location(self, entry: IndexEntry) -> str:
        """Where an entry is stored, for messages: its file, or its shard and key."""
        if entry.shard is None:
            return str(self.path(entry.kind, entry.key))
        return f"{shard_path(self.root, entry.shard)} [entry {entry.key}]"

    def read_stored(self, entry: IndexEntry) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """An entry's tensors and the metadata its content is checked against (`sha256`).
        Raises FileNotFoundError, or SafetensorError/OSError/ValueError/KeyError (unreadable)."""
        if entry.shard is None:
            return read_entry(self.path(entry.kind, entry.key))
        with self._lock:
            tensors = self._shards.read(entry.shard, entry.key)
        return tensors, ({"sha256": entry.sha256} if entry.sha256 else {})

    # reading (training)
    def read_latents(self, row: ManifestRow, flip: bool) -> LatentDist:
        """The cached posterior of a row's image: mean, std [1, C, h, w] fp32."""
        return self.read_latent_entry(row, flip)[0]

    def read_latent_entry(self, row: ManifestRow, flip: bool
                          ) -> tuple[LatentDist, torch.Tensor | None]:
        """The cached posterior and, when the row has a loss mask, the mask [1, 1, h, w] fp32."""
        key = self.spec.latent_key(row, flip)
        what = f"the latents of {row.path}" + (" (flipped)" if flip else "")
        tensors, where = self._load("latent", key, what, ("mean", "std"))
        mask = tensors.get("mask")
        if row.mask is not None and mask is None:
            raise CacheError(f"{where}: cache entry for {what} lacks its loss mask",
                             hint="run `ditctl precompute --verify`")
        dist = LatentDist(mean=tensors["mean"].float().unsqueeze(0),
                          std=tensors["std"].float().unsqueeze(0))
        return dist, mask.float().unsqueeze(0) if mask is not None else None

    def read_text(self, caption: str) -> Conditioning:
        """The cached conditioning of a caption or prompt: a batch of one, floats fp32."""
        key = self.spec.text_key(caption)
        tensors, where = self._load("text", key, f"the text embedding of {caption!r}", ())
        if not Conditioning.record_names(list(tensors)):
            raise CacheError(f"{where}: cache entry for the text embedding of {caption!r} "
                             f"holds {sorted(tensors)}, not a conditioning record",
                             hint="run `ditctl precompute --verify`")
        return Conditioning.from_record(tensors)

    def _load(self, kind: str, key: str, what: str, names: tuple[str, ...]
              ) -> tuple[dict[str, torch.Tensor], str]:
        """The entry's tensors and where they are, checked against its stored content hash
        and the range its kind can take: a corrupt entry stops training here, named, instead
        of training on it."""
        entry = self.lookup(key) or IndexEntry(key, kind, (), "", 0, False, "")
        where = self.location(entry)
        try:
            tensors, metadata = self.read_stored(entry)
        except FileNotFoundError:
            missing = shard_path(self.root, entry.shard) if entry.shard else self.path(kind, key)
            raise CacheError(f"{what} is not in the cache {self.root} (no {missing.name})",
                             hint="run `ditctl precompute`") from None
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise CacheError(f"{where}: unreadable cache entry for {what} ({exc})",
                             hint="run `ditctl precompute --verify`") from None
        if set(names) - set(tensors):
            raise CacheError(f"{where}: cache entry for {what} lacks {', '.join(names)}",
                             hint="run `ditctl precompute --verify`")
        problem = content_problem(tensors, metadata)
        if problem:
            raise CacheError(f"{where}: corrupt cache entry for {what}: {problem}",
                             hint="run `ditctl precompute --verify` (it re-encodes bad entries)")
        return tensors, where

    def check_all(self, entries: Iterable[IndexEntry]
                  ) -> Iterator[tuple[IndexEntry, str | None]]:
        """(entry, why it is bad or None) of each entry; consecutive entries of one shard are
        checked from one sequential read of it (`IndexEntry.entries(by_location=True)`)."""
        for shard, group in itertools.groupby(entries, key=lambda e: e.shard):
            if shard is None:
                yield from ((entry, self.check(entry)) for entry in group)
                continue
            try:
                stored = self._shards.read_all(shard)
            except FileNotFoundError:
                yield from ((entry, "shard missing") for entry in group)
                continue
            except (SafetensorError, OSError, ValueError) as exc:
                yield from ((entry, f"unreadable ({exc})") for entry in group)
                continue
            for entry in group:
                tensors = stored.pop(entry.key, None)
                if tensors is None:
                    yield entry, "not in its shard"
                else:
                    yield entry, check_tensors(
                        tensors, {"sha256": entry.sha256} if entry.sha256 else {}, entry)

    def check(self, entry: IndexEntry) -> str | None:
        """Why a stored entry is bad, or None (`check_tensors`)."""
        try:
            tensors, metadata = self.read_stored(entry)
        except FileNotFoundError:
            return "shard missing" if entry.shard else "file missing"
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            return f"unreadable ({exc})"
        return check_tensors(tensors, metadata, entry)


# --- entry files ------------------------------------------------------------------------------

def read_entry_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an entry file, in memory of their own. (`load_file` would map the file:
    its tensors would change if the file were overwritten in place, and pin the mapping.)"""
    return read_entry(path)[0]


def read_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of an entry file and its safetensors metadata (which holds `sha256`)."""
    data = Path(path).read_bytes()
    return load(data), _safetensors_metadata(data)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (load() checks the header; this only reads it)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' bytes, in name order: the content hash an entry carries."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.requires_grad or tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.detach().cpu().contiguous()
        if tensor.dim() == 0:
            tensor = tensor.reshape(1)
        digest.update(name.encode() + b"\0")
        # the raw bytes, in memory order (a byte view keeps the shape; the buffer is the same)
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def _entry_bytes(tensors: dict[str, torch.Tensor], kind: str) -> bytes:
    return save(tensors, metadata={"format": "ditctl-cache", "kind": kind,
                                   "sha256": tensors_sha256(tensors)})


def latent_tensors(mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype,
                   mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one posterior entry ([C, h, w] each) and its loss mask ([1, h, w] on
    the latent grid, if any), stored in `dtype`."""
    tensors = {"mean": mean.to(dtype).contiguous(), "std": std.to(dtype).contiguous()}
    if mask is not None:
        tensors["mask"] = mask.to(dtype).contiguous()
    return tensors


def latent_file_bytes(mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype,
                      mask: torch.Tensor | None = None) -> bytes:
    """`latent_tensors` as the bytes of a one-file entry."""
    return _entry_bytes(latent_tensors(mean, std, dtype, mask), "latent")


def text_file_bytes(cond: Conditioning, dtype: torch.dtype) -> bytes:
    """The safetensors bytes of one caption's conditioning (a batch of one), floats in `dtype`."""
    return _entry_bytes(cond.record(dtype), "text")


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def entry_to_store(kind: str, key: str, tensors: dict[str, torch.Tensor], shape: Sequence[int],
                   dtype: str, flip: bool, source: str
                   ) -> tuple[IndexEntry, dict[str, torch.Tensor]]:
    """An entry for `ShardWriter.add`: its index row (with its content hash) and tensors."""
    return IndexEntry(key, kind, tuple(shape), dtype, tensor_bytes(tensors), flip, source,
                      sha256=tensors_sha256(tensors)), tensors


def content_problem(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """Why an entry's values cannot be what the encoders wrote, or None: a content hash that
    does not match, non-finite values, or latents outside a VAE posterior's range. (Entries
    written before hashes existed carry none; their values are still range-checked.)"""
    stored = metadata.get("sha256")
    if stored is not None and stored != tensors_sha256(tensors):
        return "its tensors do not match the content hash stored with them"
    # one reduction per tensor (verify runs this for every entry): NaN and inf propagate
    # into the extremes, which also give the ranges checked below
    extremes: dict[str, tuple[float, float]] = {}
    for name, tensor in sorted(tensors.items()):
        if not tensor.numel():
            continue
        low, high = (v.item() for v in torch.aminmax(tensor))
        if not (math.isfinite(low) and math.isfinite(high)):
            return f"{name} holds non-finite values"
        extremes[name] = (low, high)
    if "mean" in extremes:
        peak = max(abs(v) for v in extremes["mean"])
        if peak > LATENT_MEAN_LIMIT:
            return (f"mean reaches {peak:.3g}, beyond any VAE posterior "
                    f"(|mean| <= {LATENT_MEAN_LIMIT:g})")
    if "mask" in extremes:
        low, high = extremes["mask"]
        if low < 0 or high > 1:
            return f"mask spans [{low:.3g}, {high:.3g}], outside a loss mask's [0, 1]"
    if "std" in extremes:
        (low, high), (least, most) = LATENT_STD_RANGE, extremes["std"]
        if least < low or most > high:
            return (f"std spans [{least:.3g}, {most:.3g}], outside a VAE posterior's "
                    f"[{low:.3g}, {high:.3g}]")
    return None


def check_entry(path: Path, entry: IndexEntry) -> str | None:
    """Why a one-file entry is bad (`check_tensors`), or None."""
    try:
        tensors, metadata = read_entry(path)
    except FileNotFoundError:
        return "file missing"
    except (SafetensorError, OSError, ValueError) as exc:
        return f"unreadable ({exc})"
    return check_tensors(tensors, metadata, entry)


def check_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  entry: IndexEntry) -> str | None:
    """Why an entry's tensors are bad (wrong tensors/shape/dtype, content not matching its
    hash, non-finite or out-of-range values, no hash to check), or None."""
    if entry.kind == "latent":
        if set(tensors) - {"mask"} != {"mean", "std"}:
            return f"holds {sorted(tensors)}, expected ['mean', 'std'] (and 'mask')"
        if "mask" in tensors and tuple(tensors["mask"].shape) != (1, *entry.shape[1:]):
            return (f"mask has shape {list(tensors['mask'].shape)}, expected "
                    f"{[1, *entry.shape[1:]]}")
        shaped = ("mean", "std")
    else:
        if not Conditioning.record_names(list(tensors)):
            return f"holds {sorted(tensors)}, expected a conditioning record ('sequence', ...)"
        shaped = tuple(n for n in ("sequence", Conditioning.LEGACY_SEQUENCE) if n in tensors)
    for name in tensors:
        tensor = tensors[name]
        if name in shaped and tuple(tensor.shape) != entry.shape:
            return f"{name} has shape {list(tensor.shape)}, expected {list(entry.shape)}"
        if not tensor.is_floating_point():
            continue  # masks and integer extras are stored as they are
        if tensor.dtype != _DTYPE_BY_NAME.get(entry.dtype):
            return f"{name} is {tensor.dtype}, expected {entry.dtype}"
    problem = content_problem(tensors, metadata)
    if problem is None and "sha256" not in metadata:
        # written before entries carried hashes: its content cannot be checked, so --verify
        # re-encodes it once (training still reads it, range-checked)
        return "no content hash (written by an older ditctl), so its content cannot be checked"
    return problem


# --- whether an entry's bytes are there -------------------------------------------------------

def is_stored(cache: Cache, shards: set[str], key: str, kind: str, shard: str | None) -> bool:
    """Whether an indexed entry's bytes are there: its shard (one of `shards`, those on
    disk), or its own file (caches written before shards)."""
    return shard in shards if shard is not None else cache.path(kind, key).is_file()
