"""An exponential moving average (EMA) of the trained weights, kept in fp32.

Only what trains is averaged (LoRA adapters, or every weight of a full fine-tune): the frozen
base is the same in both. After optimiser step s, when s is a multiple of `[train] ema_every`,

    ema <- ema + (1 - d) * (weight - ema)        (torch.lerp: ema * d + weight * (1 - d))

with d = ema_decay, or with `ema_warmup` d = min(ema_decay, (1 + n) / (10 + n)) where n is the
number of EMA updates before this one (n = s // ema_every - 1) — the warm-up rule of
TensorFlow's ExponentialMovingAverage(num_updates) and diffusers' EMAModel. The EMA starts
equal to the weights training starts from. A step skipped for a non-finite loss changes no
weight and is not averaged in; n still counts from the step, so a resume continues exactly.

Why not torch.optim.swa_utils.AveragedModel: it deep-copies the whole module (with a frozen
base that doubles the base's memory) and its decay is a constant; this keeps only the trained
tensors, on the accelerator or in host memory (`ema_on_cpu`), and n derives from the step, so
nothing but the tensors needs saving. Every process of a DDP run holds the same weights after
each step, so every process computes the same EMA; the main process saves it. FSDP runs are
refused by the config (their weights are sharded).

The EMA is saved as `ema.safetensors` in each checkpoint, keyed by parameter name (the names
of the denoiser as built, so `engine.loading` can put it in place of the raw trained weights).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from ..config import TrainConfig
from ..errors import CheckpointError

EMA_WEIGHTS = "ema.safetensors"
WEIGHT_CHOICES = ("auto", "ema", "raw")


def ema_decay_at(decay: float, warmup: bool, update_index: int) -> float:
    """The decay of EMA update number `update_index` (0 for the first)."""
    if not warmup:
        return decay
    return min(decay, (1 + update_index) / (10 + update_index))


def ema_settings(train: TrainConfig) -> dict:
    """What a checkpoint records about its EMA (the model card and `status` read it)."""
    return {"decay": train.ema_decay, "warmup": train.ema_warmup, "every": train.ema_every}


class EmaWeights:
    """The fp32 EMA of a denoiser's trainable parameters."""

    def __init__(self, denoiser: torch.nn.Module, train: TrainConfig):
        self.decay, self.warmup, self.every = train.ema_decay, train.ema_warmup, train.ema_every
        self.params = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
        device = "cpu" if train.ema_on_cpu else None
        with torch.no_grad():
            self.shadow = {name: p.detach().to(device=device or p.device, dtype=torch.float32,
                                               copy=True)
                           for name, p in self.params.items()}

    def update(self, step: int) -> bool:
        """Average in the weights after optimiser step `step`, if it is an EMA step."""
        if step % self.every:
            return False
        weight = 1.0 - ema_decay_at(self.decay, self.warmup, step // self.every - 1)
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                shadow.lerp_(self.params[name].detach().to(shadow.device, torch.float32), weight)
        return True

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA in place of the trained weights for the block (validation during training);
        the trained weights are put back bit for bit afterwards, so training is unchanged."""
        with torch.no_grad():
            raw = {name: p.detach().clone() for name, p in self.params.items()}
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(raw[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}

    def load(self, folder: Path) -> None:
        """Restore the EMA saved in a checkpoint (every tensor, with its exact bits)."""
        path = Path(folder) / EMA_WEIGHTS
        if not path.is_file():
            raise CheckpointError(f"{folder} holds no {EMA_WEIGHTS}, but this run keeps an EMA "
                                  "([train] ema_decay > 0)",
                                  hint="resume with ema_decay = 0 as the run was trained "
                                       "(--force), or start a new run")
        saved = load_file(path)
        if set(saved) != set(self.shadow):
            raise CheckpointError(f"{path} averages other weights than this run trains",
                                  hint="resume with the settings the run was trained with")
        with torch.no_grad():
            for name, value in saved.items():
                self.shadow[name].copy_(value)


def ema_bytes(denoiser: torch.nn.Module) -> int:
    """Memory of the EMA copy of `denoiser`'s trainable weights (fp32)."""
    return sum(p.numel() * 4 for p in denoiser.parameters() if p.requires_grad)


def apply_ema_weights(denoiser: torch.nn.Module, checkpoint: Path) -> None:
    """Put a checkpoint's EMA in place of the trained weights already loaded into `denoiser`."""
    path = Path(checkpoint) / EMA_WEIGHTS
    own = dict(denoiser.named_parameters())
    state = load_file(path)
    unknown = [k for k in state if k not in own]
    if unknown:
        raise CheckpointError(f"{path} has weights this model lacks: {unknown[:3]}",
                              hint="it was trained on another model configuration")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)
