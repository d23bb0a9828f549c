"""Tests for ditctl.demo.scenes: scene geometry, captions, determinism, held-out split, datasets."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from ditctl.demo import scenes as S
from ditctl.demo.scenes import (ASPECT_SIZES, BACKGROUNDS, COLOURS, HELD_OUT, SHAPES, Scene,
                                base_training_scenes, example_prompts, held_out_scenes,
                                random_scenes, render, write_dataset, write_example_dataset)
from ditctl.errors import DataError

SIZES = ((64, 64), (80, 48), (48, 80), (64, 48))


def parse_caption(caption: str) -> tuple[str, str, str]:
    words = caption.split()
    assert words[0] == "a" and words[3:5] == ["on", "a"] and words[6] == "background", caption
    assert len(words) == 7, caption
    return words[1], words[2], words[5]


def test_caption_names_colour_shape_and_background():
    assert Scene("circle", "red", "white").caption == "a red circle on a white background"
    for scene in random_scenes(50, 3):
        assert parse_caption(scene.caption) == (scene.colour, scene.shape, scene.background)


@pytest.mark.parametrize("size", SIZES)
def test_render_size_colours_and_border(size):
    for scene in random_scenes(40, 11, sizes=(size,)):
        image = render(scene)
        assert image.mode == "RGB" and image.size == size
        pixels = np.asarray(image)
        frame = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        # The shape lies fully inside the canvas: the outermost frame is pure background.
        assert (frame == BACKGROUNDS[scene.background]).all()
        if scene.shape in ("circle", "square"):  # solid at the centre
            centre = pixels[round(scene.cy * size[1] - 0.5), round(scene.cx * size[0] - 0.5)]
            assert tuple(centre) == COLOURS[scene.colour]


@pytest.mark.parametrize("shape, area", [("square", 1.0), ("circle", math.pi / 4),
                                         ("triangle", 0.5), ("cross", 5 / 9)])
def test_render_draws_the_shape_with_its_size(shape, area):
    scene = Scene(shape, "red", "black", cx=0.45, cy=0.55, size=0.6, width=64, height=64)
    coverage = np.asarray(render(scene), float)[..., 0].sum() / COLOURS["red"][0]
    assert coverage == pytest.approx(area * (0.6 * 64) ** 2, rel=0.03)


def test_star_is_a_fat_five_pointed_star():
    points = S._POLYGONS["star"]
    assert len(points) == 10
    radii = [math.hypot(x, y) for x, y in points]
    assert radii[0::2] == pytest.approx([1.0] * 5) and radii[1::2] == pytest.approx([0.5] * 5)


def test_random_scenes_respect_ranges():
    for scene in random_scenes(300, 5, sizes=SIZES):
        assert (scene.width, scene.height) in SIZES
        assert scene.width % 16 == 0 and scene.height % 16 == 0
        assert scene.colour != scene.background
        assert S.SIZE_RANGE[0] <= scene.size <= S.SIZE_RANGE[1]
        half = scene.half_side_px
        assert half + 1 - 1e-6 <= scene.cx * scene.width <= scene.width - half - 1 + 1e-6
        assert half + 1 - 1e-6 <= scene.cy * scene.height <= scene.height - half - 1 + 1e-6
        assert abs(scene.cx - 0.5) <= S.CENTRE_SPREAD and abs(scene.cy - 0.5) <= S.CENTRE_SPREAD
    # ... and they do vary
    scenes = random_scenes(300, 5, sizes=SIZES)
    assert len({round(s.cx, 2) for s in scenes}) > 10 and len({round(s.size, 2) for s in scenes}) > 10


def test_random_scenes_are_deterministic_per_seed():
    assert random_scenes(60, 7, sizes=SIZES) == random_scenes(60, 7, sizes=SIZES)
    assert random_scenes(60, 7, sizes=SIZES) != random_scenes(60, 8, sizes=SIZES)
    first = [np.asarray(render(s)) for s in random_scenes(5, 7)]
    again = [np.asarray(render(s)) for s in random_scenes(5, 7)]
    assert all((a == b).all() for a, b in zip(first, again))


def test_random_scenes_honour_restrictions():
    chosen = random_scenes(100, 1, colours=["white", "red"], shapes=["star"],
                           backgrounds=["white"])
    assert {s.colour for s in chosen} == {"red"}  # white never shows on white
    assert {s.shape for s in chosen} == {"star"}
    with pytest.raises(DataError):
        random_scenes(3, 0, colours=["white"], backgrounds=["white"])


@pytest.mark.parametrize("kwargs", [
    dict(shape="hexagon", colour="red", background="white"),
    dict(shape="circle", colour="teal", background="white"),
    dict(shape="circle", colour="white", background="white"),
    dict(shape="circle", colour="red", background="white", width=60),
    dict(shape="circle", colour="red", background="white", cx=0.1, size=0.5),
])
def test_invalid_scenes_are_refused(kwargs):
    with pytest.raises(DataError) as info:
        Scene(**kwargs)
    assert info.value.hint


def test_held_out_concept_split():
    kind, value = HELD_OUT
    assert (kind, value) == ("colour", "green")
    base = base_training_scenes(600, 0)
    assert all(s.colour != value and value not in s.caption for s in base)
    assert {s.colour for s in base} == set(COLOURS) - {value}
    assert {s.shape for s in base} == set(SHAPES)
    assert {(s.width, s.height) for s in base} == set(ASPECT_SIZES)
    held = held_out_scenes(200, 0)
    assert all(s.colour == value for s in held)
    assert {s.shape for s in held} == set(SHAPES)
    assert {s.background for s in held} == set(BACKGROUNDS)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(reader)


@pytest.mark.parametrize("subfolders", [True, False])
def test_write_dataset_rows_point_at_the_right_images(tmp_path, subfolders):
    chosen = random_scenes(12, 4, sizes=SIZES)
    csv_path = write_dataset(tmp_path, chosen, csv_name="data.csv", subfolders=subfolders)
    assert csv_path == tmp_path / "data.csv"
    header, rows = read_csv(csv_path)
    assert header == ["image_path", "caption"]
    assert len(rows) == len(chosen)
    for (relative, caption), scene in zip(rows, chosen):
        assert not relative.startswith("/")
        parts = relative.split("/")
        assert parts[:-1] == (["images", scene.shape] if subfolders else ["images"])
        assert caption == scene.caption
        with Image.open(tmp_path / relative) as image:
            assert image.size == (scene.width, scene.height)
            assert (np.asarray(image.convert("RGB")) == np.asarray(render(scene))).all()
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_write_example_dataset(tmp_path):
    info = write_example_dataset(tmp_path / "data", seed=3, n_train=20, n_val=5, n_prior=10)
    folder = tmp_path / "data"
    assert info["train_csv"] == folder / "train.csv" and info["val_csv"] == folder / "val.csv"
    assert info["prior_csv"] == folder / "prior.csv"
    assert (info["n_train"], info["n_prior"], info["n_val"], info["concept"]) == \
        (20, 10, 5, "green")
    assert info["train_rows"] == 30
    seen_sizes, images, train_colours = set(), set(), []
    for csv_path, count in ((info["train_csv"], 20), (info["prior_csv"], 10),
                            (info["val_csv"], 5)):
        header, rows = read_csv(csv_path)
        assert header == ["image_path", "caption"] and len(rows) == count
        for relative, caption in rows:
            colour, shape, _ = parse_caption(caption)
            assert relative.startswith(f"images/{shape}/")
            if csv_path != info["prior_csv"]:
                assert colour == "green"  # train and validation: only the new concept
            else:
                train_colours.append(colour)
            with Image.open(folder / relative) as image:
                seen_sizes.add(image.size)
            images.add(relative)
    assert len(images) == 35  # train and val never share a file
    assert seen_sizes <= set(ASPECT_SIZES) and len(seen_sizes) >= 2
    # the prior-preservation dataset: only colours the base model knows
    assert "green" not in train_colours and len(train_colours) == 10


def test_example_prompts_cover_held_out_and_trained_concepts():
    prompts = example_prompts()
    parsed = [parse_caption(p) for p in prompts]
    assert all(c in COLOURS and s in SHAPES and b in BACKGROUNDS for c, s, b in parsed)
    held = [c for c, _, _ in parsed if c == HELD_OUT[1]]
    assert 2 <= len(held) < len(prompts)
