"""The ModelFamily protocol: everything model-specific, behind one interface.

The engine, the sampler, precompute and export only talk to a `ModelFamily`; they never ask
which model it is. A family knows how to read its folder layout, encode prompts and images,
predict with its denoiser, what its training target is, and how to write its native layout.
Adding a DiT family (SD3, Flux, Sana, ...) means writing one module that implements this and
registering it in `registry.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class LatentDist:
    """A VAE posterior N(mean, std²) per image, in the VAE's raw (unscaled) latent space.

    Stored by precompute instead of a sample, so that cached and on-the-fly training draw the
    same latent from the same training RNG.
    """

    mean: torch.Tensor  # [B, C, h, w]
    std: torch.Tensor  # [B, C, h, w]


@dataclass(frozen=True)
class SamplingDefaults:
    steps: int
    guidance_scale: float
    resolution: int


@runtime_checkable
class ModelFamily(Protocol):
    """One model family, bound to one model folder."""

    name: str
    path: Path
    lora_targets: tuple[str, ...]  # default LoRA target module names
    lora_target_candidates: tuple[str, ...]  # every module name LoRA may target
    sampling_defaults: SamplingDefaults

    # --- loading (each component on its own, so training from a cache loads only the DiT) ---
    # Each streams its weights straight into `dtype` on `device` (never a full-precision copy);
    # `convert(name, module)` sees every denoiser module once its weights are in (quantization).
    def load_denoiser(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      convert: Any = None) -> torch.nn.Module: ...
    def build_denoiser_skeleton(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module: ...
    def load_text_encoder(self, dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu") -> Any: ...
    def load_vae(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Any: ...

    def text_tokens(self) -> int: ...  # text states per prompt the denoiser attends to

    # --- identities: change exactly when the component's output could change ---
    def text_encoder_identity(self) -> str: ...
    def vae_identity(self) -> str: ...
    def denoiser_identity(self) -> str: ...

    # --- encoding ---
    def encode_prompts(self, text_encoder: Any, prompts: list[str]) -> torch.Tensor: ...
    def empty_prompt_embedding(self, batch: int, like: torch.Tensor | None = None) -> torch.Tensor: ...
    def encode_images(self, vae: Any, images: torch.Tensor) -> LatentDist: ...
    def sample_latents(self, dist: LatentDist, generator: torch.Generator | None) -> torch.Tensor: ...
    def decode_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor: ...

    # --- the denoiser's contract ---
    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor,
                cond: torch.Tensor) -> torch.Tensor: ...
    def noisy_latents(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def training_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...
    def resolution_shift(self, latent_h: int, latent_w: int) -> float: ...

    # --- writing the native layout ---
    def save_pipeline(self, denoiser: torch.nn.Module, out_dir: Path, *, copy_encoders: bool,
                      dtype: torch.dtype, max_shard_size: str) -> None: ...
