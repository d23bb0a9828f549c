"""`precompute` and the cache: content-addressed keys, incremental and crash-safe runs, --verify,
--gc, exact equality with on-the-fly encoding, training without encoders, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tomli_w
import torch

from ditctl.config import build_config
from ditctl.data import cache as cache_mod
from ditctl.data import cache_shards as shards
from ditctl.data.batches import (CachedSource, OnTheFlySource, collate, crop_for, epoch_batches,
                                 flip_for)
from ditctl.data.cache import Cache, CacheIndex, KeySpec, latent_key, text_key
from ditctl.data.cache_plan import check_cache_complete, prompts_to_cache
from ditctl.data.cache_shards import shard_path
from ditctl.data.ingest import run_ingest
from ditctl.data.manifest import ManifestRow, read_manifest
from ditctl.demo.scenes import Scene, random_scenes, render, write_dataset
from ditctl.errors import CacheError, DataError
from ditctl.models.registry import load_family
from ditctl.precompute import run_precompute
from ditctl.workspace import Workspace
from tests.cache_entries import (drop_entry, garble_in_shard, overwrite_in_shard, read_stored,
                                 stored, to_one_file_layout)
from tests.conftest import family_class, family_method_path

SIZES = ((64, 64), (80, 48), (48, 80))


def make_workspace(root: Path, model_dir: Path, *, n: int = 6, n_val: int = 0, seed: int = 0,
                   data: dict | None = None, precompute: dict | None = None,
                   prompts: str | None = None, sample: dict | None = None,
                   sizes=SIZES) -> Workspace:
    """A workspace with `n` generated train images (and `n_val` val images), ingested."""
    root.mkdir(parents=True)
    write_dataset(root / "data", random_scenes(n, seed, sizes=sizes), csv_name="train.csv")
    data = {"train_data_path": "data/train.csv", "resolution": 64, **(data or {})}
    if n_val:
        write_dataset(root / "data", random_scenes(n_val, seed + 100, sizes=sizes),
                      csv_name="val.csv")
        data["val_data_path"] = "data/val.csv"
    toml = {"model": {"pretrained_model_path": str(model_dir)}, "data": data,
            "precompute": {"num_workers": 0, "batch_size": 4, **(precompute or {})}}
    if sample:
        toml["sample"] = sample
    (root / "project.toml").write_text(tomli_w.dumps(toml))
    if prompts is not None:
        (root / "prompts.txt").write_text(prompts)
    ws = Workspace(root)
    run_ingest(ws, ws.config())
    return ws


def all_rows(ws: Workspace) -> list[ManifestRow]:
    return read_manifest(ws, "train") + read_manifest(ws, "val")


class Counter:
    """Counts images and prompts that go through the encoders (wraps the family's methods)."""

    def __init__(self, monkeypatch, model_dir):
        self.images = 0
        self.prompts = 0
        family = family_class(model_dir)
        encode_images, encode_prompts = family.encode_images, family.encode_prompts

        def count_images(family, vae, images):
            self.images += images.shape[0]
            return encode_images(family, vae, images)

        def count_prompts(family, te, prompts):
            self.prompts += len(prompts)
            return encode_prompts(family, te, prompts)

        monkeypatch.setattr(family, "encode_images", count_images)
        monkeypatch.setattr(family, "encode_prompts", count_prompts)


def forbid_encoders(monkeypatch, model_dir):
    """Any attempt to build the VAE or the text encoder fails the test."""
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was constructed")

    monkeypatch.setattr(family_class(model_dir), "load_vae", refuse)
    monkeypatch.setattr(family_class(model_dir), "load_text_encoder", refuse)
    monkeypatch.setattr(AutoencoderKL, "__init__", refuse)
    monkeypatch.setattr(T5EncoderModel, "__init__", refuse)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(refuse))


def index_rows(ws: Workspace, config=None) -> dict[str, tuple]:
    path = ws.cache_dir(config or ws.config()) / "index.sqlite"
    with sqlite3.connect(path) as db:
        found = db.execute("SELECT key, kind, flip FROM entries")
        return {key: (kind, flip) for key, kind, flip in found}


# --- keys -------------------------------------------------------------------------------------

BASE_LATENT = dict(image_sha256="a" * 64, bucket=(64, 64), crop=(3, 0), flip=False,
                   vae_identity="vae:1", dtype="fp32")
BASE_TEXT = dict(caption="a red circle", text_identity="t5:1:2:L-8", max_length=32, dtype="fp32")


