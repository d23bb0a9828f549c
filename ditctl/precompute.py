"""`precompute`: put every VAE posterior and text embedding that training needs into the cache.

    manifest (train + val); re-ingested first when missing or built from other [data] settings
    plan: a key per image variant (both flips of train images with random_flip), per unique
          caption, per sample prompt and the negative prompt (see ditctl.data.cache)
    --verify  re-read every entry (shard by shard, in [precompute] num_workers processes);
              delete bad ones (the steps below re-encode them)
    captions  the missing ones only, unique, through the text encoder
    images    the missing ones only, one bucket per batch: DataLoader workers decode (the one
              transform) while the VAE loads and encodes; a writer thread packs the entries
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
from typing import Any, Sequence

import torch
from rich.markup import escape
from safetensors import SafetensorError

from .config import Config
from .console import console
from .data.batches import crop_for, load_row_pixels, row_latent_mask, unreadable_image
from .data.datasets import of_row, per_dataset
from .data.cache import (FOLDERS, INDEX_NAME, STORAGE_DTYPES, Cache, CacheIndex, CachePlan,
                         IndexEntry, KeySpec, LatentJob, content_problem, entry_to_store,
                         latent_tensors, present_keys, prompts_to_cache, read_entry,
                         tensor_bytes)
from .data.cache_shards import ShardWriter, compact, remove_unindexed
from .data.images import ImageProblem
from .data.manifest import ManifestRow, manifest_fingerprint, read_manifest, stale_manifest_reason
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
    rows = _manifest_rows(ws, config, notes)
    prompts = prompts_to_cache(ws, config, family)
    cache_root = ws.cache_dir(config)
    _clean_leftovers(cache_root)

    with CacheIndex(cache_root / INDEX_NAME) as index:
        remove_unindexed(cache_root, index)
        text_encoder = None
        max_length = family.text_tokens()  # a family fact: the keys need no encoder
        cache = Cache(cache_root, KeySpec.for_config(config, family, max_length))
        plan = cache.plan(rows, random_flip=per_dataset(config, "random_flip"), captions=prompts)
        summary = PrecomputeSummary(
            cache_dir=cache_root, dtype=cache.spec.dtype, images=len(rows), variants=plan.variants,
            latents=EntryCounts(total=len(plan.latents)), texts=EntryCounts(total=len(plan.texts)),
            prompts=len(set(prompts) - {row.caption for row in rows}),
            fingerprint=plan.fingerprint, notes=notes)

        summary.packed = _pack_one_file_entries(cache, index)
        if verify:
            summary.verified, summary.bad = _verify(cache, index,
                                                    config.precompute.num_workers)
        present = present_keys(cache, index, plan)
        missing_texts = [(k, c) for k, c in plan.texts.items() if k not in present]
        missing_latents = [job for k, job in plan.latents.items() if k not in present]
        summary.texts.reused = len(plan.texts) - len(missing_texts)
        summary.latents.reused = len(plan.latents) - len(missing_latents)

        if missing_texts:
            if text_encoder is None:
                text_encoder = _load_text_encoder(family, config, device)
            summary.texts.added = _encode_texts(family, text_encoder, cache, index, missing_texts,
                                                config.precompute.batch_size)
        if text_encoder is not None:  # free it before the VAE loads
            text_encoder = None
            _free_memory(device)
        if missing_latents:
            summary.latents.added, summary.encode_s = _encode_latents(
                family, cache, index, missing_latents, config, device)
        if gc:
            summary.removed, summary.stray_files = _collect_garbage(cache, index, plan.keys())
            summary.shards_deleted, summary.shards_rewritten = compact(cache_root, index)

        _measure_disk(summary, index, plan, rows)
    summary.elapsed_s = time.perf_counter() - started
    ws.update_state("precompute", {**summary.counters(),
                                   "manifest_fingerprint": manifest_fingerprint(ws)})
    return summary


def _manifest_rows(ws: Workspace, config: Config, notes: list[str]) -> list[ManifestRow]:
    """Train + val rows of a manifest that matches config.data (ingesting first if needed)."""
    reason = stale_manifest_reason(ws, config)
    if reason:
        from .data.ingest import run_ingest

        console.info(f"ingesting first: {reason}")
        result = run_ingest(ws, config)
        notes.append(f"ingested first ({reason}): {result.counts.get('train', 0)} train + "
                     f"{result.counts.get('val', 0)} val images, {len(result.bad)} bad row(s) "
                     f"skipped (report: {result.report_path})")
    return read_manifest(ws, "train") + read_manifest(ws, "val")


def _clean_leftovers(cache_root: Path) -> None:
    """Remove `.tmp-*` files of writes that a kill interrupted."""
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
                  missing: list[tuple[str, str]], batch_size: int) -> int:
    chunk = _encode_chunk(cache.spec, batch_size)
    with _EntryWriter(cache, index, "text") as writer, \
            console.progress("encoding captions", total=len(missing), unit="captions") as bar:
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            conds = family.encode_prompts(text_encoder, [c for _, c in part]).cpu()
            items = []
            for i, (key, caption) in enumerate(part):
                one = conds.rows(i)
                items.append(entry_to_store("text", key, one.record(cache.spec.torch_dtype),
                                            one.sequence.shape[1:], cache.spec.dtype, False,
                                            caption))
            writer.submit(items)
            bar.advance(len(part))
    return len(missing)


# --- images -----------------------------------------------------------------------------------

class _ImageJobs(torch.utils.data.Dataset):
    """Decodes one image variant per item (in DataLoader workers) with the one transform.

    Problems come back as values rather than exceptions, so that the main process can raise
    them as DataError with the file's name (a worker's exception arrives as a traceback text).
    """

    def __init__(self, jobs: Sequence[LatentJob], center_crop: tuple[bool, ...], max_pixels: int,
                 spatial_factor: int):
        self.jobs, self.center_crop, self.max_pixels = list(jobs), center_crop, max_pixels
        self.spatial_factor = spatial_factor

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        row, flip = self.jobs[i].row, self.jobs[i].flip
        crop = crop_for(row, of_row(self.center_crop, row.dataset))  # its dataset's crop
        try:
            pixels = load_row_pixels(row, crop, flip, self.max_pixels)
            # the loss mask as training on the fly makes it (None: the row has none)
            mask = row_latent_mask(row, crop, flip, self.max_pixels, self.spatial_factor) \
                if row.mask is not None else None
            return i, pixels, mask, None
        except DataError as exc:
            return i, None, None, (exc.message, exc.hint)
        except (ImageProblem, OSError) as exc:
            problem = unreadable_image(row.image_name, exc)
            return i, None, None, (problem.message, problem.hint)


def _stack_batch(items: list
                 ) -> tuple[list[int], torch.Tensor | None, list, tuple[str, str] | None]:
    """(job indices, pixels [B, 3, H, W], masks (each [1, h, w] or None), first problem). Runs
    in the worker, so that one tensor per batch crosses to the main process rather than one per
    image."""
    indices = [i for i, _, _, _ in items]
    problems = [problem for _, _, _, problem in items if problem is not None]
    if problems:
        return indices, None, [], problems[0]
    return indices, torch.stack([pixels for _, pixels, _, _ in items]), \
        [mask for _, _, mask, _ in items], None


def bucket_batches(jobs: Sequence[LatentJob], batch_size: int) -> list[list[int]]:
    """Job indices cut into batches of at most `batch_size`, one bucket per batch."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, job in enumerate(jobs):
        by_bucket.setdefault(job.row.bucket, []).append(i)
    return [members[k:k + batch_size] for bucket in sorted(by_bucket)
            for members in [by_bucket[bucket]] for k in range(0, len(members), batch_size)]


