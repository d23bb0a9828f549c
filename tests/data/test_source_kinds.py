"""Sources beyond CSV and folders: JSONL, Parquet, WebDataset shards, a `datasets` folder.
Images inside shards / Arrow files read back byte-identical through ImageRef; bad records are
named by shard and key; an unchanged shard is not read again; hostile inputs give one line."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w

from ditctl.config import build_config
from ditctl.data import tar_shards
from ditctl.data.containers import ContainerCache
from ditctl.data.images import read_image
from ditctl.data.ingest import run_ingest
from ditctl.data.manifest import read_manifest
from ditctl.data.sources import read_source
from ditctl.data.webdataset import expand_braces
from ditctl.demo.scenes import random_scenes, render
from ditctl.errors import DataError
from ditctl.workspace import Workspace


def _png(scene) -> bytes:
    buffer = io.BytesIO()
    render(scene).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, n: int, per_shard: int, *, seed: int = 0,
                 caption: str = "txt", sizes=((32, 32), (48, 32))) -> dict[str, tuple[bytes, str]]:
    """WebDataset shards of generated scenes; returns {key: (image bytes, caption)}."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = {}
    scenes = random_scenes(n, seed, sizes=sizes)
    for shard in range(0, n, per_shard):
        with tarfile.open(folder / f"train-{shard // per_shard:04d}.tar", "w",
                          format=tarfile.PAX_FORMAT) as tf:
            for index in range(shard, min(n, shard + per_shard)):
                key, data = f"s{index:05d}", _png(scenes[index])
                _add(tf, f"{key}.png", data)
                if caption == "txt":
                    _add(tf, f"{key}.txt", scenes[index].caption.encode())
                else:
                    _add(tf, f"{key}.json", json.dumps({"caption": scenes[index].caption}).encode())
                samples[key] = (data, scenes[index].caption)
    return samples


def _workspace(root: Path, data: dict) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    (root / "project.toml").write_text(tomli_w.dumps({"data": data}))
    return Workspace(root)


def _config(data: dict):
    return build_config({"data": data})


def _bytes(row) -> bytes:
    return read_image(row.ref, 10**8)[0]


# --- reading each kind --------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["shards", "shards/*.tar", "shards/train-{0000..0002}.tar"])
@pytest.mark.parametrize("caption", ["txt", "json"])
def test_webdataset_rows_and_bytes(tmp_path, spec, caption):
    samples = write_shards(tmp_path / "shards", 7, 3, caption=caption)
    rows = read_source(tmp_path / spec, split="train")
    assert [r.listed_path for r in rows] == [f"{k}.png" for k in samples]
    for row in rows:
        key = row.member.split(".")[0]
        assert row.problem is None and row.caption == samples[key][1]
        assert _bytes(row) == samples[key][0]
    assert rows[4].source == "train-0001.tar key s00004"


def test_brace_expansion():
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]


def _plain_images(folder: Path, n: int) -> list[tuple[str, bytes, str]]:
    out = []
    for i, scene in enumerate(random_scenes(n, 3, sizes=((32, 32),))):
        data = _png(scene)
        (folder / "img").mkdir(parents=True, exist_ok=True)
        (folder / "img" / f"{i}.png").write_bytes(data)
        out.append((f"img/{i}.png", data, scene.caption))
    return out


def test_jsonl_and_parquet_rows(tmp_path):
    images = _plain_images(tmp_path, 4)
    samples = write_shards(tmp_path / "shards", 2, 2)
    listed = [(p, d, c) for p, d, c in images]
    listed += [(f"shards/train-0000.tar#{k}.png", d, c) for k, (d, c) in samples.items()]
    (tmp_path / "meta.jsonl").write_text("".join(
        json.dumps({"file": p, "text": c}) + "\n" for p, _, c in listed))
    pq.write_table(pa.table({"file": [p for p, _, _ in listed], "text": [c for _, _, c in listed]}),
                   tmp_path / "meta.parquet")
    for name, first_source in (("meta.jsonl", "line 1"), ("meta.parquet", "row 1")):
        rows = read_source(tmp_path / name, split="train", image_column="file",
                           caption_column="text")
        assert rows[0].source == first_source
        assert [(r.caption, _bytes(r)) for r in rows] == [(c, d) for _, d, c in listed]
        assert rows[-1].member == "s00001.png" and rows[0].member == ""
        assert rows[0].listed_path == "img/0.png" and rows[-1].listed_path == ""


