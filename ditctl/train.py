"""`ditctl train` as a library call: prepare a run, then hand it to the engine's loop.

Preparation, in order: the model family; the manifest (ingested first when missing or built
with other [data] settings); the run's seed and schedule; the run folder (new or resumed, with
its config checked); the data source (the precomputed cache, verified complete, or on-the-fly
encoding); the denoiser with LoRA; the sampler and evaluator used during training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, set_seed

from . import __version__
from .config import Config
from .console import console
from .data.datasets import dataset_plan, resolve_datasets
from .data.manifest import (ManifestRow, manifest_counts, manifest_fingerprint,
                            stale_manifest_reason)
from .data.sample_table import SampleTable, bucket_keys, masked_count
from .engine.attention import attention_context
from .engine.context import TrainingContext, TrainingData
from .engine.loop import TrainResult, train_loop
from .engine.objective import describe_objective
from .engine.plan import memory_advice, training_plan
from .engine.precision import cpu_lacks_native_bf16
from .engine.run import Run, new_run, open_run_for_resume
from .engine.setup import (base_storage, build_denoiser, make_accelerator, plan_schedule,
                           process_state, resolve_seed, step_batch_size)
from .errors import ConfigError, DataError, TrainingError, WorkspaceError
from .evaluation.inputs import split_holdout
from .fsutil import format_bytes
from .models.base import ModelFamily
from .models.registry import load_family
from .runs import (checkpoint_step, clean_torn_checkpoints, resolve_checkpoint, run_of_checkpoint,
                   verify_checkpoint)
from .train_hooks import make_evaluator, make_sampler
from .training_source import make_source
from .workspace import Workspace


def ensure_manifest(ws: Workspace, config: Config) -> SampleTable:
    """The training rows (a SampleTable: no Python object per sample until one is read); runs
    `ingest` first when there is no manifest or it is stale."""
    ensure_ingested(ws, config)
    return SampleTable.read(ws.manifest_db, "train")


def ensure_ingested(ws: Workspace, config: Config) -> None:
    """Run `ingest` when there is no manifest or it is stale; refuse one without training
    images (counted, not read)."""
    from .data.ingest import run_ingest

    stale = stale_manifest_reason(ws, config)
    if stale:
        if not resolve_datasets(config):
            raise WorkspaceError("no training data: [data] train_data_path is not set",
                                 hint="set it in project.toml or pass --train-data-path (or "
                                      "add [[data.datasets]] tables)")
        console.info(f"ingesting first ({stale})")
        run_ingest(ws, config)
    if not (manifest_counts(ws) or {}).get("train"):
        raise DataError("the manifest has no training images", hint="check `ditctl ingest`'s report")


def training_rows(ws: Workspace, config: Config, rows: Sequence[ManifestRow],
                  ) -> Sequence[ManifestRow]:
    """Without a validation split, the last [eval] holdout_fraction of the images is held out
    for validation (so `ditctl eval` measures images the model never trained on)."""
    if _val_images(ws) or config.eval.holdout_fraction == 0:
        return rows
    train, held = split_holdout(rows, config.eval.holdout_fraction)
    if not train:
        raise DataError(f"all {len(rows)} training images would be held out for validation",
                        hint="add a validation set ([data] val_data_path) or set [eval] "
                             "holdout_fraction = 0")
    console.info(f"no validation split: training on {len(train)} images, {len(held)} held out "
                 "for validation ([eval] holdout_fraction; 0 trains on all)")
    return train


def _val_images(ws: Workspace) -> int:
    return (manifest_counts(ws) or {}).get("val", 0)


def run_info(ws: Workspace, config: Config, family: ModelFamily, rows, seed: int,
             schedule) -> dict:
    # images per bucket, the buckets in the order the rows first use them
    keys, first, counts = np.unique(bucket_keys(rows), return_index=True, return_counts=True)
    buckets = {f"{key >> 32}x{key & 0xFFFFFFFF}": count for _, key, count in
               sorted(zip(first.tolist(), keys.tolist(), counts.tolist()))}
    return {"family": family.name, "base_model": str(family.path),
            "base_identity": family.denoiser_identity(), "seed": seed,
            "manifest_fingerprint": manifest_fingerprint(ws), "train_images": len(rows),
            "val_images": _val_images(ws), "buckets": buckets,
            "step_batch": schedule.step_batch, "total_steps": schedule.total_steps,
            "ditctl_version": __version__}


@dataclass
class TrainOutcome:
    plan: dict | None = None
    run: Run | None = None
    result: TrainResult | None = None


def run_training(ws: Workspace, config: Config, *, resume: str | None = None,
                 run: str | None = None, force: bool = False,
                 dry_run: bool = False) -> TrainOutcome:
    """Train as configured (or only plan it, with `dry_run`).

    `resume` continues a run exactly from a checkpoint: anything `runs.resolve_checkpoint`
    reads ("latest", a step, step-000100, a run, a path), within `run` (default: [train]
    run_name, else the most recently active run).
    """
    family = load_family(ws.model_path(config), config.model.family)
    runs_dir = ws.runs_dir(config)
    checkpoint = meta = None
    if resume:
        checkpoint = resolve_checkpoint(runs_dir, resume, run=run or config.train.run_name)
        meta = verify_checkpoint(checkpoint)
    elif run:
        raise ConfigError("--run picks the run to resume; it needs --resume",
                          hint="name a new run with --run-name, or add --resume latest")
    state = process_state()  # process layout; the Accelerator comes once the run folder exists
    console.quiet = not state.is_main_process  # one process reports
    if state.is_main_process:
        if not dry_run:
            _clean_torn_checkpoints(runs_dir)
        ensure_ingested(ws, config)  # every process reads the table below
    state.wait_for_everyone()
    rows = training_rows(ws, config, SampleTable.read(ws.manifest_db, "train"))

    seed = resolve_seed(config) if meta is None else meta["seed"]
    world = state.num_processes
    seed = broadcast_object_list([seed])[0] if world > 1 else seed
    if dry_run and world == 1:  # the plan is made in one process for the processes asked for
        world = config.train.num_processes * config.distributed.nnodes
    datasets = resolve_datasets(config)
    data = TrainingData(rows, None, seed, step_batch_size(config, world), config.data.random_flip,
                        datasets)
    schedule = plan_schedule(config, len(data.epoch_batches(0)), world)
    info = run_info(ws, config, family, rows, seed, schedule)
    info["base_precision"] = base_storage(config)
    if checkpoint is not None:
        console.info(f"continuing run {run_of_checkpoint(checkpoint).name} from "
                     f"{checkpoint.name} (step {checkpoint_step(checkpoint, meta)} of "
                     f"{schedule.total_steps})")

    set_seed(seed)  # LoRA's initial weights and dropout draw from the global RNGs
    if dry_run:  # shapes only: the plan reads no weights
        skeleton = build_denoiser(family, config, device="meta")
        plan = training_plan(schedule, skeleton, family, config, info["buckets"], world)
        plan["objective"] = describe_objective(
            config.train, masked_count(rows), len(rows))
        plan["datasets"] = dataset_plan(datasets, rows, schedule.step_batch)
        return TrainOutcome(plan=plan)
    if state.device.type == "cpu" and config.train.mixed_precision == "bf16" \
            and cpu_lacks_native_bf16():
        console.warn("this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX): bf16 "
                     "autocast will make each step slower than fp32 here; use "
                     "--mixed-precision no to train in fp32")
    denoiser = build_denoiser(family, config, device=state.device)
    if config.lora.offload_base_blocks:
        from .engine.offload import stream_base_blocks

        stream_base_blocks(denoiser, state.device)

    training_run = None
    if state.is_main_process:
        training_run = (open_run_for_resume(checkpoint, config, info, force)
                        if checkpoint is not None else new_run(runs_dir, config, info))
    training_run = broadcast_object_list([training_run])[0] if world > 1 else training_run
    accelerator = make_accelerator(config, project_dir=training_run.logs_dir)

    data.source = make_source(ws, config, family, rows,
                              encodes_on_the_fly=schedule.total_steps * schedule.step_batch)
    ctx = TrainingContext(accelerator, family, config, data, schedule, seed, training_run,
                          denoiser, info,
                          sampler=make_sampler(ws, config, family, training_run, data.source,
                                               writes=accelerator.is_main_process),
                          evaluator=make_evaluator(ws, config, family, training_run, data.source,
                                                   writes=accelerator.is_main_process))
    try:
        with attention_context(config.train.attention_backend, state.device):
            result = train_loop(ctx, resume_from=checkpoint)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        raise TrainingError("out of memory (nothing was saved from the failed step): "
                            + str(exc).splitlines()[0],
                            hint="try " + "; ".join(memory_advice(config))) from exc
    if result.checkpoint is None and checkpoint is not None:
        result.checkpoint = checkpoint  # a finished run resumed: nothing new, its last checkpoint
    if accelerator.is_main_process:
        ws.update_state("train", {"run": training_run.name, "step": result.steps,
                                  "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                                  "final_loss": result.final_loss, "interrupted": result.interrupted})
    return TrainOutcome(run=training_run, result=result)


def _clean_torn_checkpoints(runs_dir) -> None:
    """Torn checkpoint folders of killed runs go at the next training (we hold the lock)."""
    count, reclaimed = clean_torn_checkpoints(runs_dir)
    if count:
        console.info(f"removed {count} torn temporary checkpoint folder(s) left by a killed "
                     f"run ({format_bytes(reclaimed)} reclaimed)")


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text \
        or "can't allocate memory" in text
