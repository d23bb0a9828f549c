"""Several datasets in one run: config tables, caption tools, epoch plans, ingest, cache keys."""

import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_workspace  # noqa: E402

from ditctl.config import build_config, load_config, render_template  # noqa: E402
from ditctl.data.datasets import (dataset_caption, epoch_slots, planned_counts,  # noqa: E402
                                  resolve_datasets, shuffle_tags, training_caption)
from ditctl.errors import ConfigError  # noqa: E402


def _datasets(*tables, data=None, train=None):
    return resolve_datasets(build_config({"data": {**(data or {}), "datasets": list(tables)},
                                          "train": train or {}}))


# --- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tables, message", [
    ([{"path": "a"}, {"path": "b", "repeats": 0}],
     "project.toml [[data.datasets]] #2 repeats = 0: must be >= 1"),
    ([{"path": "a", "role": "prior"}],
     "project.toml [[data.datasets]] #1 role = 'prior': must be one of 'train', 'regularization'"),
    ([{"path": "a", "reppeats": 2}],
     "project.toml [[data.datasets]] #1: unknown key 'reppeats'; did you mean 'repeats'?"),
    ([{"role": "regularization"}],
     "project.toml [[data.datasets]] #1: path is not set (a CSV file or a folder of images)"),
    ([{"path": "a", "weight": 0}],
     "project.toml [[data.datasets]] #1 weight = 0: must be > 0"),
    ([{"path": "a", "loss_weight": "high"}],
     "project.toml [[data.datasets]] #1 loss_weight = 'high': expected a number, got str"),
    ([{"path": "a", "caption_template": "a photo"}],
     "project.toml [[data.datasets]] #1 caption_template = 'a photo': must contain {caption}"),
    ([{"path": "a", "resolution": 40}],
     "project.toml [[data.datasets]] #1 resolution = 40: must be a multiple of 16"),
    ([{"path": "x/a.csv"}, {"path": "y/a.csv"}],
     "project.toml [[data.datasets]] #2 name = 'a': already the name of #1 dataset"),
    ("nope", "project.toml [data] datasets: must be [[data.datasets]] tables"),
])
def test_bad_dataset_tables_are_one_line_naming_table_and_key(tables, message):
    with pytest.raises(ConfigError) as caught:
        build_config({"data": {"datasets": tables}})
    lines = str(caught.value).splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith(message), str(caught.value)


def test_a_table_may_not_take_the_first_datasets_name():
    with pytest.raises(ConfigError, match=r"#1 name = 'train': already the name of \[data\] "
                                          "train_data_path's dataset"):
        build_config({"data": {"train_data_path": "a.csv",
                               "datasets": [{"path": "other/train.csv"}]}})


def test_dataset_tables_load_inherit_and_round_trip(tmp_path):
    path = tmp_path / "project.toml"
    path.write_text(tomli_w.dumps({
        "data": {"train_data_path": "data/train.csv", "resolution": 64, "center_crop": True,
                 "trigger_word": "ohwx",
                 "datasets": [{"path": "data/reg", "role": "regularization",
                               "loss_weight": 0.5, "center_crop": False, "repeats": 3}]},
        "train": {"caption_dropout": 0.2}}))
    config = load_config(path)
    first, reg = resolve_datasets(config)
    assert (first.name, first.path, first.role, first.repeats) == \
        ("train", "data/train.csv", "train", 1)
    assert (reg.name, reg.role, reg.loss_weight, reg.repeats) == ("reg", "regularization", 0.5, 3)
    # unset keys take [data]'s (and [train] caption_dropout) value
    assert (reg.resolution, reg.trigger_word, reg.caption_dropout) == (64, "ohwx", 0.2)
    assert (first.center_crop, reg.center_crop) == (True, False)
    assert build_config(config.to_dict()) == config
    assert config.replace("train", seed=3).data.datasets == config.data.datasets


def test_a_single_dataset_config_is_unchanged():
    config = build_config({"data": {"train_data_path": "t.csv"}})
    assert "datasets" not in config.to_dict()["data"]
    (only,) = resolve_datasets(config)
    assert (only.repeats, only.weight, only.loss_weight, only.role) == (1, None, 1.0, "train")


def test_template_shows_a_commented_dataset_table_that_loads_when_uncommented(tmp_path):
    text = render_template()
    assert "# [[data.datasets]]" in text and '#   role = "regularization"' in text
    block = text[text.index("# [[data.datasets]]"):text.index("[precompute]")]
    active = [line[2:].strip() for line in block.splitlines()
              if line.startswith("# [[") or (line.startswith("#   ") and " = " in line
                                              and "(default" not in line)]
    path = tmp_path / "project.toml"
    path.write_text("\n".join(active) + "\n")
    (table,) = load_config(path).data.datasets
    assert (table.path, table.role) == ("data/regularization", "regularization")


# --- caption tools ----------------------------------------------------------------------------

