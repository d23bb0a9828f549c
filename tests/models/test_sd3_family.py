"""The SD3/SD3.5 family agrees with diffusers' own `StableDiffusion3Pipeline` on its tiny model.

The conformance suite (test_family_conformance.py) checks the ModelFamily contract; this file
checks that what ditctl computes is what the pipeline computes from the same folder: prompt
encoding (both CLIPs, T5, pooled, the "" negative), the sampling grid and images, the folder
without T5, and the diffusers-format LoRA export loaded with `load_lora_weights`.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ditctl.config import build_config
from ditctl.models.registry import build_tiny, load_family
from ditctl.sampling import generate, initial_noise, plan_images, time_grid

PROMPT = "a red circle on a white background"
SIZE, STEPS, SEED, GUIDANCE = 64, 6, 3, 4.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny("sd3", tmp_path_factory.mktemp("sd3") / "model")


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny).to(torch.float32)


def ditctl_image(folder, *, steps=STEPS, guidance=GUIDANCE, size=SIZE) -> np.ndarray:
    family = load_family(folder)
    settings = build_config({"sample": {"steps": steps, "guidance_scale": guidance,
                                        "seed": SEED}}).sample
    image, = generate(family, family.load_denoiser(), family.load_vae(), [PROMPT], settings,
                      width=size, height=size, text_encoder=family.load_text_encoder(),
                      show_progress=False)
    return np.asarray(image).astype(int)


@torch.no_grad()
def pipeline_image(pipe, folder, *, steps=STEPS, guidance=GUIDANCE, size=SIZE) -> np.ndarray:
    """diffusers' pipeline from the noise `ditctl sample` starts image 0 of prompt 0 from."""
    family = load_family(folder)
    noise = initial_noise(plan_images(1, 1, SEED)[0].seed,
                          family.latent.latent_shape(size, size)).unsqueeze(0)
    out = pipe(PROMPT, height=size, width=size, num_inference_steps=steps,
               guidance_scale=guidance, latents=noise, output_type="np")
    return (out.images[0] * 255).round().astype(int)


def test_prompts_encode_as_the_pipeline_encodes_them(tiny, pipe):
    family = load_family(tiny)
    encoder = family.load_text_encoder()
    cond = family.encode_prompts(encoder, [PROMPT, "a blue star"])
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            [PROMPT, "a blue star"], None, None, do_classifier_free_guidance=True)
    # measured: equal, or up to 1e-5 apart between runs (CPU GEMM kernels under load)
    torch.testing.assert_close(cond.sequence, embeds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert cond.mask is None and cond.sequence.shape[1] == 77 + 256
    # the unconditional input is the encoding of "" (the pipeline's negative), not zeros
    empty = family.encode_prompts(encoder, [family.unconditional_prompt])
    torch.testing.assert_close(empty.sequence[0], negative[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(empty.pooled[0], negative_pooled[0], rtol=1e-5, atol=1e-5)
    assert empty.pooled.abs().sum() > 0


def test_the_sampling_grid_is_the_schedulers(tiny, pipe):
    family = load_family(tiny)
    h = family.latent.latent_shape(SIZE, SIZE)[1]
    grid = time_grid(STEPS, family.resolution_shift(h, h), family.sampling_defaults.grid_end)
    pipe.scheduler.set_timesteps(STEPS)
    torch.testing.assert_close(grid.float(), pipe.scheduler.sigmas.float(), rtol=0, atol=1e-6)


def test_a_dynamic_shift_config_gives_the_pipelines_grid(tiny, tmp_path):
    """With `use_dynamic_shifting` the shift depends on the image's token count as in
    StableDiffusion3Pipeline (mu = calculate_shift(...), sigmas shifted by exp(mu))."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    folder = tmp_path / "dynamic"
    shutil.copytree(tiny, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.16)
    config_file.write_text(json.dumps(config))
    family = load_family(folder)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    for side in (8, 32):  # latent pixels: 16 and 256 tokens
        tokens = (side // 2) ** 2
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.16)
        scheduler.set_timesteps(STEPS, mu=mu)
        grid = time_grid(STEPS, family.resolution_shift(side, side),
                         family.sampling_defaults.grid_end)
        torch.testing.assert_close(grid.float(), scheduler.sigmas.float(), rtol=0, atol=1e-6)


def test_ditctl_sample_matches_the_diffusers_pipeline(tiny, pipe):
    ours, theirs = ditctl_image(tiny), pipeline_image(pipe, tiny)
    assert ours.shape == theirs.shape == (SIZE, SIZE, 3)
    # measured: max difference 0/255; 1 leaves room for float summation order
    assert np.abs(ours - theirs).max() <= 1


def test_a_folder_without_t5_encodes_zeros_for_it(tiny, tmp_path):
    folder = tmp_path / "no-t5"
    shutil.copytree(tiny, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder_3")
    shutil.rmtree(folder / "tokenizer_3")
    family = load_family(folder)
    assert "text_encoder_3" not in family.copied_components
    cond = family.encode_prompts(family.load_text_encoder(), [PROMPT])
    assert cond.sequence.shape[1] == 77 + 256 and not cond.sequence[:, 77:].any()
    assert family.text_encoder_identity() != load_family(tiny).text_encoder_identity()


def test_init_on_an_sd3_folder_writes_its_family(tiny, tmp_path):
    import tomllib

    from ditctl.scaffold import init_workspace

    init_workspace(tmp_path / "ws", model=str(tiny))
    settings = tomllib.loads((tmp_path / "ws" / "project.toml").read_text())
    assert settings["model"]["family"] == "sd3"
    assert load_family(tiny).sampling_defaults.steps == 40  # dual attention: SD3.5-medium's card
