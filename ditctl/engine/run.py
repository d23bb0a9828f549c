"""Run folders: creating a new run, reopening one to resume, refusing unsafe resumes.

Where a run keeps what is `ditctl.runs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from ..config import Config, build_config, read_toml
from ..errors import CheckpointError, WorkspaceError
from ..fsutil import atomic_write_json, atomic_write_text
from ..runs import (checkpoints_dir, logs_dir, read_checkpoint_meta, read_run_info,
                    run_config_file, run_info_file, run_of_checkpoint, samples_dir)

# Keys that may change between the start of a run and its resume without changing what the
# already-trained steps mean (how long to train, how often to save/sample/log).
RESUME_SAFE = {
    "train": {"num_epochs", "max_steps", "checkpoint_every", "checkpoints_total_limit",
              "sample_every", "eval_every", "sample_prompts_file", "report_to", "project_name",
              "num_processes", "train_batch_size", "gradient_accumulation_steps",
              "run_name", "output_dir",
              "precomputed_data_dir", "use_precomputed_data", "max_nonfinite_steps",
              "eval_batch_size"},
    "sample": None, "eval": None, "export": None, "precompute": None,  # None: whole section
    # how processes share the model and meet: a sharded checkpoint reshards on load; only a
    # change of strategy (another checkpoint format) is a change of the run
    "distributed": {"cpu_offload", "nnodes", "node_rank", "master_addr", "master_port"},
    "model": {"pretrained_model_path"},  # the model identity is checked separately
    # the data fingerprint is checked separately; num_workers: how many processes read the
    # data, not what they read (the same bits with any count)
    "data": {"train_data_path", "val_data_path", "base_image_dir", "num_workers"},
}


@dataclass
class Run:
    folder: Path
    config: Config
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def samples_dir(self) -> Path:
        return samples_dir(self.folder)

    @property
    def logs_dir(self) -> Path:
        return logs_dir(self.folder)

    def save_info(self) -> None:
        atomic_write_json(run_info_file(self.folder), self.info)


def new_run(runs_dir: Path, config: Config, info: dict[str, Any]) -> Run:
    """Create runs/<name>/ with the resolved config; an existing name is never overwritten."""
    name = config.train.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    folder = runs_dir / name
    if folder.exists():
        raise WorkspaceError(f"run {folder} already exists",
                             hint=f"resume it with `ditctl train --resume latest --run {name}`, "
                                  "or pick another --run-name")
    checkpoints_dir(folder).mkdir(parents=True)
    atomic_write_text(run_config_file(folder), tomli_w.dumps(config.to_dict()))
    run = Run(folder, config, info)
    run.save_info()
    return run


def open_run_for_resume(checkpoint: Path, config: Config, info: dict[str, Any],
                        force: bool) -> Run:
    """The run a checkpoint belongs to, after checking that the current config and data still
    mean the same training; differences are listed and refused unless `force`."""
    folder = run_of_checkpoint(checkpoint)
    if folder is None:
        raise CheckpointError(f"{checkpoint} is not inside a run folder (runs/<run>/checkpoints/)",
                              hint="training resumes runs; to start from saved LoRA weights use "
                                   "[lora] lora_checkpoint")
    saved = build_config(read_toml(run_config_file(folder)), source=str(run_config_file(folder)))
    changes = config_changes(saved, config)
    meta = read_checkpoint_meta(checkpoint)
    for key in ("manifest_fingerprint", "base_identity"):
        if meta.get(key) and info.get(key) and meta[key] != info[key]:
            changes.append(f"{key.replace('_', ' ')} changed ({meta[key]} -> {info[key]})")
    previous = read_run_info(folder)
    if previous.get("step_batch") and previous["step_batch"] != info.get("step_batch"):
        changes.append(f"samples per optimiser step {previous['step_batch']} -> "
                       f"{info.get('step_batch')} (train_batch_size x processes x "
                       "gradient_accumulation_steps must stay the same)")
    if changes and not force:
        raise CheckpointError("cannot resume: " + "; ".join(changes),
                              hint="restore the original settings/data, or pass --force to "
                                   "resume anyway")
    run = Run(folder, config, {**previous, **info, "resumed_from": str(checkpoint)})
    atomic_write_text(run_config_file(folder), tomli_w.dumps(config.to_dict()))
    run.save_info()
    return run


def config_changes(saved: Config, current: Config) -> list[str]:
    """Human-readable differences that change what training does."""
    old, new = saved.to_dict(), current.to_dict()
    changes = []
    for section in old:
        safe = RESUME_SAFE.get(section, set())
        if safe is None:
            continue
        for key in sorted(set(old[section]) | set(new[section])):
            if key in safe:
                continue
            a, b = old[section].get(key), new[section].get(key)
            if a != b:
                changes.append(f"[{section}] {key} {a!r} -> {b!r}")
    return changes