RAW = "red car, sunset, beach, 1girl"


@pytest.mark.parametrize("settings, expected", [
    ({}, RAW),
    ({"trigger_word": "ohwx"}, f"ohwx, {RAW}"),
    ({"caption_template": "a photo of {caption}"}, f"a photo of {RAW}"),
    ({"trigger_word": "ohwx", "caption_template": "a photo of {caption}, 4k"},
     f"a photo of ohwx, {RAW}, 4k"),
])
def test_deterministic_caption_tools(settings, expected):
    (dataset,) = _datasets({"path": "d", **settings})
    assert dataset_caption(RAW, dataset) == expected
    # without shuffling, training sees exactly what ingest (and the cache) recorded
    assert training_caption(RAW, dataset, seed=1, epoch=3, index=2) == expected


def test_trigger_word_alone_captions_an_uncaptioned_image():
    (dataset,) = _datasets({"path": "d", "trigger_word": "ohwx"})
    assert dataset_caption("", dataset) == "ohwx"


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_shuffle_tags_keeps_the_first_tags_and_varies_by_epoch(keep):
    (dataset,) = _datasets({"path": "d", "shuffle_tags": True, "keep_tokens": keep,
                            "trigger_word": "ohwx", "caption_template": "art: {caption}"})
    tags = [t.strip() for t in RAW.split(",")]
    seen = set()
    for epoch in range(12):
        text = training_caption(RAW, dataset, seed=5, epoch=epoch, index=0)
        assert text.startswith("art: ohwx, ")  # the trigger and template stay outside
        shuffled = text[len("art: ohwx, "):].split(", ")
        assert sorted(shuffled) == sorted(tags) and shuffled[:keep] == tags[:keep]
        seen.add(text)
        # deterministic per (seed, epoch, image): a resumed run draws the same caption
        assert text == training_caption(RAW, dataset, seed=5, epoch=epoch, index=0)
    assert len(seen) > 1
    assert dataset_caption(RAW, dataset) == f"art: ohwx, {RAW}"  # what eval and the cache see


def test_shuffle_tags_is_kohya_shuffle_caption():
    rng = random.Random(0)
    assert shuffle_tags(" a , b,c,, d ", 1, rng).split(", ")[0] == "a"
    assert sorted(shuffle_tags("a, b, c, d", 1, random.Random(0)).split(", ")) == list("abcd")


# --- repeats and weights ----------------------------------------------------------------------

def test_repeats_give_each_image_that_many_samples_per_epoch():
    datasets = _datasets({"path": "a", "repeats": 3}, {"path": "b"})
    rows = [0] * 4 + [1] * 5
    assert planned_counts(datasets, [4, 5]) == [12, 5]
    for epoch in range(3):
        seen = Counter(epoch_slots(rows, datasets, seed=1, epoch=epoch))
        assert seen == Counter({i: 3 if i < 4 else 1 for i in range(9)})


@pytest.mark.parametrize("weights, images, expected", [
    ((1.0, 1.0), (4, 12), [8, 8]),
    ((3.0, 1.0), (4, 12), [12, 4]),
    ((1.0, None), (10, 10), [10, 10]),   # unset weight counts 1
    ((2.0, 1.0), (5, 5), [7, 3]),        # 20/3 rounds: largest remainder
])
def test_weights_share_the_epoch(weights, images, expected):
    tables = [{"path": name, **({"weight": w} if w is not None else {})}
              for name, w in zip("ab", weights)]
    datasets = _datasets(*tables)
    assert planned_counts(datasets, list(images)) == expected
    rows = [0] * images[0] + [1] * images[1]
    # None: every row once (the one-dataset plan)
    slots = epoch_slots(rows, datasets, seed=3, epoch=0) or list(range(len(rows)))
    by_dataset = Counter(rows[i] for i in slots)
    assert [by_dataset[0], by_dataset[1]] == expected
    for d, count in enumerate(expected):  # shuffled rounds: as even as the count allows
        uses = Counter(i for i in slots if rows[i] == d)
        members = [i for i, r in enumerate(rows) if r == d]
        low = count // len(members)
        assert all(low <= uses.get(i, 0) <= low + 1 for i in members)
    assert slots == (epoch_slots(rows, datasets, seed=3, epoch=0)  # deterministic
                     or list(range(len(rows))))
    if expected[0] < images[0]:
        assert slots != epoch_slots(rows, datasets, seed=3, epoch=1)


