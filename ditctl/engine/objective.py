"""The rectified-flow training objective: pure functions, no state.

z_t = (1 - t)·x0 + t·ε with t = 1 pure noise; every family's `predict` returns the velocity
x0 - ε (the contract in `models/base.py`: `flow_noisy`, `flow_target`), and the loss is the MSE
against it in fp32, averaged per sample (over the loss mask's weights when the sample has one),
times the sample's loss weight w(t), then averaged over the batch.

Timesteps ([train] timestep_sampling): "logit_normal" (the default: sigmoid of a normal draw, a
`uniform_timestep_fraction` of samples uniform instead), "uniform", "mode" or "cosmap" (the
SD3 paper's densities); then the time shift t' = αt / (1 + (α-1)t), α from the family's
resolution rule ([train] resolution_shift) or fixed ([train] timestep_shift). Loss weights
([train] loss_weighting): "none", "sigma_sqrt" (1/t²) or "cosmap" (2 / (π(1 - 2t + 2t²))).

Randomness is counter-based: every sample of every step gets its own generator, seeded from
(seed, epoch, batch index, position in the global batch, repeat). So a sample's noise does not
depend on how the batch is split across processes or accumulation steps, a resumed run draws
exactly what an uninterrupted run draws, and cached and on-the-fly training see the same noise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields, replace
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


TIMESTEP_SAMPLINGS = ("logit_normal", "uniform", "mode", "cosmap")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def mode_timesteps(u: torch.Tensor, scale: float) -> torch.Tensor:
    """The SD3 paper's mode sampling (Esser et al. 2024, eq. 20; diffusers'
    `compute_density_for_timestep_sampling("mode")`): t = 1 - u - s·(cos²(πu/2) - 1 + u) for
    u ~ U(0, 1). s = 0 is uniform; s > 0 favours the middle, s < 0 the ends."""
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def cosmap_timesteps(u: torch.Tensor) -> torch.Tensor:
    """The SD3 paper's CosMap density (eq. 21-22): t = 1 - 1 / (tan(πu/2) + 1), u ~ U(0, 1)."""
    return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)


def loss_weights(t: torch.Tensor, weighting: str) -> torch.Tensor | None:
    """Per-sample loss weights at timesteps `t` ([B], t = sigma), as diffusers'
    `compute_loss_weighting_for_sd3`: "sigma_sqrt" 1/t², "cosmap" 2 / (π(1 - 2t + 2t²));
    None for "none" (the loss is left as it is, not multiplied by ones)."""
    if weighting == "none":
        return None
    if weighting == "sigma_sqrt":
        return t.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * t.float() + 2 * t.float() ** 2))
    raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, not {weighting!r}")


