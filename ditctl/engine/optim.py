"""Optimiser and learning-rate schedule, and their state as safetensors + JSON (no pickles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..config import TrainConfig
from ..errors import ConfigError
from ..runs import CheckpointWriter
from ..tensorfile import write_safetensors


def build_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                  eps=train.adam_epsilon, weight_decay=train.weight_decay)
    if train.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
            raise ConfigError("use_8bit_adam needs bitsandbytes, which failed to import "
                              f"({exc})", hint="pip install bitsandbytes, or drop --use-8bit-adam")
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    """The schedule bound to the optimiser that is actually stepped (warm-up, then the curve)."""
    from diffusers.optimization import get_scheduler

    # diffusers' "constant" ignores num_warmup_steps; with a warm-up it is what users mean
    name = train.lr_scheduler
    if name == "constant" and train.num_warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer=optimizer,
                         num_warmup_steps=train.num_warmup_steps,
                         num_training_steps=max(total_steps, 1))


# --- state (de)serialisation ------------------------------------------------------------------

def _split_tensors(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference, collecting the tensors."""
    if isinstance(tree, torch.Tensor):
        key = prefix.rstrip(".")
        tensor = tree.detach().cpu().contiguous()
        for other_key, other in tensors.items():  # one copy of tensors shared between entries
            if other.data_ptr() == tensor.data_ptr() and other.shape == tensor.shape \
                    and other.dtype == tensor.dtype:
                return {"__tensor__": other_key}
        tensors[key] = tensor
        return {"__tensor__": key}
    if isinstance(tree, dict):
        return {"__dict__": [[k, _split_tensors(v, f"{prefix}{k}.", tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {"__list__": [_split_tensors(v, f"{prefix}{i}.", tensors) for i, v in enumerate(tree)],
                "tuple": isinstance(tree, tuple)}
    return tree


def _join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__dict__" in tree:
        return {k: _join_tensors(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, dict) and "__list__" in tree:
        items = [_join_tensors(v, tensors) for v in tree["__list__"]]
        return tuple(items) if tree["tuple"] else items
    return tree


def save_state(state: dict, files: CheckpointWriter, name: str) -> None:
    """Write a state dict (optimiser, RNG, ...) as NAME.safetensors + NAME.json into a
    checkpoint being written (both recorded in its manifest)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(state, "", tensors)
    with files.open(f"{name}.safetensors") as fh:
        write_safetensors(fh, tensors)
    files.write_json(f"{name}.json", skeleton)


def load_state(folder: Path, name: str) -> dict:
    tensors = load_file(folder / f"{name}.safetensors")
    return _join_tensors(json.loads((folder / f"{name}.json").read_text()), tensors)


def scheduler_state(scheduler) -> dict:
    """The schedule's position (its lambdas are rebuilt from the config, not stored)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
