"""Run folders: creating a new run, finding the one to resume, refusing unsafe resumes.

```
runs/<run>/config.toml    the resolved configuration the run trains with
runs/<run>/run.json       base model identity, seed, data fingerprint and counts
runs/<run>/checkpoints/   see checkpoint.py
runs/<run>/samples/       sample images during training (step-N/)
runs/<run>/eval/          metrics and reports
runs/<run>/logs/          tensorboard (and wandb) logs
```
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from ..config import Config, build_config, read_toml
from ..errors import CheckpointError, WorkspaceError
from ..fsutil import atomic_write_json, atomic_write_text
from ..status import list_checkpoints, list_runs
from .loading import read_checkpoint_meta

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
    "model": {"pretrained_model_path"},  # the model identity is checked separately
    "data": {"train_data_path", "val_data_path", "base_image_dir"},  # the data fingerprint is
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
        return self.folder / "samples"

    @property
    def logs_dir(self) -> Path:
        return self.folder / "logs"

    def save_info(self) -> None:
        atomic_write_json(self.folder / "run.json", self.info)


def new_run(runs_dir: Path, config: Config, info: dict[str, Any]) -> Run:
    """Create runs/<name>/ with the resolved config; an existing name is never overwritten."""
    name = config.train.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    folder = runs_dir / name
    if folder.exists():
        raise WorkspaceError(f"run {folder} already exists",
                             hint="resume it with `ditctl train --resume latest` (or --resume "
                                  f"{folder}), or pick another --run-name")
    (folder / "checkpoints").mkdir(parents=True)
    atomic_write_text(folder / "config.toml", tomli_w.dumps(config.to_dict()))
    run = Run(folder, config, info)
    run.save_info()
    return run


def find_resume_checkpoint(runs_dir: Path, resume: str) -> Path:
    """`latest` (newest complete checkpoint of the newest run), a run folder, or a checkpoint."""
    if resume == "latest":
        for run in reversed(list_runs(runs_dir)):
            checkpoints = list_checkpoints(run)
            if checkpoints:
                return checkpoints[-1]
        raise CheckpointError(f"no complete checkpoint to resume in {runs_dir}",
                              hint="start a new run with `ditctl train`")
    path = Path(resume)
    if (path / "config.toml").is_file():  # a run folder
        checkpoints = list_checkpoints(path)
        if not checkpoints:
            raise CheckpointError(f"run {path} has no complete checkpoint", hint="start a new run")
        return checkpoints[-1]
    read_checkpoint_meta(path)
    return path


def open_run_for_resume(checkpoint: Path, config: Config, info: dict[str, Any],
                        force: bool) -> Run:
    """The run a checkpoint belongs to, after checking that the current config and data still
    mean the same training; differences are listed and refused unless `force`."""
    folder = checkpoint.parent.parent
    saved = build_config(read_toml(folder / "config.toml"), source=str(folder / "config.toml"))
    changes = config_changes(saved, config)
    meta = read_checkpoint_meta(checkpoint)
    for key in ("manifest_fingerprint", "base_identity"):
        if meta.get(key) and info.get(key) and meta[key] != info[key]:
            changes.append(f"{key.replace('_', ' ')} changed ({meta[key]} -> {info[key]})")
    previous = json.loads((folder / "run.json").read_text())
    if previous.get("step_batch") and previous["step_batch"] != info.get("step_batch"):
        changes.append(f"samples per optimiser step {previous['step_batch']} -> "
                       f"{info.get('step_batch')} (train_batch_size x processes x "
                       "gradient_accumulation_steps must stay the same)")
    if changes and not force:
        raise CheckpointError("cannot resume: " + "; ".join(changes),
                              hint="restore the original settings/data, or pass --force to "
                                   "resume anyway")
    run = Run(folder, config, {**previous, **info, "resumed_from": str(checkpoint)})
    atomic_write_text(folder / "config.toml", tomli_w.dumps(config.to_dict()))
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
