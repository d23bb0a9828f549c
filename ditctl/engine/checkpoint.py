"""Checkpoints: everything needed to continue a run exactly, as safetensors + JSON.

What a checkpoint folder holds, and how it is found and checked, is `ditctl.runs`. A checkpoint
is built in a temporary folder, every file hashed while it is written, `checkpoint.json` (with
the manifest and the monitor's smoothed loss) last, and the folder renamed into place: a killed save leaves the previous
checkpoints intact and `latest` never picks a torn one. Old checkpoints are pruned only after
the new one is complete. Frozen base weights are never saved.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .. import __version__
from ..errors import CheckpointError
from ..fsutil import atomic_dir, check_free_space
from ..runs import (ADAPTER_CONFIG, LORA_WEIGHTS, OPTIMIZER_STATE, RNG_STATE, SCHEDULER_STATE,
                    TRAINABLE_FILE, CheckpointWriter, checkpoint_dir, checkpoint_holds, is_sharded,
                    list_checkpoints, remove_checkpoint, verify_checkpoint)
from ..tensorfile import write_safetensors
from .ema import EMA_WEIGHTS, EmaWeights
from .lora import (adapter_config_dict, has_lora, is_adapter_param, load_adapter_weights,
                   peft_state_dict)
from .optim import load_state, save_state, scheduler_state


@dataclass(frozen=True)
class Position:
    """Where training stands: optimiser steps done, and the next batch to read."""

    step: int
    epoch: int
    batch_index: int


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached": cached},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_base(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in denoiser.named_parameters()
            if p.requires_grad and not is_adapter_param(name)}


def save_checkpoint(run_dir: Path, position: Position, denoiser: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, meta: dict,
                    keep: int | None = None, ema: EmaWeights | None = None) -> Path:
    """Write a complete checkpoint for `position.step` (with the EMA of the trained weights
    when the run keeps one); prune to `keep` afterwards."""
    folder = checkpoint_dir(run_dir, position.step)
    weights = sum(p.numel() * 4 for p in denoiser.parameters() if p.requires_grad)
    check_free_space(folder.parent, weights * (5 if ema else 4), f"checkpoint {folder.name}")
    with atomic_dir(folder, replace=True) as tmp:
        files = CheckpointWriter(tmp)
        if has_lora(denoiser):
            with files.open(LORA_WEIGHTS) as fh:
                write_safetensors(fh, peft_state_dict(denoiser))
            files.write_json(ADAPTER_CONFIG, adapter_config_dict(denoiser), indent=2)
        base = _trainable_base(denoiser)
        if base:
            with files.open(TRAINABLE_FILE) as fh:
                write_safetensors(fh, base)
        if ema is not None:
            with files.open(EMA_WEIGHTS) as fh:
                write_safetensors(fh, ema.state_dict())
        save_state(optimizer.state_dict(), files, OPTIMIZER_STATE)
        files.write_json(SCHEDULER_STATE, scheduler_state(scheduler))
        save_state(rng_state(), files, RNG_STATE)
        files.finish({**meta, **asdict(position), "ditctl_version": __version__})
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            remove_checkpoint(old)  # vanishes whole: a reader is told it was removed
    return folder


def load_checkpoint(folder: Path, denoiser: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, ema: EmaWeights | None = None) -> tuple[Position, dict]:
    """Restore weights, optimiser, schedule, RNG (and the EMA, when the run keeps one) from a
    checkpoint into a prepared run, after checking its files against its manifest."""
    meta = verify_checkpoint(folder)
    if is_sharded(meta):
        raise CheckpointError(f"{folder} was written by a [distributed] strategy = 'fsdp' run "
                              "(sharded); this run holds the whole model (ddp)",
                              hint="resume it with --strategy fsdp (any number of processes)")
    if has_lora(denoiser) and not checkpoint_holds(folder, meta, LORA_WEIGHTS):
        raise CheckpointError(f"{folder} holds no LoRA weights, but this run trains LoRA",
                              hint="resume with the settings the run was trained with")
    try:
        if checkpoint_holds(folder, meta, LORA_WEIGHTS):
            load_adapter_weights(denoiser, folder)
        if checkpoint_holds(folder, meta, TRAINABLE_FILE):
            own = dict(denoiser.named_parameters())
            with torch.no_grad():
                for name, value in load_file(folder / TRAINABLE_FILE).items():
                    own[name].copy_(value)
        optimizer.load_state_dict(load_state(folder, OPTIMIZER_STATE))
        state = json.loads((folder / SCHEDULER_STATE).read_text())
        scheduler.load_state_dict({**scheduler.state_dict(), **state})
        restore_rng(load_state(folder, RNG_STATE))
        if ema is not None:
            ema.load(folder)
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot resume from {folder}: {exc}",
                              hint="resume from another checkpoint, or start a new run") from exc
    return Position(meta["step"], meta["epoch"], meta["batch_index"]), meta