def _encode_latents(family: ModelFamily, cache: Cache, index: CacheIndex,
                    jobs: list[LatentJob], config: Config,
                    device: torch.device) -> tuple[int, float]:
    """Encode and store `jobs`; returns (images encoded, seconds of the encoding loop, from
    the VAE being ready to the last commit)."""
    settings = config.precompute
    workers = settings.num_workers
    loader = torch.utils.data.DataLoader(
        _ImageJobs(jobs, per_dataset(config, "center_crop"), config.data.max_image_pixels,
                   family.latent.spatial_factor),
        batch_sampler=bucket_batches(jobs, settings.batch_size), num_workers=workers,
        collate_fn=_stack_batch, persistent_workers=workers > 0,
        worker_init_fn=worker_started,  # workers die with us and never keep the lock
        prefetch_factor=4 if workers else None, pin_memory=device.type == "cuda")
    batches = iter(loader)  # workers start, and decode ahead, while the VAE loads
    try:
        with console.err.status("loading the VAE ..."):
            vae = family.load_vae(cache.spec.torch_dtype, device)
        chunk = _encode_chunk(cache.spec, settings.batch_size)
        done = 0
        started = time.perf_counter()
        with _EntryWriter(cache, index, "latent") as writer, \
                console.progress("encoding images", total=len(jobs), unit="images") as bar:
            for indices, pixels, masks, problem in batches:
                if problem is not None:
                    raise DataError(problem[0], hint=problem[1])
                written = _encode_batch(family, vae, cache, [jobs[i] for i in indices], pixels,
                                        masks, chunk, device, writer)
                if done == 0:  # the first batch tells how large an entry is
                    per_entry = written / len(indices)
                    check_free_space(cache.root, int(per_entry * (len(jobs) - len(indices))),
                                     "the latent cache")
                done += len(indices)
                bar.advance(len(indices))
        return done, time.perf_counter() - started  # the writer has drained: all committed
    finally:
        del batches, loader  # stops the decoding workers now, also when an error unwinds


