"""The run and checkpoint layout: the one module that knows where a run keeps what.

```
runs/<run>/config.toml        the resolved configuration the run trains with (marks a run)
runs/<run>/run.json           base model identity, seed, data fingerprint and counts
runs/<run>/train_log.jsonl    one line per optimiser step
runs/<run>/checkpoints/       step-000100/ ... (below); .tmp-step-* while one is being written
runs/<run>/samples/           step-000100/ samples made during training, step-000100-sample/
                              those of `ditctl sample`
runs/<run>/eval/              metrics.json, report.html, during_training.jsonl
runs/<run>/logs/              tensorboard (and wandb) logs

checkpoints/step-000100/
  lora.safetensors, adapter_config.json   LoRA weights in PEFT format (LoRA runs)
  trainable.safetensors                   other trained weights (full fine-tuning)
  optimizer.safetensors/.json             optimiser state
  scheduler.json                          learning-rate schedule position
  rng.safetensors/.json                   python, numpy and torch RNG states
  checkpoint.json                         written last: step, data position, fingerprints and
                                          the manifest ("files": name -> bytes, sha256)

checkpoints/step-000100/ of a sharded run ([distributed] strategy = "fsdp"):
  shards/shard-0000R-model-00001-of-00001.safetensors
                                          rank R-1's shards of the trained weights ("model.*")
                                          and optimiser state ("optim.*"), written by
                                          torch.distributed.checkpoint's Hugging Face writer;
                                          each file's header records where its pieces lie in
                                          the whole tensors (no pickled .metadata)
  optimizer_groups.json                   the optimiser's hyper-parameters per parameter
  adapter_config.json, scheduler.json, rng.*  as above (rank 0)
  checkpoint.json                         as above, with "sharded": {world_size, trains_base}
```

A checkpoint is complete when its `checkpoint.json` exists (it is written last, and the folder
is built under a temporary name and renamed). Its manifest lists every other file with its size
and content hash, computed while the file was written; every load checks it
(`verify_checkpoint`), so a missing, truncated or damaged file is refused with the previous
good checkpoint named, never silently replaced by the base weights. Checkpoints written before
manifests existed carry no "files": they are accepted with a warning after a check that the
weight files their `checkpoint.json` implies are present.

`resolve_checkpoint` is the one reading of a `--checkpoint`/`--resume` argument for train,
sample, eval and export: `latest`, a step (`100`), a checkpoint folder name (`step-000100`),
a run name, or a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .console import console
from .errors import CheckpointError
from .fsutil import (TEMP_PREFIX, HashingWriter, remove_leftovers, restore_replaced,
                     temp_leftovers)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# --- names -----------------------------------------------------------------------------------

RUN_CONFIG = "config.toml"
RUN_INFO = "run.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
EVAL = "eval"
LOGS = "logs"
DURING_TRAINING_EVAL = "during_training.jsonl"
METRICS = "metrics.json"

STEP_PREFIX = "step-"
CHECKPOINT_MARKER = "checkpoint.json"  # written last: present only in complete checkpoints
LORA_WEIGHTS = "lora.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINABLE_FILE = "trainable.safetensors"  # non-LoRA trained weights (full fine-tuning)
SCHEDULER_STATE = "scheduler.json"
OPTIMIZER_STATE = "optimizer"  # optimizer.safetensors + optimizer.json
RNG_STATE = "rng"  # rng.safetensors + rng.json
SHARDS_DIR = "shards"  # sharded checkpoints: every rank's safetensors shards
OPTIMIZER_GROUPS = "optimizer_groups.json"  # sharded checkpoints: optimiser hyper-parameters

LATEST = "latest"
_STEP_NAME = re.compile(rf"^{STEP_PREFIX}(\d+)$")
_HASH_CHUNK = 8 << 20


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{int(step):06d}"


def step_of_name(name: str) -> int | None:
    """100 for "step-000100"; None for any other name."""
    match = _STEP_NAME.match(name)
    return int(match[1]) if match else None


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / checkpoint_name(step)


def run_config_file(run_dir: Path) -> Path:
    return Path(run_dir) / RUN_CONFIG


def run_info_file(run_dir: Path) -> Path:
    return Path(run_dir) / RUN_INFO


def train_log_file(run_dir: Path) -> Path:
    return Path(run_dir) / TRAIN_LOG


def samples_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SAMPLES


def training_samples_dir(run_dir: Path, step: int) -> Path:
    """Where training puts the samples of `step`."""
    return samples_dir(run_dir) / checkpoint_name(step)


def eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL


def logs_dir(run_dir: Path) -> Path:
    return Path(run_dir) / LOGS


def is_run(path: Path) -> bool:
    return run_config_file(path).is_file()


def is_complete_checkpoint(path: Path) -> bool:
    return (Path(path) / CHECKPOINT_MARKER).is_file()


def run_of_checkpoint(checkpoint: Path) -> Path | None:
    """runs/<run>/checkpoints/step-N -> runs/<run>; None for a folder outside a run."""
    parent = Path(checkpoint).resolve().parent
    if parent.name == CHECKPOINTS and is_run(parent.parent):
        return parent.parent
    return None


# --- listing ---------------------------------------------------------------------------------

def run_activity(run_dir: Path) -> float:
    """When the run last changed: created, resumed, logged a step or completed a checkpoint."""
    times = []
    for path in (run_config_file(run_dir), run_info_file(run_dir), train_log_file(run_dir),
                 checkpoints_dir(run_dir)):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders, least recently active first (the last one is "the latest run")."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if is_run(p)]
    return sorted(runs, key=lambda p: (run_activity(p), p.name))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (torn ones lack the marker and are skipped)."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir()
             if (step := step_of_name(p.name)) is not None and is_complete_checkpoint(p)]
    return [p for _, p in sorted(found)]


def torn_temporaries(runs_dir: Path) -> list[Path]:
    """Leftovers of checkpoint writes that a kill interrupted (`checkpoints/.tmp-step-*`)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return [p for run in sorted(runs_dir.iterdir()) if run.is_dir()
            for p in temp_leftovers(checkpoints_dir(run))]