def test_planned_counts_reach_the_trainers_epoch():
    """The epoch the trainer plans holds each dataset's planned count (batches filled up by
    `TrainingData` aside: batch size 1 fills nothing)."""
    from ditctl.data.manifest import ManifestRow
    from ditctl.engine.context import TrainingData

    datasets = _datasets({"path": "a", "repeats": 2}, {"path": "b", "repeats": 1})
    rows = [ManifestRow("train", f"line {i}", Path(f"{i}.png"), "c", f"{i:064x}", 1, 1, 32, 32,
                        "PNG", 32, 32, dataset=0 if i < 3 else 1) for i in range(7)]
    data = TrainingData(rows, None, seed=4, step_batch=1, random_flip=False, datasets=datasets)
    seen = Counter(i for batch in data.epoch_batches(0) for i in batch)
    assert seen == Counter({0: 2, 1: 2, 2: 2, 3: 1, 4: 1, 5: 1, 6: 1})
    assert data.loss_weights([0, 5]) is None  # every dataset weighs 1: the plain mean


# --- ingest and the cache ---------------------------------------------------------------------

def _two_datasets(tmp_path, tiny_model_dir, reg=None, data=None):
    from ditctl.demo.scenes import random_scenes, write_dataset

    table = {"path": "data/reg.csv", "role": "regularization", "loss_weight": 0.5, **(reg or {})}
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, n_val=0,
                        data={"datasets": [table], **(data or {})})
    write_dataset(ws.root / "data", random_scenes(3, 11, sizes=((48, 32),)), csv_name="reg.csv")
    return ws


def test_ingest_records_each_dataset(tmp_path, tiny_model_dir):
    from ditctl.data.ingest import run_ingest
    from ditctl.data.manifest import read_manifest

    ws = _two_datasets(tmp_path, tiny_model_dir, reg={"trigger_word": "prior"},
                       data={"caption_template": "a photo: {caption}"})
    (ws.root / "data" / "reg.csv").write_text(
        (ws.root / "data" / "reg.csv").read_text() + "missing.png,lost\n")
    summary = run_ingest(ws, ws.config(), workers=1)
    assert summary.datasets["train"]["images"] == 4 and summary.datasets["reg"]["images"] == 3
    assert summary.datasets["reg"]["bad"] == 1 and summary.datasets["train"]["bad"] == 0
    assert summary.datasets["reg"]["role"] == "regularization"
    assert [b.where for b in summary.bad] == ["reg.csv:5"]
    rows = read_manifest(ws)
    assert [r.dataset for r in rows] == [0] * 4 + [1] * 3
    assert all(r.caption.startswith("a photo: prior, ") for r in rows[4:])
    assert all(r.caption == f"a photo: {r.source_caption}" for r in rows[:4])
    # the two datasets have different resolutions (inherited 32 vs 48x32 images): one plan
    assert {r.bucket for r in rows} == {(32, 32)}
    # the fingerprint written by SQL covers datasets and source captions as rows read back
    from ditctl.data.manifest import compute_fingerprint, manifest_fingerprint
    assert manifest_fingerprint(ws) == compute_fingerprint(rows)


def test_per_dataset_sizes_and_crops_change_the_cache_keys(tmp_path, tiny_model_dir):
    from ditctl.data.cache import KeySpec
    from ditctl.data.ingest import run_ingest
    from ditctl.data.manifest import read_manifest
    from ditctl.models.registry import load_family

    family = load_family(tiny_model_dir)

    def keys(reg):
        ws = _two_datasets(tmp_path / str(len(list(tmp_path.iterdir()))), tiny_model_dir,
                           reg=reg)
        config = ws.config()
        run_ingest(ws, config, workers=1)
        rows = read_manifest(ws)
        spec = KeySpec.for_config(config, family, 16)
        return [spec.latent_key(r, False) for r in rows], rows

    base, rows = keys({"center_crop": True})
    cropped, _ = keys({"center_crop": False})
    resized, resized_rows = keys({"resolution": 16})
    assert base[:4] == cropped[:4] == resized[:4]  # the first dataset is untouched
    assert base[4:] != cropped[4:]                 # a random crop of 48x32 -> 32x32 moves
    assert {r.bucket for r in resized_rows[4:]} == {(16, 16)} and base[4:] != resized[4:]
    assert {r.bucket for r in rows[4:]} == {(32, 32)}


def test_changing_only_training_settings_keeps_the_manifest(tmp_path, tiny_model_dir):
    from ditctl.data.ingest import run_ingest
    from ditctl.data.manifest import stale_manifest_reason

    ws = _two_datasets(tmp_path, tiny_model_dir)
    run_ingest(ws, ws.config(), workers=1)
    table = {"path": "data/reg.csv", "role": "regularization"}
    for change in ({"repeats": 4}, {"weight": 2.0}, {"loss_weight": 0.1},
                   {"caption_dropout": 0.5}, {"shuffle_tags": True, "keep_tokens": 1},
                   {"center_crop": True}, {"random_flip": True}):
        config = ws.config().replace("data", datasets=[{**table, **change}])
        assert stale_manifest_reason(ws, config) is None, change
    for change in ({"trigger_word": "x"}, {"resolution": 16}, {"caption_template": "{caption}!"}):
        config = ws.config().replace("data", datasets=[{**table, **change}])
        assert "datasets" in stale_manifest_reason(ws, config), change
