"""Read colour, shape and background back from the pixels of a (generated) scene image.

An honest, hand-written classifier (numpy only, no learnt weights), so that a score says
something about the image and nothing about another model's biases:

1. background = the median colour of the border pixels, named after the nearest background;
2. foreground = pixels of a 3x3 box-blurred copy far from that colour; the threshold sits
   halfway between the background and the typical foreground pixel (where an anti-aliased
   edge is half covered), a 3x3 majority vote smooths the ragged edge, and only the largest
   connected blob is kept, so specks of noise do not count;
3. colour = the named colour nearest the median RGB of the blob's core, unless it is too far
   from every named colour; a blob whose pixels share no colour (noise) is no shape at all;
4. shape = the nearest prototype in (fill, solidity, symmetry) space (see `SHAPE_PROTOTYPES`).

Images larger than `WORK_SIDE` are shrunk first: the features do not need more pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from .scenes import BACKGROUNDS, COLOURS

WORK_SIDE = 128  # longest side the classifier works at
BORDER_PX = 2  # width of the frame whose median colour is the background
MIN_CONTRAST = 40.0  # RGB distance below which a pixel is background whatever else happens
BACKGROUND_MAX_DISTANCE = 80.0  # border colour farther than this from all backgrounds: None
COLOUR_MAX_DISTANCE = 80.0  # blob colour farther than this from all named colours: None
COLOUR_MAX_SPREAD = 60.0  # median distance of blob pixels from their median colour (noise: ~110)
FOREGROUND_FRACTION = (0.01, 0.6)  # plausible blob area / image area for one shape
# Shape features of the largest blob: fill = area / bounding box, solidity = area / convex
# hull, symmetry = IoU of the blob with its upside-down self (tells the up-down symmetric
# cross from the star, whose fill and solidity come close once blurred). Prototypes are the
# means measured on 1200 rendered scenes at 48-80 px, clean, noisy (sigma 10) and blurred
# (Gaussian radius 0.8): square ~1/1/1, circle ~pi/4, triangle ~1/2 with symmetry ~1/3, star
# and cross hollow (solidity < 0.8). Single images stray up to ~0.15 from their prototype;
# a blob farther than SHAPE_MAX_DISTANCE from every prototype has no shape.
SHAPE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "square": (0.99, 0.995, 0.995),
    "circle": (0.782, 0.955, 0.968),
    "triangle": (0.585, 0.937, 0.405),
    "cross": (0.565, 0.783, 0.965),
    "star": (0.556, 0.754, 0.562),
}
SHAPE_MAX_DISTANCE = 0.25  # the closest prototypes (circle, square) are 0.21 apart


@dataclass(frozen=True)
class Classification:
    """What the pixels show; None where the image does not show it clearly.

    `confidence` is in [0, 1]: the weaker of the colour's closeness to its named colour and the
    shape's margin between its nearest and second-nearest prototype (0 when either is None).
    """

    colour: str | None
    shape: str | None
    background: str | None
    confidence: float = 0.0
    foreground_fraction: float = 0.0
    features: tuple[float, float, float] | None = None  # (fill, solidity, symmetry) of the blob


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        array = image.astype(np.float64)
        if image.dtype.kind == "f" and array.max(initial=0) <= 1.0:
            array = array * 255.0  # floats in [0, 1]
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        image = Image.fromarray(np.clip(array[..., :3], 0, 255).astype(np.uint8))
    image = image.convert("RGB")
    if max(image.size) > WORK_SIDE:
        scale = WORK_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)),
                              max(1, round(image.height * scale))), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _nearest(rgb: np.ndarray, palette: Mapping[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], float) - rgb, axis=1)
    best = int(distances.argmin())
    return names[best], float(distances[best])


def _sum3x3(array: np.ndarray, mode: str) -> np.ndarray:
    """Sum over each pixel's 3x3 neighbourhood (first two axes), padding with `mode`."""
    h, w = array.shape[:2]
    p = np.pad(array, [(1, 1), (1, 1)] + [(0, 0)] * (array.ndim - 2), mode=mode)
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))


def _majority(mask: np.ndarray) -> np.ndarray:
    """Keep pixels with at least 5 of their 3x3 neighbourhood set: drops the ragged single
    pixels that a half-covered anti-aliased edge leaves on either side of the threshold."""
    return _sum3x3(mask.astype(np.int8), "constant") >= 5


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component: every pixel takes the largest label among its
    neighbours until nothing changes (numpy only; fine at WORK_SIDE)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        p = np.pad(labels, 1)
        grown = np.maximum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax()


