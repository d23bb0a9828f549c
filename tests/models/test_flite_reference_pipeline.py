"""`ditctl sample` draws what F-Lite's own pipeline draws from the same exported folder.

F-Lite's `FLitePipeline` (package `f_lite`) is not installable offline, so a faithful stand-in of
its sampling is written here from the format notes (docs/flite-format.md sections 3, 4 and 6),
without any of ditctl's encoding or sampling code: T5 tokens padded to 512 with no attention
mask, hidden_states[-8] + final layer norm, zero embeddings for the unconditional half, the
warped Euler grid, CFG only when the guidance scale exceeds 1, decoding with the VAE's scale
and shift. The DiT is ditctl's class, which `f_lite.model.DiT` loads as (its math is checked
against a hand-written reference in test_flite_dit.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditctl.config import build_config
from ditctl.models.flite_dit import DiT
from ditctl.models.registry import load_family
from ditctl.sampling import generate, initial_noise, plan_images
from ditctl.scaffold import shipped_tiny_model

PROMPT = "a red circle on a white background"
SIZE, STEPS, SEED = 64, 8, 3  # the shipped model's size: it draws real shapes there


@torch.no_grad()
def reference_flite_pipeline(folder, prompt: str, latents: torch.Tensor, *, steps: int,
                             guidance_scale: float, max_length: int = 512) -> np.ndarray:
    """FLitePipeline.__call__ as the format notes describe it; returns uint8 pixels [H, W, 3]."""
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel, T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(folder / "tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    dit = DiT.from_pretrained(folder / "dit_model").eval()

    ids = tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    states = text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-8]
    cond = text_encoder.encoder.final_layer_norm(states)
    uncond = torch.zeros_like(cond)

    h, w = latents.shape[-2:]
    alpha = 2 * math.sqrt(h * w / 4096)

    def warp(t: float) -> float:
        return alpha * t / (1 + (alpha - 1) * t)

    x = latents.clone()
    for i in range(steps, 0, -1):
        t, t_next = warp(i / steps), warp((i - 1) / steps)
        if guidance_scale > 1:
            v_u, v_c = dit(torch.cat([x, x]), torch.cat([uncond, cond]),
                           torch.full((2,), t)).chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        else:
            v = dit(x, cond, torch.full((1,), t))
        x = x + (t - t_next) * v
    image = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An exported pipeline folder (fp32, encoders copied) of the shipped trained tiny model."""
    family = load_family(shipped_tiny_model())
    folder = tmp_path_factory.mktemp("export") / "flite"
    family.save_pipeline(family.load_denoiser(), folder, copy_encoders=True, dtype=torch.float32,
                         max_shard_size="5GB")
    return folder


def _ditctl_image(folder, guidance_scale: float) -> np.ndarray:
    family = load_family(folder)
    settings = build_config({"sample": {"steps": STEPS, "guidance_scale": guidance_scale,
                                        "seed": SEED}}).sample
    image, = generate(family, family.load_denoiser(), family.load_vae(), [PROMPT], settings,
                      width=SIZE, height=SIZE, text_encoder=family.load_text_encoder(),
                      show_progress=False)
    return np.asarray(image)


def _noise(folder) -> torch.Tensor:
    family = load_family(folder)
    seed = plan_images(1, 1, SEED)[0].seed  # the noise `ditctl sample` starts image 0 from
    return initial_noise(seed, family.latent.latent_shape(SIZE, SIZE)).unsqueeze(0)


@pytest.mark.parametrize("guidance_scale", [3.0, 0.5])
def test_ditctl_sample_matches_the_reference_pipeline(export, guidance_scale):
    ours = _ditctl_image(export, guidance_scale).astype(int)
    reference = reference_flite_pipeline(export, PROMPT, _noise(export), steps=STEPS,
                                         guidance_scale=guidance_scale).astype(int)
    assert ours.shape == reference.shape == (SIZE, SIZE, 3)
    # measured: identical (max difference 0/255); 1 leaves room for float summation order
    assert np.abs(ours - reference).max() <= 1


def test_the_text_length_is_what_makes_the_difference(export):
    """The check can fail: the same reference pipeline fed 32-token prompts (what ditctl used to
    encode with the tiny tokenizer's model_max_length) draws another image."""
    ours = _ditctl_image(export, 3.0).astype(int)
    short = reference_flite_pipeline(export, PROMPT, _noise(export), steps=STEPS,
                                     guidance_scale=3.0, max_length=32).astype(int)
    assert np.abs(ours - short).max() > 32