def _encode_batch(family: ModelFamily, vae: Any, cache: Cache, jobs: list[LatentJob],
                  pixels: torch.Tensor, masks: list, chunk: int, device: torch.device,
                  writer: _EntryWriter) -> int:
    """Encode one bucket batch (pixels [B, 3, H, W]) and hand its entries, with each image's
    loss mask (or None), to the writer; returns the bytes queued."""
    means, stds = [], []
    for start in range(0, len(jobs), chunk):
        dist = family.encode_images(vae, pixels[start:start + chunk].to(device))
        means.append(dist.mean.cpu())  # [b, C, h, w]
        stds.append(dist.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    items = [entry_to_store("latent", job.key,
                            latent_tensors(job_mean, job_std, cache.spec.torch_dtype, mask),
                            job_mean.shape, cache.spec.dtype, job.flip, job.row.image_name)
             for job, job_mean, job_std, mask in zip(jobs, mean, std, masks)]
    writer.submit(items)
    return sum(entry.bytes for entry, _ in items)


# --- verify, gc, disk -------------------------------------------------------------------------

class _EntryChecks(torch.utils.data.Dataset):
    """Groups of entries (a shard's, or a slice of the one-file ones) checked in DataLoader
    workers: [(key, why it is bad or None)] per group."""

    def __init__(self, cache: Cache, groups: list[list[IndexEntry]]):
        self.cache, self.groups = cache, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[tuple[str, str | None]]:
        return [(entry.key, problem) for entry, problem in self.cache.check_all(self.groups[i])]


def _as_is(item):
    return item


def _verify(cache: Cache, index: CacheIndex, workers: int) -> tuple[int, list[tuple[str, str]]]:
    """Re-check every entry, shard by shard, in `workers` processes ([precompute]
    num_workers); delete bad ones (the row; a one-file entry's file too; the dead bytes in a
    shard go with the next --gc). Returns (checked, bad): each bad one as (its image or
    caption, why and where)."""
    entries = list(index.entries(by_location=True))
    groups: list[list[IndexEntry]] = []
    for shard, group in itertools.groupby(entries, key=lambda e: e.shard):
        members = list(group)
        step = len(members) if shard is not None else 1024  # one-file entries: in slices
        groups += [members[k:k + step] for k in range(0, len(members), step)]
    by_key = {entry.key: entry for entry in entries}
    loader = torch.utils.data.DataLoader(
        _EntryChecks(cache, groups), batch_size=None, num_workers=workers, collate_fn=_as_is,
        worker_init_fn=worker_started)  # workers die with us and never keep the lock
    bad: list[tuple[IndexEntry, str]] = []
    with console.progress("verifying cache", total=len(entries), unit="entries") as bar:
        for results in loader:
            bad += [(by_key[key], problem) for key, problem in results if problem]
            bar.advance(len(results))
    for entry, problem in bad:
        console.warn(f"bad cache entry for {entry.source} ({cache.location(entry)}): "
                     f"{problem}; re-encoding it")
    index.remove(entry.key for entry, _ in bad)  # rows first: a kill leaves only dead bytes
    for entry, _ in bad:
        if entry.shard is None:
            cache.path(entry.kind, entry.key).unlink(missing_ok=True)
    return len(entries), [(entry.source, f"{problem} ({cache.location(entry)})")
                          for entry, problem in bad]


def _pack_one_file_entries(cache: Cache, index: CacheIndex) -> int:
    """Move entries of the one-file layout into shards (any config's: the whole cache
    converts on the first run). An entry whose file fails its content checks, or carries no
    hash to check, stays a one-file entry for --verify to judge. Each shard's rows are
    committed before the files they replace are deleted: a kill leaves at worst files no row
    points to, which --gc removes. Returns the entries packed."""
    legacy = list(index.entries(one_file=True))
    if not legacy:
        return 0
    packed = 0
    writers: dict[str, ShardWriter] = {}

    def retire(entries: list[IndexEntry]) -> None:
        for entry in entries:
            cache.path(entry.kind, entry.key).unlink(missing_ok=True)

    with console.progress("packing cache entries into shards", total=len(legacy),
                          unit="entries") as bar:
        for entry in legacy:
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


def _collect_garbage(cache: Cache, index: CacheIndex, keep: set[str]) -> tuple[int, int]:
    """Delete entries outside `keep`, and one-file entries no row points to (their shards
    are compacted by `compact`). Returns the counts."""
    unused = [entry for entry in index.entries() if entry.key not in keep]
    index.remove(entry.key for entry in unused)  # rows first: a kill leaves only stray files
    for entry in unused:
        if entry.shard is None:
            cache.path(entry.kind, entry.key).unlink(missing_ok=True)
    one_file = {key for key, _, shard in index.locations() if shard is None}
    strays = 0
    for folder in FOLDERS.values():
        for path in sorted((cache.root / folder).glob("*/*.safetensors")):
            if path.stem not in one_file:
                path.unlink(missing_ok=True)
                strays += 1
    _remove_empty_folders(cache)
    return len(unused), strays


def _measure_disk(summary: PrecomputeSummary, index: CacheIndex, plan: CachePlan,
                  rows: Sequence[ManifestRow]) -> None:
    sizes = index.sizes()
    summary.latent_bytes = sum(sizes.get(k, 0) for k in plan.latents)
    summary.flip_bytes = sum(sizes.get(k, 0) for k in plan.flipped)
    summary.text_bytes = sum(sizes.get(k, 0) for k in plan.texts)
    sources = {row.sha256: row.size_bytes for row in rows}
    summary.unique_images = len(sources)
    summary.source_bytes = sum(sources.values())
    summary.cache_bytes = folder_size(summary.cache_dir)


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
