"""Tests for ditctl.demo.concepts: the pixel classifier reads rendered scenes back, and refuses
to read anything into blank images or noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from ditctl.demo.concepts import classify, score
from ditctl.demo.scenes import BACKGROUNDS, Scene, held_out_scenes, random_scenes, render

SIZES = ((64, 64), (80, 48), (48, 80), (64, 48))


def corrupt(image: Image.Image, *, blur: float, sigma: float, rng) -> np.ndarray:
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, float) + rng.normal(0.0, sigma, (image.height, image.width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("blur, sigma", [(0.0, 0.0), (0.0, 10.0), (0.8, 0.0), (0.8, 10.0)])
def test_reads_back_rendered_scenes(size, blur, sigma):
    rng = np.random.default_rng(hash((size, blur, sigma)) % 2**32)
    chosen = random_scenes(80, 17, sizes=(size,))
    right = background_right = 0
    for scene in chosen:
        got = classify(corrupt(render(scene), blur=blur, sigma=sigma, rng=rng))
        right += got.colour == scene.colour and got.shape == scene.shape
        background_right += got.background == scene.background
    assert right / len(chosen) >= 0.95
    assert background_right == len(chosen)


def test_reads_the_held_out_colour():
    chosen = held_out_scenes(40, 2)
    assert score([render(s) for s in chosen], [dataclasses.asdict(s) for s in chosen]) == {
        "n": 40, "colour": 1.0, "shape": 1.0, "both": 1.0}


def test_large_images_and_float_arrays():
    scene = Scene("star", "orange", "gray", width=512, height=320)
    got = classify(render(scene))
    assert (got.colour, got.shape, got.background) == ("orange", "star", "gray")
    assert 0.0 < got.confidence <= 1.0
    small = Scene("triangle", "blue", "white")
    as_floats = np.asarray(render(small), np.float32) / 255.0
    assert classify(as_floats) == classify(render(small))


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_blank_image_has_no_shape(background):
    got = classify(Image.new("RGB", (64, 64), BACKGROUNDS[background]))
    assert (got.colour, got.shape, got.background) == (None, None, background)
    assert got.confidence == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_noise_has_no_colour_or_shape(seed):
    rng = np.random.default_rng(seed)
    uniform = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    soft = Image.fromarray(np.clip(rng.normal(128, 60, (80, 48, 3)), 0, 255).astype(np.uint8))
    for image in (uniform, soft.filter(ImageFilter.GaussianBlur(2))):
        got = classify(image)
        assert (got.colour, got.shape) == (None, None)


def test_unnamed_colour_and_unknown_shape_are_none():
    teal = Image.new("RGB", (64, 64), BACKGROUNDS["white"])
    ImageDraw.Draw(teal).rectangle((16, 16, 47, 47), fill=(128, 200, 200))
    got = classify(teal)
    assert (got.colour, got.shape) == (None, "square")
    # A thin ring: hollow like a star or cross, but its features match no prototype.
    ring = Image.new("RGB", (64, 64), BACKGROUNDS["black"])
    ImageDraw.Draw(ring).ellipse((10, 10, 53, 53), outline=(220, 30, 30), width=3)
    got = classify(ring)
    assert (got.colour, got.shape) == ("red", None)


def test_score_counts_colour_shape_and_both():
    chosen = [Scene("circle", "red", "white"), Scene("square", "blue", "black"),
              Scene("triangle", "yellow", "gray"), Scene("cross", "green", "white")]
    expected = [{"colour": "red", "shape": "circle"}, {"colour": "green", "shape": "square"},
                {"colour": "yellow", "shape": "star"}, {"colour": "white", "shape": "circle"}]
    result = score([render(s) for s in chosen], expected)
    assert result == {"n": 4, "colour": 0.5, "shape": 0.5, "both": 0.25}
    with pytest.raises(ValueError):
        score([render(chosen[0])], expected)
