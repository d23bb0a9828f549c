"""Bucket planning: sizes on the 16-grid, areas in bounds, every image assigned or dropped for a
stated reason, small buckets merged where that is harmless."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ditctl.data.buckets import (MERGE_MIN_KEPT, candidate_buckets, cover_scale, kept_fraction,
                                 native_target, nearest_bucket, plan_buckets)

sizes_strategy = st.lists(st.tuples(st.integers(8, 3000), st.integers(8, 3000)),
                          min_size=1, max_size=60)


def check_plan_invariants(sizes, plan, *, resolution, max_upscale, max_native_pixels):
    assert len(plan.targets) == len(sizes)
    for index, ((width, height), target) in enumerate(zip(sizes, plan.targets)):
        if target is None:
            assert index in plan.dropped and plan.dropped[index].startswith("too small")
            continue
        assert index not in plan.dropped
        bucket_w, bucket_h = target
        assert bucket_w % 16 == 0 and bucket_h % 16 == 0 and min(target) >= 16
        assert cover_scale(width, height, *target) <= max_upscale + 1e-9
        if resolution is not None:
            assert bucket_w * bucket_h <= resolution ** 2
        else:
            assert bucket_w * bucket_h <= max_native_pixels
    # the bucket table accounts for every assigned image, once
    assigned = [t for t in plan.targets if t is not None]
    assert sum(b.count for b in plan.buckets) == len(assigned)
    assert {(b.width, b.height) for b in plan.buckets} == set(assigned)
    batches = sum(math.ceil(b.count / plan.batch_size) for b in plan.buckets)
    assert plan.batches_per_epoch == batches


@settings(max_examples=150, deadline=None)
@given(sizes=sizes_strategy, resolution=st.sampled_from([None, 256, 512, 1024]),
       use_buckets=st.booleans(), max_upscale=st.sampled_from([1.0, 1.5, 2.0, 4.0]),
       batch_size=st.integers(1, 8))
def test_plan_properties(sizes, resolution, use_buckets, max_upscale, batch_size):
    plan = plan_buckets(sizes, resolution=resolution, use_buckets=use_buckets,
                        max_upscale=max_upscale, max_native_pixels=512 * 512,
                        batch_size=batch_size, multiple=16)
    check_plan_invariants(sizes, plan, resolution=resolution, max_upscale=max_upscale,
                          max_native_pixels=512 * 512)
    # no silent drops: an image is dropped exactly when it is too small for its own target
    for (width, height), target in zip(sizes, plan.targets):
        if resolution is None:
            too_small = native_target(width, height, 512 * 512, multiple=16) is None
        else:
            own = (nearest_bucket(width, height, candidate_buckets(resolution, multiple=16)) if use_buckets
                   else (resolution, resolution))
            too_small = cover_scale(width, height, *own) > max_upscale + 1e-9
        assert (target is None) == too_small


@settings(max_examples=100, deadline=None)
@given(sizes=sizes_strategy, resolution=st.sampled_from([256, 512]),
       max_upscale=st.sampled_from([1.0, 2.0]))
def test_only_images_needing_too_much_upscaling_are_dropped(sizes, resolution, max_upscale):
    plan = plan_buckets(sizes, resolution=resolution, use_buckets=False, max_upscale=max_upscale,
                        max_native_pixels=10**6, batch_size=1, multiple=16)
    for (width, height), target in zip(sizes, plan.targets):
        needs = resolution / min(width, height)
        assert (target is None) == (needs > max_upscale + 1e-9)
        assert target in (None, (resolution, resolution))


def test_random_sizes_with_fixed_seed():
    # The same invariants without hypothesis' shrinking, on a larger realistic set.
    rng = random.Random(0)
    sizes = [(rng.randint(400, 2500), rng.randint(400, 2500)) for _ in range(500)]
    for resolution in (None, 512):
        plan = plan_buckets(sizes, resolution=resolution, use_buckets=True, max_upscale=2.0,
                            max_native_pixels=1024 * 1024, batch_size=4, multiple=16)
        check_plan_invariants(sizes, plan, resolution=resolution, max_upscale=2.0,
                              max_native_pixels=1024 * 1024)
        assert not plan.dropped


def test_candidate_buckets_cover_aspects_at_the_target_area():
    buckets = candidate_buckets(512, multiple=16)
    assert (512, 512) in buckets and (1024, 256) in buckets and (256, 1024) in buckets
    for width, height in buckets:
        assert width % 16 == 0 and height % 16 == 0
        assert 0.9 * 512 ** 2 <= width * height <= 512 ** 2
        assert 0.25 <= width / height <= 4


def test_bucket_follows_aspect_ratio():
    plan = plan_buckets([(1920, 1080), (1080, 1920), (1000, 1000)], resolution=512,
                        use_buckets=True, max_upscale=2.0, max_native_pixels=10**6, batch_size=1, multiple=16)
    (w1, h1), (w2, h2), square = plan.targets
    assert abs(w1 / h1 - 16 / 9) < 0.05 and abs(w2 / h2 - 9 / 16) < 0.05
    assert square == (512, 512)
    assert plan.merges == 0 and len(plan.buckets) == 3


def test_small_buckets_merge_into_the_nearest_when_batching():
    sizes = [(1000, 1000)] * 4 + [(1040, 1000)] + [(1920, 1080)] * 4
    plan = plan_buckets(sizes, resolution=512, use_buckets=True, max_upscale=2.0,
                        max_native_pixels=10**6, batch_size=4, multiple=16)
    # the lone near-square image joins the square bucket, not the 16:9 one
    assert plan.targets[4] == (512, 512)
    assert [b.count for b in plan.buckets] == [5, 4] and plan.merges == 1
    assert plan.batches_per_epoch == 2 + 1


def test_far_apart_buckets_are_not_merged_and_are_filled_by_the_trainer():
    sizes = [(4000, 1000), (1000, 4000)]
    plan = plan_buckets(sizes, resolution=512, use_buckets=True, max_upscale=2.0,
                        max_native_pixels=10**6, batch_size=2, multiple=16)
    assert plan.targets[0] != plan.targets[1] and plan.merges == 0
    assert kept_fraction(4000, 1000, *plan.targets[1]) < MERGE_MIN_KEPT
    assert plan.batches_per_epoch == 2 and not plan.dropped
    # the note says what ditctl.train.TrainingData does with them (tests/engine: _fill)
    assert plan.notes == ("2 bucket(s) hold fewer images than the batch size (2); the trainer "
                          "fills their batches by repeating the bucket's images, so these "
                          "images are seen more often per epoch",)


def test_merge_never_upscales_beyond_the_limit():
    # The 600x600 image (native 592x592) would need 1.73x to join the 1024x1024 bucket.
    sizes = [(1024, 1024)] * 3 + [(600, 600)]
    plan = plan_buckets(sizes, resolution=None, use_buckets=True, max_upscale=1.5,
                        max_native_pixels=2 * 1024 * 1024, batch_size=4, multiple=16)
    # so the lone image stays, and the three large ones come down to it instead
    assert plan.targets == ((592, 592),) * 4 and plan.buckets[0].upscaled == 0
    merged = plan_buckets(sizes, resolution=None, use_buckets=True, max_upscale=2.0,
                          max_native_pixels=2 * 1024 * 1024, batch_size=4, multiple=16)
    assert merged.targets == ((1024, 1024),) * 4 and merged.buckets[0].upscaled == 1


def test_native_sizes_round_down_and_respect_the_area_cap():
    assert native_target(1000, 700, 10**7, multiple=16) == (992, 688)
    width, height = native_target(4000, 3000, 1024 * 1024, multiple=16)
    assert width * height <= 1024 * 1024 and width % 16 == 0 and height % 16 == 0
    assert abs(width / height - 4 / 3) < 0.03
    assert native_target(15, 400, 10**6, multiple=16) is None


def test_native_without_buckets_reports_mixed_sizes():
    plan = plan_buckets([(512, 512), (640, 480)], resolution=None, use_buckets=False,
                        max_upscale=2.0, max_native_pixels=10**6, batch_size=2, multiple=16)
    assert plan.mode == "native" and plan.targets == ((512, 512), (640, 480))
    assert any("2 different image sizes" in note for note in plan.notes)
    assert plan_buckets([(512, 512)] * 2, resolution=None, use_buckets=False, max_upscale=2.0,
                        max_native_pixels=10**6, batch_size=2, multiple=16).notes == ()


def test_square_mode_counts_resize_crop_and_upscale():
    plan = plan_buckets([(512, 512), (1024, 512), (300, 400)], resolution=512, use_buckets=False,
                        max_upscale=2.0, max_native_pixels=10**6, batch_size=2, multiple=16)
    (bucket,) = plan.buckets
    assert (bucket.width, bucket.height, bucket.count) == (512, 512, 3)
    assert (bucket.resized, bucket.cropped, bucket.upscaled) == (2, 2, 1)