def test_keys_are_stable_across_versions():
    """Cache keys written by earlier versions must still be found: a change to how keys are
    computed (even a faster one) has to give these exact digests."""
    assert latent_key(**BASE_LATENT) == \
        "a8c3f133ce1385047f6c886bc3fe8e6698b643f596bc8582f98887c8529ed13c"
    assert latent_key(**{**BASE_LATENT, "flip": True}, mask="m:1") == \
        "7ebf9b90043b96e3cbb998487c4bb3f8af4b165005a103527d3fe96b63279ef3"
    assert text_key(caption='ein "rotes" Kreis \u2014 \u00fc\n\t\u65e5\u672c',
                    text_identity="t5:1:2:L-8", max_length=None, dtype="bf16") == \
        "17f28a1ea19b6b3b71076c73fd62a076fa96f0e383fccf854796f6a94b538510"


def test_keys_are_the_sha256_of_their_parts_as_sorted_json():
    """The keys' JSON is written by templates (for speed); it must be, byte for byte, what
    json.dumps(parts, sort_keys=True, ensure_ascii=False) gives, for any text."""
    texts = ["", "plain", 'quote " back \\ slash', "tab\t newline\n nul\x00 bell\x07",
             "\u00fc\u65e5\u672c \U0001f600 \u2028 \x7f"]
    for text in texts:
        for mask in (None, text, "file:" + "a" * 64):
            for flip in (False, True):
                parts = {"kind": "latent", "format": cache_mod.SCHEMA_VERSION,
                         "transform": cache_mod.TRANSFORM_VERSION, "image": text or "c" * 64,
                         "bucket": [1024, 48], "crop": [0, 17], "flip": flip, "vae": text,
                         "dtype": "bf16"}
                if mask is not None:
                    parts["mask"] = mask
                assert latent_key(image_sha256=text or "c" * 64, bucket=(1024, 48),
                                  crop=(0, 17), flip=flip, vae_identity=text, dtype="bf16",
                                  mask=mask) == cache_mod._digest(parts)
        for max_length in (None, 77, 512):
            assert text_key(caption=text, text_identity=text + "t5", max_length=max_length,
                            dtype="fp32") == cache_mod._digest(
                {"kind": "text", "format": cache_mod.SCHEMA_VERSION, "caption": text,
                 "encoder": text + "t5", "max_length": max_length, "dtype": "fp32"})


@pytest.mark.parametrize("change", [
    {"image_sha256": "b" * 64}, {"bucket": (80, 48)}, {"bucket": (48, 64)}, {"crop": (4, 0)},
    {"crop": (3, 1)}, {"flip": True}, {"vae_identity": "vae:2"}, {"dtype": "bf16"},
    {"dtype": "fp16"}])
def test_latent_key_changes_with_every_input(change):
    assert latent_key(**{**BASE_LATENT, **change}) != latent_key(**BASE_LATENT)
    assert latent_key(**{**BASE_LATENT, **change}) == latent_key(**{**BASE_LATENT, **change})


@pytest.mark.parametrize("change", [
    {"caption": "a red circle "}, {"caption": "A red circle"}, {"text_identity": "t5:1:3:L-8"},
    {"text_identity": "t5:1:2:L-7"}, {"max_length": 512}, {"dtype": "bf16"}])
def test_text_key_changes_with_every_input(change):
    assert text_key(**{**BASE_TEXT, **change}) != text_key(**BASE_TEXT)


def manifest_row(**changes) -> ManifestRow:
    base = dict(split="train", source="line 2", path=Path("/data/a.png"), caption="a red circle",
                sha256="c" * 64, size_bytes=1000, mtime_ns=5, width=96, height=64, format="PNG",
                bucket_w=64, bucket_h=64)
    return ManifestRow(**{**base, **changes})


SPEC = KeySpec(vae_identity="vae:1", text_identity="t5:1", text_max_length=32, dtype="fp32",
               center_crop=False)


@pytest.mark.parametrize("change", [
    {"path": Path("/moved/elsewhere.png")}, {"source": "line 9"}, {"caption": "other"},
    {"size_bytes": 1}, {"mtime_ns": 99}, {"split": "val"}, {"format": "JPEG"}])
def test_latent_key_ignores_what_does_not_change_the_pixels(change):
    assert SPEC.latent_key(manifest_row(**change), False) == SPEC.latent_key(manifest_row(), False)


@pytest.mark.parametrize("change", [
    {"sha256": "d" * 64},                        # other content (and another random crop)
    {"bucket_w": 48, "bucket_h": 80},            # another resolution / bucket
    {"width": 128},                              # other resize, so other crop range
])
def test_latent_key_follows_the_pixels(change):
    assert SPEC.latent_key(manifest_row(**change), False) != SPEC.latent_key(manifest_row(), False)


