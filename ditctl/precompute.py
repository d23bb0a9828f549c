"""`precompute`: put every VAE posterior and text embedding that training needs into the cache.

    manifest (train + val); re-ingested first when missing or built from other [data] settings
    plan: a key per image variant (both flips of train images with random_flip), per unique
          caption, per sample prompt and the negative prompt, streamed from the manifest into
          a temporary SQLite file (data/cache_plan.py: nothing per entry held in memory)
    --verify  re-read every entry (shard by shard, in [precompute] num_workers processes);
              delete bad ones (the steps below re-encode them)
    captions  the missing ones only, unique, through the text encoder
    images    the missing ones only, one bucket per batch: DataLoader workers read the
              batch's rows from the manifest and decode them (the one transform) while the
              VAE loads and encodes; a writer thread packs the entries
              into shards and commits their index rows shard by shard
    --gc      delete entries and stray files the plan no longer references, and compact
              shards (data/cache_shards.py): delete dead ones, rewrite mostly-dead ones
    packing   entries of the one-file layout (caches written before shards) are moved into
              shards, whatever the config, so that an old cache converts on its first run
    state     [precompute] entries, bytes, cache_plan_fingerprint

Exactness vs. batching: the same image encoded alone and inside a batch does not always give
the same bits (measured on CPU: a batch of one takes another convolution algorithm than larger
batches for 3-channel inputs, and at 256x256 every batch size differed). Training on the fly
encodes one image per forward pass, so with fp32 storage (mixed_precision "no", the exact mode)
precompute does the same and the two are bit-identical. With bf16/fp16 storage the rounding
dwarfs those differences, so the VAE and text encoder run on whole batches there.

The caller holds the workspace lock (`ditctl precompute` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc as garbage
import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.markup import escape
from safetensors import SafetensorError

from .config import Config
from .console import console
from .data.batches import crop_for, load_row_pixels, row_latent_mask, unreadable_image
from .data.datasets import of_row, per_dataset
from .data.cache import (FOLDERS, INDEX_NAME, STORAGE_DTYPES, Cache, CacheIndex, IndexEntry,
                         KeySpec, content_problem, entry_to_store, latent_tensors, read_entry,
                         tensor_bytes)
from .data.cache_plan import LatentBatches, PrecomputePlan, prompts_to_cache
from .data.cache_shards import ShardWriter, compact, remove_unindexed
from .data.images import ImageProblem
from .data.manifest import distinct_images, manifest_fingerprint, stale_manifest_reason
from .data.sample_table import ManifestReader, SampleTable
from .errors import DataError
from .fsutil import check_free_space, clean_temp, folder_size
from .models.base import ModelFamily
from .procutil import worker_started
from .models.registry import load_family
from .workspace import Workspace

MAX_PENDING_WRITES = 3  # batches whose files are still being written (bounds memory)


@dataclass
class EntryCounts:
    total: int = 0     # entries the current manifest + config need
    added: int = 0     # encoded by this run
    reused: int = 0    # already complete

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class PrecomputeSummary:
    cache_dir: Path
    dtype: str
    images: int                  # manifest samples (train + val)
    variants: int                # image variants training can ask for (flips included)
    latents: EntryCounts
    texts: EntryCounts
    prompts: int                 # of the texts: sample prompts and the negative prompt
    removed: int = 0             # entries deleted by --gc
    stray_files: int = 0         # files without an index row deleted by --gc
    packed: int = 0              # one-file entries moved into shards
    shards_deleted: int = 0      # shards --gc deleted (no live entry left)
    shards_rewritten: int = 0    # shards --gc rewrote (mostly dead)
    verified: int = 0            # entries re-checked by --verify
    bad: list[tuple[str, str]] = field(default_factory=list)  # (what, why), deleted + re-encoded
    latent_bytes: int = 0        # the entries this config uses
    flip_bytes: int = 0          # of which the mirrored variants
    text_bytes: int = 0
    cache_bytes: int = 0         # the whole cache folder (other configs' entries included)
    source_bytes: int = 0        # the image files (each distinct content once)
    unique_images: int = 0
    encode_s: float = 0.0        # the image-encoding loop (decode, encode, write; no loading)
    elapsed_s: float = 0.0
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.latents.added / self.encode_s if self.encode_s > 0 else 0.0

    @property
    def latent_bytes_per_image(self) -> float:
        return self.latent_bytes / self.unique_images if self.unique_images else 0.0

    @property
    def source_bytes_per_image(self) -> float:
        return self.source_bytes / self.unique_images if self.unique_images else 0.0

    def counters(self) -> dict[str, Any]:
        """Plain JSON for the state file and --json."""
        return {"cache_dir": str(self.cache_dir), "dtype": self.dtype, "images": self.images,
                "variants": self.variants, "latents": self.latents.as_dict(),
                "texts": self.texts.as_dict(), "prompts": self.prompts,
                "entries": self.latents.total + self.texts.total,
                "added": self.latents.added + self.texts.added,
                "reused": self.latents.reused + self.texts.reused,
                "removed": self.removed, "stray_files": self.stray_files,
                "packed": self.packed, "shards_deleted": self.shards_deleted,
                "shards_rewritten": self.shards_rewritten,
                "verified": self.verified, "bad": [list(b) for b in self.bad],
                "bytes": self.latent_bytes + self.text_bytes, "latent_bytes": self.latent_bytes,
                "flip_bytes": self.flip_bytes, "text_bytes": self.text_bytes,
                "cache_bytes": self.cache_bytes, "source_bytes": self.source_bytes,
                "latent_bytes_per_image": round(self.latent_bytes_per_image, 1),
                "source_bytes_per_image": round(self.source_bytes_per_image, 1),
                "images_per_s": round(self.images_per_s, 2), "encode_s": round(self.encode_s, 3),
                "elapsed_s": round(self.elapsed_s, 3),
                "cache_plan_fingerprint": self.fingerprint, "notes": list(self.notes)}


# --- the run ----------------------------------------------------------------------------------

def run_precompute(ws: Workspace, config: Config, *, verify: bool = False, gc: bool = False,
                   device: str | torch.device | None = None) -> PrecomputeSummary:
    """Bring the cache up to date with the manifest and config (see the module docstring)."""
    started = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    notes: list[str] = []
    family = load_family(ws.model_path(config), config.model.family)
    tables = _manifest_tables(ws, config, notes)
    prompts = prompts_to_cache(ws, config, family)
    cache_root = ws.cache_dir(config)
    _clean_leftovers(cache_root)
    max_length = family.text_tokens()  # a family fact: the keys need no encoder
    cache = Cache(cache_root, KeySpec.for_config(config, family, max_length))

    with CacheIndex(cache_root / INDEX_NAME) as index, PrecomputePlan.build(
            cache.spec, tables, random_flip=per_dataset(config, "random_flip"),
            prompts=prompts, folder=cache_root) as plan:
        remove_unindexed(cache_root, index)
        counts = plan.counts
        summary = PrecomputeSummary(
            cache_dir=cache_root, dtype=cache.spec.dtype, images=counts.images,
            variants=counts.variants, latents=EntryCounts(total=counts.latents),
            texts=EntryCounts(total=counts.texts), prompts=counts.prompts,
            fingerprint=plan.fingerprint, notes=notes)

        summary.packed = _pack_one_file_entries(cache, index)
        if verify:
            summary.verified, summary.bad = _verify(cache, index,
                                                    config.precompute.num_workers)
        missing_latents, missing_texts = plan.find_missing(cache, index)
        summary.texts.reused = counts.texts - missing_texts
        summary.latents.reused = counts.latents - missing_latents

        if missing_texts:
            text_encoder = _load_text_encoder(family, config, device)
            summary.texts.added = _encode_texts(family, text_encoder, cache, index,
                                                plan.missing_texts(), missing_texts,
                                                config.precompute.batch_size)
            text_encoder = None  # free it before the VAE loads
            _free_memory(device)
        if missing_latents:
            summary.latents.added, summary.encode_s = _encode_latents(
                family, cache, index, plan.latent_batches(config.precompute.batch_size),
                missing_latents, config, device, tables[0].reader)
        if gc:
            summary.removed, summary.stray_files = _collect_garbage(cache, index, plan)
            summary.shards_deleted, summary.shards_rewritten = compact(cache_root, index)

        summary.latent_bytes, summary.flip_bytes, summary.text_bytes = plan.stored_bytes(index)
    summary.unique_images, summary.source_bytes = distinct_images(ws)
    summary.cache_bytes = folder_size(summary.cache_dir)
    summary.elapsed_s = time.perf_counter() - started
    ws.update_state("precompute", {**summary.counters(),
                                   "manifest_fingerprint": manifest_fingerprint(ws)})
    return summary


def _manifest_tables(ws: Workspace, config: Config, notes: list[str]) -> list[SampleTable]:
    """Train and val samples of a manifest that matches config.data (ingesting first if
    needed), as tables: rows are read from the manifest as the plan streams them."""
    reason = stale_manifest_reason(ws, config)
    if reason:
        from .data.ingest import run_ingest

        console.info(f"ingesting first: {reason}")
        result = run_ingest(ws, config)
        notes.append(f"ingested first ({reason}): {result.counts.get('train', 0)} train + "
                     f"{result.counts.get('val', 0)} val images, {len(result.bad)} bad row(s) "
                     f"skipped (report: {result.report_path})")
    return [SampleTable.read(ws.manifest_db, split) for split in ("train", "val")]


def _clean_leftovers(cache_root: Path) -> None:
    """Remove `.tmp-*` files of writes (and plans) that a kill interrupted."""
    if cache_root.is_dir():
        clean_temp(cache_root)
    for folder in ("latents", "text"):
        top = cache_root / folder
        if top.is_dir():
            for shard in top.iterdir():
                clean_temp(shard)


def _load_text_encoder(family: ModelFamily, config: Config, device: torch.device) -> Any:
    _, dtype = STORAGE_DTYPES[config.precompute.mixed_precision]
    with console.err.status("loading the text encoder ..."):
        return family.load_text_encoder(dtype, device)


def _free_memory(device: torch.device) -> None:
    garbage.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _encode_chunk(spec: KeySpec, batch_size: int) -> int:
    """Items per encoder forward pass: one in the exact (fp32) mode, see the module docstring."""
    return 1 if spec.dtype == "fp32" else batch_size


# --- writing entries --------------------------------------------------------------------------

class _EntryWriter:
    """Packs complete entries into shards (`ShardWriter`) on one background thread, so that
    serialising and fsyncing overlap with encoding. A shard's file is in place before its
    rows are committed: a kill in between leaves only a file the index does not know
    (removed by the next run, its entries re-encoded)."""

    def __init__(self, cache: Cache, index: CacheIndex, kind: str):
        self.shards = ShardWriter(cache.root, index, kind)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self.pending: list[Future] = []

    def submit(self, items: list[tuple[IndexEntry, dict[str, torch.Tensor]]]) -> None:
        while len(self.pending) >= MAX_PENDING_WRITES:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self._write, items))

    def _write(self, items: list[tuple[IndexEntry, dict[str, torch.Tensor]]]) -> None:
        for entry, tensors in items:
            self.shards.add(entry, tensors)

    def drain(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def __enter__(self) -> "_EntryWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self.pool.shutdown(wait=True)
        if exc_type is None:
            self.shards.flush()
            return
        # On an error the entries already queued are complete on their own: keep them, unless
        # writing them fails too (the error unwinding is the one to report).
        with contextlib.suppress(Exception):
            self.shards.flush()


# --- captions ---------------------------------------------------------------------------------

def _encode_texts(family: ModelFamily, text_encoder: Any, cache: Cache, index: CacheIndex,
                  missing: Iterator[tuple[str, str]], count: int, batch_size: int) -> int:
    """Encode and store the `count` texts of `missing` ((key, caption) each)."""
    chunk = _encode_chunk(cache.spec, batch_size)
    done = 0
    with _EntryWriter(cache, index, "text") as writer, \
            console.progress("encoding captions", total=count, unit="captions") as bar:
        while part := list(itertools.islice(missing, chunk)):
            conds = family.encode_prompts(text_encoder, [c for _, c in part]).cpu()
            items = []
            for i, (key, caption) in enumerate(part):
                one = conds.rows(i)
                items.append(entry_to_store("text", key, one.record(cache.spec.torch_dtype),
                                            one.sequence.shape[1:], cache.spec.dtype, False,
                                            caption))
            writer.submit(items)
            bar.advance(len(part))
            done += len(part)
    return done


# --- images -----------------------------------------------------------------------------------

class _ImageBatches(torch.utils.data.Dataset):
    """Decodes one batch of image variants per item (in DataLoader workers), each with the one
    transform; the item is the batch itself ((key, manifest sample id, flip) each, from
    `LatentBatches`), and each worker reads the rows it decodes from the manifest.

    Returns (keys, flips, image names, pixels [B, 3, H, W], loss masks (each [1, h, w] or
    None), problem): one tensor per batch crosses to the main process. A problem comes back
    as a value rather than an exception, so that the main process can raise it as DataError
    with the file's name (a worker's exception arrives as a traceback text).
    """

    def __init__(self, rows: ManifestReader, center_crop: tuple[bool, ...], max_pixels: int,
                 spatial_factor: int):
        self.rows = rows
        self.center_crop, self.max_pixels = center_crop, max_pixels
        self.spatial_factor = spatial_factor

    def __getitem__(self, batch: list[tuple[str, int, bool]]):
        rows = self.rows.rows([sample for _, sample, _ in batch])
        keys, flips, names, pixels, masks = [], [], [], [], []
        for key, sample, flip in batch:
            row = rows[sample]
            keys.append(key)
            flips.append(flip)
            names.append(row.image_name)
            crop = crop_for(row, of_row(self.center_crop, row.dataset))  # its dataset's crop
            try:
                pixels.append(load_row_pixels(row, crop, flip, self.max_pixels))
                # the loss mask as training on the fly makes it (None: the row has none)
                masks.append(row_latent_mask(row, crop, flip, self.max_pixels,
                                             self.spatial_factor)
                             if row.mask is not None else None)
            except DataError as exc:
                return keys, flips, names, None, [], (exc.message, exc.hint)
            except (ImageProblem, OSError) as exc:
                problem = unreadable_image(row.image_name, exc)
                return keys, flips, names, None, [], (problem.message, problem.hint)
        return keys, flips, names, torch.stack(pixels), masks, None


def _as_is(item):
    return item


def _encode_latents(family: ModelFamily, cache: Cache, index: CacheIndex,
                    batches: LatentBatches, count: int, config: Config, device: torch.device,
                    rows: ManifestReader) -> tuple[int, float]:
    """Encode and store the `count` image variants of `batches`; returns (images encoded,
    seconds of the encoding loop, from the VAE being ready to the last commit)."""
    settings = config.precompute
    workers = settings.num_workers
    loader = torch.utils.data.DataLoader(
        _ImageBatches(rows, per_dataset(config, "center_crop"),
                      config.data.max_image_pixels, family.latent.spatial_factor),
        sampler=batches, batch_size=None, num_workers=workers, collate_fn=_as_is,
        persistent_workers=workers > 0,
        worker_init_fn=worker_started,  # workers die with us and never keep the lock
        prefetch_factor=4 if workers else None, pin_memory=device.type == "cuda")
    decoded = iter(loader)  # workers start, and decode ahead, while the VAE loads
    try:
        with console.err.status("loading the VAE ..."):
            vae = family.load_vae(cache.spec.torch_dtype, device)
        chunk = _encode_chunk(cache.spec, settings.batch_size)
        done = 0
        started = time.perf_counter()
        with _EntryWriter(cache, index, "latent") as writer, \
                console.progress("encoding images", total=count, unit="images") as bar:
            for keys, flips, names, pixels, masks, problem in decoded:
                if problem is not None:
                    raise DataError(problem[0], hint=problem[1])
                written = _encode_batch(family, vae, cache, keys, flips, names, pixels, masks,
                                        chunk, device, writer)
                if done == 0:  # the first batch tells how large an entry is
                    per_entry = written / len(keys)
                    check_free_space(cache.root, int(per_entry * (count - len(keys))),
                                     "the latent cache")
                done += len(keys)
                bar.advance(len(keys))
        return done, time.perf_counter() - started  # the writer has drained: all committed
    finally:
        del decoded, loader  # stops the decoding workers now, also when an error unwinds


def _encode_batch(family: ModelFamily, vae: Any, cache: Cache, keys: list[str],
                  flips: list[bool], names: list[str], pixels: torch.Tensor, masks: list,
                  chunk: int, device: torch.device, writer: _EntryWriter) -> int:
    """Encode one bucket batch (pixels [B, 3, H, W]) and hand its entries, with each image's
    loss mask (or None), to the writer; returns the bytes queued."""
    means, stds = [], []
    for start in range(0, len(keys), chunk):
        dist = family.encode_images(vae, pixels[start:start + chunk].to(device))
        means.append(dist.mean.cpu())  # [b, C, h, w]
        stds.append(dist.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    items = [entry_to_store("latent", key, latent_tensors(one_mean, one_std,
                                                          cache.spec.torch_dtype, mask),
                            one_mean.shape, cache.spec.dtype, flip, name)
             for key, flip, name, one_mean, one_std, mask
             in zip(keys, flips, names, mean, std, masks)]
    writer.submit(items)
    return sum(entry.bytes for entry, _ in items)


# --- verify, gc, disk -------------------------------------------------------------------------

class _EntryChecks(torch.utils.data.Dataset):
    """Groups of entries checked in DataLoader workers: a shard's (the worker reads its index
    rows itself, so the main process never holds every entry), or a slice of the one-file
    ones. Each item: (entries checked, [(entry, why it is bad)])."""

    def __init__(self, cache: Cache, groups: list[str | list[IndexEntry]]):
        self.cache, self.groups = cache, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> tuple[int, list[tuple[IndexEntry, str]]]:
        group = self.groups[i]
        entries = self.cache.shard_entries(group) if isinstance(group, str) else group
        return len(entries), [(entry, problem) for entry, problem
                              in self.cache.check_all(entries) if problem]


def _verify(cache: Cache, index: CacheIndex, workers: int) -> tuple[int, list[tuple[str, str]]]:
    """Re-check every entry, shard by shard, in `workers` processes ([precompute]
    num_workers); delete bad ones (the row; a one-file entry's file too; the dead bytes in a
    shard go with the next --gc). Returns (checked, bad): each bad one as (its image or
    caption, why and where)."""
    one_file = list(index.entries(by_location=True, one_file=True))  # older caches only
    groups: list[str | list[IndexEntry]] = sorted(index.shard_names())
    groups += [one_file[k:k + 1024] for k in range(0, len(one_file), 1024)]
    loader = torch.utils.data.DataLoader(
        _EntryChecks(cache, groups), batch_size=None, num_workers=workers, collate_fn=_as_is,
        worker_init_fn=worker_started)  # workers die with us and never keep the lock
    bad: list[tuple[IndexEntry, str]] = []
    checked = 0
    try:
        with console.progress("verifying cache", total=index.count(), unit="entries") as bar:
            for count, problems in loader:
                bad += problems
                checked += count
                bar.advance(count)
    finally:
        cache.close()  # num_workers 0: the checks read the index in this process
    for entry, problem in bad:
        console.warn(f"bad cache entry for {entry.source} ({cache.location(entry)}): "
                     f"{problem}; re-encoding it")
    index.remove(entry.key for entry, _ in bad)  # rows first: a kill leaves only dead bytes
    for entry, _ in bad:
        if entry.shard is None:
            cache.path(entry.kind, entry.key).unlink(missing_ok=True)
    return checked, [(entry.source, f"{problem} ({cache.location(entry)})")
                     for entry, problem in bad]


def _pack_one_file_entries(cache: Cache, index: CacheIndex) -> int:
    """Move entries of the one-file layout into shards (any config's: the whole cache
    converts on the first run). An entry whose file fails its content checks, or carries no
    hash to check, stays a one-file entry for --verify to judge. Each shard's rows are
    committed before the files they replace are deleted: a kill leaves at worst files no row
    points to, which --gc removes. Returns the entries packed."""
    total = index.count(one_file=True)
    if not total:
        return 0
    packed = 0
    writers: dict[str, ShardWriter] = {}

    def retire(entries: list[IndexEntry]) -> None:
        for entry in entries:
            cache.path(entry.kind, entry.key).unlink(missing_ok=True)

    with console.progress("packing cache entries into shards", total=total,
                          unit="entries") as bar:
        for entry in index.one_file_entries():
            bar.advance()
            try:
                tensors, metadata = read_entry(cache.path(entry.kind, entry.key))
            except (FileNotFoundError, SafetensorError, OSError, ValueError):
                continue  # missing or unreadable: --verify or the plan deals with it
            if "sha256" not in metadata or content_problem(tensors, metadata):
                continue
            writer = writers.setdefault(entry.kind, ShardWriter(cache.root, index, entry.kind))
            moved = dataclasses.replace(entry, bytes=tensor_bytes(tensors),
                                        sha256=metadata["sha256"])
            retire(writer.add(moved, tensors))
            packed += 1
        for writer in writers.values():
            retire(writer.flush())
    _remove_empty_folders(cache)
    return packed


def _remove_empty_folders(cache: Cache) -> None:
    """Drop the one-file layout's folders once they hold nothing."""
    for folder in FOLDERS.values():
        top = cache.root / folder
        if not top.is_dir():
            continue
        for sub in top.iterdir():
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
        if not any(top.iterdir()):
            top.rmdir()