def clean_torn_checkpoints(runs_dir: Path) -> tuple[int, int]:
    """Delete the torn checkpoint folders of killed runs; (how many, bytes reclaimed).
    Only a command holding the workspace lock may call this (no checkpoint is being written).
    A checkpoint that a killed re-save had moved aside is put back first."""
    runs_dir = Path(runs_dir)
    if runs_dir.is_dir():
        for run in runs_dir.iterdir():
            if run.is_dir():
                restore_replaced(checkpoints_dir(run))
    torn = torn_temporaries(runs_dir)
    return len(torn), remove_leftovers(torn)


# --- run files -------------------------------------------------------------------------------

def read_run_config(run_dir: Path | None) -> dict:
    """The run's resolved config.toml as a plain dict ({} if there is none)."""
    if run_dir is None or not is_run(run_dir):
        return {}
    path = run_config_file(run_dir)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid TOML ({exc})",
                              hint="restore the run's config.toml; training wrote it") from exc


def read_run_info(run_dir: Path | None) -> dict:
    """runs/<run>/run.json ({} if absent)."""
    path = run_info_file(run_dir) if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})",
                              hint="restore the run's run.json; training wrote it") from exc


# --- which run, which checkpoint --------------------------------------------------------------

def resolve_run(runs_dir: Path, run: str | Path | None = None) -> Path:
    """A run by name (a folder of `runs_dir`) or path; without one, the latest run."""
    runs_dir = Path(runs_dir)
    if run:
        given = Path(run).expanduser()
        for path in ((given,) if given.is_absolute() else (runs_dir / given, given)):
            if is_run(path):
                return path
        names = ", ".join(p.name for p in list_runs(runs_dir)) or "none"
        raise CheckpointError(f"no run named {str(run)!r} in {runs_dir}", hint=f"runs: {names}")
    runs = list_runs(runs_dir)
    if not runs:
        raise CheckpointError(f"no training runs in {runs_dir}",
                              hint="run `ditctl train` first, or use --base for the base model")
    return runs[-1]


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run; an error naming the run when it has none."""
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        return checkpoints[-1]
    others = [p.name for p in list_runs(Path(run_dir).parent)
              if p.name != Path(run_dir).name and list_checkpoints(p)]
    raise CheckpointError(
        f"run {Path(run_dir).name} has no complete checkpoint yet",
        hint=("pick a run with --run NAME (runs with checkpoints: " + ", ".join(others) + "), "
              if others else "") + "or let training reach checkpoint_every steps")


def resolve_checkpoint(runs_dir: Path, checkpoint: str | Path | None = None, *,
                       run: str | Path | None = None) -> Path:
    """The checkpoint a command means, for train --resume, sample, eval and export alike:

    - None or "latest": the newest complete checkpoint of `run` (default: the latest run,
      i.e. the most recently active one; an error naming it when it has no checkpoint yet);
    - an existing path: that checkpoint folder, or that run folder's newest checkpoint;
    - a step ("100") or a checkpoint folder name ("step-000100"): that checkpoint of `run`;
    - a run name: that run's newest checkpoint.

    The result is a complete checkpoint whose manifest lists no missing or resized file.
    """
    runs_dir = Path(runs_dir)
    text = str(checkpoint).strip() if checkpoint is not None else ""
    if not text or text == LATEST:
        found = latest_checkpoint(resolve_run(runs_dir, run))
    else:
        found = _find(runs_dir, text, run)
    verify_checkpoint(found, contents=False)
    return found


def _find(runs_dir: Path, text: str, run: str | Path | None) -> Path:
    path = Path(text).expanduser()
    if path.is_dir():
        return latest_checkpoint(path) if is_run(path) else path
    if len(path.parts) == 1:
        step = int(text) if text.isdigit() else step_of_name(text)
        if step is not None:
            run_dir = resolve_run(runs_dir, run)
            found = checkpoint_dir(run_dir, step)
            if found.is_dir():
                return found
            have = ", ".join(str(step_of_name(p.name)) for p in list_checkpoints(run_dir))
            raise CheckpointError(f"run {run_dir.name} has no checkpoint {checkpoint_name(step)}",
                                  hint=f"its checkpoints are at steps: {have or 'none yet'}")
        if is_run(runs_dir / text):
            return latest_checkpoint(runs_dir / text)
    raise CheckpointError(f"no checkpoint {text!r}",
                          hint="give a step (100), a checkpoint name (step-000100), a run name, "
                               "'latest' or a folder; `ditctl status` lists them")


def checkpoint_step(checkpoint: Path, meta: dict | None = None) -> int:
    """The step a checkpoint recorded (else the one in its folder name)."""
    meta = read_checkpoint_meta(checkpoint) if meta is None else meta
    if isinstance(meta.get("step"), int):
        return meta["step"]
    step = step_of_name(Path(checkpoint).name)
    if step is None:
        raise CheckpointError(f"{Path(checkpoint) / CHECKPOINT_MARKER} records no step",
                              hint="it was not written by ditctl train")
    return step


def describe(checkpoint: Path) -> str:
    """"r1/step-000100" (or the folder's path outside a run), for messages."""
    run_dir = run_of_checkpoint(checkpoint)
    return f"{run_dir.name}/{Path(checkpoint).name}" if run_dir else str(checkpoint)


# --- the manifest: writing --------------------------------------------------------------------

@dataclass
class CheckpointWriter:
    """Writes the files of a checkpoint being built in `folder` (a temporary folder), hashing
    each while it is written, and finally `checkpoint.json` with their manifest."""

    folder: Path
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def open(self, name: str) -> "_RecordedFile":
        """A binary file to write `name` into; it is recorded in the manifest when closed."""
        return _RecordedFile(self, name)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name) as fh:
            fh.write(data)

    def write_json(self, name: str, value: Any, **dumps: Any) -> None:
        self.write_bytes(name, json.dumps(value, **dumps).encode("utf-8"))

    def record(self, name: str, size: int, sha256: str) -> None:
        """Enter a file written by someone else (another rank's shard) into the manifest."""
        self.files[name] = {"bytes": size, "sha256": sha256}

    def finish(self, meta: dict[str, Any]) -> None:
        """Write checkpoint.json (meta + the manifest): the last file of the checkpoint."""
        marker = {**meta, "files": dict(sorted(self.files.items()))}
        (Path(self.folder) / CHECKPOINT_MARKER).write_text(
            json.dumps(marker, indent=2, sort_keys=True))


