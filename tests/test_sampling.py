"""The sampler: schedule, Euler step, CFG/APG math, reproducibility, and the files it writes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ditctl.config import SampleConfig
from ditctl.errors import DitctlError
from ditctl.grids import read_png_text
from ditctl.models.base import Conditioning, SamplingDefaults
from ditctl.sampling import (Guidance, apg, cfg, derive_seed, euler_sample, generate,
                             guided_velocity, plan_images, read_prompts, sample_during_training,
                             sample_latents, time_grid, write_samples)


# --- pure math ----------------------------------------------------------------------------------

def test_time_grid_is_the_warped_uniform_grid():
    grid = time_grid(2, shift=2.0)
    # t = 1, 1/2, 0 warped by 2t / (1 + t): 1, 2/3, 0
    assert grid.tolist() == pytest.approx([1.0, 2 / 3, 0.0], abs=1e-15)
    assert time_grid(4, shift=1.0).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        time_grid(0, 1.0)


def test_time_grid_can_end_where_a_scheduler_ends():
    # 3 times evenly from 1 down to 0.1, then 0 (shift 1 keeps them)
    assert time_grid(3, shift=1.0, end=0.1).tolist() == pytest.approx([1.0, 0.55, 0.1, 0.0])
    assert time_grid(1, shift=3.0, end=0.1).tolist() == [1.0, 0.0]


def test_euler_steps_match_a_hand_computation():
    # v(x, t) = x * t + 1 on the grid t = 1, 0.75, 0 (steps 2, shift 3: 3*0.5/(1+2*0.5) = 0.75)
    grid = time_grid(2, shift=3.0)
    assert grid.tolist() == [1.0, 0.75, 0.0]
    x = torch.tensor([1.0, -2.0])
    seen = []
    out = euler_sample(lambda x, t: (seen.append(t), x * t + 1)[1], x, grid)
    # step 1: x + (1 - 0.75) * (x*1 + 1) = [1.5, -2.25]
    # step 2: x + 0.75 * (x*0.75 + 1)    = [1.5 + 0.75*2.125, -2.25 + 0.75*(-0.6875)]
    assert seen == [1.0, 0.75]
    assert out.tolist() == [3.09375, -2.765625]


class SpyFamily:
    """A family whose 'denoiser' output is a known function of its inputs; records every call."""

    sampling_defaults = SamplingDefaults(steps=2, guidance_scale=1.0, resolution=16)
    embedded_guidance = None  # classifier-free guidance

    def __init__(self):
        self.calls = []

    def predict(self, denoiser, noisy, t, cond):
        text = cond.sequence
        self.calls.append((noisy.clone(), t.clone(), text.clone()))
        # different for conditional and unconditional rows: depends on the text
        return noisy * 0.5 + text.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)

    def empty_conditioning(self, batch, like=None):
        return Conditioning(torch.zeros((batch, *like.sequence.shape[1:]),
                                        dtype=like.sequence.dtype))


def _denoiser():
    return torch.nn.Linear(1, 1)  # only its parameters' dtype/device are read


def test_cfg_runs_one_batched_forward_on_negative_then_positive():
    family = SpyFamily()
    x = torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    cond = torch.full((2, 3, 4), 2.0)
    out = guided_velocity(family, _denoiser(), x, 0.25, Conditioning(cond), None,
                          Guidance(scale=4.0))
    assert len(family.calls) == 1
    noisy, t, text = family.calls[0]
    assert torch.equal(noisy, torch.cat([x, x]))
    assert t.tolist() == [0.25] * 4
    assert torch.equal(text[:2], torch.zeros(2, 3, 4)) and torch.equal(text[2:], cond)
    v_uncond = x * 0.5 + 0.25
    v_cond = x * 0.5 + 2.0 + 0.25
    assert torch.allclose(out, v_uncond + 4.0 * (v_cond - v_uncond), atol=0, rtol=0)
    assert torch.equal(cfg(v_uncond, v_cond, 4.0), out)


def test_guidance_scale_one_skips_the_unconditional_forward():
    family = SpyFamily()
    x = torch.ones(3, 16, 2, 2)
    cond = Conditioning(torch.ones(3, 2, 4))
    out = guided_velocity(family, _denoiser(), x, 0.5, cond, None, Guidance(scale=1.0))
    assert len(family.calls) == 1 and family.calls[0][0].shape[0] == 3
    assert torch.equal(out, x * 0.5 + 1.0 + 0.5)


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_guidance_below_one_is_the_conditional_prediction_alone(scale):
    """As the families' own pipelines (guidance only when the scale exceeds 1): no
    extrapolation away from the prompt, no unconditional forward."""
    family = SpyFamily()
    x = torch.ones(2, 16, 2, 2)
    cond = Conditioning(torch.full((2, 2, 4), 3.0))
    out = guided_velocity(family, _denoiser(), x, 0.5, cond, None, Guidance(scale=scale))
    assert len(family.calls) == 1 and family.calls[0][0].shape[0] == 2
    assert torch.equal(out, x * 0.5 + 3.0 + 0.5)


def test_negative_embedding_is_used_for_the_unconditional_half():
    family = SpyFamily()
    x = torch.zeros(1, 16, 2, 2)
    negative = torch.full((1, 2, 4), -1.0)
    guided_velocity(family, _denoiser(), x, 0.5, Conditioning(torch.ones(1, 2, 4)),
                    Conditioning(negative), Guidance(3.0))
    assert torch.equal(family.calls[0][2][0], negative[0])


def test_apg_matches_a_hand_computation():
    v_cond = torch.tensor([[2.0, 0.0]])
    v_uncond = torch.tensor([[1.0, 1.0]])
    # d = [1, -1]; projection on v_c = (2/4)*[2, 0] = [1, 0]; orth = [0, -1] with std 0.7071
    # (unbiased); clamped to std 0.1 -> [0, -0.1414]; v = v_c + (3 - 1) * orth
    out = apg(v_uncond, v_cond, 3.0, threshold=0.1)
    assert out[0].tolist() == pytest.approx([2.0, -2 * 0.1 * 2 ** 0.5], abs=1e-6)
    # below the threshold nothing is clamped: v = v_c + (g-1) * orth
    assert apg(v_uncond, v_cond, 3.0, threshold=10.0)[0].tolist() == pytest.approx([2.0, -2.0])


def test_apg_is_per_sample():
    gen = torch.Generator().manual_seed(0)
    v_uncond, v_cond = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 16, 4, 4, generator=gen)
    alone = apg(v_uncond[:1], v_cond[:1], 5.0, 0.03)
    together = apg(v_uncond, v_cond, 5.0, 0.03)
    louder = apg(torch.cat([v_uncond[:1], v_uncond[1:] * 100]),
                 torch.cat([v_cond[:1], v_cond[1:] * -37]), 5.0, 0.03)
    assert torch.allclose(together[:1], alone, rtol=1e-6, atol=1e-7)
    assert torch.allclose(louder[:1], alone, rtol=1e-6, atol=1e-7)


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, 0, 0) == 311678538  # pinned: changing it changes every user's images
    seeds = {job.seed for job in plan_images(5, 4, base_seed=3)}
    assert len(seeds) == 20
    assert derive_seed(1, 0, 0) != derive_seed(0, 0, 1)
    assert [j.prompt_index for j in plan_images(2, 2, 0)] == [0, 0, 1, 1]


def test_sample_latents_with_a_fake_model_follows_the_schedule():
    family = SpyFamily()
    noise = torch.ones(1, 16, 2, 2)
    cond = Conditioning(torch.zeros(1, 2, 4))
    out = sample_latents(family, _denoiser(), noise, cond, None, steps=2,
                         guidance=Guidance(1.0), shift=3.0)
    # v = x/2 + t on t = 1, 0.75, 0: x1 = 1 + 0.25*(0.5 + 1) = 1.375;
    # x2 = 1.375 + 0.75*(0.6875 + 0.75) = 2.453125
    assert [call[1].item() for call in family.calls] == [1.0, 0.75]
    assert torch.equal(out, torch.full((1, 16, 2, 2), 2.453125))


# --- with the tiny model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from ditctl.models.registry import load_family

    family = load_family(tiny_model_dir)
    return SimpleNamespace(family=family, denoiser=family.load_denoiser().eval(),
                           vae=family.load_vae(), te=family.load_text_encoder())


def _settings(**changes):
    values = dict(steps=2, guidance_scale=3.0, seed=5, num_images_per_prompt=3, batch_size=1)
    return SampleConfig(**{**values, **changes})


def _pixels(images):
    return [np.asarray(image) for image in images]


def test_images_are_bit_identical_whatever_the_batch_size(tiny):
    prompts = ["a red circle on a white background"]
    one = generate(tiny.family, tiny.denoiser, tiny.vae, prompts, _settings(batch_size=1),
                   width=32, height=32, text_encoder=tiny.te)
    three = generate(tiny.family, tiny.denoiser, tiny.vae, prompts, _settings(batch_size=3),
                     width=32, height=32, text_encoder=tiny.te)
    again = generate(tiny.family, tiny.denoiser, tiny.vae, prompts, _settings(batch_size=3),
                     width=32, height=32, text_encoder=tiny.te)
    assert len(one) == 3 and one[0].size == (32, 32)
    for a, b, c in zip(_pixels(one), _pixels(three), _pixels(again)):
        assert np.array_equal(a, b) and np.array_equal(b, c)
    # three different seeds give three different images
    assert not np.array_equal(_pixels(one)[0], _pixels(one)[1])
    other_seed = generate(tiny.family, tiny.denoiser, tiny.vae, prompts, _settings(seed=6),
                          width=32, height=32, text_encoder=tiny.te)
    assert not np.array_equal(_pixels(other_seed)[0], _pixels(one)[0])


def test_latents_do_not_depend_on_the_other_images_of_the_batch(tiny):
    # The float latents are a stricter check than 8-bit images: one batched forward of 3 images
    # differs from 3 forwards of 1 in the last bits on this CPU, which batch_invariant avoids.
    from ditctl.sampling import initial_noise

    cond = tiny.family.encode_prompts(tiny.te, ["a red circle", "a cat", "sky"])
    noise = torch.stack([initial_noise(seed, (16, 4, 4)) for seed in (1, 2, 3)])
    kwargs = dict(steps=2, guidance=Guidance(3.0), shift=1.0)
    three = sample_latents(tiny.family, tiny.denoiser, noise, cond, None, **kwargs)
    for i in range(3):
        alone = sample_latents(tiny.family, tiny.denoiser, noise[i:i + 1], cond.rows(i), None,
                               **kwargs)
        assert torch.equal(three[i:i + 1], alone)


def test_apg_and_cfg_give_different_images(tiny):
    prompts = ["a blue square"]
    plain = generate(tiny.family, tiny.denoiser, tiny.vae, prompts,
                     _settings(num_images_per_prompt=1), width=32, height=32, text_encoder=tiny.te)
    guided = generate(tiny.family, tiny.denoiser, tiny.vae, prompts,
                      _settings(num_images_per_prompt=1, apg=True, apg_threshold=1e-4),
                      width=32, height=32, text_encoder=tiny.te)
    assert not np.array_equal(_pixels(plain)[0], _pixels(guided)[0])


def test_sizes_must_be_multiples_of_16(tiny):
    with pytest.raises(DitctlError, match="multiple of 16"):
        generate(tiny.family, tiny.denoiser, tiny.vae, ["x"], _settings(), width=40, height=32,
                 text_encoder=tiny.te)


def test_long_prompts_are_reported_as_truncated(tiny, capsys):
    long_prompt = " ".join(["red circle"] * 300)  # F-Lite reads 512 tokens
    generate(tiny.family, tiny.denoiser, tiny.vae, [long_prompt],
             _settings(num_images_per_prompt=1, steps=1), width=32, height=32,
             text_encoder=tiny.te)
    err = capsys.readouterr().err
    assert "prompt 1 has 601 tokens" in err and "first 512" in err


def test_training_samples_leave_the_model_and_rng_as_they_were(tiny, tmp_path):
    tiny.denoiser.train()
    state = torch.get_rng_state()
    try:
        grid = sample_during_training(tiny.family, tiny.denoiser, tiny.vae, ["a red star", "a cat"],
                                      tmp_path / "step-000010",
                                      _settings(num_images_per_prompt=2), width=32, height=32,
                                      text_encoder=tiny.te, metadata={"step": 10})
        assert tiny.denoiser.training
        assert torch.equal(state, torch.get_rng_state())
    finally:
        tiny.denoiser.eval()
    assert grid == tmp_path / "step-000010" / "grid.png"
    index = json.loads((grid.parent / "index.json").read_text())
    assert index["step"] == 10 and len(index["images"]) == 4
    assert index["settings"]["width"] == 32 and index["settings"]["shift"] == pytest.approx(0.125)


# --- files --------------------------------------------------------------------------------------

def test_write_samples_writes_pngs_with_metadata_a_grid_and_an_index(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    images = [Image.new("RGB", (32, 32), c) for c in colours]
    seeds = [11, 12, 21, 22]
    settings = {"steps": 2, "guidance_scale": 6.0, "negative_prompt": "blurry", "seed": 0}
    index = write_samples(images, ["red things", "green things"], seeds, settings, tmp_path,
                          metadata={"checkpoint": "runs/x/checkpoints/step-000001"})
    assert [e["file"] for e in index["images"]] == ["p000-s11.png", "p000-s12.png",
                                                    "p001-s21.png", "p001-s22.png"]
    text = read_png_text(tmp_path / "p001-s21.png")
    assert text["prompt"] == "green things" and text["seed"] == "21"
    assert text["negative_prompt"] == "blurry"
    assert json.loads(text["settings"]) == settings
    assert text["checkpoint"] == "runs/x/checkpoints/step-000001"
    with Image.open(tmp_path / "p001-s21.png") as png:
        assert png.getpixel((5, 5)) == (0, 0, 255)
    assert json.loads((tmp_path / "index.json").read_text()) == index
    with Image.open(tmp_path / "grid.png") as grid:
        # 2 columns of 128 px cells (32 px images enlarged 4x) plus 3 gaps of 4 px
        assert grid.width == 2 * 128 + 3 * 4
        assert grid.getpixel((4 + 64, 4 + 64)) == (255, 0, 0)
        assert grid.getpixel((4 + 128 + 4 + 64, 4 + 64)) == (0, 255, 0)
    with pytest.raises(ValueError):
        write_samples(images[:3], ["a", "b"], seeds[:3], settings, tmp_path)


def test_read_prompts_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\n\n a red circle \n  # indented comment\nblue square\n")
    assert read_prompts(path) == ["a red circle", "blue square"]
    path.write_text("# only a comment\n\n")
    with pytest.raises(DitctlError, match="holds no prompts"):
        read_prompts(path)
    with pytest.raises(DitctlError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
