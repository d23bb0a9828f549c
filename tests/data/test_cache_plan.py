"""PrecomputePlan: precompute's plan in a temporary SQLite file gives the entries, the
batches, the gaps, the unused entries and the sizes a plan held in memory gives, while Python
holds nothing per entry."""

from __future__ import annotations

import gc
import hashlib
import tracemalloc
from pathlib import Path

import pytest
import torch

from ditctl.data.cache import (Cache, CacheIndex, KeySpec, crop_offsets, entry_to_store,
                               latent_tensors)
from ditctl.data.cache_plan import PrecomputePlan
from ditctl.data.cache_shards import ShardWriter, shard_path
from ditctl.data.manifest import ManifestRow, MaskRef, write_manifest
from ditctl.data.sample_table import SampleTable
from ditctl.workspace import Workspace

SPEC = KeySpec(vae_identity="vae:1", text_identity="t5:1", text_max_length=32, dtype="fp32",
               center_crop=(False, True))
BUCKETS = [(64, 64), (80, 48), (48, 80)]


def sample(n: int, split: str, root: Path) -> ManifestRow:
    """One image in 7 is a copy of the one before (same content, same bucket) and every 5th
    caption repeats: duplicate keys that the first sample must stand for."""
    content = n - 1 if n % 7 == 3 else n
    w, h = BUCKETS[content % len(BUCKETS)]
    return ManifestRow(
        split=split, source=f"row {n}", path=root / f"img-{n}.png",
        caption=f"caption {n % 5 if n % 5 == 0 else n}", sha256=f"{content:064x}",
        size_bytes=100, mtime_ns=1, width=w + 10, height=h + 6, format="PNG", bucket_w=w,
        bucket_h=h, dataset=content % 2,
        mask=MaskRef("alpha", root / f"img-{n}.png", f"{n:064x}", 5, 6) if n % 9 == 0
        else None)


@pytest.fixture
def tables(tmp_path) -> list[SampleTable]:
    ws = Workspace(tmp_path)
    rows = [sample(n, "train", tmp_path) for n in range(300)]
    rows += [sample(n, "val", tmp_path) for n in range(300, 330)]
    write_manifest(ws.manifest_db, rows, [], {})
    return [SampleTable.read(ws.manifest_db, split) for split in ("train", "val")]


def in_memory_plan(tables, random_flip, prompts):
    """The plan as dicts, the way precompute held it before: key -> (sample id, flip) or
    caption, first asker wins, in asking order."""
    latents, texts, variants = {}, {}, 0
    for table in tables:
        for sample_id, row in zip(table.ids.tolist(), table):
            crop = crop_offsets(row, SPEC.center_crop)
            flips = (False, True) if random_flip and row.split == "train" else (False,)
            for flip in flips:
                latents.setdefault(SPEC.latent_key(row, flip, crop), (sample_id, flip, row))
                variants += 1
    for caption in [row.caption for table in tables for row in table] + list(prompts):
        texts.setdefault(SPEC.text_key(caption), caption)
    return latents, texts, variants


PROMPTS = ["a sample prompt", "caption 0", ""]  # one of them is also a caption


@pytest.mark.parametrize("random_flip", [False, True])
def test_the_plan_holds_what_the_in_memory_plan_held(tables, random_flip):
    latents, texts, variants = in_memory_plan(tables, random_flip, PROMPTS)
    with PrecomputePlan.build(SPEC, tables, random_flip=random_flip, prompts=PROMPTS) as plan:
        counts = plan.counts
        assert (counts.images, counts.variants) == (330, variants)
        assert (counts.latents, counts.texts) == (len(latents), len(texts))
        assert counts.latents < variants  # the copies share entries
        assert counts.prompts == 2        # "caption 0" is a caption already
        assert list(plan.keys()) == sorted(set(latents) | set(texts))
        digest = hashlib.sha256()
        for key in sorted(set(latents) | set(texts)):
            digest.update(key.encode() + b"\n")
        assert plan.fingerprint == digest.hexdigest()[:16]

        with CacheIndex(Path(tables[0].path).parent / "index.sqlite") as index:
            assert plan.find_missing(Cache(index.path.parent, SPEC), index) == (
                len(latents), len(texts))
            assert list(plan.missing_texts()) == list(texts.items())  # asking order
            batches = plan.latent_batches(4)
            got = list(batches)
            assert len(batches) == len(got)
            # one bucket per batch, buckets in order, asking order within one, the first
            # sample of each key
            by_bucket: dict = {}
            for key, (sample_id, flip, row) in latents.items():
                by_bucket.setdefault(row.bucket, []).append((key, sample_id, flip))
            expected = [members[k:k + 4] for bucket in sorted(by_bucket)
                        for members in [by_bucket[bucket]] for k in range(0, len(members), 4)]
            assert got == expected


