"""What training sees: per-sample decisions, the epoch plan, and the sources of latents/embeddings.

Randomness that changes the *pixels* of a sample (crop, flip) is decided here from fixed seeds,
never drawn from the training RNG, so that precompute can cache every variant a training run
can ask for:

- crop: centred, or a random offset drawn once from the image's content hash (the same in
  every epoch, so one latent per image covers it);
- flip: a fair coin per (seed, epoch, row index); precompute caches both variants.

A `SampleSource` turns (manifest row, flip) into a VAE posterior and a caption into its
`Conditioning`. `CachedSource` reads the precompute cache and never loads an encoder;
`OnTheFlySource` runs the one transform and the encoders. Each source's model-free half, its
`SampleReader` (cache reads; or file checks, decoding and the transform), is what training's
data-loading workers run (`read_inputs`); the encoders finish the batch in the training
process (`encode_inputs`). `collate` is both in one process. With fp32 encoders and fp32 storage
both give bit-identical tensors, because precompute encodes every image exactly as
`OnTheFlySource` does: one image per forward pass (see `ditctl.precompute`). A row's loss mask
([data] use_masks) comes with its latents (`masked_latent`): cached in the same entry, or made
on the fly by the same function (`row_latent_mask`), with the image's crop and flip.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from ..config import DataConfig
from ..errors import DataError
from ..models.base import Conditioning, LatentDist, ModelFamily
from .datasets import of_row
from .images import ImageProblem
from .manifest import ManifestRow
from .sample_table import bucket_keys
from .transforms import (Crop, crop_offset_range, latent_mask, load_training_image,
                         load_training_mask)

if TYPE_CHECKING:
    from .cache import Cache


# --- per-sample decisions ---------------------------------------------------------------------

def crop_for(row: ManifestRow, center_crop: bool) -> Crop:
    """"center", or a random (left, top) offset that is fixed per image content."""
    if center_crop:
        return "center"
    max_left, max_top = crop_offset_range(row.width, row.height, row.bucket_w, row.bucket_h)
    rng = random.Random(int(row.sha256[:16], 16))
    left = rng.randint(0, max_left)
    top = rng.randint(0, max_top)
    return left, top


def flip_for(seed: int, epoch: int, index: int, enabled: bool) -> bool:
    """Whether row `index` is mirrored in `epoch`: a fair coin, independent of everything else."""
    if not enabled:
        return False
    return random.Random(f"{seed}:{epoch}:{index}").random() < 0.5


def sample_variants(row: ManifestRow, random_flip: bool | Sequence[bool]) -> tuple[bool, ...]:
    """The flip values training can ask for: both with random_flip (train split only; evaluation
    always uses the unflipped image). `random_flip`: one value, or one per dataset."""
    if not isinstance(random_flip, bool):
        random_flip = of_row(random_flip, row.dataset)
    return (False, True) if random_flip and row.split == "train" else (False,)


# --- the epoch plan ---------------------------------------------------------------------------

def epoch_batches(rows: Sequence[ManifestRow], global_batch_size: int, seed: int,
                  epoch: int, slots: Sequence[int] | None = None) -> list[list[int]]:
    """The batches of one epoch, as lists of row indices; every index exactly once (or as
    often as `slots`, the epoch's row indices, lists it: `datasets.epoch_slots`).

    Rows are grouped by bucket (a batch has one image size), each bucket is shuffled and cut
    into batches of `global_batch_size` (the last partial batch is kept, never dropped), and
    the batches are shuffled. Only (seed, epoch) drive the order, so it is the same for any
    number of processes; each process then takes its share with `rank_share`.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, not {global_batch_size}")
    rng = random.Random(f"{seed}:{epoch}:order")
    keys = bucket_keys(rows).tolist()  # integers that sort as the (width, height) buckets
    by_bucket: dict[int, list[int]] = {}
    for index in range(len(rows)) if slots is None else slots:
        by_bucket.setdefault(keys[index], []).append(index)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        batches += [members[k:k + global_batch_size]
                    for k in range(0, len(members), global_batch_size)]
    rng.shuffle(batches)
    return batches


def rank_share(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The part of a global batch that process `rank` of `world_size` trains on."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return list(batch[rank::world_size])


# --- pixels -----------------------------------------------------------------------------------

def _check_unchanged(path, size_bytes: int, mtime_ns: int, member: str = "") -> None:
    """A file's content hash names cache entries, so a file edited after ingest must not be
    encoded under the old hash: its size and mtime are checked against the manifest (the same
    test ingest uses to decide what to re-read). For an image inside a tar shard or Arrow file
    (`member`), that is the container's mtime (`size_bytes` is the member's own size)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (it was there at ingest)",
                        hint="run `ditctl ingest` to update the manifest") from None
    if stat.st_mtime_ns != mtime_ns or (not member and stat.st_size != size_bytes):
        raise DataError(f"{path}: changed since ingest (size or modification time differ)",
                        hint="run `ditctl ingest` to update the manifest")


def load_row_pixels(row: ManifestRow, crop: Crop, flip: bool, max_pixels: int) -> torch.Tensor:
    """The training tensor [3, bucket_h, bucket_w] of a manifest row, via the one transform
    (the file checked unchanged since ingest first)."""
    _check_unchanged(row.path, row.size_bytes, row.mtime_ns, row.member)
    return load_training_image(row.ref, row.bucket_w, row.bucket_h, crop=crop, flip=flip,
                               max_pixels=max_pixels)


def row_latent_mask(row: ManifestRow, crop: Crop, flip: bool, max_pixels: int,
                    spatial_factor: int) -> torch.Tensor:
    """The row's loss mask on its latent grid, [1, bucket_h/f, bucket_w/f] in [0, 1], made by
    the one transform with the image's crop and flip (all ones when the row has no mask).
    Precompute stores exactly this; on-the-fly training computes it the same way."""
    h, w = row.bucket_h // spatial_factor, row.bucket_w // spatial_factor
    if row.mask is None:
        return torch.ones(1, h, w)
    in_image = row.mask.kind == "alpha" and row.member  # the alpha of an image in a container
    _check_unchanged(row.mask.path, row.mask.size_bytes, row.mask.mtime_ns,
                     row.member if in_image else "")
    pixels = load_training_mask(row.ref if in_image else row.mask.path, row.bucket_w, row.bucket_h,
                                alpha=row.mask.kind == "alpha", crop=crop, flip=flip,
                                max_pixels=max_pixels)
    return latent_mask(pixels, spatial_factor)


# --- sources ----------------------------------------------------------------------------------

class SampleReader(Protocol):
    """The model-free half of a source: file reads, image decoding and the transform, which a
    DataLoader worker process can run (it never loads or calls an encoder). What it cannot
    finish (pixels, a caption to encode) its source's `encode_image` / `encode_caption` does,
    in the process that holds the encoders."""

    def read_image(self, row: ManifestRow, flip: bool, masked: bool
                   ) -> tuple[LatentDist | torch.Tensor, torch.Tensor | None]:
        """The row's posterior (cached) or its pixels [3, H, W] still to encode; with `masked`,
        its loss mask on the latent grid [1, 1, h, w] (ones when it has none), else None."""
        ...

    def read_caption(self, caption: str) -> Conditioning | str:
        """The caption's conditioning (cached), or the caption itself, still to encode."""
        ...


class SampleSource(Protocol):
    """Per-sample training inputs, however they are obtained."""

    @property
    def reader(self) -> SampleReader:
        """The part that runs without the encoders (in data-loading workers)."""
        ...

    def latent_dist(self, row: ManifestRow, flip: bool) -> LatentDist:
        """The VAE posterior of the row's image: mean and std [1, C, h, w], fp32."""
        ...

    def conditioning(self, caption: str) -> Conditioning:
        """The caption's conditioning, a batch of one, floats fp32 on the CPU."""
        ...

    def masked_latent(self, row: ManifestRow, flip: bool) -> tuple[LatentDist, torch.Tensor]:
        """`latent_dist` and the row's loss mask on the latent grid [1, 1, h, w] (ones when
        the row has none)."""
        ...


class CachedSource:
    """Reads the precompute cache. Loads no encoder: keys need only the models' identities.
    Everything it does is reading, so it is its own reader (workers read cache entries)."""

    def __init__(self, cache: "Cache"):
        self.cache = cache

    @property
    def reader(self) -> "CachedSource":
        return self

    def latent_dist(self, row: ManifestRow, flip: bool) -> LatentDist:
        return self.cache.read_latents(row, flip)

    def masked_latent(self, row: ManifestRow, flip: bool) -> tuple[LatentDist, torch.Tensor]:
        dist, mask = self.cache.read_latent_entry(row, flip)
        if mask is None:  # a row without a mask: its entry holds none
            mask = torch.ones(1, 1, *dist.mean.shape[-2:])
        return dist, mask

    def conditioning(self, caption: str) -> Conditioning:
        return self.cache.read_text(caption)

    def read_image(self, row: ManifestRow, flip: bool, masked: bool
                   ) -> tuple[LatentDist, torch.Tensor | None]:
        return self.masked_latent(row, flip) if masked else (self.latent_dist(row, flip), None)

    def read_caption(self, caption: str) -> Conditioning:
        return self.conditioning(caption)


def unreadable_image(name: str, exc: Exception) -> DataError:
    """The one-line error for an image (or mask) that ingest could read and now cannot."""
    return DataError(f"{name}: {exc} (it was readable at ingest)",
                     hint="run `ditctl ingest` to update the manifest")


@dataclass(frozen=True)
class PixelReader:
    """OnTheFlySource's model-free half: the one transform (pixels, loss masks)."""

    center_crop: tuple[bool, ...]  # per dataset (datasets.per_dataset)
    max_pixels: int
    spatial_factor: int

    def read_image(self, row: ManifestRow, flip: bool, masked: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        crop = crop_for(row, of_row(self.center_crop, row.dataset))
        try:
            pixels = load_row_pixels(row, crop, flip, self.max_pixels)
        except (ImageProblem, OSError) as exc:
            raise unreadable_image(row.image_name, exc) from None
        if not masked:
            return pixels, None
        try:
            mask = row_latent_mask(row, crop, flip, self.max_pixels, self.spatial_factor)
        except (ImageProblem, OSError) as exc:
            raise unreadable_image(str(row.mask.path) if row.mask else row.image_name,
                                   exc) from None
        return pixels, mask.unsqueeze(0)

    def read_caption(self, caption: str) -> str:
        return caption


class OnTheFlySource:
    """Runs the transform and the encoders for every request (fp32 unless the models are not).

    Images are encoded one per forward pass, as precompute does for fp32 caches: convolution
    kernels may pick different algorithms for different batch sizes, and only the same call
    guarantees the same bits.
    """

    def __init__(self, family: ModelFamily, vae: Any, text_encoder: Any, data_config: DataConfig,
                 center_crop: Sequence[bool] | None = None):
        self.family = family
        self.vae = vae
        self.text_encoder = text_encoder
        self.data = data_config
        # per dataset (datasets.per_dataset); default: [data]'s
        self.reader = PixelReader(tuple(center_crop or (data_config.center_crop,)),
                                  data_config.max_image_pixels, family.latent.spatial_factor)

    def encode_image(self, pixels: torch.Tensor) -> LatentDist:
        """The posterior of one image's pixels [3, H, W]: [1, C, h, w]."""
        return self.family.encode_images(self.vae, pixels.unsqueeze(0))

    def encode_caption(self, caption: str) -> Conditioning:
        # on the CPU like cached entries, whichever device encoded it
        return self.family.encode_prompts(self.text_encoder, [caption]).cpu()

    def latent_dist(self, row: ManifestRow, flip: bool) -> LatentDist:
        return self.encode_image(self.reader.read_image(row, flip, False)[0])

    def masked_latent(self, row: ManifestRow, flip: bool) -> tuple[LatentDist, torch.Tensor]:
        pixels, mask = self.reader.read_image(row, flip, True)
        return self.encode_image(pixels), mask

    def conditioning(self, caption: str) -> Conditioning:
        return self.encode_caption(caption)


@dataclass(frozen=True)
class CachedImagesReader:
    """CachedLatentsLiveText's model-free half: every latent, and the captions the cache holds."""

    cached: CachedSource

    def read_image(self, row: ManifestRow, flip: bool, masked: bool
                   ) -> tuple[LatentDist, torch.Tensor | None]:
        return self.cached.read_image(row, flip, masked)

    def read_caption(self, caption: str) -> Conditioning | str:
        cache = self.cached.cache
        # entries are renamed into place complete: one that exists can be read (and is
        # checked against its hash as it is)
        if cache.has("text", cache.spec.text_key(caption)):
            return cache.read_text(caption)
        return caption


class CachedLatentsLiveText:
    """Latents from the cache, and captions from it where it holds them (a caption whose
    shuffle left it as precompute saw it); others are encoded: for datasets whose tags are
    shuffled at each step (their captions cannot all be cached), without the VAE."""

    def __init__(self, cached: CachedSource, family: ModelFamily, text_encoder: Any):
        self.cached = cached
        self.family = family
        self.text_encoder = text_encoder
        self.reader = CachedImagesReader(cached)

    def encode_caption(self, caption: str) -> Conditioning:
        return self.family.encode_prompts(self.text_encoder, [caption]).cpu()

    def latent_dist(self, row: ManifestRow, flip: bool) -> LatentDist:
        return self.cached.latent_dist(row, flip)

    def masked_latent(self, row: ManifestRow, flip: bool) -> tuple[LatentDist, torch.Tensor]:
        return self.cached.masked_latent(row, flip)

    def conditioning(self, caption: str) -> Conditioning:
        found = self.reader.read_caption(caption)
        return found if isinstance(found, Conditioning) else self.encode_caption(found)


# --- batches ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    """One (micro-)batch of training inputs. `indices` are the manifest row indices."""

    dist: LatentDist      # mean, std [B, C, h, w] fp32
    cond: Conditioning    # batch B, fp32
    indices: tuple[int, ...]
    mask: torch.Tensor | None = None  # [B, 1, h, w] loss masks on the latent grid, or None


@dataclass(frozen=True)
class BatchInputs:
    """A (micro-)batch as a `SampleReader` leaves it: per row its posterior or its pixels still
    to encode, its loss mask (with masks), and per sample its conditioning or its caption
    still to encode. `encode_inputs` turns it into the `Batch`."""

    indices: tuple[int, ...]
    images: tuple[LatentDist | torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...] | None
    texts: tuple[Conditioning | str, ...]


def read_inputs(reader: SampleReader, rows: Sequence[ManifestRow], indices: Sequence[int],
                flips: Sequence[bool], masks: bool = False,
                captions: Sequence[str] | None = None) -> BatchInputs:
    """The model-free half of `collate` (runs in data-loading workers)."""
    if len(indices) != len(flips):
        raise ValueError(f"{len(indices)} indices but {len(flips)} flips")
    if not indices:
        raise ValueError("a batch needs at least one index")
    picked = [rows[i] for i in indices]  # once: a SampleTable reads each from the manifest
    buckets = {row.bucket for row in picked}
    if len(buckets) != 1:
        raise ValueError(f"a batch must hold one image size, got {sorted(buckets)}")
    pairs = [reader.read_image(row, bool(f), masks) for row, f in zip(picked, flips)]
    if captions is None:
        captions = [row.caption for row in picked]
    return BatchInputs(tuple(int(i) for i in indices), tuple(image for image, _ in pairs),
                       tuple(mask for _, mask in pairs) if masks else None,
                       tuple(reader.read_caption(caption) for caption in captions))


def encode_inputs(source: SampleSource, inputs: BatchInputs) -> Batch:
    """The other half of `collate`: encode what the reader left to encode (in the process that
    holds the encoders) and stack the batch."""
    dists = [item if isinstance(item, LatentDist) else source.encode_image(item)  # type: ignore
             for item in inputs.images]
    mean = torch.cat([d.mean for d in dists])  # [B, C, h, w]
    std = torch.cat([d.std for d in dists])
    cond = Conditioning.cat([item if isinstance(item, Conditioning)
                             else source.encode_caption(item)  # type: ignore[attr-defined]
                             for item in inputs.texts])
    mask = torch.cat(inputs.masks) if inputs.masks is not None else None  # [B, 1, h, w]
    return Batch(LatentDist(mean, std), cond, inputs.indices, mask)


def collate(source: SampleSource, rows: Sequence[ManifestRow], indices: Sequence[int],
            flips: Sequence[bool], masks: bool = False,
            captions: Sequence[str] | None = None) -> Batch:
    """Gather the inputs of rows[i] for i in `indices`, flipped as `flips` (one per index);
    with `masks`, their loss masks too (every row gets one, ones where it has none, so a
    batch's loss does not depend on which rows it holds); with `captions` (one per index;
    default: the rows' captions). `read_inputs` then `encode_inputs`, in this process."""
    return encode_inputs(source, read_inputs(source.reader, rows, indices, flips, masks,
                                             captions))