def _cross(o: tuple, a: tuple, b: tuple) -> int:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixel squares (monotone chain over row ends)."""
    rows = np.flatnonzero(mask.any(axis=1))
    points: set = set()
    for y in rows:
        xs = np.flatnonzero(mask[y])
        for x in (xs[0], xs[-1] + 1):
            points.update({(int(x), int(y)), (int(x), int(y) + 1)})
    points = sorted(points)

    def half_hull(pts: list) -> list:
        chain: list = []
        for p in pts:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = half_hull(points) + half_hull(points[::-1])
    xs, ys = np.array([p[0] for p in hull], float), np.array([p[1] for p in hull], float)
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def _shape(mask: np.ndarray) -> tuple[str | None, float, tuple[float, float, float]]:
    """(shape or None, margin confidence, (fill, solidity, symmetry)) of a blob."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    area = float(box.sum())
    fill = area / box.size
    solidity = min(1.0, area / max(_hull_area(box), 1.0))
    flipped = box[::-1]
    symmetry = float((box & flipped).sum() / (box | flipped).sum())
    features = (fill, solidity, symmetry)
    distances = sorted((float(np.linalg.norm(np.subtract(features, prototype))), name)
                       for name, prototype in SHAPE_PROTOTYPES.items())
    (d1, best), (d2, _) = distances[0], distances[1]
    if d1 > SHAPE_MAX_DISTANCE:
        return None, 0.0, features
    return best, (d2 - d1) / (d2 + d1), features


def classify(image: Image.Image | np.ndarray) -> Classification:
    """Name the colour, shape and background of a one-shape scene image (see module doc)."""
    rgb = _as_rgb(image)
    b = BORDER_PX
    border = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                             rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background, distance = _nearest(background_rgb, BACKGROUNDS)
    background = background if distance <= BACKGROUND_MAX_DISTANCE else None
    nothing = Classification(None, None, background)

    # The mask comes from a 3x3 box-blurred copy (noise / 3); colours from the raw pixels.
    contrast = np.linalg.norm(_sum3x3(rgb, "edge") / 9 - background_rgb, axis=-1)
    if not (contrast > MIN_CONTRAST).any():
        return nothing
    threshold = max(MIN_CONTRAST, 0.5 * float(np.median(contrast[contrast > MIN_CONTRAST])))
    blob = _largest_blob(_majority(contrast > threshold))
    fraction = float(blob.mean())
    if not FOREGROUND_FRACTION[0] <= fraction <= FOREGROUND_FRACTION[1]:
        return Classification(None, None, background, foreground_fraction=fraction)

    # The colour of the blob's core (its higher-contrast half): edge pixels are mixed with
    # the background, and in a soft image they are most of a small shape.
    core = blob & (contrast >= np.median(contrast[blob]))
    pixels = rgb[core]
    median = np.median(pixels, axis=0)
    spread = float(np.median(np.linalg.norm(pixels - median, axis=1)))
    if spread > COLOUR_MAX_SPREAD:  # no common colour: noise or texture, not a shape
        return Classification(None, None, background, foreground_fraction=fraction)
    colour, colour_distance = _nearest(median, COLOURS)
    if colour == background or colour_distance > COLOUR_MAX_DISTANCE:
        colour = None
    shape, shape_confidence, features = _shape(blob)
    confidence = 0.0
    if colour is not None and shape is not None:
        confidence = min(1.0 - colour_distance / COLOUR_MAX_DISTANCE, shape_confidence)
    return Classification(colour, shape, background, confidence, fraction, features)


def score(images: Sequence[Image.Image | np.ndarray],
          expected: Sequence[Mapping[str, str]]) -> dict:
    """Fractions of images whose colour, shape, and both match `expected`.

    Each expectation is a mapping with "colour" and "shape" keys (a missing key never matches),
    e.g. `dataclasses.asdict(scene)`. Returns {"n", "colour", "shape", "both"}.
    """
    if len(images) != len(expected):
        raise ValueError(f"{len(images)} images but {len(expected)} expectations")
    colour = shape = both = 0
    for image, want in zip(images, expected):
        got = classify(image)
        colour_ok = got.colour is not None and got.colour == want.get("colour")
        shape_ok = got.shape is not None and got.shape == want.get("shape")
        colour, shape, both = colour + colour_ok, shape + shape_ok, both + (colour_ok and shape_ok)
    n = max(len(images), 1)
    return {"n": len(images), "colour": colour / n, "shape": shape / n, "both": both / n}