def write_entries(cache: Cache, index: CacheIndex, keys: list[str]) -> None:
    writer = ShardWriter(cache.root, index, "latent")
    for key in keys:
        tensors = latent_tensors(torch.zeros(4, 2, 2), torch.ones(4, 2, 2), torch.float32)
        writer.add(*entry_to_store("latent", key, tensors, (4, 2, 2), "fp32", False, key))
    writer.flush()


def test_missing_unused_and_sizes_come_from_the_index(tables, tmp_path):
    cache = Cache(tmp_path / "cache", SPEC)
    latents, texts, _ = in_memory_plan(tables, True, ())
    needed = list(latents)
    with CacheIndex(cache.index_path) as index, \
            PrecomputePlan.build(SPEC, tables, random_flip=True) as plan:
        write_entries(cache, index, needed[:40])             # one shard, stays
        write_entries(cache, index, needed[40:50])           # a shard that goes missing
        write_entries(cache, index, ["f" * 64, "e" * 64])    # entries nobody needs
        gone = index.entry(needed[45]).shard
        shard_path(cache.root, gone).unlink()
        # an entry of the one-file layout whose file is there, and one whose file is not
        for key, present in ((needed[60], True), (needed[61], False)):
            index.add([entry_to_store("latent", key, {}, (4, 2, 2), "fp32", False, "x")[0]])
            if present:
                cache.path("latent", key).parent.mkdir(parents=True, exist_ok=True)
                cache.path("latent", key).write_bytes(b"entry")

        missing_latents, missing_texts = plan.find_missing(cache, index)
        assert (missing_latents, missing_texts) == (len(latents) - 41, len(texts))
        missing = {key for batch in plan.latent_batches(8) for key, _, _ in batch}
        assert missing == set(needed) - set(needed[:40]) - {needed[60]}

        assert plan.find_unused(index) == 2
        assert [sorted(key for key, _, _ in chunk) for chunk in plan.unused()] == [
            ["e" * 64, "f" * 64]]
        latent_bytes, flip_bytes, text_bytes = plan.stored_bytes(index)
        per_entry = 2 * 4 * 2 * 2 * 4
        indexed = needed[:50] + needed[60:62]
        assert latent_bytes == per_entry * 50 + 0 * 2  # the one-file rows record 0 bytes
        assert flip_bytes == per_entry * sum(latents[k][1] for k in needed[:50])
        assert text_bytes == 0 and len(indexed) == 52


def test_the_plan_keeps_nothing_per_entry_in_python(tmp_path):
    """Python memory retained by a built plan does not grow with the samples: the entries
    live in the plan's file (SQLite's own page cache is bounded by its cache_size)."""
    ws = Workspace(tmp_path)
    write_manifest(ws.manifest_db, (sample(n, "train", tmp_path) for n in range(3000)), [], {})
    table = SampleTable.read(ws.manifest_db, "train")
    PrecomputePlan.build(SPEC, [table[:100]], random_flip=True).close()  # one-time costs

    def retained(rows) -> int:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            plan = PrecomputePlan.build(SPEC, [rows], random_flip=True)
            gc.collect()  # the last chunk of rows may sit in a reference cycle until then
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        plan.close()
        return after - before

    small, large = retained(table[:500]), retained(table)
    assert large - small < 20_000  # 2,500 more samples (5,000 more variants): < 4 B each