def test_crop_is_part_of_the_key():
    row = manifest_row(width=200)  # horizontal crop range 0..136
    centred = dataclasses.replace(SPEC, center_crop=True)
    assert crop_for(row, False) != (68, 0)
    assert SPEC.latent_key(row, False) != centred.latent_key(row, False)
    # an image that needs no crop has one entry whichever crop mode is set
    square = manifest_row(width=64, height=64)
    assert SPEC.latent_key(square, False) == centred.latent_key(square, False)
    assert SPEC.latent_key(row, True) != SPEC.latent_key(row, False)


def test_keys_ignore_unrelated_config(tiny_model_dir):
    family = load_family(tiny_model_dir)
    base = build_config({"data": {"resolution": 64}})
    spec = KeySpec.for_config(base, family, 32)
    for section, key, value in [("train", "learning_rate", 3e-3), ("train", "seed", 9),
                                ("lora", "use_lora", True), ("precompute", "batch_size", 1),
                                ("precompute", "num_workers", 7),
                                ("precompute", "output_dir", "elsewhere")]:
        assert KeySpec.for_config(base.replace(section, **{key: value}), family, 32) == spec
    assert KeySpec.for_config(base.replace("precompute", mixed_precision="bf16"),
                              family, 32).dtype == "bf16"
    assert KeySpec.for_config(base.replace("data", center_crop=True), family, 32) != spec
    assert spec.vae_identity == family.vae_identity()
    assert spec.text_identity == family.text_encoder_identity()


# --- a first run, a second run, an edited image ------------------------------------------------

def test_precompute_then_nothing_to_do(tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=6, n_val=2,
                        data={"random_flip": True, "use_resolution_buckets": True},
                        prompts="# header\n\na blue star\n  a red circle  \n",
                        sample={"negative_prompt": "blurry"})
    rows = all_rows(ws)
    counter = Counter(monkeypatch, tiny_model_dir)
    first = run_precompute(ws, ws.config())
    captions = {r.caption for r in rows} | {"a blue star", "a red circle", "blurry"}
    train = [r for r in rows if r.split == "train"]
    assert first.latents.total == first.latents.added == 2 * len(train) + 2  # val: unflipped
    assert counter.images == first.latents.total
    assert first.texts.total == first.texts.added == len(captions) == counter.prompts
    assert first.bad == [] and first.removed == 0
    files = sorted(p.relative_to(first.cache_dir) for p in first.cache_dir.rglob("*.safetensors"))
    # one shard per kind, not one file per entry
    assert [(p.parent.name, p.name.split("-")[0]) for p in files] == [("shards", "latent"),
                                                                       ("shards", "text")]
    assert first.flip_bytes * 2 < first.latent_bytes  # the flipped half of the train images
    state = ws.read_state()["precompute"]
    assert state["entries"] == first.latents.total + first.texts.total
    assert state["cache_plan_fingerprint"] == first.fingerprint
    assert state["bytes"] == first.latent_bytes + first.text_bytes

    forbid_encoders(monkeypatch, tiny_model_dir)  # nothing changed: no encoder may even be loaded
    second = run_precompute(ws, ws.config())
    assert (second.latents.added, second.texts.added) == (0, 0)
    assert (second.latents.reused, second.texts.reused) == (first.latents.total, first.texts.total)
    assert second.fingerprint == first.fingerprint


def test_edited_image_is_the_only_one_re_encoded(tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=6, data={"random_flip": True})
    before = run_precompute(ws, ws.config())
    row = read_manifest(ws, "train")[2]
    old_keys = set(index_rows(ws))
    scene = Scene("circle", "purple", "white", width=row.width, height=row.height)
    render(scene).save(row.path)  # new pixels, same path and caption
    time.sleep(0.01)
    run_ingest(ws, ws.config())

    counter = Counter(monkeypatch, tiny_model_dir)
    after = run_precompute(ws, ws.config())
    assert counter.images == 2 and counter.prompts == 0  # the image and its mirror; no caption
    assert (after.latents.added, after.latents.reused) == (2, before.latents.total - 2)
    assert after.texts.added == 0
    new_keys = set(index_rows(ws)) - old_keys
    assert len(new_keys) == 2
    # without --gc the old entries stay (another config may use them)
    assert len(index_rows(ws)) == len(old_keys) + 2


