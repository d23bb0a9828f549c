"""The one transform from an image file to a training tensor.

Precompute and on-the-fly training both call `load_training_image`, so they see identical
pixels. It is pure: randomness (the crop offset for a random crop, whether to flip) is drawn by
the caller from its own generator and passed in, so the same arguments always give the same
tensor.

Steps: decode (EXIF orientation, RGB; see `images.decode_rgb`) -> resize so the image just
covers the target (Lanczos, which low-pass filters when shrinking) -> crop the target out of the
resized image -> optionally flip left/right -> float32 [3, H, W] in [-1, 1].
Crop offsets are in the coordinates of the resized (unflipped) image.

A loss mask ([data] use_masks) goes through the same geometry (`fit_image`: the same resize
filter, crop and flip), so it lies on the training tensor exactly as on the image, and becomes
float32 [1, H, W] in [0, 1] (`load_training_mask`); `latent_mask` averages it over each latent
pixel's area.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .images import ImageRef, decode_mask, decode_rgb, read_image

Crop = Literal["center"] | tuple[int, int]
DEFAULT_MAX_PIXELS = 100_000_000  # matches [data] max_image_pixels' default


def resized_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """Size of the image after resizing it (aspect kept) to just cover the target."""
    scale = max(target_w / width, target_h / height)
    return max(target_w, round(width * scale)), max(target_h, round(height * scale))


def crop_offset_range(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """(max_left, max_top): valid crop offsets are 0..max_left and 0..max_top, inclusive.

    `width`, `height` are the image's oriented size (as the manifest records it).
    """
    resized_w, resized_h = resized_size(width, height, target_w, target_h)
    return resized_w - target_w, resized_h - target_h


def center_crop_offset(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    max_left, max_top = crop_offset_range(width, height, target_w, target_h)
    return max_left // 2, max_top // 2


def load_training_image(image: ImageRef | str | Path, target_w: int, target_h: int, *,
                        crop: Crop = "center", flip: bool = False,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The training tensor of one image: float32 [3, target_h, target_w] in [-1, 1].

    `crop` is "center" or explicit (left, top) offsets within `crop_offset_range`;
    `flip` mirrors the cropped image left/right. `image` is an image file or an ImageRef
    (an image inside a tar shard or Arrow file).
    """
    ref = image if isinstance(image, ImageRef) else ImageRef(str(image))
    decoded = decode_rgb(read_image(ref, max_pixels)[0], max_pixels=max_pixels)
    return transform_image(decoded, target_w, target_h, crop=crop, flip=flip)


def transform_image(image: Image.Image, target_w: int, target_h: int, *,
                    crop: Crop = "center", flip: bool = False) -> torch.Tensor:
    """Resize-to-cover, crop, flip and normalise an RGB PIL image (see load_training_image)."""
    if image.mode != "RGB":
        raise ValueError(f"transform_image needs an RGB image, got mode {image.mode}")
    image = fit_image(image, target_w, target_h, crop=crop, flip=flip)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [H, W, 3]
    return pixels.permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)  # [3, H, W]


def fit_image(image: Image.Image, target_w: int, target_h: int, *, crop: Crop = "center",
              flip: bool = False) -> Image.Image:
    """Resize to cover (Lanczos), crop, flip: the geometry of the transform, for an image of any
    mode (the RGB image and its grey mask alike)."""
    width, height = image.size
    max_left, max_top = crop_offset_range(width, height, target_w, target_h)
    if crop == "center":
        left, top = max_left // 2, max_top // 2
    else:
        left, top = crop
        if not (0 <= left <= max_left and 0 <= top <= max_top):
            raise ValueError(f"crop offset ({left}, {top}) outside 0..{max_left}, 0..{max_top} "
                             f"for a {width}x{height} image and a {target_w}x{target_h} target")
    size = (max_left + target_w, max_top + target_h)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    image = image.crop((left, top, left + target_w, top + target_h))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def load_training_mask(path: ImageRef | str | Path, target_w: int, target_h: int, *,
                       alpha: bool = False,
                       crop: Crop = "center", flip: bool = False,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The loss mask of one image at its training size: float32 [1, target_h, target_w] in
    [0, 1] (1: learn). `path` is a mask file, or with `alpha` the image whose alpha channel
    is the mask (an ImageRef for an image inside a container); `crop` and `flip` are the
    image's (see `load_training_image`)."""
    ref = path if isinstance(path, ImageRef) else ImageRef(str(path))
    mask = decode_mask(read_image(ref, max_pixels)[0], max_pixels=max_pixels, alpha=alpha)
    mask = fit_image(mask, target_w, target_h, crop=crop, flip=flip)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())  # [H, W]
    return pixels.unsqueeze(0).to(torch.float32).div_(255.0)


def latent_mask(mask: torch.Tensor, spatial_factor: int) -> torch.Tensor:
    """A pixel mask [..., 1, H, W] on the latent grid [..., 1, H/f, W/f]: the mean over each
    latent pixel's f x f area (training sizes are multiples of f)."""
    return torch.nn.functional.avg_pool2d(mask, spatial_factor)
