"""Loss masks ([data] use_masks): where they come from (CSV column, NAME.mask.png, alpha), how
ingest validates them, the transform they share with their image, the latent grid, the cache
key and entry, and cached == on the fly."""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_workspace  # noqa: E402

from ditctl.data.batches import (CachedSource, OnTheFlySource, collate, crop_for,  # noqa: E402
                                 epoch_batches, flip_for)
from ditctl.data.cache import Cache, KeySpec  # noqa: E402
from ditctl.data.ingest import StrictIngestError, run_ingest  # noqa: E402
from ditctl.data.manifest import (MaskRef, compute_fingerprint, manifest_fingerprint,  # noqa: E402
                                  read_manifest)
from ditctl.data.sources import is_mask_name, read_folder  # noqa: E402
from ditctl.data.transforms import (latent_mask, load_training_image,  # noqa: E402
                                    load_training_mask)
from ditctl.models.registry import load_family  # noqa: E402
from ditctl.precompute import run_precompute  # noqa: E402


def mask_pattern(width: int, height: int, seed: int) -> Image.Image:
    """A grey mask that is not mirror-symmetric: black left part, grey band, white rest."""
    rng = np.random.default_rng(seed)
    values = np.full((height, width), 255, dtype=np.uint8)
    values[:, : width // 3] = 0
    values[: height // 2, width // 3: width // 2] = 128
    values[rng.integers(0, height), rng.integers(0, width)] = 64
    return Image.fromarray(values, mode="L")


def add_masks(root: Path, csv_name: str = "train.csv") -> dict[str, str]:
    """Give the CSV's images masks, one of each kind in turn: a NAME.mask.png beside the image,
    a file named in a `mask_path` column, the image's own alpha channel, and none. Returns
    image path -> kind."""
    data = root / "data"
    with open(data / csv_name, newline="") as fh:
        rows = list(csv.DictReader(fh))
    kinds = {}
    (data / "masks").mkdir(exist_ok=True)
    for i, row in enumerate(rows):
        image_path = data / row["image_path"]
        with Image.open(image_path) as image:
            image.load()
        mask = mask_pattern(image.width, image.height, i)
        kind = ("sidecar", "column", "alpha", "none")[i % 4]
        row["mask_path"] = ""
        if kind == "sidecar":
            mask.save(image_path.with_name(image_path.stem + ".mask.png"))
        elif kind == "column":
            relative = f"masks/{Path(csv_name).stem}-{i}.png"
            mask.save(data / relative)
            row["mask_path"] = relative
        elif kind == "alpha":
            rgba = image.convert("RGBA")
            rgba.putalpha(mask)
            rgba.save(image_path)
        kinds[str(image_path)] = kind
    with open(data / csv_name, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image_path", "caption", "mask_path"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return kinds


@pytest.fixture()
def masked(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n_train=8, n_val=0,
                        sizes=((64, 64), (96, 64), (64, 96), (80, 48), (112, 48)),
                        data={"use_masks": True, "random_flip": True, "center_crop": False,
                              "use_resolution_buckets": True})
    kinds = add_masks(ws.root)
    return ws, kinds


def test_ingest_finds_each_kind_of_mask(masked):
    ws, kinds = masked
    summary = run_ingest(ws, ws.config(), workers=1)
    assert "loss masks: 4 from mask files, 2 from alpha channels; 2 image(s) without one" \
        in summary.notes[-1]
    rows = read_manifest(ws, "train")
    assert len(rows) == len(kinds)  # the sidecar masks are not images of their own
    for row in rows:
        kind = kinds[str(row.path)]
        if kind == "none":
            assert row.mask is None
        elif kind == "alpha":
            assert row.mask == MaskRef("alpha", row.path, row.sha256, row.size_bytes,
                                       row.mtime_ns)
        else:
            assert row.mask.kind == "file" and row.mask.path.is_file()
            assert row.mask.path.name.endswith(".mask.png") == (kind == "sidecar")
    # the fingerprint ingest writes by SQL covers the masks as the rows read back hold them
    assert manifest_fingerprint(ws) == compute_fingerprint(rows)
    # without use_masks nothing is read: the rows carry no masks
    run_ingest(ws, ws.config({"data.use_masks": False}), workers=1)
    assert all(row.mask is None for row in read_manifest(ws, "train"))


def test_masks_of_both_splits_belong_to_their_samples(tmp_path, tiny_model_dir):
    """The manifest's masks point at the samples they belong to in the validation split too
    (whose ids follow the training split's)."""
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n_train=6, n_val=5,
                        sizes=((64, 64), (96, 64), (64, 96)),
                        data={"use_masks": True, "use_resolution_buckets": True})
    kinds = {**add_masks(ws.root), **add_masks(ws.root, "val.csv")}
    run_ingest(ws, ws.config(), workers=1)
    for split, count in (("train", 6), ("val", 5)):
        rows = read_manifest(ws, split)
        assert len(rows) == count
        for row in rows:
            kind = kinds[str(row.path)]
            assert (row.mask is None) == (kind == "none"), (split, row.source)
            if kind == "alpha":
                assert row.mask.kind == "alpha" and row.mask.path == row.path
            elif kind != "none":
                assert row.mask.kind == "file" and row.mask.path != row.path


def test_a_folder_source_skips_mask_files(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "cat.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "cat.mask.png")
    assert [row.source for row in read_folder(tmp_path, split="train")] == ["cat.png"]
    assert is_mask_name("a.mask.PNG") and not is_mask_name(".mask.png")
    assert not is_mask_name("mask.png")


def _break_corrupt(path: Path, image: Image.Image) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)


def _break_size(path: Path, image: Image.Image) -> None:
    Image.new("L", (image.width + 8, image.height), 255).save(path)


def _break_black(path: Path, image: Image.Image) -> None:
    Image.new("L", image.size, 0).save(path)


def _break_missing(path: Path, image: Image.Image) -> None:
    path.unlink()


@pytest.mark.parametrize("damage, code, words", [
    (_break_corrupt, "bad_mask_corrupt", "corrupt"),
    (_break_size, "bad_mask_size", "must match"),
    (_break_black, "bad_mask_empty_mask", "black everywhere"),
    (_break_missing, "bad_mask_missing", "file not found"),
])
def test_ingest_rejects_a_bad_mask_naming_the_row(masked, damage, code, words):
    ws, kinds = masked
    image = next(Path(p) for p, kind in kinds.items() if kind == "column")
    with open(ws.root / "data" / "train.csv", newline="") as fh:
        records = list(csv.DictReader(fh))
    line = next(i for i, r in enumerate(records) if (ws.root / "data" / r["image_path"]) == image)
    mask = ws.root / "data" / records[line]["mask_path"]
    with Image.open(image) as opened:
        damage(mask, opened.copy())
    summary = run_ingest(ws, ws.config(), workers=1)
    [bad] = summary.bad
    assert bad.code == code and words in bad.reason, bad
    assert bad.where == f"train.csv:{line + 2}" and records[line]["mask_path"] in bad.reason
    assert "\n" not in bad.reason
    assert len(read_manifest(ws, "train")) == len(kinds) - 1
    with pytest.raises(StrictIngestError):
        run_ingest(ws, ws.config(), strict=True, workers=1)


def test_the_mask_goes_through_the_images_geometry(tmp_path):
    """The same grey levels as an image and as a mask land on the same pixels, for every crop
    and flip (same resize filter, crop box and mirror)."""
    grey = mask_pattern(50, 37, 0)
    grey.convert("RGB").save(tmp_path / "image.png")
    grey.save(tmp_path / "mask.png")
    for crop, flip in (("center", False), ((3, 0), True), ((11, 0), False)):
        image = load_training_image(tmp_path / "image.png", 32, 32, crop=crop, flip=flip)
        mask = load_training_mask(tmp_path / "mask.png", 32, 32, crop=crop, flip=flip)
        assert mask.shape == (1, 32, 32) and mask.dtype == torch.float32
        assert 0 <= mask.min() and mask.max() <= 1
        assert torch.equal(torch.round((image[:1] + 1) * 127.5), torch.round(mask * 255))


def test_an_alpha_mask_is_the_alpha_channel(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (200, 10, 10, 255))
    rgba.putalpha(mask_pattern(32, 32, 1))
    rgba.save(tmp_path / "a.png")
    mask = load_training_mask(tmp_path / "a.png", 32, 32, alpha=True)
    assert torch.equal(mask[0], torch.from_numpy(np.array(mask_pattern(32, 32, 1))) / 255.0)
    Image.new("RGB", (32, 32)).save(tmp_path / "opaque.png")
    assert torch.equal(load_training_mask(tmp_path / "opaque.png", 32, 32, alpha=True),
                       torch.ones(1, 32, 32))


def test_latent_mask_is_the_area_average():
    mask = torch.zeros(1, 1, 4, 8)
    mask[..., :2, :2] = 1  # the first 2x2 area fully, the next one half
    mask[..., :, 2] = 1
    out = latent_mask(mask, 2)
    assert out.shape == (1, 1, 2, 4)
    assert torch.equal(out[0, 0], torch.tensor([[1.0, 0.5, 0, 0], [0, 0.5, 0, 0]]))


def test_a_mask_is_part_of_its_latent_key_and_editing_it_changes_the_key(masked, tiny_model_dir):
    ws, kinds = masked
    config = ws.config()
    run_ingest(ws, config, workers=1)
    family = load_family(tiny_model_dir)
    spec = KeySpec.for_config(config, family, family.text_tokens())
    rows = {str(r.path): r for r in read_manifest(ws, "train")}
    plain = {p: spec.latent_key(dataclasses.replace(r, mask=None), False)
             for p, r in rows.items()}
    for path, row in rows.items():
        # rows without a mask keep the key they had before masks existed
        assert (spec.latent_key(row, False) == plain[path]) == (row.mask is None)
    sidecar = next(Path(p) for p, kind in kinds.items() if kind == "sidecar")
    before = spec.latent_key(rows[str(sidecar)], False)
    mask_file = sidecar.with_name(sidecar.stem + ".mask.png")
    mask_pattern(*Image.open(mask_file).size, seed=99).transpose(
        Image.Transpose.FLIP_TOP_BOTTOM).save(mask_file)
    run_ingest(ws, config, workers=1)
    after = {str(r.path): r for r in read_manifest(ws, "train")}[str(sidecar)]
    assert spec.latent_key(after, False) != before
    others = [p for p in rows if p != str(sidecar)]
    assert all(spec.latent_key(rows[p], False) == spec.latent_key(
        {str(r.path): r for r in read_manifest(ws, "train")}[p], False) for p in others)


def test_cached_masks_equal_on_the_fly_masks(masked, tiny_model_dir):
    ws, kinds = masked
    config = ws.config({"precompute.num_workers": 0, "precompute.batch_size": 3})
    run_precompute(ws, config)
    family = load_family(tiny_model_dir)
    train = read_manifest(ws, "train")
    assert len({r.bucket for r in train}) > 1 and any(crop_for(r, False) != (0, 0) for r in train)
    live = OnTheFlySource(family, family.load_vae(), family.load_text_encoder(), config.data)
    cached = CachedSource(Cache.open(ws, config, family))
    seed, flips_seen, factor = 3, set(), family.latent.spatial_factor
    for epoch in range(2):
        for indices in epoch_batches(train, 3, seed, epoch):
            flips = [flip_for(seed, epoch, i, True) for i in indices]
            flips_seen.update(flips)
            a = collate(cached, train, indices, flips, masks=True)
            b = collate(live, train, indices, flips, masks=True)
            assert torch.equal(a.mask, b.mask) and torch.equal(a.dist.mean, b.dist.mean)
            row = train[indices[0]]
            assert a.mask.shape == (len(indices), 1, row.bucket_h // factor,
                                    row.bucket_w // factor)
            for k, i in enumerate(indices):
                if train[i].mask is None:
                    assert torch.equal(a.mask[k], torch.ones_like(a.mask[k]))
                else:  # a real mask: black on one side, so never all ones
                    assert a.mask[k].min() < 1
    assert flips_seen == {False, True}
    # the mirrored variant's mask is the mirrored mask (crops are per image, not per flip)
    row = next(r for r in train if r.mask is not None and crop_for(r, False) == (0, 0))
    _, plain = cached.masked_latent(row, False)
    _, mirrored = cached.masked_latent(row, True)
    assert torch.allclose(mirrored, torch.flip(plain, dims=[-1]), atol=0.02)
    assert not torch.equal(mirrored, plain)


def test_a_mask_edited_after_ingest_is_an_error(masked, tiny_model_dir):
    from ditctl.errors import DataError

    ws, kinds = masked
    config = ws.config()
    run_ingest(ws, config, workers=1)
    family = load_family(tiny_model_dir)
    row = next(r for r in read_manifest(ws, "train") if r.mask is not None
               and r.mask.kind == "file")
    os.utime(row.mask.path, ns=(row.mask.mtime_ns + 10**9, row.mask.mtime_ns + 10**9))
    live = OnTheFlySource(family, family.load_vae(), family.load_text_encoder(), config.data)
    with pytest.raises(DataError, match="changed since ingest"):
        live.masked_latent(row, False)