def test_changed_caption_resolution_and_model(tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=4)
    base = run_precompute(ws, ws.config())
    csv = ws.root / "data" / "train.csv"
    lines = csv.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",an edited caption"
    csv.write_text("\n".join(lines) + "\n")
    counter = Counter(monkeypatch, tiny_model_dir)
    # precompute sees the changed source through a re-ingest only; here ingest is explicit
    run_ingest(ws, ws.config())
    caption = run_precompute(ws, ws.config())
    assert (caption.latents.added, caption.texts.added) == (0, 1)
    assert (counter.images, counter.prompts) == (0, 1)

    # another resolution: every latent changes, no caption does (ingest runs first by itself)
    resized = run_precompute(ws, ws.config({"data.resolution": 32}))
    assert any("other [data] settings" in note for note in resized.notes)
    assert (resized.latents.added, resized.texts.added) == (base.latents.total, 0)

    # another VAE (same text encoder): every latent changes, no caption does
    other = tmp_path / "model-b"
    shutil.copytree(tiny_model_dir, other)
    config_file = other / "vae" / "config.json"
    vae_config = json.loads(config_file.read_text())
    vae_config["force_upcast"] = not vae_config.get("force_upcast", True)  # same weights
    config_file.write_text(json.dumps(vae_config))
    model_b = run_precompute(ws, ws.config({"data.resolution": 32,
                                            "model.pretrained_model_path": str(other)}))
    assert (model_b.latents.added, model_b.texts.added) == (base.latents.total, 0)


# --- exactness, and training that never loads an encoder ---------------------------------------

def test_cached_batches_equal_on_the_fly_batches(tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=8, n_val=1,
                        data={"random_flip": True, "use_resolution_buckets": True},
                        precompute={"num_workers": 2, "batch_size": 3},
                        sizes=((64, 64), (96, 64), (64, 96), (80, 48), (112, 48)))
    config = ws.config()
    run_precompute(ws, config)
    family = load_family(tiny_model_dir)
    train = read_manifest(ws, "train")
    assert len({r.bucket for r in train}) > 1
    assert sum(crop_for(r, False) != (0, 0) for r in train) >= 3  # real random crops
    live = OnTheFlySource(family, family.load_vae(), family.load_text_encoder(), config.data)
    cached = CachedSource(Cache.open(ws, config, family))
    seed, seen_flips = 11, set()
    for epoch in range(2):
        for indices in epoch_batches(train, 3, seed, epoch):
            flips = [flip_for(seed, epoch, i, True) for i in indices]
            seen_flips.update(flips)
            a = collate(cached, train, indices, flips)
            b = collate(live, train, indices, flips)
            assert a.indices == b.indices == tuple(indices)
            assert torch.equal(a.dist.mean, b.dist.mean) and torch.equal(a.dist.std, b.dist.std)
            assert torch.equal(a.cond.sequence, b.cond.sequence)
            assert a.cond.named_tensors().keys() == b.cond.named_tensors().keys()
            # the engine draws the posterior sample from its own generator: same draws
            ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            assert torch.equal(family.sample_latents(a.dist, ga), family.sample_latents(b.dist, gb))
    assert seen_flips == {False, True}
    # the mirrored variant is encoded from mirrored pixels: mirroring the latent is not the same
    row = train[0]
    mirrored = torch.flip(cached.latent_dist(row, False).mean, dims=[-1])
    assert not torch.allclose(cached.latent_dist(row, True).mean, mirrored, atol=1e-3)
    for row in read_manifest(ws, "val"):
        assert torch.equal(cached.latent_dist(row, False).mean, live.latent_dist(row, False).mean)


def test_a_cache_of_the_one_file_layout_reads_the_same_and_precompute_packs_it(
        tmp_path, tiny_model_dir, monkeypatch):
    """Caches written before shards (one file per entry, an index without shards) are read
    as they are, batch for batch the same, and the next precompute moves every entry into
    shards without encoding anything."""
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=5, data={"random_flip": True},
                        prompts="a blue star\n")
    config = ws.config()
    run_precompute(ws, config)
    family = load_family(tiny_model_dir)
    rows = read_manifest(ws, "train")

    def batches():
        source = CachedSource(Cache.open(ws, config, family))
        return [collate(source, rows, indices, [flip_for(0, 0, i, True) for i in indices])
                for epoch in range(2) for indices in epoch_batches(rows, 2, 0, epoch)]

    sharded = batches()
    cache = Cache.open(ws, config, family)
    entries = to_one_file_layout(cache)
    assert not shards.stored_shards(cache.root)
    assert len(list(cache.root.glob("*/*/*.safetensors"))) == entries
    old = batches()  # read before any ditctl upgraded the index
    check_cache_complete(ws, config, family, rows)  # upgrades it; still complete
    counter = Counter(monkeypatch, tiny_model_dir)
    result = run_precompute(ws, config, verify=True)
    assert result.packed == entries and result.bad == [] and result.verified == entries
    assert counter.images == counter.prompts == 0
    assert sorted(p.name for p in cache.root.iterdir()) == ["index.sqlite", "shards"]
    packed = batches()
    for a, b, c in zip(sharded, old, packed, strict=True):
        for x, y in ((a, b), (a, c)):
            assert torch.equal(x.dist.mean, y.dist.mean) and torch.equal(x.dist.std, y.dist.std)
            assert torch.equal(x.cond.sequence, y.cond.sequence)
    assert run_precompute(ws, config).packed == 0


