"""What to export, decided before anything is loaded: which checkpoint, which kind, where to.

Kinds:
- "merged": a LoRA run with `--merge-lora`; the adapter is folded into the base DiT and a
  complete pipeline folder is written.
- "full":   a full fine-tune (no adapter); the fine-tuned DiT in a complete pipeline folder.
- "lora":   a LoRA run without `--merge-lora`; the adapter alone (PEFT folder or comfy file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..engine.loading import checkpoint_weights
from ..errors import ConfigError, ExportError
from ..runs import (ADAPTER_CONFIG, checkpoint_holds, holds_trained_base, checkpoint_step,
                    read_run_config, read_run_info, resolve_checkpoint, run_of_checkpoint,
                    verify_checkpoint)
from ..workspace import Workspace

_SHARD_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*[KMGT]B\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ExportPlan:
    checkpoint: Path
    run_dir: Path | None  # None for a checkpoint that does not sit in a run folder
    run_name: str
    step: int
    kind: str  # "merged" | "full" | "lora"
    format: str  # "pipeline" | "peft" | "comfy"
    dtype: str  # "fp32" | "fp16" | "bf16"
    name: str
    out_dir: Path
    model_path: Path
    family: str
    copy_encoders: bool
    verify: bool
    max_shard_size: str
    replace: bool
    weights: str = "raw"  # "ema" (the checkpoint's moving average) or "raw" (as last trained)


def plan_export(ws: Workspace, config: Config, *, run: str | None = None,
                checkpoint: str | Path | None = None, name: str | None = None,
                out: str | Path | None = None, force: bool = False,
                lora_only: bool | None = None) -> ExportPlan:
    """Resolve the checkpoint (latest of the latest run by default) and everything about the
    export; raises before any weight is loaded if the request cannot be honoured.

    `lora_only`: True when a LoRA-only format was asked for explicitly (an error for a full run),
    None to decide from the checkpoint.
    """
    settings = config.export
    checkpoint_dir = resolve_checkpoint(ws.runs_dir(config), checkpoint, run=run).resolve()
    meta = verify_checkpoint(checkpoint_dir)  # every file against its manifest, up front
    run_dir = run_of_checkpoint(checkpoint_dir)
    run_name = run_dir.name if run_dir else checkpoint_dir.name
    step = checkpoint_step(checkpoint_dir, meta)
    kind = _kind(checkpoint_dir, meta, run_name, settings.merge_lora, lora_only)
    if not _SHARD_SIZE.match(settings.max_shard_size):
        raise ConfigError(f"[export] max_shard_size = {settings.max_shard_size!r}: not a size",
                          hint='write a number and a unit, e.g. "5GB", "500MB" or "50KB"')

    if out is not None:
        out_dir = Path(out).expanduser().resolve()
        name = out_dir.name
    else:
        suffix = {"merged": "merged", "full": "full", "lora": "lora"}[kind]
        name = name or f"{run_name}-step{step}-{suffix}"
        if "/" in name or "\\" in name or name.startswith(".") or not name.strip():
            raise ExportError(f"export name {name!r} is not a plain folder name",
                              hint="use letters, digits, '-' and '_' (or --out PATH for a path)")
        out_dir = ws.exports_dir / name
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        raise ExportError(f"export {out_dir} already exists",
                          hint="pass --force to replace it, or choose another --name")

    model_path, family = _base_model(ws, config, run_dir)
    return ExportPlan(
        checkpoint=checkpoint_dir, run_dir=run_dir, run_name=run_name, step=step, kind=kind,
        format=settings.format if kind == "lora" else "pipeline", dtype=settings.dtype,
        name=name, out_dir=out_dir, model_path=model_path, family=family,
        copy_encoders=settings.copy_encoders, verify=settings.verify,
        max_shard_size=settings.max_shard_size.strip().upper(), replace=force,
        weights=checkpoint_weights(checkpoint_dir, settings.weights))


def _kind(checkpoint: Path, meta: dict, run_name: str, merge_lora: bool,
          lora_only: bool | None) -> str:
    """From what the checkpoint's manifest says it holds (its files were checked against it)."""
    has_lora = checkpoint_holds(checkpoint, meta, ADAPTER_CONFIG)
    has_base_weights = holds_trained_base(checkpoint, meta)
    if merge_lora and lora_only:
        raise ExportError("--merge-lora writes a full pipeline; --format chooses the layout of a "
                          "LoRA-only export: pick one",
                          hint="drop --format to merge, or drop --merge-lora for the adapter alone")
    if not has_lora:
        if lora_only:
            raise ExportError(f"run {run_name} is a full fine-tune: it has no LoRA adapter to "
                              "export on its own",
                              hint="drop --format: `ditctl export` writes the fine-tuned "
                                   "pipeline for full runs")
        return "full"
    if merge_lora:
        return "merged"
    if has_base_weights:
        raise ExportError(f"run {run_name} trained the base weights as well as the LoRA "
                          "(train_only_lora = false): the adapter alone would lose them",
                          hint="export it with --merge-lora")
    return "lora"


def _base_model(ws: Workspace, config: Config, run_dir: Path | None) -> tuple[Path, str]:
    """The base model the run trained on (run.json, then its config.toml), else the
    workspace's. The checkpoint's recorded base identity is checked when it is loaded."""
    info = read_run_info(run_dir)
    model = read_run_config(run_dir).get("model", {})
    family = info.get("family") or model.get("family") or config.model.family
    recorded = [ws.resolve(p) for p in (info.get("base_model"), model.get("pretrained_model_path"))
                if p]
    # a base model moved since training is found again through the workspace's config
    for path in recorded:
        if path.is_dir():
            return path, family
    return ws.model_path(config), family