def _collect_garbage(cache: Cache, index: CacheIndex, plan: PrecomputePlan) -> tuple[int, int]:
    """Delete the entries the plan does not need, and one-file entries no row points to
    (their shards are compacted by `compact`). Returns the counts."""
    removed = plan.find_unused(index)
    for chunk in plan.unused():  # rows first: a kill leaves only stray files
        index.remove(key for key, _, _ in chunk)
        for key, kind, shard in chunk:
            if shard is None:
                cache.path(kind, key).unlink(missing_ok=True)
    one_file = {entry.key for entry in index.entries(one_file=True)}
    strays = 0
    for folder in FOLDERS.values():
        for path in sorted((cache.root / folder).glob("*/*.safetensors")):
            if path.stem not in one_file:
                path.unlink(missing_ok=True)
                strays += 1
    _remove_empty_folders(cache)
    return removed, strays


# --- output -----------------------------------------------------------------------------------

def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def print_summary(summary: PrecomputeSummary) -> None:
    """What was encoded, reused, removed and repaired, and what the cache costs on disk."""
    for note in summary.notes:
        console.info(f"note: {note}")
    if summary.verified:
        console.print(f"verified {summary.verified} entries: "
                      + (f"[red]{len(summary.bad)} bad[/] (deleted and re-encoded)"
                         if summary.bad else "all good"))
        for what, why in summary.bad[:10]:
            console.print(f"  bad: {escape(what)}: {escape(why)}")
    lat, txt = summary.latents, summary.texts
    flips = summary.variants - summary.images
    console.print(
        f"latents   {lat.total} ({summary.images} images"
        + (f" + {flips} flipped variants" if flips else "") + f"): {lat.added} added, "
        f"{lat.reused} reused")
    console.print(f"captions  {txt.total} (of which {summary.prompts} sample/negative prompts): "
                  f"{txt.added} added, {txt.reused} reused")
    if summary.packed:
        console.print(f"packed    {summary.packed} entries of the one-file layout into shards")
    if summary.removed or summary.stray_files or summary.shards_deleted \
            or summary.shards_rewritten:
        console.print(f"removed   {summary.removed} unused entries, {summary.stray_files} "
                      f"stray files; shards: {summary.shards_deleted} deleted, "
                      f"{summary.shards_rewritten} compacted")
    ratio = summary.latent_bytes / summary.source_bytes if summary.source_bytes else 0.0
    console.print(
        f"disk      {_size(summary.latent_bytes + summary.text_bytes)} for this config "
        f"({summary.dtype}): latents {_size(summary.latent_bytes)} = "
        f"{_size(summary.latent_bytes_per_image)} per image vs. "
        f"{_size(summary.source_bytes_per_image)} per source image ({ratio:.2f}x)"
        + (f", of which flipped variants {_size(summary.flip_bytes)}" if summary.flip_bytes else "")
        + f"; captions {_size(summary.text_bytes)}; whole cache folder "
        f"{_size(summary.cache_bytes)}")
    speed = (f"{lat.added} images in {summary.encode_s:.1f} s ({summary.images_per_s:.1f} "
             "images/s)" if lat.added else "nothing to encode")
    console.print(f"time      {summary.elapsed_s:.1f} s; {speed}")
    console.print(f"[green]cache ready[/] in {escape(str(summary.cache_dir))}")
