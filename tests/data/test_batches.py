"""Per-sample decisions (crop, flip), the epoch plan, pixels and collate: exact properties."""

from __future__ import annotations

import hashlib
import math
import os
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ditctl.data.batches import (Batch, collate, crop_for, epoch_batches, flip_for,
                                 load_row_pixels, rank_share, sample_variants)
from ditctl.data.manifest import ManifestRow
from ditctl.data.transforms import crop_offset_range, load_training_image
from ditctl.errors import DataError
from ditctl.models.base import Conditioning, LatentDist


def make_row(index: int = 0, *, bucket=(64, 64), size=(80, 64), sha: str | None = None,
             split: str = "train", caption: str | None = None,
             path: str | None = None) -> ManifestRow:
    sha = sha or hashlib.sha256(str(index).encode()).hexdigest()
    return ManifestRow(split=split, source=f"line {index + 2}",
                       path=Path(path or f"/d/{index}.png"),
                       caption=caption if caption is not None else f"caption {index}", sha256=sha,
                       size_bytes=100, mtime_ns=1, width=size[0], height=size[1], format="PNG",
                       bucket_w=bucket[0], bucket_h=bucket[1])


def rows_with_buckets(counts: dict[tuple[int, int], int]) -> list[ManifestRow]:
    rows = []
    for bucket, count in counts.items():
        rows += [make_row(len(rows), bucket=bucket) for _ in range(count)]
    random.Random(1).shuffle(rows)  # buckets interleaved, as a CSV may list them
    return rows


def reference_epoch(rows, batch_size, seed, epoch):
    """The contract's words, written out independently."""
    rng = random.Random(f"{seed}:{epoch}:order")
    groups = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.bucket_w, row.bucket_h), []).append(i)
    out = []
    for bucket in sorted(groups):
        indices = list(groups[bucket])
        rng.shuffle(indices)
        for start in range(0, len(indices), batch_size):
            out.append(indices[start:start + batch_size])
    rng.shuffle(out)
    return out


# --- epoch_batches ----------------------------------------------------------------------------

bucket_counts = st.dictionaries(
    st.sampled_from([(64, 64), (80, 48), (48, 80), (96, 32), (128, 128)]),
    st.integers(min_value=1, max_value=23), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(counts=bucket_counts, batch_size=st.integers(1, 9), seed=st.integers(0, 2**31),
       epoch=st.integers(0, 50))
def test_epoch_batches_properties(counts, batch_size, seed, epoch):
    rows = rows_with_buckets(counts)
    batches = epoch_batches(rows, batch_size, seed, epoch)
    # every index exactly once
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(rows)))
    # one bucket per batch, no batch larger than the global batch size
    for batch in batches:
        assert len({rows[i].bucket for i in batch}) == 1
        assert 1 <= len(batch) <= batch_size
    # per bucket: all batches full except at most one (the last partial batch is kept)
    for bucket, count in counts.items():
        sizes = sorted((len(b) for b in batches if rows[b[0]].bucket == bucket), reverse=True)
        assert len(sizes) == math.ceil(count / batch_size)
        assert sum(sizes) == count
        assert all(s == batch_size for s in sizes[:-1])
        assert sizes[-1] == count - batch_size * (len(sizes) - 1)
    # deterministic, and exactly the contract's algorithm
    assert epoch_batches(rows, batch_size, seed, epoch) == batches
    assert batches == reference_epoch(rows, batch_size, seed, epoch)


def test_epochs_and_seeds_reorder():
    rows = rows_with_buckets({(64, 64): 20, (80, 48): 13})
    first = epoch_batches(rows, 4, seed=3, epoch=0)
    assert epoch_batches(rows, 4, seed=3, epoch=1) != first
    assert epoch_batches(rows, 4, seed=4, epoch=0) != first


def test_epoch_batches_do_not_mutate_or_depend_on_row_objects_identity():
    rows = rows_with_buckets({(64, 64): 7, (48, 80): 5})
    copy = list(rows)
    assert epoch_batches(rows, 3, 0, 0) == epoch_batches(copy, 3, 0, 0)
    assert rows == copy


