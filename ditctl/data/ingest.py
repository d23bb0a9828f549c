"""`ingest`: read the data sources, validate every image, plan buckets, write the manifest.

    sources (CSV / folder)  ->  rows
    stat every file; reuse what the previous manifest learned where size and mtime match
    probe the rest (read once, sha256, full decode) in worker processes
    classify rows: good / bad (missing, corrupt, not an image, empty, too many pixels,
                   too small, empty caption, ...); duplicates (same hash) are reported
    masks ([data] use_masks): each good row's mask file (the CSV's mask column, else
          NAME.mask.png beside the image) is probed like an image (read, hashed, decoded, the
          same size as its image, not black everywhere), else the image's alpha channel;
          a bad mask makes its row bad
    plan buckets per split; write data/ingest-report.json; replace the manifest atomically

Bad rows never stop the scan: all of them are collected and reported together. By default
they are skipped; with `strict=True` any bad row raises `StrictIngestError` and the manifest
stays as it was.

`run_ingest` is a library call (`ditctl train` uses it for one-shot runs); the caller holds the
workspace lock. `print_summary` renders the result for the terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import os
import sys
import time
import types
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from rich.markup import escape
from rich.table import Table

from .. import __version__
from ..config import Config, DataConfig
from ..console import console
from ..errors import DataError
from ..fsutil import atomic_write_json
from ..models.registry import size_multiple
from ..procutil import worker_started
from ..workspace import Workspace
from . import images
from .buckets import BucketPlan, plan_buckets
from .datasets import Dataset, dataset_caption, resolve_datasets
from .images import ImageFacts, ProbeResult
from .manifest import (ManifestRow, MaskRef, PreviousManifest, SampleKey, read_previous, sample_key,
                       write_manifest)
from .sources import SourceRow, read_source, sidecar_mask

REPORT_NAME = "ingest-report.json"
# Below this many files to decode, starting worker processes costs more than it saves.
POOL_MIN_FILES = 48
MAX_CHUNK = 16  # small enough that the last chunks do not leave a core idle for long


@dataclass(frozen=True)
class BadRow:
    """A row that is not used, and why."""

    split: str
    origin: str        # the CSV file or folder the row comes from
    source: str        # "line 12" or the image's path relative to the folder
    listed_path: str   # the image path as the source writes it
    path: str          # absolute path
    code: str          # missing, corrupt, not_image, empty_file, too_small, empty_caption, ...
    reason: str

    @property
    def where(self) -> str:
        """`train.csv:12` for a CSV row, `photos/` for a folder row."""
        if self.source.startswith("line "):
            return f"{Path(self.origin).name}:{self.source[5:]}"
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
    plans: dict[str, BucketPlan]
    changes: Changes
    files_read: int
    files_reused: int
    report_path: Path
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> counts, role
    fingerprint: str | None = None
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def duplicate_images(self) -> int:
        return sum(len(group) for group in self.duplicates)

    def counters(self) -> dict[str, Any]:
        """The counts as plain JSON (state file, report, --json)."""
        return {"train_count": self.counts.get("train", 0), "val_count": self.counts.get("val", 0),
                "bad_count": len(self.bad), "duplicate_groups": len(self.duplicates),
                "empty_captions_kept": len(self.empty_captions_kept),
                "buckets": {s: len(p.buckets) for s, p in self.plans.items()},
                "batches_per_epoch": {s: p.batches_per_epoch for s, p in self.plans.items()},
                **dataclasses.asdict(self.changes), "files_read": self.files_read,
                "files_reused": self.files_reused, "fingerprint": self.fingerprint,
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
    datasets = resolve_datasets(config)
    rows, origin, dataset_of = _read_rows(ws, data, datasets)
    previous = read_previous(ws.manifest_db)
    notes = []
    if previous.problem:
        notes.append(f"the previous manifest is {previous.problem}; every image was re-read")

    facts, problems, files_read, files_reused = _examine_files(
        rows, previous, data.max_image_pixels, workers)
    good, bad = _classify(rows, facts, problems, data, origin, dataset_of, datasets)
    masks, mask_facts, masks_read = {}, {}, 0
    if data.use_masks:
        good, masks, mask_facts, masks_read = _examine_masks(good, bad, previous, data, workers)
    batch_sizes = {"train": config.train.train_batch_size, "val": config.train.eval_batch_size}
    samples, plans = _plan(good, bad, data, batch_sizes, origin,
                           size_multiple(config.model.family), datasets, masks)
    if data.use_masks:
        kinds = Counter(s.mask.kind if s.mask is not None else "none" for s in samples)
        notes.append(f"loss masks: {kinds['file']} from mask files, {kinds['alpha']} from alpha "
                     f"channels; {kinds['none']} image(s) without one train everywhere")
    position = {(origin[i], row.split, row.source): i for i, row in enumerate(rows)}
    bad.sort(key=lambda b: position[(b.origin, b.split, b.source)])

    summary = IngestSummary(
        counts=dict(Counter(s.split for s in samples)), bad=bad,
        empty_captions_kept=[s for s in samples if not s.caption],
        duplicates=_duplicates(samples), plans=plans, changes=_changes(previous, samples),
        files_read=files_read + masks_read, files_reused=files_reused,
        report_path=ws.data_dir / REPORT_NAME, notes=notes,
        datasets=_dataset_counts(datasets, samples, Counter(
            dataset_of[position[(b.origin, b.split, b.source)]] for b in bad
            if b.split == "train")))

    refusal: DataError | None = None
    if strict and bad:
        refusal = StrictIngestError(summary)
    elif not summary.counts.get("train"):
        where = ", ".join(d.path for d in datasets)
        refusal = DataError(f"no usable training images in {where} ({len(bad)} bad "
                            f"row(s); details in {summary.report_path})",
                            hint="fix the rows listed above, or point [data] train_data_path "
                                 "at other data")
    if refusal is not None:
        _finish(summary, started)
        _write_report(summary, data, strict)
        raise refusal

    # Keep what validation learned about every decodable file still listed (also those of
    # rows that were refused as too small or uncaptioned), so the next run skips them too.
    listed = {r.path for r in rows}
    meta = {"data_config": dataclasses.asdict(data), "batch_sizes": batch_sizes,
            "ditctl_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "counts": summary.counts}
    known = [facts[p] for p in sorted(listed) if p in facts]
    known += [f for p, f in sorted(mask_facts.items()) if p not in facts]
    summary.fingerprint = write_manifest(ws.manifest_db, samples, known, meta)
    _finish(summary, started)
    _write_report(summary, data, strict)
    # the data actually ingested (a --train-data-path flag may differ from project.toml)
    ws.update_state("ingest", {**summary.counters(), "report": str(summary.report_path),
                               "train_data_path": origin[0] if rows else None,
                               "val_data_path": (str(ws.resolve(data.val_data_path))
                                                 if data.val_data_path else None)})
    return summary


def _finish(summary: IngestSummary, started: float) -> None:
    summary.elapsed_s = time.perf_counter() - started


def _read_rows(ws: Workspace, data: DataConfig, datasets: tuple[Dataset, ...],
               ) -> tuple[list[SourceRow], list[str], list[int]]:
    """Every dataset's rows, then the validation rows; the source (CSV or folder) of each, and
    its dataset (validation rows: 0, the [data] settings).

    Each dataset reads its own path through `read_source` with its own columns and base folder.
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
    rows: list[SourceRow] = []
    origin: list[str] = []
    dataset_of: list[int] = []
    for split, index, where, base, image_column, caption_column in sources:
        found = read_source(ws.resolve(where), split=split, base_image_dir=base,
                            image_column=image_column, caption_column=caption_column,
                            mask_column=data.mask_column if data.use_masks else None)
        if not found:
            raise DataError(f"{ws.resolve(where)}: no images listed ({split} data)",
                            hint="add rows to the CSV, or images (.jpg, .png, .webp, ...) "
                                 "to the folder")
        rows += found
        origin += [str(ws.resolve(where))] * len(found)
        dataset_of += [index] * len(found)
    return rows, origin, dataset_of