def test_training_from_the_cache_loads_no_encoder(tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=5, data={"random_flip": True},
                        prompts="a green star on a black background\n")
    config = ws.config()
    run_precompute(ws, config)
    family = load_family(tiny_model_dir)
    live = family.load_text_encoder()
    expected_prompt = family.encode_prompts(live, ["a green star on a black background"])

    forbid_encoders(monkeypatch, tiny_model_dir)
    family = load_family(tiny_model_dir)
    rows = read_manifest(ws, "train")
    check_cache_complete(ws, config, family, rows)
    source = CachedSource(Cache.open(ws, config, family))
    for indices in epoch_batches(rows, 2, 0, 0):
        batch = collate(source, rows, indices, [flip_for(0, 0, i, True) for i in indices])
        # F-Lite's text length (512), whatever the tokenizer's model_max_length
        assert batch.cond.sequence.shape[1:] == (512, 32)
        assert torch.isfinite(batch.dist.mean).all()
    prompt = source.conditioning("a green star on a black background")
    assert torch.equal(prompt.sequence, expected_prompt.sequence)
    with pytest.raises(CacheError, match="not in the cache"):
        source.conditioning("a prompt nobody cached")


def test_caches_written_before_the_conditioning_type_read_or_report_stale(tmp_path,
                                                                          tiny_model_dir):
    """Entries of older ditctl versions: an F-Lite text entry named its one tensor "embedding"
    (read as the sequence; --verify re-encodes it once, as any entry without a content hash);
    entries keyed at the tokenizer's
    model_max_length (32 for the tiny models, not F-Lite's 512) no longer match any key, so
    training reports them missing or stale with the fix, instead of training on them."""
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=3, prompts="")
    config = ws.config()
    run_precompute(ws, config)
    family = load_family(tiny_model_dir)
    rows = read_manifest(ws, "train")
    cache = Cache.open(ws, config, family)
    to_one_file_layout(cache)  # as those versions stored entries
    caption = rows[0].caption
    path = cache.path("text", cache.spec.text_key(caption))
    current = cache.read_text(caption)
    from safetensors.torch import save
    path.write_bytes(save({"embedding": current.sequence[0].contiguous()},
                          metadata={"format": "ditctl-cache", "kind": "text"}))
    legacy = cache.read_text(caption)
    assert torch.equal(legacy.sequence, current.sequence) and legacy.pooled is None
    with CacheIndex(cache.index_path) as index:
        entry = next(e for e in index.entries() if e.key == cache.spec.text_key(caption))
    assert "no content hash" in cache_mod.check_entry(path, entry)

    # the same entries under the keys an older ditctl gave them (token length 32)
    old = dataclasses.replace(cache.spec, text_max_length=32)
    with CacheIndex(cache.index_path) as index:
        text_entries = [e for e in index.entries() if e.kind == "text"]
        index.remove([e.key for e in text_entries])
        moved = []
        for e in text_entries:
            old_key = old.text_key(e.source)
            target = cache.path("text", old_key)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cache.path("text", e.key), target)
            moved.append(dataclasses.replace(e, key=old_key))
        index.add(moved)
    with pytest.raises(CacheError, match="captions are missing or stale") as info:
        check_cache_complete(ws, config, family, rows)
    assert info.value.hint == "run `ditctl precompute`"
    again = run_precompute(ws, config)
    assert again.texts.added == len(text_entries)
    check_cache_complete(ws, config, family, rows)


