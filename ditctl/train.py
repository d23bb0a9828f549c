"""`ditctl train` as a library call: prepare a run, then hand it to the engine's loop.

Preparation, in order: the model family; the manifest (ingested first when missing or built
with other [data] settings); the run's seed and schedule; the run folder (new or resumed, with
its config checked); the data source (the precomputed cache, verified complete, or on-the-fly
encoding); the denoiser with LoRA; the sampler and evaluator used during training.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .config import Config
from .console import console
from .data.manifest import ManifestRow, manifest_fingerprint, manifest_meta, read_manifest
from .errors import DataError, WorkspaceError
from .models.base import ModelFamily
from .models.registry import load_family
from .workspace import Workspace


@dataclass
class TrainingData:
    """The training set as the loop sees it: one planned batch per optimiser step, and loading.

    Each epoch's bucketed, shuffled batches have `step_batch` samples. The last batch of a
    bucket is filled up with other images of the same bucket (shuffled, cycling when the bucket
    is small), so every image is seen at least once per epoch, nothing is dropped, and every
    step trains on a full batch: accumulation and multi-process training then equal one big
    batch exactly.
    """

    rows: list[ManifestRow]
    source: Any  # a SampleSource: CachedSource or OnTheFlySource
    seed: int
    step_batch: int
    random_flip: bool

    @functools.lru_cache(maxsize=4)
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        from .data.batches import epoch_batches

        batches = epoch_batches(self.rows, self.step_batch, self.seed, epoch)
        rng = random.Random(f"{self.seed}:{epoch}:fill")
        return [batch if len(batch) == self.step_batch else self._fill(batch, rng)
                for batch in batches]

    def _fill(self, batch: list[int], rng: random.Random) -> list[int]:
        bucket = self.rows[batch[0]].bucket
        others = [i for i, row in enumerate(self.rows) if row.bucket == bucket and i not in batch]
        rng.shuffle(others)
        pool = others + list(batch)
        return batch + [pool[k % len(pool)] for k in range(self.step_batch - len(batch))]

    def load(self, indices: list[int], epoch: int):
        from .data.batches import collate, flip_for

        flips = [flip_for(self.seed, epoch, i, self.random_flip) for i in indices]
        return collate(self.source, self.rows, indices, flips)

    __hash__ = object.__hash__


@dataclass
class TrainingContext:
    accelerator: Any
    family: ModelFamily
    config: Config
    data: TrainingData
    schedule: Any
    seed: int
    run: Any
    denoiser: torch.nn.Module
    info: dict = field(default_factory=dict)
    sampler: Callable | None = None
    evaluator: Callable | None = None

    def checkpoint_meta(self) -> dict:
        return {"base_identity": self.info["base_identity"], "config_hash": self.config.hash(),
                "manifest_fingerprint": self.info["manifest_fingerprint"], "seed": self.seed,
                "lora": self.config.lora.use_lora, "run": self.run.name,
                "base_precision": self.info.get("base_precision", "fp32")}


def ensure_manifest(ws: Workspace, config: Config) -> list[ManifestRow]:
    """The training rows; runs `ingest` first when there is no manifest or it is stale."""
    from .data.ingest import run_ingest

    stale = None
    if not ws.manifest_db.is_file():
        stale = "no manifest yet"
    else:
        recorded = manifest_meta(ws).get("data_config") or {}
        current = dataclasses.asdict(config.data)
        changed = sorted(k for k in current if k in recorded and recorded[k] != current[k])
        if changed:
            stale = "[data] " + ", ".join(changed) + " changed since the last ingest"
    if stale:
        if not config.data.train_data_path:
            raise WorkspaceError("no training data: [data] train_data_path is not set",
                                 hint="set it in project.toml or pass --train-data-path")
        console.info(f"ingesting first ({stale})")
        run_ingest(ws, config)
    rows = read_manifest(ws, "train")
    if not rows:
        raise DataError("the manifest has no training images", hint="check `ditctl ingest`'s report")
    return rows


def training_rows(ws: Workspace, config: Config, rows: list[ManifestRow]) -> list[ManifestRow]:
    """Without a validation split, the last [eval] holdout_fraction of the images is held out
    for validation (so `ditctl eval` measures images the model never trained on)."""
    from .evaluation import split_holdout

    if read_manifest(ws, "val") or config.eval.holdout_fraction == 0:
        return rows
    train, held = split_holdout(rows, config.eval.holdout_fraction)
    if not train:
        raise DataError(f"all {len(rows)} training images would be held out for validation",
                        hint="add a validation set ([data] val_data_path) or set [eval] "
                             "holdout_fraction = 0")
    console.info(f"no validation split: training on {len(train)} images, {len(held)} held out "
                 "for validation ([eval] holdout_fraction; 0 trains on all)")
    return train


def make_source(ws: Workspace, config: Config, family: ModelFamily, rows: list[ManifestRow]):
    """The precomputed cache when asked for (verified complete), else on-the-fly encoding."""
    from .data.batches import CachedSource, OnTheFlySource

    if config.train.use_precomputed_data:
        from .data.cache import Cache, check_cache_complete

        check_cache_complete(ws, config, family, rows)
        return CachedSource(Cache.open(ws, config, family))
    console.info("encoding images and captions on the fly (run `ditctl precompute` and train "
                 "with --use-precomputed-data to skip the VAE and text encoder)")
    text_device = "cpu" if config.train.text_encoder_device == "cpu" else process_device()
    return OnTheFlySource(family, family.load_vae(), family.load_text_encoder(device=text_device),
                          config.data)


def process_device() -> torch.device:
    """This process's accelerator (its rank's GPU), or the CPU."""
    from .engine.setup import process_state

    return process_state().device


def run_info(ws: Workspace, config: Config, family: ModelFamily, rows, seed: int,
             schedule) -> dict:
    buckets: dict[str, int] = {}
    for row in rows:
        key = f"{row.bucket_w}x{row.bucket_h}"
        buckets[key] = buckets.get(key, 0) + 1
    return {"family": family.name, "base_model": str(family.path),
            "base_identity": family.denoiser_identity(), "seed": seed,
            "manifest_fingerprint": manifest_fingerprint(ws), "train_images": len(rows),
            "val_images": len(read_manifest(ws, "val")), "buckets": buckets,
            "step_batch": schedule.step_batch, "total_steps": schedule.total_steps,
            "ditctl_version": __version__}


@dataclass
class TrainOutcome:
    plan: dict | None = None
    run: Any = None
    result: Any = None


def run_training(ws: Workspace, config: Config, *, resume: str | None = None,
                 force: bool = False, dry_run: bool = False) -> TrainOutcome:
    """Train as configured (or only plan it, with `dry_run`)."""
    from accelerate.utils import broadcast_object_list, set_seed

    from .engine.loop import train_loop
    from .engine.plan import memory_advice, training_plan
    from .engine.run import find_resume_checkpoint, new_run, open_run_for_resume
    from .engine.setup import (base_storage, build_denoiser, make_accelerator, plan_schedule,
                               process_state, resolve_seed, step_batch_size)
    from .errors import TrainingError

    family = load_family(ws.model_path(config), config.model.family)
    runs_dir = ws.runs_dir(config)
    checkpoint = find_resume_checkpoint(runs_dir, resume) if resume else None
    state = process_state()  # process layout; the Accelerator comes once the run folder exists
    console.quiet = not state.is_main_process  # one process reports
    if state.is_main_process:
        ensure_manifest(ws, config)
    state.wait_for_everyone()
    rows = training_rows(ws, config, read_manifest(ws, "train"))

    seed = resolve_seed(config)
    if checkpoint is not None:
        seed = _json(checkpoint / "checkpoint.json")["seed"]
    world = state.num_processes
    seed = broadcast_object_list([seed])[0] if world > 1 else seed
    data = TrainingData(rows, None, seed, step_batch_size(config, world), config.data.random_flip)
    schedule = plan_schedule(config, len(data.epoch_batches(0)), world)
    info = run_info(ws, config, family, rows, seed, schedule)
    info["base_precision"] = base_storage(config)

    set_seed(seed)  # LoRA's initial weights and dropout draw from the global RNGs
    if dry_run:  # shapes only: the plan reads no weights
        skeleton = build_denoiser(family, config, device="meta")
        return TrainOutcome(plan=training_plan(schedule, skeleton, family.dit_config(), config,
                                               info["buckets"], world, family.text_tokens()))
    denoiser = build_denoiser(family, config, device=state.device)
    if config.lora.offload_base_blocks:
        from .engine.offload import stream_base_blocks

        stream_base_blocks(denoiser, state.device)

    run = None
    if state.is_main_process:
        run = (open_run_for_resume(checkpoint, config, info, force) if checkpoint is not None
               else new_run(runs_dir, config, info))
    run = broadcast_object_list([run])[0] if world > 1 else run
    accelerator = make_accelerator(config, project_dir=run.logs_dir)

    data.source = make_source(ws, config, family, rows)
    ctx = TrainingContext(accelerator, family, config, data, schedule, seed, run, denoiser, info)
    from .engine.hooks import make_evaluator, make_sampler

    ctx.sampler = make_sampler(ws, config, family, run, data.source)
    ctx.evaluator = make_evaluator(ws, config, family, run, data.source)
    try:
        result = train_loop(ctx, resume_from=checkpoint)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        raise TrainingError("out of memory (nothing was saved from the failed step): "
                            + str(exc).splitlines()[0],
                            hint="try " + "; ".join(memory_advice(config))) from exc
    if accelerator.is_main_process:
        ws.update_state("train", {"run": run.name, "step": result.steps,
                                  "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                                  "final_loss": result.final_loss, "interrupted": result.interrupted})
    return TrainOutcome(run=run, result=result)


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text \
        or "can't allocate memory" in text


def _json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())