# --- validating the files ---------------------------------------------------------------------

def _examine_files(rows: list[SourceRow], previous: PreviousManifest, max_pixels: int,
                   workers: int | None,
                   ) -> tuple[dict[str, ImageFacts], dict[str, tuple[str, str]], int, int]:
    """(facts of good files, (code, message) of bad files, files decoded, files reused).

    A file whose size and mtime match the previous manifest is not read again: its recorded
    hash and size are reused.
    """
    facts: dict[str, ImageFacts] = {}
    problems: dict[str, tuple[str, str]] = {}
    to_probe = []
    reused = 0
    for path in dict.fromkeys(r.path for r in rows if r.problem is None):
        try:
            stat = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            problems[path] = ("missing", "file not found")
            continue
        except OSError as exc:
            problems[path] = ("unreadable", f"cannot read the file ({exc.strerror or exc})")
            continue
        refused = images.file_problem(stat, max_pixels)  # a FIFO, /dev/zero, a huge file
        if refused is not None:
            problems[path] = (refused.code, refused.message)
            continue
        known = previous.files.get(path)
        if known and known.size_bytes == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
            facts[path] = known
            reused += 1
        else:
            to_probe.append(path)
    for result in _probe_all(to_probe, max_pixels, workers):
        if result.facts is not None:
            facts[result.path] = result.facts
        else:
            problems[result.path] = (result.code, result.message)
    return facts, problems, len(to_probe), reused


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


