"""Target sizes for training images: one bucket plan per split.

Every image gets a target (width, height), both multiples of the model family's size multiple
`multiple` (its VAE factor times its patch size; `models.registry.size_multiple`).
An image reaches its target by resizing it to cover the target (keeping its aspect ratio), then
cropping the overhang. Four modes:

- resolution R, no buckets: every target is R x R.
- resolution R, buckets: the candidate buckets are all (w, h) with area <= R^2 (as close to it
  as multiples of 16 allow) and aspect ratio within 1:4 .. 4:1; each image takes the bucket
  nearest to its aspect ratio; then small buckets are merged (below).
- no resolution, no buckets: the native size rounded down to multiples of 16 (area capped at
  max_native_pixels). Batches are formed per size, so varied sizes make small batches.
- no resolution, buckets: as above, then small buckets are merged (below).

No image is enlarged by more than `max_upscale`. An image too small for its target (it would
need more, or it is under 16 pixels on a side) is dropped with that reason, and ingest reports
it as a bad row. Nothing else is ever dropped.

Small buckets: unlike the reference trainer (which drops partial batches, so a bucket smaller
than the batch size never trains), a bucket with fewer images than the batch size is merged
into its nearest bucket (nearest in log width and log height, i.e. aspect ratio and scale) as
long as every merged image stays within `max_upscale` and keeps at least `MERGE_MIN_KEPT` of
its area through the crop. Buckets that cannot merge stay as they are and still train: the
trainer batches per bucket and fills each bucket's last batch up with other images of the same
bucket (`ditctl.train.TrainingData`), repeating its images when the whole bucket is smaller
than a batch, so every step trains on a full batch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

MAX_ASPECT = 4.0
# A merge may crop an image more than its own bucket would, but never below this fraction of
# its (resized) area: a square photo should not become a 1:2 strip to fill a batch.
MERGE_MIN_KEPT = 0.8
_EPS = 1e-9

Size = tuple[int, int]


@dataclass(frozen=True)
class Bucket:
    """One target size and what reaching it does to the images assigned to it."""

    width: int
    height: int
    count: int
    resized: int    # images whose size differs from the target
    cropped: int    # images that lose pixels to the crop (aspect ratio differs)
    upscaled: int   # images enlarged to reach the target

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def batches(self, batch_size: int) -> int:
        return math.ceil(self.count / batch_size)  # the trainer fills the last one up


@dataclass(frozen=True)
class PlanSummary:
    """What a bucket plan amounts to: its mode, buckets, merges and notes."""

    mode: str
    batch_size: int
    buckets: tuple[Bucket, ...]
    merges: int
    notes: tuple[str, ...]

    @property
    def batches_per_epoch(self) -> int:
        return sum(b.batches(self.batch_size) for b in self.buckets)


@dataclass(frozen=True)
class BucketPlan(PlanSummary):
    """Targets for a list of image sizes. `targets[i]` is None when image i was dropped."""

    targets: tuple[Size | None, ...]
    dropped: dict[int, str]


def cover_scale(width: int, height: int, target_w: int, target_h: int) -> float:
    """The resize factor that makes an image just cover the target."""
    return max(target_w / width, target_h / height)


def kept_fraction(width: int, height: int, target_w: int, target_h: int) -> float:
    """Fraction of the resized image's area that survives the crop to the target."""
    scale = cover_scale(width, height, target_w, target_h)
    return (target_w * target_h) / (width * scale * height * scale)


def candidate_buckets(resolution: int, *, multiple: int) -> list[Size]:
    """Sizes of area <= resolution^2 (largest the `multiple` grid allows per width),
    aspect <= 4:1."""
    area = resolution * resolution
    sizes = []
    for width in range(multiple, 4 * resolution + 1, multiple):
        height = (area // width) // multiple * multiple
        if height >= multiple and 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
            sizes.append((width, height))
    return sizes


def native_target(width: int, height: int, max_native_pixels: int, *,
                  multiple: int) -> Size | None:
    """The native size rounded down to multiples of `multiple`, shrunk to fit
    max_native_pixels."""
    scale = min(1.0, math.sqrt(max_native_pixels / (width * height)))
    target = (int(width * scale) // multiple * multiple, int(height * scale) // multiple * multiple)
    return target if min(target) >= multiple else None


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket closest in aspect ratio (log scale); ties go to the narrower bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), b))


def _target(width: int, height: int, resolution: int | None, candidates: list[Size],
            max_upscale: float, max_native_pixels: int, multiple: int) -> tuple[Size | None, str]:
    """(target, "") for one image size, or (None, why it is too small)."""
    if resolution is None:
        target = native_target(width, height, max_native_pixels, multiple=multiple)
        if target is None:
            return None, f"too small: {width}x{height} is under {multiple} pixels on a side"
        return target, ""
    target = nearest_bucket(width, height, candidates) if candidates else (resolution, resolution)
    scale = cover_scale(width, height, *target)
    if scale > max_upscale + _EPS:
        return None, (f"too small: {width}x{height} needs {scale:.2f}x upscaling "
                      f"for {target[0]}x{target[1]} (max_upscale {max_upscale:g})")
    return target, ""


@dataclass(frozen=True)
class SizePlan(PlanSummary):
    """A bucket plan by image size: what a plan decides is the same for every image of one
    size, so it is made once per distinct size (a million images have a few thousand).
    `targets` maps each kept size to its target, `dropped` each dropped size to why."""

    targets: dict[Size, Size]
    dropped: dict[Size, str]
    dropped_images: int


