"""The training transform: exact pixels for crops and flips, deterministic, [-1, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditctl.data.transforms import (center_crop_offset, crop_offset_range, load_training_image,
                                    resized_size)


def columns_image(path, width: int, height: int):
    """Each column x has value x in R (so crops and flips are visible), G = 255 - x, B = 7."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    pixels[..., 1] = 255 - pixels[..., 0]
    pixels[..., 2] = 7
    Image.fromarray(pixels).save(path)
    return pixels


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    return ((tensor + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_crop_without_resize_is_exact(tmp_path):
    path = tmp_path / "wide.png"
    pixels = columns_image(path, 64, 32)
    assert crop_offset_range(64, 32, 32, 32) == (32, 0)
    tensor = load_training_image(path, 32, 32, crop=(5, 0))
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert np.array_equal(to_uint8(tensor), pixels[:, 5:37])
    centre = load_training_image(path, 32, 32)
    assert np.array_equal(to_uint8(centre), pixels[:, 16:48])


def test_flip_mirrors_the_crop(tmp_path):
    path = tmp_path / "wide.png"
    pixels = columns_image(path, 64, 32)
    flipped = load_training_image(path, 32, 32, crop=(5, 0), flip=True)
    assert np.array_equal(to_uint8(flipped), pixels[:, 5:37][:, ::-1])


def test_range_and_normalisation(tmp_path):
    path = tmp_path / "bw.png"
    image = Image.new("RGB", (16, 16), (0, 0, 0))
    image.paste((255, 255, 255), (8, 0, 16, 16))
    image.save(path)
    tensor = load_training_image(path, 16, 16)
    assert tensor[:, :, :8].eq(-1).all() and tensor[:, :, 8:].eq(1).all()


def test_resize_covers_the_target_then_crops(tmp_path):
    path = tmp_path / "big.png"
    columns_image(path, 200, 100)
    assert resized_size(200, 100, 64, 64) == (128, 64)
    assert crop_offset_range(200, 100, 64, 64) == (64, 0)
    assert center_crop_offset(200, 100, 64, 64) == (32, 0)
    tensor = load_training_image(path, 64, 64, crop=(64, 0))
    assert tensor.shape == (3, 64, 64)
    red = to_uint8(tensor)[..., 0].astype(int)
    # the right-most crop of a left-to-right ramp: columns ~100..199 of the original
    assert abs(red[:, 0].mean() - 101) <= 3 and abs(red[:, -1].mean() - 198) <= 3


def test_deterministic(tmp_path):
    path = tmp_path / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    first = load_training_image(path, 48, 32, crop=(0, 3), flip=True)
    assert torch.equal(first, load_training_image(path, 48, 32, crop=(0, 3), flip=True))


def test_transparency_and_orientation_match_ingest(tmp_path):
    path = tmp_path / "rotated.jpg"
    stored = Image.new("RGB", (32, 16), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif.tobytes())
    tensor = load_training_image(path, 16, 32)              # oriented 16 wide x 32 tall
    pixels = to_uint8(tensor).astype(int)
    assert abs(pixels[4, 8] - [255, 0, 0]).max() <= 8
    assert abs(pixels[28, 8] - [0, 0, 255]).max() <= 8

    clear = tmp_path / "clear.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(clear)
    assert load_training_image(clear, 16, 16).eq(1).all()   # transparent -> white


def test_offsets_outside_the_range_are_refused(tmp_path):
    path = tmp_path / "wide.png"
    columns_image(path, 64, 32)
    with pytest.raises(ValueError, match="outside"):
        load_training_image(path, 32, 32, crop=(33, 0))
    with pytest.raises(ValueError, match="outside"):
        load_training_image(path, 32, 32, crop=(0, 1))