def _probe_all(paths: list[str], max_pixels: int, workers: int | None,
               masks: bool = False) -> list[ProbeResult]:
    """Probe files in parallel (chunks over worker processes), in-process for few files;
    `masks`: mask files (`images.probe_mask`)."""
    if not paths:
        return []
    workers = workers or available_cpus()
    results: list[ProbeResult] = []
    with console.progress("Validating masks" if masks else "Validating images", total=len(paths),
                          unit="img") as bar:
        if workers <= 1 or len(paths) < POOL_MIN_FILES:
            for path in paths:
                results += images.probe_chunk([path], max_pixels, masks)
                bar.advance()
            return results
        # Chunks amortise the per-task overhead; several per worker keep the load balanced.
        size = max(1, min(MAX_CHUNK, math.ceil(len(paths) / (workers * 4))))
        # spawn, not fork: ingest may run inside `train`, where torch threads make fork unsafe.
        # worker_started: the workers die with ingest (a kill must not leave them reading).
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=worker_started)
        try:
            with _main_module_hidden():  # the workers start during these submits
                futures = [pool.submit(images.probe_chunk, paths[i:i + size], max_pixels, masks)
                           for i in range(0, len(paths), size)]
            for future in as_completed(futures):
                chunk = future.result()
                results += chunk
                bar.advance(len(chunk))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return results


# --- classifying rows -------------------------------------------------------------------------

class Good(NamedTuple):
    """A row that passed validation."""

    dataset: int
    row: SourceRow
    facts: ImageFacts
    caption: str  # after the dataset's caption tools
    origin: str


def _dataset_counts(datasets: tuple[Dataset, ...], samples: list[ManifestRow],
                    bad: Counter) -> dict[str, dict[str, Any]]:
    """Per dataset: its role, good images, bad rows (`bad`: by dataset index), repeats and
    weights (ingest's report and summary)."""
    good = Counter(s.dataset for s in samples if s.split == "train")
    return {d.name: {"path": d.path, "role": d.role, "images": good.get(d.index, 0),
                     "bad": bad.get(d.index, 0), "repeats": d.repeats,
                     "weight": d.weight, "loss_weight": d.loss_weight}
            for d in datasets}