@settings(max_examples=40, deadline=None)
@given(counts=bucket_counts, batch_size=st.integers(1, 12), world=st.integers(1, 5))
def test_rank_shares_partition_each_global_batch(counts, batch_size, world):
    rows = rows_with_buckets(counts)
    batches = epoch_batches(rows, batch_size, 7, 2)
    for batch in batches:
        shares = [rank_share(batch, rank, world) for rank in range(world)]
        assert sorted(i for share in shares for i in share) == sorted(batch)
        # interleaved: rank r holds positions r, r + world, ...
        assert all(share == batch[rank::world] for rank, share in enumerate(shares))
    # the plan itself never depends on the number of processes
    assert epoch_batches(rows, batch_size, 7, 2) == batches


def test_rank_share_rejects_bad_rank_and_bad_batch_size():
    with pytest.raises(ValueError):
        rank_share([1, 2], 2, 2)
    with pytest.raises(ValueError):
        epoch_batches([make_row()], 0, 0, 0)


# --- crop_for / flip_for ----------------------------------------------------------------------

def test_center_crop_is_center():
    assert crop_for(make_row(size=(200, 64)), center_crop=True) == "center"


@pytest.mark.parametrize("size,bucket", [((80, 64), (64, 64)), ((64, 160), (64, 64)),
                                         ((300, 200), (96, 48)), ((64, 64), (64, 64))])
def test_random_crop_follows_the_content_hash(size, bucket):
    row = make_row(size=size, bucket=bucket, sha="ab" * 32)
    max_left, max_top = crop_offset_range(*size, *bucket)
    rng = random.Random(int(row.sha256[:16], 16))
    expected = (rng.randint(0, max_left), rng.randint(0, max_top))
    assert crop_for(row, center_crop=False) == expected
    # same content elsewhere, with another caption: same crop (fixed across epochs and paths)
    moved = make_row(5, size=size, bucket=bucket, sha="ab" * 32, path="/elsewhere/x.png")
    assert crop_for(moved, center_crop=False) == expected
    left, top = expected
    assert 0 <= left <= max_left and 0 <= top <= max_top


def test_random_crops_vary_between_images():
    offsets = {crop_for(make_row(i, size=(400, 64), bucket=(64, 64)), False) for i in range(30)}
    assert len(offsets) > 10  # 0..~336 horizontal offsets


def test_flip_for():
    assert not any(flip_for(0, 0, i, enabled=False) for i in range(100))
    flips = [flip_for(3, 1, i, enabled=True) for i in range(4000)]
    assert flips == [flip_for(3, 1, i, enabled=True) for i in range(4000)]
    assert 0.46 < sum(flips) / len(flips) < 0.54  # a fair coin
    assert flips == [random.Random(f"3:1:{i}").random() < 0.5 for i in range(4000)]
    assert flips != [flip_for(3, 2, i, enabled=True) for i in range(4000)]
    assert flips != [flip_for(4, 1, i, enabled=True) for i in range(4000)]


def test_sample_variants():
    assert sample_variants(make_row(), random_flip=True) == (False, True)
    assert sample_variants(make_row(), random_flip=False) == (False,)
    assert sample_variants(make_row(split="val"), random_flip=True) == (False,)


# --- pixels -----------------------------------------------------------------------------------

def real_row(path: Path, bucket=(32, 32)) -> ManifestRow:
    stat = os.stat(path)
    width, height = Image.open(path).size
    return ManifestRow("train", "line 2", path, "c", "cd" * 32, stat.st_size, stat.st_mtime_ns,
                       width, height, "PNG", *bucket)


def test_load_row_pixels_is_the_one_transform(tmp_path):
    path = tmp_path / "a.png"
    Image.effect_noise((48, 32), 60).convert("RGB").save(path)
    row = real_row(path)
    crop = crop_for(row, center_crop=False)
    pixels = load_row_pixels(row, crop, True, 10_000)
    assert torch.equal(pixels, load_training_image(path, 32, 32, crop=crop, flip=True))


