"""`ingest`: read the data sources, validate every image, plan buckets, write the manifest.

    sources (CSV, JSONL, Parquet, image folder, WebDataset shards, datasets folder) -> rows
        (a tar shard or Arrow file is read only when its size or mtime changed since the last
        ingest: `containers.ContainerCache`)
    while the sources are read: stat every image named for the first time (or its container);
        reuse what the previous manifest learned where size and mtime match; probe the rest
        (read once, sha256, full decode) in worker processes, images inside a container by
        one positioned read each, in container order (`ImageValidator`)
    classify rows (by SQL): good / bad (missing, corrupt, not an image, empty, too many
                   pixels, too small, empty caption, ...); duplicates (same hash) are reported
    masks ([data] use_masks): each good row's mask file (the CSV's mask column, else
          NAME.mask.png beside the image) is probed like an image (read, hashed, decoded, the
          same size as its image, not black everywhere), else the image's alpha channel;
          a bad mask makes its row bad
    plan buckets per split; write data/ingest-report.json; replace the manifest atomically
        (filled by SQL from the staging tables, see `ingest_stage`)

Bad rows never stop the scan: all of them are collected and reported together. By default
they are skipped; with `strict=True` any bad row raises `StrictIngestError` and the manifest
stays as it was.

`run_ingest` is a library call (`ditctl train` uses it for one-shot runs); the caller holds the
workspace lock. `print_summary` renders the result for the terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import os
import sqlite3
import stat as stat_module
import sys
import time
import types
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.markup import escape
from rich.table import Table

from .. import __version__
from ..config import Config, DataConfig
from ..console import console
from ..errors import DataError
from ..fsutil import atomic_write_json, clean_temp
from ..models.registry import size_multiple
from ..procutil import worker_started
from ..workspace import Workspace
from . import images, ingest_inputs
from .buckets import SizePlan, plan_sizes
from .datasets import Dataset, dataset_caption, resolve_datasets
from .images import ImageFacts, ProbeResult
from .manifest import (ManifestRow, MaskRef, PreviousManifest, SampleScan, attached_manifest,
                       count_changes_by_sql, duplicate_groups, read_meta, read_previous,
                       select_rows, write_manifest_by_sql)
from .containers import ContainerCache
from .images import ImageRef
from .ingest_stage import Stage, staged
from .sources import SourceRow, iter_source, sidecar_mask

REPORT_NAME = "ingest-report.json"
CONTAINER_CACHE = "containers.sqlite"  # in .ditctl/: what reading each shard learned
# Below this many files to decode, starting worker processes costs more than it saves.
POOL_MIN_FILES = 48
MAX_CHUNK = 16  # small enough that the last chunks do not leave a core idle for long
# images inside shards are small and read from one open file: larger chunks, fewer tasks
MAX_MEMBER_CHUNK = 256


@dataclass(frozen=True)
class BadRow:
    """A row that is not used, and why."""

    split: str
    origin: str        # the data path the row comes from (file, folder, shard list)
    source: str        # "line 12", "row 12", "shard-000.tar key 0001", a path in the folder
    listed_path: str   # the image path as the source writes it
    path: str          # absolute path (of the container, for an image inside one)
    code: str          # missing, corrupt, not_image, empty_file, too_small, empty_caption, ...
    reason: str
    member: str = ""   # the image's name inside the container
    seq: int = 0       # the row's position among all rows read (bad rows are listed in order)

    @property
    def where(self) -> str:
        """`train.csv:12` for a CSV/JSONL line, `captions.parquet row 12` for a Parquet row,
        `shard-000.tar key 0001` for a WebDataset sample, `photos/` for a folder row."""
        if self.source.startswith("line "):
            return f"{Path(self.origin).name}:{self.source[5:]}"
        if self.source.startswith("row "):
            return f"{Path(self.origin).name} {self.source}"
        if " key " in self.source or " row " in self.source:
            return self.source  # names the shard / Arrow file and the key already
        return f"{Path(self.origin).name}/"


@dataclass(frozen=True)
class Changes:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0


@dataclass
class IngestSummary:
    counts: dict[str, int]                  # good samples per split
    bad: list[BadRow]
    empty_captions_kept: list[ManifestRow]  # kept as unconditional samples
    duplicates: list[list[ManifestRow]]     # groups of samples with the same content hash
    plans: dict[str, SizePlan]
    changes: Changes
    files_read: int
    files_reused: int
    report_path: Path
    containers_read: int = 0    # tar shards / Arrow files read
    containers_reused: int = 0  # unchanged since the last ingest: not read
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> counts, role
    fingerprint: str | None = None
    elapsed_s: float = 0.0
    # seconds per phase (listing, validating, planning, writing the manifest): where a slow
    # ingest spends its time, in the report
    phases_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # a re-ingest that found nothing changed: the counters the last ingest recorded
    kept_counters: dict[str, Any] | None = None

    @property
    def duplicate_images(self) -> int:
        return sum(len(group) for group in self.duplicates)

    def counters(self) -> dict[str, Any]:
        """The counts as plain JSON (state file, report, --json)."""
        if self.kept_counters is not None:
            return {**self.kept_counters, "changed": 0, "added": 0, "removed": 0,
                    "unchanged": self.changes.unchanged, "files_read": 0, "files_reused": 0,
                    "containers_read": 0, "containers_reused": 0, "fingerprint": self.fingerprint}
        return {"train_count": self.counts.get("train", 0), "val_count": self.counts.get("val", 0),
                "bad_count": len(self.bad), "duplicate_groups": len(self.duplicates),
                "empty_captions_kept": len(self.empty_captions_kept),
                "buckets": {s: len(p.buckets) for s, p in self.plans.items()},
                "batches_per_epoch": {s: p.batches_per_epoch for s, p in self.plans.items()},
                **dataclasses.asdict(self.changes), "files_read": self.files_read,
                "files_reused": self.files_reused, "containers_read": self.containers_read,
                "containers_reused": self.containers_reused, "fingerprint": self.fingerprint,
                "datasets": self.datasets}


class StrictIngestError(DataError):
    """Bad rows under --strict. Carries the summary so the caller can show every bad row."""

    def __init__(self, summary: IngestSummary):
        super().__init__(
            f"{len(summary.bad)} bad row(s) with --strict; the manifest is unchanged "
            f"(details in {summary.report_path})",
            hint="fix or remove the rows listed above, or run without --strict to skip them")
        self.summary = summary


# --- the run ----------------------------------------------------------------------------------

def run_ingest(ws: Workspace, config: Config, *, strict: bool = False,
               workers: int | None = None) -> IngestSummary:
    """Validate the data of `config.data` and replace the workspace manifest (see module doc).

    `workers`: decoding processes (default: every available core; 1: in this process).
    Raises StrictIngestError (strict and any bad row) or DataError (no usable training image)
    after writing the report, with the manifest untouched.
    """
    started = time.perf_counter()
    data = config.data
    batch_sizes = {"train": config.train.train_batch_size, "val": config.train.eval_batch_size}
    multiple = size_multiple(config.model.family)
    datasets = resolve_datasets(config)
    kept = _kept_summary(ws, data, datasets, batch_sizes, multiple, strict)
    if kept is not None:
        _finish(kept, started)
        return kept
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    clean_temp(ws.state_dir)  # a staging file a kill left in the instant before its unlink
    with staged(ws.state_dir) as stage:
        summary = _ingest_staged(ws, config, stage, datasets, batch_sizes, multiple, strict,
                                 workers, started)
    return summary


def _ingest_staged(ws: Workspace, config: Config, stage: Stage, datasets: tuple[Dataset, ...],
                   batch_sizes: dict[str, int], multiple: int, strict: bool,
                   workers: int | None, started: float) -> IngestSummary:
    """`run_ingest` past the no-change check: every per-record step goes through `stage`."""
    data = config.data
    phases: dict[str, float] = {}
    timed = functools.partial(_timed, phases)
    previous = read_previous(ws.manifest_db)
    notes = []
    if previous.problem:
        notes.append(f"the previous manifest is {previous.problem}; every image was re-read")
    bad = Rejects(stage.origins)
    cache = ContainerCache(ws.state_dir / CONTAINER_CACHE)
    try:
        # "list": reading the sources, while the images they name decode in worker processes;
        # "validate": the decoding left when the sources are read, classifying, masks
        with ImageValidator(stage, previous, data.max_image_pixels, workers) as validator:
            with timed("list"):
                try:
                    _read_rows(ws, data, datasets, cache, stage, validator.rows_added)
                finally:
                    cache.close()
            with timed("validate"):
                files_read, files_reused = validator.finish()
        with timed("validate"):
            _classify(stage, data, datasets, bad)
            mask_facts, masks_read = {}, 0
            if data.use_masks:
                mask_facts, masks_read = _examine_masks(stage, bad, previous, data, workers)
        with timed("plan"):
            plans = _plan(stage, bad, data, batch_sizes, multiple, datasets)
        bad.rows.sort(key=lambda b: b.seq)  # in source order
    finally:
        previous.close()  # the change count attaches the file itself

    def summarise(tally: Tally) -> IngestSummary:
        if data.use_masks:
            kinds = tally.mask_kinds
            notes.append(f"loss masks: {kinds['file']} from mask files, {kinds['alpha']} from "
                         f"alpha channels; {kinds['none']} image(s) without one train "
                         "everywhere")
        return IngestSummary(
            counts=dict(tally.counts), bad=bad.rows, empty_captions_kept=tally.empty_captions,
            duplicates=tally.duplicates, plans=plans, changes=tally.changes,
            files_read=files_read + masks_read, files_reused=files_reused,
            report_path=ws.data_dir / REPORT_NAME, containers_read=cache.read,
            containers_reused=cache.reused, notes=notes, phases_s=phases,
            datasets=_dataset_counts(datasets, tally.datasets, bad.train_datasets))

    # Keep what validation learned about every decodable image still listed (also those of
    # rows that were refused as too small or uncaptioned), so the next run skips them too:
    # the listed images' facts, then the mask files'
    mask_files = [facts for _, facts in sorted(mask_facts.items())]
    stage.end_transaction()  # the manifest tables are attached to the staging database
    if (strict and bad.rows) or not stage.has_split("train"):
        with attached_manifest(stage.db) as name:  # a temporary file: counted, never kept
            scan = stage.fill_manifest(name, mask_files)
            summary = summarise(Tally.count(stage.db, name, scan, previous))
        if strict and bad.rows:
            refusal: DataError = StrictIngestError(summary)
        else:
            where = ", ".join(d.path for d in datasets)
            refusal = DataError(f"no usable training images in {where} ({len(bad.rows)} bad "
                                f"row(s); details in {summary.report_path})",
                                hint="fix the rows listed above, or point [data] "
                                     "train_data_path at other data")
        _finish(summary, started)
        _write_report(summary, data, strict)
        raise refusal

    done: list[IngestSummary] = []

    def meta(name: str, scan: SampleScan) -> dict[str, Any]:
        """The manifest's meta table, once its rows are written (and counted in it)."""
        tally = Tally.count(stage.db, name, scan, previous)
        summary = summarise(tally)
        done.append(summary)
        inputs = ingest_inputs.record(
            _sources(ws, data, datasets), stage.containers(),
            loose_files=stage.has_loose_files() or tally.mask_kinds["file"] > 0)
        return {"data_config": dataclasses.asdict(data), "batch_sizes": batch_sizes,
                "size_multiple": multiple, "ditctl_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "counts": summary.counts,
                "counters": summary.counters(), "inputs": inputs}

    with timed("manifest"):
        fingerprint = write_manifest_by_sql(
            ws.manifest_db, stage.db, lambda name: stage.fill_manifest(name, mask_files), meta)
    summary = done[0]
    summary.fingerprint = fingerprint
    _finish(summary, started)
    _write_report(summary, data, strict)
    # the data actually ingested (a --train-data-path flag may differ from project.toml)
    ws.update_state("ingest", {**summary.counters(), "report": str(summary.report_path),
                               "train_data_path": stage.first_origin(),
                               "val_data_path": (str(ws.resolve(data.val_data_path))
                                                 if data.val_data_path else None)})
    return summary


