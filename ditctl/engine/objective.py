"""The rectified-flow training objective: pure functions, no state.

z_t = (1 - t)·x0 + t·ε with t = 1 pure noise; every family's `predict` returns the velocity
x0 - ε (the contract in `models/base.py`: `flow_noisy`, `flow_target`), and the loss is the MSE
against it in fp32, averaged per sample, then over the batch.

Randomness is counter-based: every sample of every step gets its own generator, seeded from
(seed, epoch, batch index, position in the global batch, repeat). So a sample's noise does not
depend on how the batch is split across processes or accumulation steps, a resumed run draws
exactly what an uninterrupted run draws, and cached and on-the-fly training see the same noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import TrainConfig
from ..models.base import (Conditioning, LatentDist, ModelFamily, flow_noisy, flow_target,
                           with_guidance)


def shift_timesteps(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Resolution shift t' = α·t / (1 + (α - 1)·t): α > 1 moves timesteps towards noise."""
    return alpha * t / (1 + (alpha - 1) * t)


def sample_seed(seed: int, *counters: int) -> int:
    """A 63-bit seed for one sample, from the run seed and its position counters."""
    digest = hashlib.blake2b(":".join(map(str, (seed, *counters))).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class TimestepDensity:
    """Logit-normal timesteps, a uniform fraction, and the resolution shift (the defaults are
    [train]'s)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    uniform_fraction: float = 0.1

    @classmethod
    def from_config(cls, train: TrainConfig) -> "TimestepDensity":
        return cls(train.logit_normal_mean, train.logit_normal_std, train.uniform_timestep_fraction)


@dataclass
class NoisedBatch:
    noisy: torch.Tensor  # [B, C, h, w] model input z_t
    t: torch.Tensor  # [B] timesteps in [0, 1]
    cond: Conditioning  # per sample; dropped-out captions replaced by the empty conditioning
    target: torch.Tensor  # [B, C, h, w] what the model should predict
    weight: torch.Tensor | None = None  # [B] per-sample loss weights (None: all 1)


def draw_sample(family: ModelFamily, dist: LatentDist, cond: Conditioning,
                generator: torch.Generator, density: TimestepDensity, alpha: float,
                caption_dropout: float, unconditional: Conditioning | None = None):
    """Everything random about one training sample, drawn from its own generator in a fixed
    order: posterior ε, diffusion noise, logit-normal draw, uniform draw, uniform switch,
    caption dropout. A dropped caption becomes `unconditional` (the encoding of the family's
    unconditional prompt), or without one the family's empty conditioning. Returns
    (noisy, t, cond, target) for a batch of one."""
    x0 = family.sample_latents(dist, generator)  # [1, C, h, w]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    logit = torch.randn(1, generator=generator) * density.logit_std + density.logit_mean
    uniform_t = torch.rand(1, generator=generator)
    use_uniform = torch.rand(1, generator=generator) < density.uniform_fraction
    drop_caption = torch.rand(1, generator=generator) < caption_dropout

    t = torch.where(use_uniform, uniform_t, shift_timesteps(torch.sigmoid(logit), alpha))
    if drop_caption:
        cond = unconditional if unconditional is not None else \
            family.empty_conditioning(1, like=cond)
    return flow_noisy(x0, noise, t), t, cond, flow_target(x0, noise)


def training_guidance(family: ModelFamily, train: TrainConfig) -> float | None:
    """The guidance scale a guidance-distilled denoiser reads in training ([train]
    embedded_guidance, else the family's default); None for a family without that input."""
    if family.embedded_guidance is None:
        return None
    return float(train.embedded_guidance if train.embedded_guidance is not None
                 else family.embedded_guidance)


def noised_batch(family: ModelFamily, dist: LatentDist, cond: Conditioning, seeds: list[int],
                 density: TimestepDensity, caption_dropout: float | Sequence[float], shift: bool,
                 unconditional: Conditioning | None = None,
                 guidance: float | None = None,
                 loss_weights: Sequence[float] | None = None) -> NoisedBatch:
    """Noise a batch: sample i uses generator `seeds[i]` (see `sample_seed`); dropped
    captions become `unconditional` (see `draw_sample`). `caption_dropout`: one rate, or one
    per sample (each dataset its own). `guidance`: the scale a guidance-distilled denoiser
    reads (`training_guidance`), None for others. `loss_weights`: per sample (None: all 1)."""
    dropouts = ([float(caption_dropout)] * len(seeds)
                if isinstance(caption_dropout, (int, float)) else list(caption_dropout))
    h, w = dist.mean.shape[-2:]
    alpha = family.resolution_shift(h, w) if shift else 1.0
    parts = []
    for i, seed in enumerate(seeds):
        one = LatentDist(dist.mean[i:i + 1], dist.std[i:i + 1])
        generator = torch.Generator().manual_seed(seed)
        parts.append(draw_sample(family, one, cond.rows(i), generator, density, alpha,
                                 dropouts[i], unconditional))
    noisy, t, conds, target = zip(*parts)
    cond = Conditioning.cat(conds)
    if guidance is not None:
        cond = with_guidance(cond, guidance)
    weight = None if loss_weights is None else torch.tensor(list(loss_weights),
                                                            dtype=torch.float32)
    return NoisedBatch(torch.cat(noisy), torch.cat(t), cond, torch.cat(target), weight)


def weighted_loss(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The batch loss: the mean of the per-sample losses, each times its weight (regularization
    images' loss_weight), or the plain mean without weights (bit-identical to before)."""
    if weight is None:
        return per_sample.mean()
    return (per_sample * weight.to(per_sample.device)).mean()


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] mean squared error of each sample, computed in fp32."""
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)
