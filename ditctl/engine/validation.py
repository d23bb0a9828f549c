"""Validation loss: the number to compare checkpoints by.

The training loss at fixed timesteps with fixed noise, so two checkpoints (or two runs) see
exactly the same inputs and only the weights differ. Pure: a denoiser, rows and a sample source
in, numbers out; `ditctl eval` and the evaluation during training both call it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..console import console
from ..data.manifest import ManifestRow
from ..errors import DataError
from ..models.base import (Conditioning, LatentDist, ModelFamily, flow_noisy, flow_target,
                           with_guidance)
from .inference import inference_context, param_dtype
from .objective import per_sample_mse, sample_seed, shift_alpha, shift_timesteps

VALIDATION_SEED = 0  # fixed, so that every run and checkpoint is measured on the same noise


class MaterializedSource:
    """A source's inputs for a few rows, read once and kept in memory (CPU, fp32), so that
    several checkpoints are evaluated without encoding the images again."""

    def __init__(self, source: Any, rows: Sequence[ManifestRow]):
        self._dists: dict[ManifestRow, LatentDist] = {}
        self._conds: dict[str, Conditioning] = {}
        for row in console.track(rows, "reading validation images", total=len(rows), unit="img"):
            dist = source.latent_dist(row, False)
            self._dists[row] = LatentDist(dist.mean.detach().float().cpu(),
                                          dist.std.detach().float().cpu())
            if row.caption not in self._conds:
                self._conds[row.caption] = source.conditioning(row.caption).detach().float().cpu()

    def latent_dist(self, row: ManifestRow, flip: bool = False) -> LatentDist:
        if flip:
            raise ValueError("validation inputs are never flipped")
        return self._dists[row]

    def conditioning(self, caption: str) -> Conditioning:
        return self._conds[caption]


def validation_generator(seed: int, index: int) -> torch.Generator:
    """The generator of validation sample `index`: its posterior eps, then one noise per quantile."""
    return torch.Generator().manual_seed(sample_seed(seed, index))


def validation_loss(family: ModelFamily, denoiser: torch.nn.Module, rows: Sequence[ManifestRow],
                    source: Any, quantiles: Sequence[float], seed: int = VALIDATION_SEED,
                    batch_size: int = 1, *, resolution_shift: bool = True,
                    fixed_shift: float | None = None,
                    guidance: float | None = None) -> dict[str, Any]:
    """The training loss at fixed timesteps, with fixed noise.

    Sample i draws, from `validation_generator(seed, i)`, its posterior eps (x0 =
    family.sample_latents) and then one noise tensor per quantile in order; the timestep of
    quantile q is q warped by the time shift as in training (`objective.shift_alpha`: the
    fixed [train] timestep_shift, else the family's rule when `resolution_shift`); the loss is
    the plain MSE (no loss mask or weighting, so validation losses compare across settings);
    a guidance-distilled denoiser reads `guidance` (`objective.training_guidance`).
    Loss = MSE(prediction, flow_target(x0, noise)) per sample (fp32), averaged per
    quantile; "overall" is the mean over quantiles. Returns {"per_quantile": {q: loss},
    "overall": loss, "n": samples}, and "per_dataset" ({dataset index: overall loss of its
    images}) when the rows come from several datasets.
    """
    if not rows:
        raise DataError("validation loss needs at least one image", hint="add validation data")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = next(denoiser.parameters()).device, param_dtype(denoiser)
    losses: dict[float, list[torch.Tensor]] = {float(q): [] for q in quantiles}
    inputs = [_validation_inputs(family, source, row, seed, i, len(quantiles))
              for i, row in enumerate(rows)]
    groups: dict[tuple, list[int]] = {}  # one latent shape per forward
    for i, (x0, _, _) in enumerate(inputs):
        groups.setdefault(tuple(x0.shape), []).append(i)

    order: list[int] = []  # the samples in the order their losses are appended
    with inference_context(denoiser):
        for shape, members in groups.items():
            alpha = shift_alpha(family, shape[-2], shape[-1], resolution_shift, fixed_shift)
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                order += chunk
                x0 = torch.cat([inputs[i][0] for i in chunk])
                cond = Conditioning.cat([inputs[i][2] for i in chunk])
                if guidance is not None:
                    cond = with_guidance(cond, guidance)
                for j, q in enumerate(losses):
                    noise = torch.cat([inputs[i][1][j] for i in chunk])
                    t = shift_timesteps(torch.full((len(chunk),), q, dtype=torch.float32), alpha)
                    noisy = flow_noisy(x0, noise, t)
                    prediction = family.predict(denoiser, noisy.to(device, dtype), t.to(device),
                                                cond.to(device, dtype))
                    target = flow_target(x0, noise).to(device)
                    losses[q].append(per_sample_mse(prediction, target).cpu())
    per_quantile = {q: float(torch.cat(values).mean()) for q, values in losses.items()}
    out = {"per_quantile": per_quantile,
           "overall": sum(per_quantile.values()) / len(per_quantile), "n": len(rows)}
    datasets = [rows[i].dataset for i in order]
    if len(set(datasets)) > 1:
        per_sample = torch.stack([torch.cat(v) for v in losses.values()], dim=1).mean(dim=1)
        out["per_dataset"] = {d: float(per_sample[[k for k, e in enumerate(datasets) if e == d]]
                                       .mean()) for d in sorted(set(datasets))}
    return out


def _validation_inputs(family: ModelFamily, source: Any, row: ManifestRow, seed: int, index: int,
                       n_quantiles: int) -> tuple[torch.Tensor, list[torch.Tensor], Conditioning]:
    """(x0 [1,C,h,w], one noise per quantile, conditioning) of one validation sample (CPU)."""
    dist = source.latent_dist(row, False)
    dist = LatentDist(dist.mean.float().cpu(), dist.std.float().cpu())
    generator = validation_generator(seed, index)
    x0 = family.sample_latents(dist, generator)
    noises = [torch.randn(x0.shape, generator=generator, dtype=torch.float32)
              for _ in range(n_quantiles)]
    return x0, noises, source.conditioning(row.caption).float().cpu()