def _sources(ws: Workspace, data: DataConfig, datasets: tuple[Dataset, ...]) -> dict[str, Path]:
    """Every data path read, by a name: each training dataset's, and the validation data's."""
    found = {f"train:{d.name}": ws.resolve(d.path) for d in datasets}
    if data.val_data_path:
        found["val"] = ws.resolve(data.val_data_path)
    return found


def _kept_summary(ws: Workspace, data: DataConfig, datasets: tuple[Dataset, ...],
                  batch_sizes: dict[str, int], multiple: int,
                  strict: bool) -> IngestSummary | None:
    """The last ingest's summary when nothing it read has changed (see `ingest_inputs`): the
    manifest and the report stay as they are. None when ingest must run."""
    meta = read_meta(ws.manifest_db)
    report_path = ws.data_dir / REPORT_NAME
    if (meta is None or not datasets or not report_path.is_file()
            or meta.get("ditctl_version") != __version__
            or meta.get("data_config") != json.loads(json.dumps(dataclasses.asdict(data)))
            or meta.get("batch_sizes") != batch_sizes or meta.get("size_multiple") != multiple
            or (strict and (meta.get("counters") or {}).get("bad_count", 1))
            or not ingest_inputs.unchanged(meta.get("inputs"), _sources(ws, data, datasets))):
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        bad = [BadRow(**row) for row in report["bad"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    counters = meta["counters"]
    summary = IngestSummary(
        counts=meta["counts"], bad=bad, empty_captions_kept=[], duplicates=[], plans={},
        changes=Changes(unchanged=sum(meta["counts"].values())), files_read=0,
        files_reused=0, report_path=report_path, fingerprint=meta.get("fingerprint"),
        notes=[f"nothing changed since the last ingest ({len(meta['inputs']['stats'])} "
               "source file(s) and shard(s) as they were): the manifest and report were kept"])
    summary.kept_counters = counters
    return summary


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to `phases[name]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - start, 3)


def _finish(summary: IngestSummary, started: float) -> None:
    summary.elapsed_s = time.perf_counter() - started


def _read_rows(ws: Workspace, data: DataConfig, datasets: tuple[Dataset, ...],
               cache: ContainerCache, stage: Stage, on_batch: Callable[[], None]) -> None:
    """Stage every dataset's rows, then the validation rows, with the source (CSV or folder)
    of each and its dataset (validation rows: 0, the [data] settings).

    Each dataset reads its own path through `iter_source` with its own columns and base folder;
    rows go to the staging database as they are read.
    """
    if not datasets:
        raise DataError("no training data: [data] train_data_path is not set",
                        hint="set it in project.toml or pass --train-data-path CSV_OR_FOLDER "
                             "(or add [[data.datasets]] tables)")
    val_base = ws.resolve(data.base_image_dir) if data.base_image_dir else None
    sources = [("train", d.index, d.path,
                ws.resolve(d.base_image_dir) if d.base_image_dir else None,
                d.image_column, d.caption_column) for d in datasets]
    if data.val_data_path:
        sources.append(("val", 0, data.val_data_path, val_base, data.image_column,
                        data.caption_column))
    for split, index, where, base, image_column, caption_column in sources:
        found = iter_source(ws.resolve(where), split=split, base_image_dir=base,
                            image_column=image_column, caption_column=caption_column,
                            cache=cache,
                            mask_column=data.mask_column if data.use_masks else None)
        if not stage.add_rows(found, index, str(ws.resolve(where)), on_batch):
            raise DataError(f"{ws.resolve(where)}: no images listed ({split} data)",
                            hint="add rows to the CSV, or images (.jpg, .png, .webp, ...) "
                                 "to the folder")


# --- validating the files ---------------------------------------------------------------------

class ImageValidator:
    """Validates the listed images while the sources are still being read: `rows_added` (after
    each batch of staged rows) hands the images named for the first time to worker processes,
    `finish` waits for the rest. Each image's facts (or why it cannot be used) are staged.

    An image whose size and mtime match the previous manifest is not read again: its recorded
    hash and size are reused. For an image inside a container, that is the container's mtime
    and the member's own offset and size.

    Reading the sources and decoding overlap (on a first ingest the sources are read on one
    core while the images they named so far decode on the others); the number of chunks in
    flight is bounded, so when decoding falls behind, reading waits and nothing piles up.
    Fewer than POOL_MIN_FILES images, or `workers=1`, are decoded in this process.
    """

    def __init__(self, stage: Stage, previous: PreviousManifest, max_pixels: int,
                 workers: int | None):
        self.stage, self.previous, self.max_pixels = stage, previous, max_pixels
        self.workers = workers or available_cpus()
        self.read = self.reused = self.named = 0
        self._stats: dict[str, os.stat_result | tuple[str, str]] = {}  # per container
        self._waiting: list[tuple[str, str, int, int]] = []  # to decode, not yet handed out
        self._pool: ProcessPoolExecutor | None = None
        self._pending: set = set()
        self._bar: Any = None

    def __enter__(self) -> "ImageValidator":
        self._bar = console.progress("Validating images", total=None, unit="img").__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            if exc[0] is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            else:
                self._pool.shutdown()
        self._bar.__exit__(*exc)

    def rows_added(self) -> None:
        """Sort the images the newly staged rows name: reused, bad, or to decode."""
        known, problems = [], []
        named = self.stage.new_images()
        self.named += len(named)
        for path, member, offset, size in named:
            stat = self._stats.get(path) if member else None
            if stat is None:
                stat = _stat(path, self.max_pixels, bool(member))
                if member:
                    self._stats[path] = stat
            if not isinstance(stat, os.stat_result):  # (code, message)
                problems.append((path, member, *stat))
                continue
            facts = self.previous.facts(path, member)
            if facts and facts.mtime_ns == stat.st_mtime_ns and (
                    facts.offset == offset and facts.size_bytes == size if member
                    else facts.size_bytes == stat.st_size):
                known.append(facts)
            else:
                self._waiting.append((path, member, offset, size))
        self.reused += len(known)
        self.stage.add_facts(known)
        self.stage.add_problems(problems)
        self._bar.advance(len(known) + len(problems))
        self._hand_out(final=False)

    def finish(self) -> tuple[int, int]:
        """Decode what is left; returns (images decoded, images reused)."""
        self._bar.set_total(self.named)
        self._hand_out(final=True)
        while self._pending:
            self._collect(block=True)
        return self.read, self.reused

    def _hand_out(self, final: bool) -> None:
        if self._pool is None:
            if self.workers <= 1 or (final and len(self._waiting) < POOL_MIN_FILES):
                # no pool, or few images in all: decode them here
                self._record(images.probe_rows(self._waiting, self.max_pixels))
                self.read += len(self._waiting)
                self._waiting = []
                return
            if len(self._waiting) < POOL_MIN_FILES:
                return  # not yet worth starting processes
            self._pool = _decode_pool(self.workers)
        # container members in file order (each chunk reads forward through one shard)
        self._waiting.sort(key=lambda ref: (ref[0], ref[2]))
        chunks = _chunks(self._waiting)
        if not final and chunks and len(chunks[-1]) < _chunk_limit(chunks[-1][0]):
            self._waiting = chunks.pop()  # a short last chunk waits for more of its kind
        else:
            self._waiting = []
        for chunk in chunks:
            while len(self._pending) >= self.workers * 4:  # decoding is behind: wait for it
                self._collect(block=True)
            with _main_module_hidden():  # the workers start during the first submits
                self._pending.add(self._pool.submit(images.probe_rows, chunk, self.max_pixels))
            self.read += len(chunk)
        self._collect(block=False)

    def _collect(self, block: bool) -> None:
        if not self._pending:
            return
        done, self._pending = wait(self._pending, timeout=None if block else 0,
                                   return_when=FIRST_COMPLETED)
        for future in done:
            self._record(future.result())

    def _record(self, result: tuple[list[tuple], list[tuple]]) -> None:
        facts, problems = result
        self.stage.add_fact_rows(facts)
        self.stage.add_problems(problems)
        self._bar.advance(len(facts) + len(problems))


def _chunks(refs: list[tuple[str, str, int, int]]) -> list[list[tuple[str, str, int, int]]]:
    """Sorted (path, member, offset, size) refs cut into pool tasks: up to MAX_MEMBER_CHUNK
    members of one container (small images read from one open file), or MAX_CHUNK image files
    (small enough that the last chunks do not leave a core idle for long). The refs of one
    chunk share one path object, so it crosses to the worker and back once."""
    chunks: list[list[tuple[str, str, int, int]]] = []
    # consecutive members of one container form a group, and so do consecutive image files
    for container, group in itertools.groupby(refs, key=lambda r: r[0] if r[1] else None):
        chunk: list[tuple[str, str, int, int]] = []
        for ref in group:
            path, member, offset, size = ref
            if len(chunk) >= _chunk_limit(ref):
                chunks.append(chunk)
                chunk = []
            chunk.append((container if container is not None else path, member, offset, size))
        if chunk:
            chunks.append(chunk)
    return chunks


def _chunk_limit(ref: tuple[str, str, int, int]) -> int:
    """How many images of `ref`'s kind (a container member, an image file) make a task."""
    return MAX_MEMBER_CHUNK if ref[1] else MAX_CHUNK


def _decode_pool(workers: int) -> ProcessPoolExecutor:
    """The worker processes that decode images. Spawned, not forked: ingest may run inside
    `train`, where torch threads make fork unsafe; `worker_started`: they die with ingest (a
    kill must not leave them reading). Submit the first tasks under `_main_module_hidden`."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=worker_started)


def _stat(path: str, max_pixels: int, container: bool) -> os.stat_result | tuple[str, str]:
    """The stat of an image file or container, or (code, message) why it cannot be read."""
    what = "the shard / Arrow file holding the image" if container else "file"
    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ("missing", f"{what} not found")
    except OSError as exc:
        return ("unreadable", f"cannot read the {what} ({exc.strerror or exc})")
    if container:
        if not stat_module.S_ISREG(stat.st_mode):
            return ("not_regular_file", f"{what} is not a regular file")
        return stat
    refused = images.file_problem(stat, max_pixels)  # a FIFO, /dev/zero, a huge file
    if refused is not None:
        return (refused.code, refused.message)
    return stat


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start spawned workers without re-running the program's main module in each of them.

    A spawned child re-imports the parent's `__main__` from its file. For the `ditctl` console
    script that means every command module, torch and diffusers included: seconds per worker
    (measured: 300 images took 5.3 s instead of 0.6 s). The workers only need
    `ditctl.data.images`, so while they start, `__main__` is a bare module without a file,
    which multiprocessing skips (as it does for an interactive session).
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _probe_masks(paths: list[str], max_pixels: int,
                 workers: int | None) -> Iterator[ProbeResult]:
    """Probe mask files (`images.probe_mask`) in parallel (chunks over worker processes),
    in-process for few files. A generator with a bounded number of chunks in flight."""
    if not paths:
        return
    workers = workers or available_cpus()
    source = iter(paths)
    with console.progress("Validating masks", total=len(paths), unit="img") as bar:
        if workers <= 1 or len(paths) < POOL_MIN_FILES:
            for path in source:
                yield from images.probe_masks([path], max_pixels)
                bar.advance()
            return
        # Chunks amortise the per-task overhead; several per worker keep the load balanced.
        size = max(1, min(MAX_CHUNK, math.ceil(len(paths) / (workers * 4))))
        pool = _decode_pool(workers)

        def submit(count: int) -> set:
            chunks = (list(itertools.islice(source, size)) for _ in range(count))
            return {pool.submit(images.probe_masks, chunk, max_pixels)
                    for chunk in itertools.takewhile(bool, chunks)}

        try:
            with _main_module_hidden():  # the workers start during these submits
                pending = submit(workers * 4)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                pending |= submit(len(done))
                for future in done:
                    chunk = future.result()
                    yield from chunk
                    bar.advance(len(chunk))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


# --- classifying rows -------------------------------------------------------------------------

class Rejects:
    """The bad rows found so far, and how many of them each training dataset has."""

    def __init__(self, origins: list[str]):
        self.origins = origins
        self.rows: list[BadRow] = []
        self.train_datasets: Counter = Counter()

    def add(self, seq: int, dataset: int, origin: int, row: SourceRow, code: str,
            reason: str) -> None:
        self.rows.append(BadRow(
            split=row.split, origin=self.origins[origin], source=row.source,
            listed_path=row.listed_path or (
                f"{os.path.basename(row.path)}#{row.member}" if row.member else ""),
            path=row.path, code=code, reason=reason, member=row.member, seq=seq))
        if row.split == "train":
            self.train_datasets[dataset] += 1


_FACTS = slice(15, 24)  # the image's facts in a `Stage.rows_with_facts` tuple


def _dataset_counts(datasets: tuple[Dataset, ...], good: Counter,
                    bad: Counter) -> dict[str, dict[str, Any]]:
    """Per dataset: its role, good images and bad rows (by dataset index), repeats and
    weights (ingest's report and summary)."""
    return {d.name: {"path": d.path, "role": d.role, "images": good.get(d.index, 0),
                     "bad": bad.get(d.index, 0), "repeats": d.repeats,
                     "weight": d.weight, "loss_weight": d.loss_weight}
            for d in datasets}


def _classify(stage: Stage, data: DataConfig, datasets: tuple[Dataset, ...],
              bad: Rejects) -> None:
    """Stage the good rows (with their caption after the dataset's caption tools) by SQL;
    the others go to `bad`, each with why."""
    stage.add_good_rows(_caption_sql(datasets), data.max_image_pixels, data.keep_empty_captions)
    for values in stage.rows_with_facts(not_good=True):
        seq, dataset, origin = values[:3]
        row = Stage.source_row(values[3:15])
        width, height = values[19], values[20]
        problem = row.problem or (values[24:26] if values[24] is not None else None)
        if problem is None:
            if width is None:  # cannot happen: every listed image has facts or a problem
                raise AssertionError(f"no facts for {row.ref.name}")
            if width * height > data.max_image_pixels:
                # recorded by an earlier ingest, before max_image_pixels was lowered
                refused = images.pixel_limit_problem(width, height, data.max_image_pixels)
                problem = (refused.code, refused.message)
            elif not dataset_caption(row.caption, datasets[dataset]):
                problem = ("empty_caption", "the caption is empty (set keep_empty_captions "
                                            "to train on it as an unconditional sample)")
            else:  # cannot happen: the SQL above keeps exactly the rows that get here
                raise AssertionError(f"row {seq} is neither good nor bad")
        bad.add(seq, dataset, origin, row, *problem)


def _caption_sql(datasets: tuple[Dataset, ...]) -> tuple[str, list[str]]:
    """`dataset_caption` of a staged row `r` as an SQL expression and its parameters: the
    trigger word in front, then the template (validation rows have dataset 0)."""
    cases, params = [], []
    for d in datasets:
        expression, bound = "r.caption", []
        if d.trigger_word:
            expression = "CASE WHEN r.caption != '' THEN ? || ', ' || r.caption ELSE ? END"
            bound = [d.trigger_word, d.trigger_word]
        if d.caption_template:
            expression, bound = f"replace(?, '{{caption}}', {expression})", [d.caption_template,
                                                                            *bound]
        cases.append(f"WHEN {d.index} THEN {expression}")
        params += bound
    return f"CASE r.dataset {' '.join(cases)} END", params


# formats that can carry an alpha channel (a JPEG never does: its header is not read)
_ALPHA_FORMATS = ("PNG", "WEBP", "TIFF", "GIF", "BMP")


def _examine_masks(stage: Stage, bad: Rejects, previous: PreviousManifest,
                   data: DataConfig, workers: int | None,
                   ) -> tuple[dict[str, ImageFacts], int]:
    """Stage each good row's loss mask (see the module doc); returns (the facts of the mask
    files for the next ingest, mask files decoded). Rows with a bad mask go to `bad`, naming
    the mask and why, and leave the good rows. An image inside a tar shard or Arrow file has
    no sidecar mask file; its alpha channel is its mask."""
    chosen: dict[int, str] = {}  # good row -> its mask file path
    for values in stage.rows_with_facts(good_only=True):
        row = Stage.source_row(values[3:15])
        path = row.mask_path or (None if row.member else sidecar_mask(row.path))
        if path is not None:
            chosen[values[0]] = path
    facts, problems, to_probe = {}, {}, []
    for path in dict.fromkeys(chosen.values()):
        try:
            stat = os.stat(path)
        except OSError:
            problems[path] = ("missing", "file not found")
            continue
        known = previous.facts(path, "")
        if known and known.size_bytes == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
            facts[path] = known
        else:
            to_probe.append(path)
    for result in _probe_masks(to_probe, data.max_image_pixels, workers):
        if result.facts is not None:
            facts[result.key] = result.facts
        else:
            problems[result.key] = (result.code, result.message)

    masks, dropped = [], []
    for values in stage.rows_with_facts(good_only=True):
        seq, dataset, origin = values[:3]
        row, image = Stage.source_row(values[3:15]), ImageFacts(*values[_FACTS])
        path = chosen.get(seq)
        problem = None
        if path is None:
            if image.format in _ALPHA_FORMATS and _has_alpha(image.ref, data.max_image_pixels):
                masks.append((seq, MaskRef("alpha", Path(image.path), image.sha256,
                                           image.size_bytes, image.mtime_ns)))
        elif path in problems:
            code, reason = problems[path]
            problem = (f"bad_mask_{code}", f"mask {row.mask_listed or os.path.basename(path)}: "
                                           f"{reason}")
        elif (facts[path].width, facts[path].height) != (image.width, image.height):
            problem = ("bad_mask_size", f"mask {row.mask_listed or os.path.basename(path)} is "
                                        f"{facts[path].width}x{facts[path].height}, its image "
                                        f"{image.width}x{image.height} (they must match)")
        else:
            found = facts[path]
            masks.append((seq, MaskRef("file", Path(path), found.sha256, found.size_bytes,
                                       found.mtime_ns)))
        if problem is not None:
            bad.add(seq, dataset, origin, row, *problem)
            dropped.append(seq)
    stage.add_masks(masks)
    stage.drop_good(dropped)
    return facts, len(to_probe)


def _has_alpha(ref: ImageRef, max_pixels: int) -> bool:
    try:
        return images.file_has_alpha(ref, max_pixels)
    except (OSError, images.ImageProblem):  # it decoded moments ago; training re-checks it
        return False


def _plan(stage: Stage, bad: Rejects, data: DataConfig, batch_sizes: dict[str, int],
          multiple: int, datasets: tuple[Dataset, ...]) -> dict[str, SizePlan]:
    """Bucket plans, their targets staged; images a plan cannot use (too small) become bad
    rows. A plan is made from its images' distinct sizes and how many images have each
    (counted by SQL); the targets go back to the rows by SQL.

    Datasets with the same size settings (resolution, buckets, max_upscale) are planned
    together, so their images share buckets and batches; a dataset with its own settings gets
    its own plan (named "train: NAME" in the report). Validation rows use [data]'s settings.
    """
    groups: dict[tuple, list[int]] = {}
    for d in datasets:
        groups.setdefault((d.resolution, d.use_resolution_buckets, d.max_upscale), []).append(
            d.index)
    plan_of: list[tuple[str, tuple, list[int]]] = [
        ("train" if len(groups) == 1 else
         "train: " + ", ".join(datasets[i].name for i in members), settings, members)
        for settings, members in groups.items()]
    if stage.has_split("val"):
        plan_of.append(("val", (data.resolution, data.use_resolution_buckets, data.max_upscale),
                        [0]))  # validation rows have dataset 0
    plans = {}
    dropped: dict[int, str] = {}  # row -> why its plan cannot use it
    for name, (resolution, use_buckets, max_upscale), members in plan_of:
        split = "val" if name == "val" else "train"
        counts = stage.size_counts(split, members)
        if not counts:
            continue
        plan = plan_sizes(counts, resolution=resolution, use_buckets=use_buckets,
                          max_upscale=max_upscale, max_native_pixels=data.max_native_pixels,
                          batch_size=batch_sizes[split], multiple=multiple)
        plans[name] = plan
        for seq, size in stage.set_targets(split, members, plan.targets, plan.dropped):
            dropped[seq] = plan.dropped[size]
    for seq, dataset, origin, *values in stage.rows_by_seq(sorted(dropped)):
        bad.add(seq, dataset, origin, Stage.source_row(values), "too_small", dropped[seq])
    stage.drop_good(dropped)
    return plans


@dataclass
class Tally:
    """What the summary counts over the samples of a manifest (`count`: by SQL, in the
    manifest attached to the staging database): samples per split and per training dataset,
    kept empty captions, duplicate groups, mask kinds, and the changes against the previous
    manifest, matched by (split, image, n-th use of that image) and compared by content,
    caption and bucket."""

    counts: Counter
    datasets: Counter
    mask_kinds: Counter    # "file" / "alpha" / "none"
    empty_captions: list[ManifestRow]
    duplicates: list[list[ManifestRow]]
    changes: Changes

    @classmethod
    def count(cls, db: sqlite3.Connection, name: str, scan: SampleScan,
              previous: PreviousManifest) -> "Tally":
        counts, datasets, mask_kinds = Counter(), Counter(), Counter()
        empty = 0
        for (split, dataset, mask_kind, no_caption), n in scan.kinds.items():
            counts[split] += n
            if split == "train":
                datasets[dataset] += n
            mask_kinds[mask_kind or "none"] += n
            empty += n if no_caption else 0
        return cls(counts=counts, datasets=datasets, mask_kinds=mask_kinds,
                   empty_captions=list(select_rows(db, "s.caption = ''", name=name))
                   if empty else [],
                   duplicates=duplicate_groups(db, name, scan),
                   changes=Changes(*count_changes_by_sql(db, name, previous)))


# --- the report -------------------------------------------------------------------------------

def _sample_ref(row: ManifestRow) -> dict[str, str]:
    return {"split": row.split, "source": row.source, "path": row.image_name}


def _write_report(summary: IngestSummary, data: DataConfig, strict: bool) -> None:
    atomic_write_json(summary.report_path, {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "strict": strict,
        "manifest_written": summary.fingerprint is not None,
        "data_config": dataclasses.asdict(data),
        "counts": summary.counters(),
        "elapsed_s": round(summary.elapsed_s, 3),
        "phases_s": summary.phases_s,
        "bad": [dataclasses.asdict(b) for b in summary.bad],
        "empty_captions_kept": [_sample_ref(s) for s in summary.empty_captions_kept],
        "duplicates": [[_sample_ref(s) for s in group] for group in summary.duplicates],
        "buckets": {split: {"mode": plan.mode, "batch_size": plan.batch_size,
                            "batches_per_epoch": plan.batches_per_epoch, "merges": plan.merges,
                            "notes": list(plan.notes),
                            "buckets": [dataclasses.asdict(b) for b in plan.buckets]}
                    for split, plan in summary.plans.items()},
        "notes": summary.notes,
    })


# --- terminal output --------------------------------------------------------------------------

MAX_TABLE_ROWS = 40


def print_bad_rows(summary: IngestSummary) -> None:
    """One table line per bad row: where it is listed, the file, the reason."""
    if not summary.bad:
        return
    table = Table(title=f"{len(summary.bad)} bad row(s)", title_justify="left")
    table.add_column("Row", no_wrap=True)
    table.add_column("File", overflow="fold")
    table.add_column("Reason")
    for bad in summary.bad:
        table.add_row(escape(bad.where), escape(bad.listed_path or "(empty)"),
                      escape(bad.reason))
    console.print(table)
    console.print(f"full report: {escape(str(summary.report_path))}")


def _plan_table(split: str, plan: SizePlan) -> Table:
    table = Table(title=f"{split}: {plan.mode} targets, batch size {plan.batch_size}",
                  title_justify="left",
                  caption=f"{plan.batches_per_epoch} batches per epoch (the trainer fills a "
                          "bucket's last batch up with other images of the bucket); "
                          f"{plan.merges} small bucket(s) merged; {plan.dropped_images} image(s) "
                          "dropped" + (" (too small, listed above)" if plan.dropped else ""),
                  caption_justify="left")
    for name in ("Size", "Aspect", "Images", "Batches", "Resized", "Cropped", "Upscaled"):
        table.add_column(name, justify="left" if name == "Size" else "right")
    shown = sorted(plan.buckets, key=lambda b: -b.count)[:MAX_TABLE_ROWS]
    for bucket in sorted(shown, key=lambda b: (b.aspect, b.width)):
        table.add_row(f"{bucket.width}x{bucket.height}", f"{bucket.aspect:.2f}", str(bucket.count),
                      str(bucket.batches(plan.batch_size)), str(bucket.resized),
                      str(bucket.cropped), str(bucket.upscaled))
    if len(plan.buckets) > MAX_TABLE_ROWS:
        rest = sorted(plan.buckets, key=lambda b: -b.count)[MAX_TABLE_ROWS:]
        table.add_row(f"... {len(rest)} more", "", str(sum(b.count for b in rest)), "", "", "", "")
    return table


def print_summary(summary: IngestSummary) -> None:
    """Bad rows, duplicates, the bucket plans and a one-line summary."""
    print_bad_rows(summary)
    if summary.kept_counters is not None:
        for note in summary.notes:
            console.info(f"note: {note}")
        console.print(f"ingested {summary.counts.get('train', 0)} train + "
                      f"{summary.counts.get('val', 0)} val images; {len(summary.bad)} bad; "
                      f"nothing changed ({summary.elapsed_s:.2f} s)")
        return
    for group in summary.duplicates[:10]:
        console.print("same image: " + ", ".join(escape(f"{s.split} {s.source}") for s in group))
    if len(summary.duplicates) > 10:
        console.print(f"... and {len(summary.duplicates) - 10} more duplicate groups (see report)")
    for split, plan in summary.plans.items():
        console.print(_plan_table(split, plan))
        for note in plan.notes:
            console.info(f"note ({split}): {note}")
    for note in summary.notes:
        console.info(f"note: {note}")
    if len(summary.datasets) > 1:
        for name, counts in summary.datasets.items():
            console.print(f"dataset {escape(name)} ({counts['role']}): {counts['images']} "
                          f"image(s), {counts['bad']} bad")
    c = summary.changes
    rate = summary.files_read / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    console.print(
        f"ingested {summary.counts.get('train', 0)} train + {summary.counts.get('val', 0)} val "
        f"images in {sum(len(p.buckets) for p in summary.plans.values())} bucket(s); "
        f"{len(summary.bad)} bad, {len(summary.duplicates)} duplicate group(s); "
        f"added {c.added}, changed {c.changed}, removed {c.removed}, unchanged {c.unchanged}; "
        f"decoded {summary.files_read} file(s), reused {summary.files_reused} "
        + (f"(shards/Arrow files: read {summary.containers_read}, unchanged "
           f"{summary.containers_reused}) " if summary.containers_read + summary.containers_reused
           else "") +
        f"({summary.elapsed_s:.1f} s, {rate:.0f} images/s)")
    if summary.bad:
        console.warn(f"{len(summary.bad)} bad row(s) skipped (listed above; "
                     f"full report in {summary.report_path}); use --strict to make them an error")
    if summary.empty_captions_kept:
        console.warn(f"{len(summary.empty_captions_kept)} image(s) with an empty caption kept "
                     "as unconditional samples (keep_empty_captions)")
    if summary.duplicates:
        console.warn(f"{summary.duplicate_images} images are duplicates of another "
                     f"({len(summary.duplicates)} group(s)); all are kept")