def test_check_cache_complete_counts_what_is_missing(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=4, prompts="")
    family = load_family(tiny_model_dir)
    rows = read_manifest(ws, "train")
    captions = len({r.caption for r in rows})
    with pytest.raises(CacheError) as info:
        check_cache_complete(ws, ws.config(), family, rows)
    assert str(info.value).startswith(
        f"4 of 4 latents and {captions} of {captions} captions are missing or stale for the "
        "current config")
    assert info.value.hint == "run `ditctl precompute`"

    run_precompute(ws, ws.config())
    check_cache_complete(ws, ws.config(), family, rows)
    flipped = ws.config({"data.random_flip": True})
    with pytest.raises(CacheError, match=f"^4 of 8 latents and 0 of {captions} captions"):
        check_cache_complete(ws, flipped, family, rows)
    bf16 = ws.config({"precompute.mixed_precision": "bf16"})
    with pytest.raises(CacheError, match=f"^4 of 4 latents and {captions} of {captions} captions"):
        check_cache_complete(ws, bf16, family, rows)
    with pytest.raises(CacheError, match="^0 of 1 latents and 1 of 2 captions"):
        check_cache_complete(ws, ws.config(), family, rows[:1], prompts=["never cached"])


# --- crash safety -----------------------------------------------------------------------------

SLOW_PRECOMPUTE = textwrap.dedent("""
    import importlib, sys, time
    module, _, name = sys.argv[2].rpartition(":")
    family = getattr(importlib.import_module(module), name.split(".")[0])
    encode = family.encode_images
    def slow(self, vae, images):
        time.sleep(0.1)
        return encode(self, vae, images)
    family.encode_images = slow
    import ditctl.data.cache_shards
    ditctl.data.cache_shards.SHARD_ENTRIES = 3  # many shards: the kill lands between two
    from ditctl.precompute import run_precompute
    from ditctl.workspace import Workspace
    ws = Workspace(sys.argv[1])
    run_precompute(ws, ws.config())
""")


def committed_latents(index_path: Path) -> int:
    if not index_path.exists():
        return 0
    try:
        with sqlite3.connect(index_path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM entries WHERE kind = 'latent'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


@pytest.mark.slow
def test_sigkill_then_rerun_completes_a_valid_cache(tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=10, data={"random_flip": True},
                        precompute={"batch_size": 2})
    script = tmp_path / "slow.py"
    script.write_text(SLOW_PRECOMPUTE)
    index_path = ws.cache_dir(ws.config()) / "index.sqlite"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(script), str(ws.root),
                                family_method_path(tiny_model_dir, "encode_images")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        hang_guard = time.monotonic() + 600  # only a hung run fails here; speed is not checked
        while committed_latents(index_path) < 4:
            assert process.poll() is None, "precompute ended before it could be killed"
            assert time.monotonic() < hang_guard, "precompute hung"
            time.sleep(0.02)
        time.sleep(0.05)  # somewhere inside the next encode or write
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = committed_latents(index_path)
    assert 4 <= done < 20

    # every entry the index shows is complete
    with CacheIndex(index_path) as index:
        cache = Cache(index_path.parent, KeySpec("", "", None, "fp32", False))
        for entry in index.entries():
            assert entry.shard is not None and cache.check(entry) is None
        assert index.shard_names() == set(shards.stored_shards(index_path.parent))

    counter = Counter(monkeypatch, tiny_model_dir)
    rerun = run_precompute(ws, ws.config(), verify=True)
    assert rerun.bad == []
    assert rerun.latents.reused == done and rerun.latents.added == 20 - done
    assert counter.images == 20 - done
    assert not list(index_path.parent.rglob(".tmp-*"))
    with CacheIndex(index_path) as index:  # the unindexed shard of the killed run is gone
        assert index.shard_names() == set(shards.stored_shards(index_path.parent))
    family = load_family(tiny_model_dir)
    check_cache_complete(ws, ws.config(), family, read_manifest(ws, "train"))
    final = run_precompute(ws, ws.config(), verify=True)
    assert final.bad == [] and final.verified == final.latents.total + final.texts.total


# --- verify and gc ----------------------------------------------------------------------------

def test_verify_repairs_bad_entries_exactly(tmp_path, tiny_model_dir, monkeypatch):
    """Bad entries inside shards are found one by one, named (image or caption, shard and
    key), dropped and re-encoded bit for bit; the rest of their shard is untouched."""
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=5)
    config = ws.config()
    run_precompute(ws, config)
    family = load_family(tiny_model_dir)
    cache = Cache.open(ws, config, family)
    rows = read_manifest(ws, "train")
    garbled = cache.spec.latent_key(rows[0], False)
    poisoned = cache.spec.latent_key(rows[1], False)
    text = cache.spec.text_key(rows[2].caption)
    originals = {k: read_stored(cache, k) for k in (garbled, poisoned, text)}
    shard = garble_in_shard(cache, garbled)
    nan = dict(originals[poisoned])
    nan["mean"] = nan["mean"].clone()
    nan["mean"][0, 0, 0] = float("nan")
    overwrite_in_shard(cache, poisoned, nan, rehash=True)  # as if the VAE had produced it
    overwrite_in_shard(cache, text, {"sequence": torch.zeros_like(originals[text]["sequence"])})

    counter = Counter(monkeypatch, tiny_model_dir)
    result = run_precompute(ws, config, verify=True)
    reasons = dict(result.bad)
    assert len(result.bad) == 3
    assert "do not match the content hash" in reasons[str(rows[0].path)]
    assert f"{shard} [entry {garbled}]" in reasons[str(rows[0].path)]
    assert "non-finite" in reasons[str(rows[1].path)]
    assert "do not match the content hash" in reasons[rows[2].caption]
    assert counter.images == 2 and counter.prompts == 1
    for key, tensors in originals.items():  # re-encoded bit for bit
        again = read_stored(Cache.open(ws, config, family), key)
        assert all(torch.equal(again[name], tensors[name]) for name in tensors)
    assert run_precompute(ws, config, verify=True).bad == []


