"""Checkpoints: everything needed to continue a run exactly, as safetensors + JSON.

```
runs/<run>/checkpoints/step-000100/
  lora.safetensors, adapter_config.json   LoRA weights in PEFT format (LoRA runs)
  trainable.safetensors                   other trained weights (full fine-tuning)
  optimizer.safetensors/.json             optimiser state
  scheduler.json                          learning-rate schedule position
  rng.safetensors/.json                   python, numpy and torch RNG states
  checkpoint.json                         step, data position, fingerprints, smoothed loss
                                          (the completeness marker)
```
A checkpoint is built in a temporary folder and renamed into place, so a killed save leaves the
previous checkpoints intact and `latest` never picks a torn one. Old checkpoints are pruned only
after the new one is complete. Frozen base weights are never saved.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import CheckpointError
from ..fsutil import atomic_dir, check_free_space
from ..status import CHECKPOINT_MARKER, list_checkpoints
from .loading import TRAINABLE_FILE, read_checkpoint_meta
from .lora import adapter_config_dict, has_lora, load_adapter_weights, peft_state_dict
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
            if p.requires_grad and "lora_" not in name}


def save_checkpoint(run_dir: Path, position: Position, denoiser: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, meta: dict,
                    keep: int | None = None) -> Path:
    """Write a complete checkpoint for `position.step`; prune to `keep` afterwards."""
    folder = Path(run_dir) / "checkpoints" / f"step-{position.step:06d}"
    weights = sum(p.numel() * 4 for p in denoiser.parameters() if p.requires_grad)
    check_free_space(folder.parent, weights * 4, f"checkpoint {folder.name}")
    with atomic_dir(folder, replace=True) as tmp:
        if has_lora(denoiser):
            save_file(peft_state_dict(denoiser), tmp / "lora.safetensors")
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config_dict(denoiser), indent=2))
        base = _trainable_base(denoiser)
        if base:
            save_file(base, tmp / TRAINABLE_FILE)
        save_state(optimizer.state_dict(), tmp, "optimizer")
        (tmp / "scheduler.json").write_text(json.dumps(scheduler_state(scheduler)))
        save_state(rng_state(), tmp, "rng")
        marker = {**meta, **asdict(position), "ditctl_version": __version__}
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path, denoiser: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> tuple[Position, dict]:
    """Restore weights, optimiser, schedule and RNG from a checkpoint into a prepared run."""
    meta = read_checkpoint_meta(folder)
    try:
        if (folder / "lora.safetensors").is_file():
            load_adapter_weights(denoiser, folder)
        if (folder / TRAINABLE_FILE).is_file():
            own = dict(denoiser.named_parameters())
            with torch.no_grad():
                for name, value in load_file(folder / TRAINABLE_FILE).items():
                    own[name].copy_(value)
        optimizer.load_state_dict(load_state(folder, "optimizer"))
        state = json.loads((folder / "scheduler.json").read_text())
        scheduler.load_state_dict({**scheduler.state_dict(), **state})
        restore_rng(load_state(folder, "rng"))
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot resume from {folder}: {exc}",
                              hint="resume from another checkpoint, or start a new run") from exc
    return Position(meta["step"], meta["epoch"], meta["batch_index"]), meta
