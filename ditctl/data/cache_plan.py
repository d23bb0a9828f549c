"""Which cache entries a manifest + config need, and which of them the cache lacks.

Two consumers, both streaming the manifest's rows instead of holding an object per entry
(a million samples with random_flip need ~3 million entries; as Python objects that plan
took ~1.2 GB):

- `ditctl precompute` plans into a `PrecomputePlan`: a private temporary SQLite file (SQLite
  keeps a bounded page cache, the rest lives on disk), so its memory stays flat however large
  the dataset. What is missing, the batches to encode, what --gc may delete and what the
  entries weigh are SQL over that file and the cache index, attached read-only.
- training start-up and eval only need counts: `count_cache_gap` looks the keys up a chunk
  at a time and keeps 8 bytes per entry.

Both ask for the same entries: every image variant (`row_variants`: both flips of a train
row with random_flip), every caption, and the texts training needs besides the captions.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import itertools
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..config import Config
from ..console import console
from ..errors import CacheError, DataError
from ..fsutil import read_only_uri, scratch_database, scratch_settings
from ..models.base import ModelFamily, unconditional_text
from ..workspace import Workspace
from .batches import sample_variants
from .cache import Cache, CacheIndex, KeySpec, crop_offsets, is_stored
from .cache_shards import stored_shards
from .datasets import per_dataset
from .manifest import ManifestRow
from .sample_table import SampleTable, bucket_key

# --- what is asked for ------------------------------------------------------------------------

def row_variants(spec: KeySpec, row: ManifestRow, random_flip: bool | tuple[bool, ...]
                 ) -> Iterator[tuple[str, bool]]:
    """(key, flip) of each variant of `row` that training can ask for."""
    crop = crop_offsets(row, spec.center_crop)  # one seeded draw per row, both flips
    for flip in sample_variants(row, random_flip):
        yield spec.latent_key(row, flip, crop), flip


def prompts_to_cache(ws: Workspace, config: Config, family: ModelFamily) -> list[str]:
    """Sample prompts (the prompts file, blank and # lines skipped), the negative prompt and the
    family's unconditional prompt, cached so that training from the cache can sample and drop
    captions without the text encoder."""
    named = config.train.sample_prompts_file
    path = ws.resolve(named or "prompts.txt")
    prompts: list[str] = []
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(f"{path}: not valid UTF-8",
                            hint="save the prompts file as UTF-8") from None
        prompts = [line.strip() for line in text.splitlines()
                   if line.strip() and not line.strip().startswith("#")]
    elif named:
        raise DataError(f"{path}: no such file ([train] sample_prompts_file)",
                        hint="create it (one prompt per line) or unset sample_prompts_file")
    prompts += [text for text in (unconditional_text(family, config.sample.negative_prompt),
                                  family.unconditional_prompt) if text is not None]
    return list(dict.fromkeys(prompts))


def training_texts(config: Config, family: ModelFamily) -> list[str]:
    """Texts training encodes besides the captions: the unconditional prompt when captions
    are dropped (families whose unconditional input is a prompt's encoding)."""
    if config.train.caption_dropout > 0 and family.unconditional_prompt is not None:
        return [family.unconditional_prompt]
    return []


def needed_prompts(ws: Workspace, config: Config, family: ModelFamily) -> list[str]:
    """What training needs cached besides the captions: the workspace's sample prompts (and
    negative prompt) when it samples (`sample_every` > 0) and the family's unconditional
    prompt when it drops captions."""
    prompts = prompts_to_cache(ws, config, family) if config.train.sample_every > 0 else []
    return list(prompts) + training_texts(config, family)


# --- precompute's plan ------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE needed (             -- every distinct entry the manifest + config need
    key TEXT PRIMARY KEY,
    is_text INTEGER NOT NULL,     -- 0: an image variant's latents, 1: a text's embedding
    seq INTEGER NOT NULL,         -- when first asked for: manifest order, prompts last
    sample INTEGER,               -- latents: the first manifest sample asking for it
    flip INTEGER,
    bucket INTEGER,               -- latents: its `bucket_key`
    caption TEXT                  -- texts: the text
) WITHOUT ROWID;
CREATE TABLE asked (              -- what each sample asks for, in asking order (`needed`
    seq INTEGER PRIMARY KEY,      -- is built from it by one sort: ~3x faster than inserting
    key TEXT NOT NULL,            -- millions of random keys into a B-tree one by one)
    is_text INTEGER NOT NULL, sample INTEGER, flip INTEGER, bucket INTEGER, caption TEXT
);
CREATE TABLE shards (name TEXT PRIMARY KEY) WITHOUT ROWID;  -- shard files on disk
CREATE TABLE missing_latents (bucket INTEGER, seq INTEGER, key TEXT, sample INTEGER,
                              flip INTEGER, PRIMARY KEY (bucket, seq)) WITHOUT ROWID;
CREATE TABLE missing_texts (seq INTEGER PRIMARY KEY, key TEXT, caption TEXT);
CREATE TABLE unused (key TEXT, is_text INTEGER, shard TEXT);  -- indexed, not needed (--gc)
"""
# SQLite's page cache for the plan file, in KiB: the most the plan holds in memory
_CACHE_KIB = 32 * 1024
_INSERT_BATCH = 4096
# an indexed entry whose bytes are not there counts as missing (`cache.is_stored`); entries
# of the one-file layout (no shard) are checked file by file in Python
_NOT_STORED = ("(e.key IS NULL OR (e.shard IS NOT NULL AND e.shard NOT IN "
               "(SELECT name FROM shards)))")


@dataclass
class PlanCounts:
    images: int = 0      # samples (train + val)
    variants: int = 0    # (sample, flip) pairs asked for, duplicates included
    latents: int = 0     # distinct latent entries
    texts: int = 0       # distinct text entries
    prompts: int = 0     # of the texts, those only prompts ask for


class PrecomputePlan:
    """The entries `ditctl precompute` must have in the cache, planned into a private
    temporary SQLite file in `folder` (the cache's, so that it lands on the disk chosen for
    large data rather than a RAM-backed /tmp; None: the system's temporary folder). The file
    is deleted as soon as it is opened, so a kill leaves nothing behind (or, killed in
    between, a `.tmp-*` leftover that the next run removes)."""

    def __init__(self, spec: KeySpec, folder: Path | None = None):
        self.spec = spec
        self.counts = PlanCounts()
        with scratch_database(folder, "plan") as path:
            # autocommit (statements are their own transactions; `_transaction` groups many)
            self.db = sqlite3.connect(path, uri=True, isolation_level=None)
        scratch_settings(self.db, _CACHE_KIB)
        self.db.executescript(_SCHEMA)
        self._index: Path | None = None  # the cache index attached as `idx`

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "PrecomputePlan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- building ----------------------------------------------------------------------------

    @classmethod
    def build(cls, spec: KeySpec, tables: Sequence[SampleTable], *,
              random_flip: bool | tuple[bool, ...], prompts: Sequence[str] = (),
              folder: Path | None = None) -> "PrecomputePlan":
        """The entries the samples of `tables` (train, then val; of one manifest: the plan
        names samples by id) need: each variant's latents (both flips of train samples with
        random_flip), each caption's embedding, and the extra `prompts`. The first sample
        asking for a latent key stands for all."""
        if len({table.path for table in tables}) > 1:
            raise ValueError("the tables come from different manifests")
        plan = cls(spec, folder)
        try:
            plan._add_samples(tables, random_flip)
            plan._add_prompts(prompts)
        except BaseException:
            plan.close()
            raise
        return plan

    def _add_samples(self, tables: Sequence[SampleTable],
                     random_flip: bool | tuple[bool, ...]) -> None:
        counts, seq = self.counts, itertools.count()
        latents: list[tuple] = []
        texts: list[tuple] = []
        total = sum(len(table) for table in tables)
        with self._transaction(), console.progress("planning cache entries", total=total,
                                                   unit="samples") as bar:
            for table in tables:
                for sample_id, row in zip(table.ids.tolist(), table):
                    bucket = bucket_key(row.bucket_w, row.bucket_h)
                    for key, flip in row_variants(self.spec, row, random_flip):
                        latents.append((key, next(seq), sample_id, flip, bucket))
                    texts.append((self.spec.text_key(row.caption), next(seq), row.caption))
                    if len(texts) >= _INSERT_BATCH:
                        counts.variants += self._insert(latents, texts)
                        bar.advance(len(texts))
                        latents, texts = [], []
            counts.variants += self._insert(latents, texts)
            bar.advance(len(texts))
            # sorted by key, first asker first: OR IGNORE keeps the first sample of each key
            self.db.execute("INSERT OR IGNORE INTO needed SELECT key, is_text, seq, sample, "
                            "flip, bucket, caption FROM asked ORDER BY key, seq")
            self.db.execute("DELETE FROM asked")
        counts.images = total
        counts.latents, = self.db.execute("SELECT COUNT(*) FROM needed WHERE NOT is_text").fetchone()
        counts.texts, = self.db.execute("SELECT COUNT(*) FROM needed WHERE is_text").fetchone()

    def _insert(self, latents: list[tuple], texts: list[tuple]) -> int:
        self.db.executemany("INSERT INTO asked (key, seq, sample, flip, bucket, is_text) "
                            "VALUES (?, ?, ?, ?, ?, 0)", latents)
        self.db.executemany("INSERT INTO asked (key, seq, caption, is_text) VALUES (?, ?, ?, 1)",
                            texts)
        return len(latents)

    def _add_prompts(self, prompts: Sequence[str]) -> None:
        first, = self.db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM needed").fetchone()
        before = self.counts.texts
        with self._transaction():
            self.db.executemany(
                "INSERT OR IGNORE INTO needed (key, is_text, seq, caption) VALUES (?, 1, ?, ?)",
                ((self.spec.text_key(p), first + i, p) for i, p in enumerate(prompts)))
        self.counts.texts, = self.db.execute("SELECT COUNT(*) FROM needed WHERE is_text").fetchone()
        self.counts.prompts = self.counts.texts - before

    # --- reading it --------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """Changes exactly when the set of entries training needs changes (sha256 over the
        sorted keys, one per line)."""
        digest = hashlib.sha256()
        for chunk in self._key_chunks():
            digest.update("".join(f"{key}\n" for key in chunk).encode())
        return digest.hexdigest()[:16]

    def keys(self) -> Iterator[str]:
        """Every needed key, in key order."""
        for chunk in self._key_chunks():
            yield from chunk

    def _key_chunks(self) -> Iterator[list[str]]:
        found = self.db.execute("SELECT key FROM needed ORDER BY key")
        while chunk := found.fetchmany(_INSERT_BATCH):
            yield [key for key, in chunk]

    # --- against the cache -------------------------------------------------------------------

    def _attach(self, index: CacheIndex) -> None:
        """Attach the cache index read-only as `idx` (WAL: the index's own connection may
        commit meanwhile; each statement here reads the last commit before it)."""
        if self._index == index.path:
            return
        self.db.execute("ATTACH DATABASE ? AS idx", (read_only_uri(index.path),))
        self._index = index.path

    def find_missing(self, cache: Cache, index: CacheIndex) -> tuple[int, int]:
        """Fill the missing tables with the needed entries the cache cannot give (not
        indexed, or indexed but their shard or file is gone); returns (latents, texts)."""
        self._attach(index)
        with self._transaction():
            self.db.execute("DELETE FROM shards")
            self.db.executemany("INSERT INTO shards VALUES (?)",
                                ((name,) for name in stored_shards(cache.root)))
            self.db.execute("DELETE FROM missing_latents")
            self.db.execute("DELETE FROM missing_texts")
            joined = "FROM needed n LEFT JOIN idx.entries e ON e.key = n.key"
            # inserted in their tables' key order: appended, not scattered over the B-tree
            self.db.execute(
                "INSERT INTO missing_latents SELECT n.bucket, n.seq, n.key, n.sample, n.flip "
                f"{joined} WHERE NOT n.is_text AND {_NOT_STORED} ORDER BY n.bucket, n.seq")
            self.db.execute("INSERT INTO missing_texts SELECT n.seq, n.key, n.caption "
                            f"{joined} WHERE n.is_text AND {_NOT_STORED} ORDER BY n.seq")
            # entries of the one-file layout: indexed, stored as files of their own
            one_file = self.db.execute(
                "SELECT n.key, e.kind FROM needed n JOIN idx.entries e ON e.key = n.key "
                "WHERE e.shard IS NULL").fetchall()
            gone = [(key,) for key, kind in one_file if not cache.path(kind, key).is_file()]
            self.db.executemany(
                "INSERT INTO missing_latents SELECT bucket, seq, key, sample, flip FROM needed "
                "WHERE key = ? AND NOT is_text", gone)
            self.db.executemany("INSERT INTO missing_texts SELECT seq, key, caption "
                                "FROM needed WHERE key = ? AND is_text", gone)
        latents, = self.db.execute("SELECT COUNT(*) FROM missing_latents").fetchone()
        texts, = self.db.execute("SELECT COUNT(*) FROM missing_texts").fetchone()
        return latents, texts

    def missing_texts(self) -> Iterator[tuple[str, str]]:
        """(key, caption) of each missing text, in the order first asked for."""
        found = self.db.execute("SELECT key, caption FROM missing_texts ORDER BY seq")
        while chunk := found.fetchmany(_INSERT_BATCH):
            yield from chunk

    def latent_batches(self, batch_size: int) -> "LatentBatches":
        """The missing latents in batches of one bucket each (`LatentBatches`)."""
        return LatentBatches(self.db, batch_size)

    def find_unused(self, index: CacheIndex) -> int:
        """Fill the unused table with the indexed entries the plan does not need (what --gc
        deletes); returns how many."""
        self._attach(index)
        with self._transaction():
            self.db.execute("DELETE FROM unused")
            self.db.execute("INSERT INTO unused SELECT e.key, e.kind = 'text', e.shard "
                            "FROM idx.entries e WHERE e.key NOT IN (SELECT key FROM needed)")
        return self.db.execute("SELECT COUNT(*) FROM unused").fetchone()[0]

    def unused(self) -> Iterator[list[tuple[str, str, str | None]]]:
        """The unused entries (`find_unused`) in chunks: (key, kind, shard or None) each."""
        found = self.db.execute("SELECT key, is_text, shard FROM unused")
        while chunk := found.fetchmany(_INSERT_BATCH):
            yield [(key, "text" if is_text else "latent", shard) for key, is_text, shard in chunk]

    def stored_bytes(self, index: CacheIndex) -> tuple[int, int, int]:
        """Bytes the index records for the needed entries: (latents, of which the flipped
        variants, texts)."""
        self._attach(index)
        by_kind = {(text, flip): size for text, flip, size in self.db.execute(
            "SELECT n.is_text, COALESCE(n.flip, 0), SUM(e.bytes) FROM needed n "
            "JOIN idx.entries e ON e.key = n.key GROUP BY n.is_text, COALESCE(n.flip, 0)")}
        latents = by_kind.get((0, 0), 0) + by_kind.get((0, 1), 0)
        return latents, by_kind.get((0, 1), 0), by_kind.get((1, 0), 0)


class LatentBatches:
    """The missing latents as batches of (key, manifest sample id, flip), one bucket per batch,
    buckets in order, samples in manifest order within one. Used as a DataLoader's sampler:
    it is iterated in the main process, reading the plan a batch at a time."""

    def __init__(self, db: sqlite3.Connection, batch_size: int):
        self.db, self.batch_size = db, batch_size

    def __len__(self) -> int:
        size = self.batch_size
        return self.db.execute(
            f"SELECT COALESCE(SUM((n + {size} - 1) / {size}), 0) FROM "
            "(SELECT COUNT(*) AS n FROM missing_latents GROUP BY bucket)").fetchone()[0]

    def __iter__(self) -> Iterator[list[tuple[str, int, bool]]]:
        found = self.db.execute(
            "SELECT bucket, key, sample, flip FROM missing_latents ORDER BY bucket, seq")
        batch: list[tuple[str, int, bool]] = []
        current = None
        while chunk := found.fetchmany(_INSERT_BATCH):
            for bucket, key, sample, flip in chunk:
                if batch and (bucket != current or len(batch) == self.batch_size):
                    yield batch
                    batch = []
                current = bucket
                batch.append((key, sample, bool(flip)))
        if batch:
            yield batch


# --- training's count -------------------------------------------------------------------------

@dataclass(frozen=True)
class GapCount:
    """What the cache lacks for a run, counted while streaming the rows (nothing is kept per
    row, so a million-sample run starts without holding its cache plan): distinct entries the
    run needs, how many the cache lacks, and their estimated size on disk."""

    latents: int
    texts: int
    missing_latents: int
    missing_texts: int
    missing_bytes: int

    @property
    def complete(self) -> bool:
        return not self.missing_latents and not self.missing_texts


_GAP_CHUNK = 2048  # keys looked up in the index per query


def count_cache_gap(ws: Workspace, config: Config, family: ModelFamily,
                    rows: Iterable[ManifestRow], *,
                    prompts: Sequence[str] | None = None) -> GapCount:
    """What the cache lacks for `rows` under `config`, plus `prompts` (None: what training
    needs besides the captions, `needed_prompts`). Loads no weights. The index is asked
    about the keys a chunk at a time, and distinct entries are counted from 60-bit key
    prefixes (8 bytes per variant; two keys of a run sharing one is a ~1e-6 chance at a
    million, and would only make the count of distinct entries one lower). `rows` is read
    twice (latents, then captions)."""
    cache = Cache.open(ws, config, family)
    index = CacheIndex(cache.index_path) if cache.index_path.is_file() else None
    shards = set(stored_shards(cache.root))
    itemsize = 2 if config.precompute.mixed_precision == "bf16" else 4
    latent = family.latent
    text_bytes = family.text_tokens() * family.denoiser_shape().text_dim * itemsize
    if prompts is None:
        prompts = needed_prompts(ws, config, family)
    random_flip = per_dataset(config, "random_flip")

    def present(keys: list[str]) -> set[str]:
        if index is None:
            return set()
        found = index.db.execute(f"SELECT key, kind, shard FROM entries WHERE key IN "
                                 f"({', '.join('?' * len(keys))})", keys)
        return {key for key, kind, shard in found if is_stored(cache, shards, key, kind, shard)}

    def count(items: Iterable[tuple[str, int]]) -> tuple[int, int, int]:
        """(distinct keys, distinct missing keys, their bytes) of (key, bytes) items."""
        needed, missing, sizes = array.array("q"), array.array("q"), array.array("q")
        for chunk in iter(lambda: list(itertools.islice(items, _GAP_CHUNK)), []):
            there = present([key for key, _ in chunk])
            for key, size in chunk:
                prefix = int(key[:15], 16)
                needed.append(prefix)
                if key not in there:
                    missing.append(prefix)
                    sizes.append(size)
        missing_keys, first = np.unique(np.frombuffer(missing, dtype=np.int64),
                                        return_index=True)
        return (len(np.unique(np.frombuffer(needed, dtype=np.int64))), len(missing_keys),
                int(np.frombuffer(sizes, dtype=np.int64)[first].sum()))

    def variant_sizes() -> Iterator[tuple[str, int]]:
        # mean and std latents (and the loss mask) of each variant at its bucket
        for row in rows:
            size = ((2 * latent.channels + (row.mask is not None)) * itemsize
                    * (row.bucket_h // latent.spatial_factor)
                    * (row.bucket_w // latent.spatial_factor))
            for key, _ in row_variants(cache.spec, row, random_flip):
                yield key, size

    try:
        latents = count(variant_sizes())
        captions = itertools.chain((row.caption for row in rows), prompts)
        texts = count((cache.spec.text_key(caption), text_bytes) for caption in captions)
    finally:
        if index is not None:
            index.close()
    return GapCount(latents[0], texts[0], latents[1], texts[1], latents[2] + texts[2])


def check_cache_complete(ws: Workspace, config: Config, family: ModelFamily,
                         rows: Sequence[ManifestRow], *,
                         prompts: Sequence[str] | None = None) -> None:
    """Raise CacheError unless every entry `rows` (and `prompts`, see `count_cache_gap`)
    need under `config` is cached."""
    gap = count_cache_gap(ws, config, family, rows, prompts=prompts)
    if not gap.complete:
        raise CacheError(
            f"{gap.missing_latents} of {gap.latents} latents and {gap.missing_texts} of "
            f"{gap.texts} captions are missing or stale for the current config "
            f"(cache {ws.cache_dir(config)})",
            hint="run `ditctl precompute`")