@dataclass(frozen=True)
class TimestepDensity:
    """How training timesteps are drawn (the defaults are [train]'s): the density, its
    parameters, and a fixed shift (None: the family's resolution rule, when it is on)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    uniform_fraction: float = 0.1
    sampling: str = "logit_normal"
    mode_scale: float = 1.29
    fixed_shift: float | None = None

    def __post_init__(self) -> None:
        if self.sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, "
                             f"not {self.sampling!r}")

    @classmethod
    def from_config(cls, train: TrainConfig) -> "TimestepDensity":
        return cls(train.logit_normal_mean, train.logit_normal_std, train.uniform_timestep_fraction,
                   train.timestep_sampling, train.mode_scale, train.timestep_shift)

    def timestep(self, logit: torch.Tensor, uniform_t: torch.Tensor, use_uniform: torch.Tensor,
                 alpha: float) -> torch.Tensor:
        """t from one sample's draws (all of them are drawn whatever the density, so the
        choice changes t and nothing else: not the noise, not the dropped captions)."""
        if self.sampling == "logit_normal":  # the uniform fraction is not shifted
            return torch.where(use_uniform, uniform_t, shift_timesteps(torch.sigmoid(logit), alpha))
        if self.sampling == "uniform":
            return shift_timesteps(uniform_t, alpha)
        if self.sampling == "mode":
            return shift_timesteps(mode_timesteps(uniform_t, self.mode_scale), alpha)
        return shift_timesteps(cosmap_timesteps(uniform_t), alpha)


def shift_alpha(family: ModelFamily, latent_h: int, latent_w: int, resolution_shift: bool,
                fixed_shift: float | None = None) -> float:
    """The α of the time shift for latents of h x w: `fixed_shift` ([train] timestep_shift)
    when set, else the family's resolution rule when `resolution_shift`, else 1 (no shift).
    Training and validation both ask here."""
    if fixed_shift is not None:
        return float(fixed_shift)
    return family.resolution_shift(latent_h, latent_w) if resolution_shift else 1.0


@dataclass
class NoisedBatch:
    noisy: torch.Tensor  # [B, C, h, w] model input z_t
    t: torch.Tensor  # [B] timesteps in [0, 1]
    cond: Conditioning  # per sample; dropped-out captions replaced by the empty conditioning
    target: torch.Tensor  # [B, C, h, w] what the model should predict
    # [B] loss weights: w(t) ([train] loss_weighting) times each sample's dataset loss_weight;
    # None: 1
    weight: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [B, 1, h, w] loss mask in [0, 1]; None: everywhere 1

    def map(self, fn) -> "NoisedBatch":
        """The batch with `fn` applied to every tensor (moves, pinning)."""
        changes = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in changes.items():
            if isinstance(value, torch.Tensor):
                changes[name] = fn(value)
        changes["cond"] = self.cond.map(lambda _, t: fn(t))
        return replace(self, **changes)


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

    t = density.timestep(logit, uniform_t, use_uniform, alpha)
    if drop_caption:
        cond = unconditional if unconditional is not None else \
            family.empty_conditioning(1, like=cond)
    return flow_noisy(x0, noise, t), t, cond, flow_target(x0, noise)


def describe_objective(train: TrainConfig, masked_images: int = 0,
                       images: int = 0) -> dict[str, str]:
    """The objective's settings in words (the --dry-run plan): timesteps, loss weighting,
    loss masks."""
    density = {"logit_normal": f"logit-normal (mean {train.logit_normal_mean:g}, std "
                               f"{train.logit_normal_std:g}), "
                               f"{train.uniform_timestep_fraction:g} of them uniform",
               "uniform": "uniform", "mode": f"mode (scale {train.mode_scale:g})",
               "cosmap": "cosmap"}[train.timestep_sampling]
    shift = (f"shifted by a fixed {train.timestep_shift:g}" if train.timestep_shift is not None
             else "shifted by the family's resolution rule" if train.resolution_shift
             else "not shifted")
    out = {"timesteps": f"{density}, {shift}", "loss_weighting": train.loss_weighting}
    if masked_images:
        floor = (f", masked-out areas weigh {train.masked_loss_floor:g}"
                 if train.masked_loss_floor else "")
        out["loss_mask"] = f"{masked_images} of {images} images masked{floor}"
    return out


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
                 guidance: float | None = None, weighting: str = "none",
                 mask: torch.Tensor | None = None,
                 sample_weights: Sequence[float] | None = None) -> NoisedBatch:
    """Noise a batch: sample i uses generator `seeds[i]` (see `sample_seed`); dropped
    captions become `unconditional` (see `draw_sample`). `caption_dropout`: one rate, or one
    per sample (each dataset its own). `guidance`: the scale a guidance-distilled denoiser
    reads (`training_guidance`), None for others. `shift`: the family's resolution shift
    ([train] resolution_shift; `density.fixed_shift` wins). `weighting`: [train]
    loss_weighting (`loss_weights`); `mask`: the samples' loss masks [B, 1, h, w] on the
    latent grid, carried along for `per_sample_loss`. `sample_weights`: each sample's
    dataset loss_weight (None: all 1), multiplied into the weights."""
    dropouts = ([float(caption_dropout)] * len(seeds)
                if isinstance(caption_dropout, (int, float)) else list(caption_dropout))
    h, w = dist.mean.shape[-2:]
    alpha = shift_alpha(family, h, w, shift, density.fixed_shift)
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
    t = torch.cat(t)
    weight = loss_weights(t, weighting)
    if sample_weights is not None:
        per_dataset = torch.tensor(list(sample_weights), dtype=torch.float32)
        weight = per_dataset if weight is None else weight * per_dataset
    return NoisedBatch(torch.cat(noisy), t, cond, torch.cat(target), weight, mask)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] mean squared error of each sample, computed in fp32."""
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] squared error of each sample averaged with the weights of `mask` ([B, 1, h, w] in
    [0, 1], broadcast over the channels), in fp32: Σ m·(p - y)² / (C·Σ m). Where the mask is 0
    the error contributes nothing, gradient included; the result is on the same scale as the
    MSE whatever the mask's area (a sample masked out entirely has loss 0)."""
    diff = prediction.float() - target.float()
    weights = mask.float().expand_as(diff)
    total = (weights * diff.pow(2)).flatten(1).sum(dim=1)
    return total / weights.flatten(1).sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)


def per_sample_loss(prediction: torch.Tensor, batch: NoisedBatch,
                    mask_floor: float = 0.0) -> torch.Tensor:
    """[B] training loss of each sample: the MSE against `batch.target` (masked where the
    batch has masks: an area weighs floor + (1 - floor)·mask, [train] masked_loss_floor),
    times the loss weight w(t) where the batch has weights."""
    if batch.mask is None:
        loss = per_sample_mse(prediction, batch.target)
    else:
        mask = batch.mask.float()
        if mask_floor > 0:
            mask = mask_floor + (1 - mask_floor) * mask
        loss = masked_mse(prediction, batch.target, mask)
    return loss if batch.weight is None else loss * batch.weight.to(loss.device)