def write_datasets_folder(folder: Path, n: int, *, files: int = 2) -> list[tuple[bytes, str]]:
    """What `Dataset.save_to_disk` writes for an (image, text) dataset: Arrow stream files."""
    folder.mkdir(parents=True)
    scenes = random_scenes(n, 5, sizes=((32, 32), (48, 32)))
    samples = [(_png(s), s.caption) for s in scenes]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("text", pa.string())])
    names = []
    per_file = -(-n // files)
    for f in range(files):
        part = samples[f * per_file:(f + 1) * per_file]
        name = f"data-{f:05d}-of-{files:05d}.arrow"
        table = pa.table({"image": pa.array([{"bytes": d, "path": None} for d, _ in part],
                                            image_type),
                          "text": [c for _, c in part]}, schema=schema)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
            for batch in table.to_batches(max_chunksize=2):  # several record batches
                w.write_batch(batch)
        names.append(name)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {
        "image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}}))
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_split": "train"}))
    return samples


def test_datasets_folder_rows_and_bytes(tmp_path):
    samples = write_datasets_folder(tmp_path / "hf", 5)
    rows = read_source(tmp_path / "hf", split="train", caption_column="text")
    assert [(r.caption, _bytes(r)) for r in rows] == [(c, d) for d, c in samples]
    assert rows[3].source == "data-00001-of-00002.arrow row 0"
    with pytest.raises(DataError, match="no column 'caption'"):
        read_source(tmp_path / "hf", split="train")


# --- ingest: bad records, incremental, hostile input --------------------------------------------

def test_bad_records_are_named_by_shard_and_key(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, 4, 4)
    good = (shards / "train-0000.tar").read_bytes()
    with tarfile.open(shards / "train-0001.tar", "w") as tf:
        _add(tf, "k1.png", b"not a png at all")                    # corrupt image
        _add(tf, "k1.txt", b"a caption")
        _add(tf, "k2.txt", b"a caption without an image")          # no image member
        _add(tf, "k3.png", good[512:512 + 200])                   # truncated PNG
        _add(tf, "k3.json", b"{not json")                          # and a bad caption
    ws = _workspace(tmp_path, {"train_data_path": "shards"})
    summary = run_ingest(ws, ws.config(), workers=1)
    where = {b.where: (b.code, b.reason) for b in summary.bad}
    assert set(where) == {"train-0001.tar key k1", "train-0001.tar key k2",
                          "train-0001.tar key k3"}
    assert where["train-0001.tar key k1"][0] == "not_image"
    assert where["train-0001.tar key k2"][0] == "no_image"
    assert where["train-0001.tar key k3"][0] == "bad_caption_file"
    assert "not valid JSON" in where["train-0001.tar key k3"][1]
    assert summary.counts["train"] == 4
    report = json.loads(summary.report_path.read_text())
    assert {b["member"] for b in report["bad"]} == {"k1.png", "", "k3.png"}


def test_unchanged_shards_are_not_read_again(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    write_shards(shards, 9, 3)
    ws = _workspace(tmp_path, {"train_data_path": "shards"})
    indexed = []
    real = tar_shards.index_tar
    monkeypatch.setattr(tar_shards, "index_tar", lambda p, *a: indexed.append(p) or real(p, *a))
    monkeypatch.setattr("ditctl.data.containers.index_tar", tar_shards.index_tar)
    first = run_ingest(ws, ws.config(), workers=1)
    assert (first.containers_read, first.files_read, len(indexed)) == (3, 9, 3)

    indexed.clear()
    again = run_ingest(ws, ws.config(), workers=1)  # nothing changed: nothing read at all
    assert again.kept_counters is not None and "nothing changed" in again.notes[0]
    assert (again.containers_read, again.files_read, again.counts) == (0, 0, {"train": 9})
    assert again.counters()["unchanged"] == 9 and indexed == []

    other = ws.config({"data.resolution": 32})  # rows planned again, no shard re-read
    resized = run_ingest(ws, other, workers=1)
    assert (resized.containers_read, resized.containers_reused, resized.files_read) == (0, 3, 0)
    assert indexed == [] and resized.kept_counters is None

    # rewrite one shard with a new caption: only that shard is read, only its images decoded
    with tarfile.open(shards / "train-0001.tar") as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shards / "train-0001.tar", "w") as tf:
        for name, data in members:
            _add(tf, name, b"a new caption" if name == "s00004.txt" else data)
    changed = run_ingest(ws, other, workers=1)
    assert [Path(p).name for p in indexed] == ["train-0001.tar"]
    assert (changed.containers_read, changed.containers_reused, changed.files_read) == (1, 2, 3)
    assert (changed.changes.changed, changed.changes.unchanged) == (1, 8)
    assert run_ingest(ws, other, workers=1).kept_counters is not None
    (shards / "train-0003.tar").write_bytes((shards / "train-0002.tar").read_bytes())
    added = run_ingest(ws, other, workers=1)  # a new shard in the folder is seen
    assert (added.kept_counters, added.containers_read, added.counts) == (None, 1, {"train": 12})
    assert [r.caption for r in read_manifest(ws) if r.member == "s00004.png"] == ["a new caption"]


def test_truncated_shard_keeps_whole_samples_and_names_the_cut_key(tmp_path):
    shards = tmp_path / "shards"
    samples = write_shards(shards, 3, 3)
    path = shards / "train-0000.tar"
    index = tar_shards.index_tar(path)
    cut = next(m for m in index.members if m.name == "s00001.png")
    path.write_bytes(path.read_bytes()[:cut.offset + cut.size // 2])
    rows = read_source(shards, split="train")
    assert [r.source for r in rows if r.problem is None] == ["train-0000.tar key s00000"]
    bad = [r for r in rows if r.problem]
    assert [r.source for r in bad] == ["train-0000.tar key s00001"]
    assert bad[0].problem[0] == "truncated" and "re-copy the shard" in bad[0].problem[1]
    assert _bytes(rows[0]) == samples["s00000"][0]
    # a Parquet row pointing past the cut says the shard is damaged, not just "no member"
    pq.write_table(pa.table({"image_path": ["shards/train-0000.tar#s00002.png"],
                             "caption": ["c"]}), tmp_path / "meta.parquet")
    (row,) = read_source(tmp_path / "meta.parquet", split="train")
    assert row.problem[0] == "truncated" and "re-copy the shard" in row.problem[1]


def test_garbage_tar_and_corrupt_parquet_are_one_line(tmp_path):
    (tmp_path / "junk.tar").write_bytes(os.urandom(4096))
    rows = read_source(tmp_path / "junk.tar", split="train")
    assert len(rows) == 1 and rows[0].problem[0] == "corrupt"
    assert "not a tar header" in rows[0].problem[1]

    data = io.BytesIO()
    pq.write_table(pa.table({"image_path": ["a.png"] * 100, "caption": ["c"] * 100}), data)
    broken = bytearray(data.getvalue())
    broken[len(broken) // 3: len(broken) // 3 + 40] = b"\xff" * 40
    for name, content in (("cut.parquet", data.getvalue()[:200]), ("bad.parquet", broken)):
        (tmp_path / name).write_bytes(bytes(content))
        with pytest.raises(DataError) as info:
            read_source(tmp_path / name, split="train")
        assert "\n" not in info.value.message and name in info.value.message


def test_hostile_sizes_do_not_allocate(tmp_path):
    """A tar header claiming a petabyte member and a pax size that is not a number: one-line
    problems, in a process whose address space is capped at 1 GiB."""
    huge = tarfile.TarInfo("big.png")
    huge.size = 10**15
    header = huge.tobuf(format=tarfile.GNU_FORMAT)
    (tmp_path / "huge.tar").write_bytes(header + b"\0" * 1024)
    pax = tarfile.TarInfo("x.png")
    pax.pax_headers = {"size": "zzz"}
    (tmp_path / "pax.tar").write_bytes(pax.tobuf(format=tarfile.PAX_FORMAT) + b"\0" * 1024)
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from ditctl.data.sources import read_source
        for name in ("huge.tar", "pax.tar"):
            rows = read_source({str(tmp_path)!r} + "/" + name, split="train")
            print(name, [r.problem[0] for r in rows])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "huge.tar ['truncated']" in out.stdout and "pax.tar ['corrupt']" in out.stdout


def test_container_cache_survives_a_damaged_file(tmp_path):
    write_shards(tmp_path / "shards", 2, 2)
    (tmp_path / "cache.sqlite").write_bytes(b"garbage" * 100)
    cache = ContainerCache(tmp_path / "cache.sqlite")
    rows = read_source(tmp_path / "shards", split="train", cache=cache)
    assert len(rows) == 2 and cache.read == 1


def test_container_cache_round_trips_and_replaces_an_old_layout(tmp_path):
    """Entries come back as they were stored (names, offsets, sizes, caption texts); a cache
    in the earlier one-row-per-entry layout is emptied and every shard read again;
    a packed row that does not decode is a miss, not an error."""
    write_shards(tmp_path / "shards", 4, 2, caption="txt")
    path = tmp_path / "cache.sqlite"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE containers (id INTEGER PRIMARY KEY, path TEXT);"
                      "CREATE TABLE entries (container INTEGER, seq INTEGER, name TEXT);")
    old.close()
    first = ContainerCache(path)
    rows = read_source(tmp_path / "shards", split="train", cache=first)
    assert (first.read, first.reused) == (2, 0)
    first.close()
    again = ContainerCache(path)
    assert read_source(tmp_path / "shards", split="train", cache=again) == rows
    assert (again.read, again.reused) == (0, 2)
    again.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE containers SET offsets = x'00'")
    damaged = ContainerCache(path)
    assert read_source(tmp_path / "shards", split="train", cache=damaged) == rows
    assert damaged.read >= 1


# --- the whole chain from a WebDataset ----------------------------------------------------------

def test_precompute_and_train_from_a_webdataset(tmp_path, tiny_model_dir):
    """Shards -> ingest -> precompute (DataLoader workers read members by offset) -> train;
    pixels from the shard equal those of the same PNG on disk, and cached == on-the-fly."""
    import torch

    from ditctl.data.batches import CachedSource, OnTheFlySource, load_row_pixels
    from ditctl.data.cache import Cache
    from ditctl.data.transforms import load_training_image
    from ditctl.models.registry import load_family
    from ditctl.precompute import run_precompute
    from ditctl.train import run_training
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n_train=0, n_val=0,
                        data={"train_data_path": "shards", "resolution": 32,
                              "center_crop": True},
                        train={"max_steps": 2, "train_batch_size": 2})
    samples = write_shards(ws.root / "shards", 6, 4, sizes=((32, 32),))
    config = ws.config({"precompute.num_workers": 1})
    assert run_ingest(ws, config).counts["train"] == 6
    rows = read_manifest(ws)
    for row in rows:
        disk = tmp_path / f"{row.member}"
        disk.write_bytes(samples[row.member.split(".")[0]][0])
        assert torch.equal(load_row_pixels(row, "center", False, 10**8),
                           load_training_image(disk, 32, 32))
    run_precompute(ws, config)
    family = load_family(tiny_model_dir)
    cached = CachedSource(Cache.open(ws, config, family))
    live = OnTheFlySource(family, family.load_vae(), family.load_text_encoder(), config.data)
    for row in rows[:2]:
        assert torch.equal(cached.latent_dist(row, False).mean, live.latent_dist(row, False).mean)
    outcome = run_training(ws, config)
    assert outcome.result is not None and outcome.run is not None


def test_bad_jsonl_lines_and_parquet_rows_are_named(tmp_path):
    _plain_images(tmp_path, 2)
    write_shards(tmp_path / "shards", 1, 1)
    (tmp_path / "meta.jsonl").write_text(
        '{"image_path": "img/0.png", "caption": "ok"}\n'
        '{"image_path": "img/0.png", \n'                                  # not JSON
        '\n'
        '["a list"]\n'                                                    # not an object
        '{"caption": "no path"}\n'                                        # no image field
        '{"image_path": "shards/train-0000.tar#nope.png", "caption": "x"}\n'  # no such member
        '{"image_path": "gone.png", "caption": "x"}\n')                   # missing file
    ws = _workspace(tmp_path, {"train_data_path": "meta.jsonl"})
    summary = run_ingest(ws, ws.config(), workers=1)
    assert [(b.where, b.code) for b in summary.bad] == [
        ("meta.jsonl:2", "bad_record"), ("meta.jsonl:4", "bad_record"),
        ("meta.jsonl:5", "no_path"), ("meta.jsonl:6", "missing"), ("meta.jsonl:7", "missing")]
    assert "nope.png" in summary.bad[3].reason and "train-0000.tar" in summary.bad[3].reason
    pq.write_table(pa.table({"image_path": ["img/1.png", None], "caption": ["ok", "x"]}),
                   tmp_path / "meta.parquet")
    ws2 = _workspace(tmp_path / "w2", {"train_data_path": str(tmp_path / "meta.parquet")})
    summary = run_ingest(ws2, ws2.config(), workers=1)
    assert [(b.where, b.code) for b in summary.bad] == [("meta.parquet row 2", "no_path")]


def test_alpha_mask_of_an_image_inside_a_shard(tmp_path):
    """[data] use_masks: a shard member's alpha channel is its loss mask, read from the shard
    (the same pixels as the PNG on disk gives)."""
    import numpy as np
    import torch
    from PIL import Image

    from ditctl.data.batches import row_latent_mask
    from ditctl.data.transforms import load_training_mask

    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, 16:, 3] = 255  # the right half learns
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "a.tar", "w") as tf:
        _add(tf, "k.png", buffer.getvalue())
        _add(tf, "k.txt", b"half a square")
    ws = _workspace(tmp_path, {"train_data_path": "shards", "use_masks": True})
    run_ingest(ws, ws.config(), workers=1)
    (row,) = read_manifest(ws)
    assert row.mask is not None and row.mask.kind == "alpha" and row.member == "k.png"
    (tmp_path / "k.png").write_bytes(buffer.getvalue())
    expected = load_training_mask(tmp_path / "k.png", 32, 32, alpha=True)
    assert torch.equal(load_training_mask(row.ref, 32, 32, alpha=True), expected)
    mask = row_latent_mask(row, "center", False, 10**8, 8)
    assert mask.shape == (1, 4, 4) and mask[0, :, :2].max() == 0 and mask[0, :, 2:].min() == 1


def test_datasets_tables_mix_source_kinds(tmp_path):
    """[[data.datasets]]: a WebDataset and a JSONL file in one run, each through read_source,
    each sample counted against its dataset; unchanged, the whole run is kept as it was."""
    samples = write_shards(tmp_path / "shards", 3, 3)
    images = _plain_images(tmp_path, 2)
    (tmp_path / "meta.jsonl").write_text("".join(
        json.dumps({"image_path": p, "caption": c}) + "\n" for p, _, c in images))
    ws = _workspace(tmp_path, {"datasets": [{"name": "web", "path": "shards"},
                                            {"name": "local", "path": "meta.jsonl"}]})
    summary = run_ingest(ws, ws.config(), workers=1)
    assert {n: d["images"] for n, d in summary.datasets.items()} == {"web": 3, "local": 2}
    rows = read_manifest(ws)
    assert sorted(r.member for r in rows if r.dataset == rows[0].dataset) == \
        sorted(f"{k}.png" for k in samples)
    again = run_ingest(ws, ws.config(), workers=1)  # loose image files: no fast path
    assert again.kept_counters is None and again.files_read == 0
    assert again.containers_reused == 1