def plan_sizes(counts: Mapping[Size, int], *, resolution: int | None, use_buckets: bool,
               max_upscale: float, max_native_pixels: int, batch_size: int,
               multiple: int) -> SizePlan:
    """Assign every image size (oriented width, height -> how many images have it) a target
    size whose sides are multiples of `multiple`; see module docstring."""
    candidates = candidate_buckets(resolution, multiple=multiple) \
        if resolution and use_buckets else []
    targets: dict[Size, Size] = {}
    dropped: dict[Size, str] = {}
    for size in counts:
        target, why = _target(*size, resolution, candidates, max_upscale, max_native_pixels,
                              multiple)
        if target is None:
            dropped[size] = why
        else:
            targets[size] = target

    merges = 0
    if use_buckets and batch_size > 1:
        merges = _merge_small_buckets(targets, counts, batch_size, max_upscale)

    mode = ("buckets" if use_buckets and resolution else "native buckets" if use_buckets
            else "square" if resolution else "native")
    buckets = _summarise(targets, counts)
    notes = []
    if mode == "native" and len(buckets) > 1 and batch_size > 1:
        notes.append(f"{len(buckets)} different image sizes: batches are formed per size, and "
                     "the trainer fills a size's last batch up with other images of that size "
                     "(repeating them when there are fewer than train_batch_size); set "
                     "resolution or use_resolution_buckets to batch different sizes together")
    underfull = [b for b in buckets if b.count < batch_size]
    if underfull and len(buckets) > 1 and mode != "native":
        notes.append(f"{len(underfull)} bucket(s) hold fewer images than the batch size "
                     f"({batch_size}); the trainer fills their batches by repeating the "
                     "bucket's images, so these images are seen more often per epoch")
    return SizePlan(mode=mode, batch_size=batch_size, targets=targets, dropped=dropped,
                    dropped_images=sum(counts[size] for size in dropped),
                    buckets=tuple(buckets), merges=merges, notes=tuple(notes))


def plan_buckets(sizes: Sequence[Size], *, resolution: int | None, use_buckets: bool,
                 max_upscale: float, max_native_pixels: int, batch_size: int,
                 multiple: int) -> BucketPlan:
    """`plan_sizes` for a list of images (by their oriented width, height): each image's
    target, or why it was dropped."""
    normalised = [(int(width), int(height)) for width, height in sizes]
    plan = plan_sizes(Counter(normalised), resolution=resolution, use_buckets=use_buckets,
                      max_upscale=max_upscale, max_native_pixels=max_native_pixels,
                      batch_size=batch_size, multiple=multiple)
    return BucketPlan(mode=plan.mode, batch_size=batch_size,
                      targets=tuple(plan.targets.get(size) for size in normalised),
                      dropped={index: plan.dropped[size] for index, size in enumerate(normalised)
                               if size in plan.dropped},
                      buckets=plan.buckets, merges=plan.merges, notes=plan.notes)


def _merge_small_buckets(targets: dict[Size, Size], counts: Mapping[Size, int],
                         batch_size: int, max_upscale: float) -> int:
    """Merge buckets smaller than the batch size into their nearest bucket, in place."""
    members: dict[Size, list[Size]] = {}  # bucket -> the image sizes it holds
    for size, target in targets.items():
        members.setdefault(target, []).append(size)
    images = {bucket: sum(counts[size] for size in sizes) for bucket, sizes in members.items()}
    stuck: set[Size] = set()
    merges = 0
    while len(members) > 1:
        small = [b for b in members if images[b] < batch_size and b not in stuck]
        if not small:
            break
        source = min(small, key=lambda b: (images[b], b))
        for target in _nearest_first(source, [b for b in members if b != source], images):
            if all(cover_scale(*size, *target) <= max_upscale + _EPS
                   and kept_fraction(*size, *target) >= MERGE_MIN_KEPT
                   for size in members[source]):
                for size in members[source]:
                    targets[size] = target
                members[target].extend(members.pop(source))
                images[target] += images.pop(source)
                merges += 1
                break
        else:
            stuck.add(source)
    return merges


def _nearest_first(source: Size, others: list[Size], images: dict[Size, int]) -> list[Size]:
    """`others` by distance in log width / log height; ties: larger bucket, then smaller size.

    Vectorised because native sizes can make thousands of buckets.
    """
    grid = np.array(others, dtype=np.float64)
    offsets = np.log(grid) - np.log(np.array(source, dtype=np.float64))
    distance = np.round(np.hypot(offsets[:, 0], offsets[:, 1]), 9)
    counts = np.array([images[b] for b in others])
    order = np.lexsort((grid[:, 1], grid[:, 0], -counts, distance))
    return [others[k] for k in order]


def _summarise(targets: dict[Size, Size], counts: Mapping[Size, int]) -> list[Bucket]:
    stats: dict[Size, list[int]] = {}
    for (width, height), target in targets.items():
        count = counts[(width, height)]
        entry = stats.setdefault(target, [0, 0, 0, 0])
        scale = cover_scale(width, height, *target)
        entry[0] += count
        entry[1] += count * ((width, height) != target)
        entry[2] += count * (kept_fraction(width, height, *target) < 1 - 1e-6)
        entry[3] += count * (scale > 1 + _EPS)
    return [Bucket(w, h, *entry) for (w, h), entry in
            sorted(stats.items(), key=lambda item: (item[0][0] / item[0][1], item[0]))]