class _RecordedFile:
    def __init__(self, writer: CheckpointWriter, name: str) -> None:
        if name == CHECKPOINT_MARKER or "/" in name:
            raise ValueError(f"not a checkpoint file name: {name!r}")
        self._writer, self._name = writer, name
        self._raw: BinaryIO = open(Path(writer.folder) / name, "wb")
        self._hashing = HashingWriter(self._raw)

    def __enter__(self) -> HashingWriter:
        return self._hashing

    def __exit__(self, exc_type, *exc) -> None:
        self._raw.close()
        if exc_type is None:
            self._writer.files[self._name] = {"bytes": self._hashing.size,
                                              "sha256": self._hashing.hexdigest()}


# --- the manifest: checking -------------------------------------------------------------------

class _Problem(Exception):
    """What is wrong with a checkpoint (turned into a CheckpointError with a hint)."""


def remove_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint (pruning): renamed out of sight first, so that a reader (eval during
    training) sees it vanish whole rather than half-deleted, and is told it was removed."""
    checkpoint = Path(checkpoint)
    doomed = checkpoint.with_name(f"{TEMP_PREFIX}{checkpoint.name}.pruned")
    try:
        os.replace(checkpoint, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _gone(checkpoint: Path) -> _Problem:
    return _Problem(f"checkpoint {describe(checkpoint)} no longer exists: it was removed while "
                    "in use (training keeps only the newest checkpoints_total_limit checkpoints)")


def _marker(checkpoint: Path) -> dict:
    marker = Path(checkpoint) / CHECKPOINT_MARKER
    if not Path(checkpoint).exists():
        raise _gone(checkpoint)
    if not marker.is_file():
        raise _Problem(f"{checkpoint} is not a complete ditctl checkpoint (no {CHECKPOINT_MARKER})")
    try:
        meta = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Problem(f"{marker} is damaged (not valid JSON: {exc})") from None
    if not isinstance(meta, dict):
        raise _Problem(f"{marker} is damaged (not a JSON object)")
    return meta


def read_checkpoint_meta(checkpoint: Path) -> dict:
    """checkpoint.json of a complete checkpoint (not yet checked against its files)."""
    try:
        return _marker(checkpoint)
    except _Problem as problem:
        raise CheckpointError(str(problem), hint=_previous_hint(checkpoint)) from None


def checkpoint_holds(checkpoint: Path, meta: dict, name: str) -> bool:
    """Whether the checkpoint says it holds `name` (its manifest; the folder for old ones)."""
    files = meta.get("files")
    return name in files if isinstance(files, dict) else (Path(checkpoint) / name).is_file()


def is_sharded(meta: dict) -> bool:
    """Whether a checkpoint was written shard by shard (strategy fsdp)."""
    return isinstance(meta.get("sharded"), dict)


def holds_trained_base(checkpoint: Path, meta: dict) -> bool:
    """Whether the checkpoint holds trained base weights (full fine-tuning, or LoRA with the
    base trained too), in either layout."""
    if is_sharded(meta):
        return bool(meta["sharded"].get("trains_base"))
    return checkpoint_holds(checkpoint, meta, TRAINABLE_FILE)


_verified: dict[str, tuple] = {}  # checkpoint -> file signature at its last full check
_warned_legacy: set[str] = set()


def verify_checkpoint(checkpoint: Path, *, contents: bool = True) -> dict:
    """The checkpoint's meta, after checking every file its manifest lists: present, of the
    recorded size and (with `contents`) of the recorded sha256. Raises CheckpointError naming
    the first bad file and the previous good checkpoint."""
    checkpoint = Path(checkpoint)
    try:
        meta = _checked(checkpoint, contents)
    except _Problem as problem:
        raise CheckpointError(str(problem), hint=_previous_hint(checkpoint)) from None
    if not isinstance(meta.get("files"), dict):
        key = str(checkpoint.resolve())
        if key not in _warned_legacy:
            _warned_legacy.add(key)
            console.warn(f"{describe(checkpoint)} was written before checkpoint manifests: only "
                         "the presence of its weight files can be checked, not their content")
    return meta


def _checked(checkpoint: Path, contents: bool) -> dict:
    meta = _marker(checkpoint)
    files = meta.get("files")
    if not isinstance(files, dict):  # written before manifests: check what the marker implies
        for name in legacy_required_files(meta):
            if not (checkpoint / name).is_file():
                raise _damaged(checkpoint, f"{name} is missing")
        return meta
    signature = []
    for name, record in sorted(files.items()):
        try:
            stat = (checkpoint / name).stat()
        except FileNotFoundError:
            if not checkpoint.exists():
                raise _gone(checkpoint) from None
            raise _damaged(checkpoint, f"{name} is missing") from None
        if stat.st_size != record.get("bytes"):
            raise _damaged(checkpoint, f"{name} has {stat.st_size} bytes, its manifest says "
                                       f"{record.get('bytes')}")
        signature.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    key, signature = str(checkpoint.resolve()), tuple(signature)
    if contents and _verified.get(key) != signature:
        for name, record in sorted(files.items()):
            try:
                digest = file_sha256(checkpoint / name)
            except FileNotFoundError:
                raise (_gone(checkpoint) if not checkpoint.exists()
                       else _damaged(checkpoint, f"{name} is missing")) from None
            if digest != record.get("sha256"):
                raise _damaged(checkpoint, f"{name} is damaged (its content does not match the "
                                           "sha256 in the manifest)")
        _verified[key] = signature
    return meta


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def legacy_required_files(meta: dict) -> list[str]:
    """The weight files a checkpoint without a manifest must hold, from what its marker says."""
    if "lora" not in meta:
        return []
    return [ADAPTER_CONFIG, LORA_WEIGHTS] if meta["lora"] else [TRAINABLE_FILE]


def _damaged(checkpoint: Path, problem: str) -> _Problem:
    return _Problem(f"checkpoint {describe(checkpoint)} is incomplete or damaged: {problem}")


def previous_good_checkpoint(checkpoint: Path) -> Path | None:
    """The newest checkpoint of the same run before `checkpoint` whose files are all present
    with their recorded sizes."""
    run_dir = run_of_checkpoint(checkpoint)
    step = step_of_name(Path(checkpoint).name)
    if run_dir is None or step is None:
        return None
    for candidate in reversed(list_checkpoints(run_dir)):
        if (step_of_name(candidate.name) or 0) >= step:
            continue
        try:
            _checked(candidate, contents=False)
        except _Problem:
            continue
        return candidate
    return None


def _previous_hint(checkpoint: Path) -> str:
    if not Path(checkpoint).exists():
        return "use one that still exists: --checkpoint latest (`ditctl status` lists them)"
    previous = previous_good_checkpoint(checkpoint)
    if previous is None:
        return "no earlier good checkpoint of this run: start a new run with `ditctl train`"
    return (f"use the previous good checkpoint {previous.name} (--checkpoint {previous.name}; "
            f"to train on: `ditctl train --resume {previous}`)")