def _bad(row: SourceRow, code: str, reason: str, origin: str) -> BadRow:
    return BadRow(split=row.split, origin=origin, source=row.source,
                  listed_path=row.listed_path, path=row.path, code=code, reason=reason)


def _classify(rows: list[SourceRow], facts: dict[str, ImageFacts],
              problems: dict[str, tuple[str, str]], data: DataConfig, origin: list[str],
              dataset_of: list[int], datasets: tuple[Dataset, ...],
              ) -> tuple[list[Good], list[BadRow]]:
    """(good rows, bad rows); a good row's caption is after its dataset's caption tools."""
    good, bad = [], []
    for i, row in enumerate(rows):
        path = row.path
        caption = dataset_caption(row.caption, datasets[dataset_of[i]])
        problem = row.problem or problems.get(path)
        if problem is None:
            found = facts[path]
            if found.width * found.height > data.max_image_pixels:
                # recorded by an earlier ingest, before max_image_pixels was lowered
                refused = images.pixel_limit_problem(found.width, found.height,
                                                     data.max_image_pixels)
                problem = (refused.code, refused.message)
            elif not caption and not data.keep_empty_captions:
                problem = ("empty_caption", "the caption is empty (set keep_empty_captions "
                                            "to train on it as an unconditional sample)")
        if problem is not None:
            bad.append(_bad(row, *problem, origin[i]))
        else:
            good.append(Good(dataset_of[i], row, facts[path], caption, origin[i]))
    return good, bad


# formats that can carry an alpha channel (a JPEG never does: its header is not read)
_ALPHA_FORMATS = ("PNG", "WEBP", "TIFF", "GIF", "BMP")


def _examine_masks(good: list[Good], bad: list[BadRow], previous: PreviousManifest,
                   data: DataConfig, workers: int | None,
                   ) -> tuple[list[Good], dict[tuple[str, str, str], MaskRef],
                              dict[str, ImageFacts], int]:
    """Each good row's loss mask (see the module doc): (the rows still good, their masks by
    (source file, split, row), the facts of the mask files for the next ingest, mask files
    decoded). Rows with a bad mask go to `bad`, naming the mask and why."""
    chosen = {}  # (source file, split, row) -> mask file path
    for g in good:
        path = g.row.mask_path or sidecar_mask(g.row.path)
        if path is not None:
            chosen[(g.origin, g.row.split, g.row.source)] = path
    facts, problems, to_probe = {}, {}, []
    for path in dict.fromkeys(chosen.values()):
        try:
            stat = os.stat(path)
        except OSError:
            problems[path] = ("missing", "file not found")
            continue
        known = previous.files.get(path)
        if known and known.size_bytes == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
            facts[path] = known
        else:
            to_probe.append(path)
    for result in _probe_all(to_probe, data.max_image_pixels, workers, masks=True):
        if result.facts is not None:
            facts[result.path] = result.facts
        else:
            problems[result.path] = (result.code, result.message)

    kept, masks = [], {}
    for g in good:
        row, image = g.row, g.facts
        key = (g.origin, row.split, row.source)
        path = chosen.get(key)
        problem = None
        if path is None:
            if image.format in _ALPHA_FORMATS and _has_alpha(image.path, data.max_image_pixels):
                masks[key] = MaskRef("alpha", Path(image.path), image.sha256, image.size_bytes,
                                     image.mtime_ns)
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
            masks[key] = MaskRef("file", Path(path), found.sha256, found.size_bytes,
                                 found.mtime_ns)
        if problem is not None:
            bad.append(_bad(row, *problem, g.origin))
        else:
            kept.append(g)
    return kept, masks, facts, len(to_probe)


def _has_alpha(path: str, max_pixels: int) -> bool:
    try:
        return images.file_has_alpha(path, max_pixels)
    except (OSError, images.ImageProblem):  # it decoded moments ago; training re-checks it
        return False


