"""What every family does the same way with a model folder and its VAE.

- reading a component's JSON config and building a module from it, a bad config reported as
  one line naming the file;
- writing a pipeline folder: the denoiser, model_index.json, and the base's other components
  hard-linked (else copied) or symlinked;
- the VAE side: diffusers' AutoencoderKL posterior, sampled with the caller's generator (so
  cached and on-the-fly training draw the same latent), then (z - shift) * scale with the
  folder's `shift_factor` / `scaling_factor`, and the inverse for decoding.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .base import LatentDist


def read_config(folder: Path, name: str = "config.json") -> dict:
    try:
        return json.loads((Path(folder) / name).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {Path(folder) / name}: {exc}",
                         hint="re-download or re-export the model folder") from None


def build_from_config(what: str, make: Any, config: Any, folder: Path) -> Any:
    """`make(config)` (on the meta device when the caller is), a bad config reported as one
    line naming the folder and `what` it should describe."""
    try:
        return make(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelError(f"{Path(folder) / 'config.json'} does not describe {what}: {exc}",
                         hint="re-download or re-export the model folder") from exc


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_pipeline_folder(denoiser: torch.nn.Module, out_dir: Path, *, denoiser_folder: str,
                          index: dict, base: Path, components: tuple[str, ...],
                          copy_encoders: bool, dtype: torch.dtype, max_shard_size: str) -> None:
    """A pipeline folder: the denoiser saved (in `dtype`, sharded) under `denoiser_folder`,
    `index` as model_index.json, and the base's other `components` hard-linked or copied (with
    `copy_encoders` False: symbolic links to the base's folders)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    denoiser.to(dtype).save_pretrained(out_dir / denoiser_folder, safe_serialization=True,
                                       max_shard_size=max_shard_size)
    # diffusers records where the weights came from (`_name_or_path`); an export must not
    # carry this machine's paths
    config_file = out_dir / denoiser_folder / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for component in components:
        source = (Path(base) / component).resolve()
        target = out_dir / component
        if copy_encoders:
            shutil.copytree(source, target, copy_function=link_or_copy)
        else:
            os.symlink(source, target, target_is_directory=True)


def vae_shift_scale(vae_config: dict) -> tuple[float, float]:
    """(shift, scale) of latents from a VAE config (no shift_factor: 0; no scaling_factor: 1)."""
    return (float(vae_config.get("shift_factor") or 0.0),
            float(vae_config.get("scaling_factor", 1.0)))


@torch.no_grad()
def encode_posterior(vae: Any, images: torch.Tensor) -> LatentDist:
    """images [B,3,H,W] in [-1,1] -> the posterior N(mean, std²), raw latent space, fp32."""
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return LatentDist(mean=posterior.mean.float(), std=posterior.std.float())


def sample_scaled(dist: LatentDist, generator: torch.Generator | None, shift: float,
                  scale: float) -> torch.Tensor:
    """z ~ N(mean, std²) drawn with the caller's RNG, then (z - shift) * scale."""
    eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32,
                      device=dist.mean.device)
    z = dist.mean + dist.std * eps
    return (z - shift) * scale


@torch.no_grad()
def decode_scaled(vae: Any, latents: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """Scaled latents -> images [B,3,H,W] in [-1,1], fp32."""
    z = latents.to(vae.device, vae.dtype) / scale + shift
    return vae.decode(z).sample.float().clamp(-1, 1)