def test_verify_names_an_entry_whose_shard_is_missing(tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=3)
    run_precompute(ws, ws.config())
    cache = Cache.open(ws, ws.config(), load_family(tiny_model_dir))
    key = cache.spec.latent_key(read_manifest(ws, "train")[0], False)
    shard = shard_path(cache.root, stored(cache, key).shard)
    shard.unlink()
    result = run_precompute(ws, ws.config(), verify=True)
    assert result.latents.added == result.latents.total  # all were in that one shard
    assert all(why.startswith("shard missing") and shard.name in why for _, why in result.bad)


def test_missing_shard_is_re_encoded_without_verify(tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=3)
    run_precompute(ws, ws.config())
    cache = Cache.open(ws, ws.config(), load_family(tiny_model_dir))
    key = cache.spec.latent_key(read_manifest(ws, "train")[0], False)
    shard_path(cache.root, stored(cache, key).shard).unlink()
    counter = Counter(monkeypatch, tiny_model_dir)
    again = run_precompute(ws, ws.config())
    assert again.latents.added == again.latents.total == counter.images


def test_dropped_entry_is_re_encoded_without_verify(tmp_path, tiny_model_dir, monkeypatch):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=3)
    run_precompute(ws, ws.config())
    cache = Cache.open(ws, ws.config(), load_family(tiny_model_dir))
    drop_entry(cache, cache.spec.latent_key(read_manifest(ws, "train")[0], False))
    counter = Counter(monkeypatch, tiny_model_dir)
    assert run_precompute(ws, ws.config()).latents.added == 1 and counter.images == 1


def test_gc_removes_exactly_the_unreferenced_entries(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=8, prompts="")
    family = load_family(tiny_model_dir)
    rows = read_manifest(ws, "train")
    run_precompute(ws, ws.config())
    random_keys = set(index_rows(ws))
    centred = ws.config({"data.center_crop": True})
    run_precompute(ws, centred)
    both = set(index_rows(ws))
    spec = Cache.open(ws, centred, family).spec
    keep = {spec.latent_key(r, False) for r in rows} | {spec.text_key(r.caption) for r in rows}
    assert keep < both and random_keys < both
    stale = both - keep
    # only images that actually get cropped (not 64x64 ones) differ between the crop modes
    cropped = {r.sha256 for r in rows if (r.width, r.height) != (64, 64)}
    assert len(stale) == len(cropped) > 0

    cache_dir = ws.cache_dir(centred)
    stray = cache_dir / "latents" / "ff" / ("f" * 64 + ".safetensors")
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"left by a killed run")
    leftover = cache_dir / "text" / "ab" / ".tmp-abc.safetensors.x1"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half")

    result = run_precompute(ws, centred, gc=True)
    assert (result.removed, result.stray_files) == (len(stale), 1)
    assert set(index_rows(ws)) == keep
    assert not stray.exists() and not leftover.exists()
    with CacheIndex(cache_dir / "index.sqlite") as index:  # every shard on disk is indexed
        assert index.shard_names() == set(shards.stored_shards(cache_dir))
        for _, _, size, live, live_bytes in index.shard_usage():  # and mostly live
            assert live and live_bytes >= shards.COMPACT_BELOW * size
    check_cache_complete(ws, centred, family, rows)