def _plan(good: list[Good], bad: list[BadRow],
          data: DataConfig, batch_sizes: dict[str, int], origin: list[str], multiple: int,
          datasets: tuple[Dataset, ...],
          masks: dict[tuple[str, str, str], MaskRef] | None = None,
          ) -> tuple[list[ManifestRow], dict[str, BucketPlan]]:
    """Bucket plans; images a plan cannot use (too small) become bad rows.

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
    if any(g.row.split == "val" for g in good):
        plan_of.append(("val", (data.resolution, data.use_resolution_buckets, data.max_upscale),
                        []))
    targets: dict[int, tuple[tuple[int, int] | None, str]] = {}  # position in `good`
    plans = {}
    for name, (resolution, use_buckets, max_upscale), members in plan_of:
        split = "val" if name == "val" else "train"
        items = [k for k, g in enumerate(good)
                 if g.row.split == split and (split == "val" or g.dataset in members)]
        if not items:
            continue
        plan = plan_buckets([(good[k].facts.width, good[k].facts.height) for k in items],
                            resolution=resolution, use_buckets=use_buckets,
                            max_upscale=max_upscale, max_native_pixels=data.max_native_pixels,
                            batch_size=batch_sizes[split], multiple=multiple)
        plans[name] = plan
        for n, k in enumerate(items):
            targets[k] = (plan.targets[n], plan.dropped.get(n, ""))
    samples = []
    for k, (d, row, found, caption, where) in enumerate(good):
        target, why = targets[k]
        if target is None:
            bad.append(_bad(row, "too_small", why, where))
            continue
        samples.append(ManifestRow(
            split=row.split, source=row.source, path=Path(found.path), caption=caption,
            sha256=found.sha256, size_bytes=found.size_bytes, mtime_ns=found.mtime_ns,
            width=found.width, height=found.height, format=found.format,
            bucket_w=target[0], bucket_h=target[1],
            mask=(masks or {}).get((where, row.split, row.source)), dataset=d,
            raw_caption=None if caption == row.caption else row.caption))
    # the manifest keeps training rows before validation rows, in source order
    samples.sort(key=lambda s: s.split != "train")
    return samples, plans


def _duplicates(samples: list[ManifestRow]) -> list[list[ManifestRow]]:
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for sample in samples:
        groups[sample.sha256].append(sample)
    return [group for group in groups.values() if len(group) > 1]


def _changes(previous: PreviousManifest, samples: list[ManifestRow]) -> Changes:
    """Compare samples by (split, file, n-th use of that file): content, caption and bucket."""

    def keyed(rows: list[SampleKey]) -> dict[tuple, tuple]:
        seen: Counter = Counter()
        out = {}
        for split, path, *content in rows:
            out[(split, path, seen[split, path])] = tuple(content)
            seen[split, path] += 1
        return out

    old, new = keyed(previous.samples), keyed([sample_key(s) for s in samples])
    both = old.keys() & new.keys()
    changed = sum(old[k] != new[k] for k in both)
    return Changes(added=len(new.keys() - old.keys()), changed=changed,
                   removed=len(old.keys() - new.keys()), unchanged=len(both) - changed)


# --- the report -------------------------------------------------------------------------------

def _sample_ref(row: ManifestRow) -> dict[str, str]:
    return {"split": row.split, "source": row.source, "path": str(row.path)}


def _write_report(summary: IngestSummary, data: DataConfig, strict: bool) -> None:
    atomic_write_json(summary.report_path, {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "strict": strict,
        "manifest_written": summary.fingerprint is not None,
        "data_config": dataclasses.asdict(data),
        "counts": summary.counters(),
        "elapsed_s": round(summary.elapsed_s, 3),
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


def _plan_table(split: str, plan: BucketPlan) -> Table:
    table = Table(title=f"{split}: {plan.mode} targets, batch size {plan.batch_size}",
                  title_justify="left",
                  caption=f"{plan.batches_per_epoch} batches per epoch (the trainer fills a "
                          "bucket's last batch up with other images of the bucket); "
                          f"{plan.merges} small bucket(s) merged; {len(plan.dropped)} image(s) "
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