def test_load_row_pixels_refuses_files_changed_since_ingest(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(path)
    row = real_row(path)
    Image.new("RGB", (32, 32), (200, 2, 3)).save(path)
    os.utime(path, ns=(row.mtime_ns + 10**9, row.mtime_ns + 10**9))
    with pytest.raises(DataError, match="changed since ingest") as info:
        load_row_pixels(row, "center", False, 10_000)
    assert "ditctl ingest" in info.value.hint
    path.unlink()
    with pytest.raises(DataError, match="file not found"):
        load_row_pixels(row, "center", False, 10_000)


# --- collate ----------------------------------------------------------------------------------

class FakeSource:
    """Values that encode (row index, flip) so order and flips are visible."""

    def __init__(self):
        self.calls = []

    @property
    def reader(self):  # everything it gives is final: it is its own model-free reader
        return self

    def read_image(self, row, flip, masked):
        return self.latent_dist(row, flip), None

    def read_caption(self, caption):
        return self.conditioning(caption)

    def latent_dist(self, row, flip):
        self.calls.append((row.source, flip))
        value = float(row.source.split()[1]) + (0.5 if flip else 0.0)
        h, w = row.bucket_h // 8, row.bucket_w // 8
        return LatentDist(torch.full((1, 4, h, w), value), torch.full((1, 4, h, w), -value))

    def conditioning(self, caption):
        return Conditioning(torch.full((1, 3, 2), float(len(caption))),
                            mask=torch.ones(1, 3, dtype=torch.bool),
                            pooled=torch.full((1, 5), -float(len(caption))))


def test_collate_stacks_in_order_with_flips():
    rows = [make_row(i, caption="x" * (i + 1)) for i in range(5)]
    source = FakeSource()
    batch = collate(source, rows, [3, 0, 4], [True, False, True])
    assert isinstance(batch, Batch)
    assert batch.indices == (3, 0, 4)
    assert batch.dist.mean.shape == (3, 4, 8, 8) and batch.cond.sequence.shape == (3, 3, 2)
    assert batch.dist.mean[:, 0, 0, 0].tolist() == [5.5, 2.0, 6.5]  # source = line index+2
    assert batch.dist.std[:, 0, 0, 0].tolist() == [-5.5, -2.0, -6.5]
    assert batch.cond.sequence[:, 0, 0].tolist() == [4.0, 1.0, 5.0]
    # every named tensor of the conditioning is collated in the same order
    assert batch.cond.pooled[:, 0].tolist() == [-4.0, -1.0, -5.0]
    assert batch.cond.mask.shape == (3, 3) and batch.cond.mask.dtype == torch.bool


def test_collate_refuses_mixed_buckets_and_mismatched_flips():
    rows = [make_row(0), make_row(1, bucket=(80, 48))]
    with pytest.raises(ValueError, match="one image size"):
        collate(FakeSource(), rows, [0, 1], [False, False])
    with pytest.raises(ValueError, match="flips"):
        collate(FakeSource(), rows, [0], [False, True])


def test_the_trainer_fills_each_buckets_last_batch_with_images_of_that_bucket():
    # What ingest's bucket notes promise (data/buckets.py): no partial batch reaches the model;
    # a bucket's last batch is topped up from the same bucket, repeating a too-small bucket.
    from ditctl.train import TrainingData

    rows = rows_with_buckets({(64, 64): 7, (96, 64): 2, (64, 96): 4})
    data = TrainingData(rows, None, seed=3, step_batch=4, random_flip=False)
    for epoch in range(3):
        batches = data.epoch_batches(epoch)
        planned = epoch_batches(rows, 4, 3, epoch)
        assert len(batches) == len(planned) == 2 + 1 + 1
        assert all(len(batch) == 4 for batch in batches)
        for batch, plan in zip(batches, planned):
            assert batch[:len(plan)] == plan  # the planned images first, then the filling
            assert len({rows[i].bucket for i in batch}) == 1
        seen = sorted(i for plan in planned for i in plan)
        assert seen == list(range(len(rows)))  # every image still exactly once in the plan
        small = next(b for b in batches if rows[b[0]].bucket == (96, 64))
        assert sorted(small) == sorted(small[:2] * 2)  # the 2-image bucket, each twice
        last_of_seven = next(b for b in batches if rows[b[0]].bucket == (64, 64)
                             and len(set(b)) == 4 and b not in planned)
        assert len(set(last_of_seven)) == 4  # 3 planned + 1 other image of its bucket