# --- prompts, precision, errors ---------------------------------------------------------------

class _ZerosFamily:
    unconditional_prompt = None  # the unconditional input is fixed tensors, not a prompt


def test_prompts_to_cache(tmp_path):
    ws = Workspace(tmp_path)
    (tmp_path / "project.toml").write_text("")
    family = _ZerosFamily()
    assert prompts_to_cache(ws, ws.config(), family) == []
    (tmp_path / "prompts.txt").write_text("# a comment\n\n  one  \ntwo\none\n   # indented\n")
    assert prompts_to_cache(ws, ws.config(), family) == ["one", "two"]
    config = ws.config({"sample.negative_prompt": "ugly", "train.sample_prompts_file": "p2.txt"})
    with pytest.raises(DataError, match="p2.txt: no such file"):
        prompts_to_cache(ws, config, family)
    (tmp_path / "p2.txt").write_text("three\n")
    assert prompts_to_cache(ws, config, family) == ["three", "ugly"]


def test_bf16_storage_halves_the_latents(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=4)
    fp32 = run_precompute(ws, ws.config())
    bf16 = run_precompute(ws, ws.config({"precompute.mixed_precision": "bf16"}))
    assert bf16.latents.added == fp32.latents.total and bf16.dtype == "bf16"
    assert 0.45 < bf16.latent_bytes / fp32.latent_bytes < 0.6  # plus a fixed header per file
    cache = Cache.open(ws, ws.config({"precompute.mixed_precision": "bf16"}),
                       load_family(tiny_model_dir))
    row = read_manifest(ws, "train")[0]
    assert read_stored(cache, cache.spec.latent_key(row, False))["mean"].dtype == torch.bfloat16
    exact = Cache.open(ws, ws.config(), load_family(tiny_model_dir)).read_latents(row, False)
    close = cache.read_latents(row, False)
    assert close.mean.dtype == torch.float32
    assert torch.allclose(close.mean, exact.mean, rtol=2e-2, atol=2e-2)


def test_image_changed_after_ingest_is_an_error(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=3)
    row = read_manifest(ws, "train")[1]
    render(Scene("star", "red", "black", width=row.width, height=row.height)).save(row.path)
    with pytest.raises(DataError, match="changed since ingest") as info:
        run_precompute(ws, ws.config())
    assert str(row.path) in str(info.value) and "ditctl ingest" in info.value.hint


# --- the command ------------------------------------------------------------------------------

def test_cli_precompute(tmp_path, tiny_model_dir, cli, monkeypatch):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n=4, prompts="a red star\n")
    monkeypatch.chdir(ws.root)  # paths given as flags are relative to the current folder
    # the guide's precompute_embeddings.py flags, spelled as the guide spells them
    result = cli("precompute", "-w", ws.root, "--pretrained_model_path", tiny_model_dir,
                 "--data_path", "data/train.csv", "--base_image_dir", "data",
                 "--output_dir", "precomputed_data", "--resolution", "64",
                 "--mixed_precision", "bf16", "--random-flip")
    assert result.exit_code == 0, result.output
    out = result.stdout
    # base_image_dir differs from what ingest used: the manifest is rebuilt first, and said so
    assert "ingesting first" in result.stderr and "base_image_dir" in result.stderr
    assert "latents   8 (4 images + 4 flipped variants): 8 added, 0 reused" in out
    assert "of which 1 sample/negative prompts" in out
    assert "per image vs." in out and "per source image" in out and "flipped variants" in out
    assert "cache ready" in out
    assert (ws.root / "precomputed_data" / "index.sqlite").is_file()
    assert not (ws.root / "cache").exists()

    again = cli("precompute", "-w", ws.root, "--mixed-precision", "bf16",
                "--base-image-dir", "data", "--output-dir", "precomputed_data", "--random-flip",
                "--json", "--verify")
    assert again.exit_code == 0, again.output
    counters = json.loads(again.stdout)
    assert counters["added"] == 0 and counters["reused"] == counters["entries"]
    assert counters["latents"] == {"total": 8, "added": 0, "reused": 8}
    assert counters["dtype"] == "bf16" and counters["verified"] == counters["entries"]
    state = ws.read_state()["precompute"]
    assert state["cache_plan_fingerprint"] == counters["cache_plan_fingerprint"]

    bad = cli("precompute", "-w", ws.root, "--mixed-precision", "fp8")
    assert bad.exit_code == 1 and "--mixed-precision = 'fp8': must be one of" in bad.stderr
