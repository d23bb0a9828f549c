"""Evaluation: validation loss (by hand), held-out data, CLIP and concept scores, charts."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditctl.data.manifest import ManifestRow
from ditctl.models.base import Conditioning, LatentDist


def _row(name: str, size: int = 32) -> ManifestRow:
    return ManifestRow(split="val", source=name, path=Path(f"/nowhere/{name}.png"), caption=name,
                       sha256=name * 8, size_bytes=1, mtime_ns=1, width=size, height=size,
                       format="PNG", bucket_w=size, bucket_h=size)


class FixedSource:
    """Fixed posteriors and text embeddings per row (what a cache would hold)."""

    def __init__(self, rows, text_dim=32, text_len=32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.dists = {r: LatentDist(torch.randn(1, 16, r.bucket_h // 8, r.bucket_w // 8, generator=gen),
                                    torch.rand(1, 16, r.bucket_h // 8, r.bucket_w // 8, generator=gen) * 0.1)
                      for r in rows}
        self.texts = {r.caption: torch.randn(1, text_len, text_dim, generator=gen) for r in rows}

    def latent_dist(self, row, flip):
        assert flip is False
        return self.dists[row]

    def conditioning(self, caption):
        return Conditioning(self.texts[caption])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from ditctl.models.registry import load_family

    family = load_family(tiny_model_dir)
    return family, family.load_denoiser().eval()


def test_validation_loss_matches_a_hand_computation(tiny, tiny_model_dir):
    from ditctl.engine.objective import sample_seed
    from ditctl.engine.validation import validation_loss

    family, dit = tiny
    row = _row("a red circle")
    source = FixedSource([row])
    result = validation_loss(family, dit, [row], source, [0.3], seed=7, batch_size=1)

    vae_config = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    shift, scale = vae_config["shift_factor"], vae_config["scaling_factor"]
    gen = torch.Generator().manual_seed(sample_seed(7, 0))
    dist = source.dists[row]
    eps = torch.randn(dist.mean.shape, generator=gen)
    x0 = (dist.mean + dist.std * eps - shift) * scale
    noise = torch.randn(x0.shape, generator=gen)
    alpha = 2 * (4 * 4 / 4096) ** 0.5  # 32 px -> 4x4 latents -> 0.125
    t = alpha * 0.3 / (1 + (alpha - 1) * 0.3)
    with torch.no_grad():
        prediction = dit((1 - t) * x0 + t * noise, source.texts[row.caption],
                         torch.tensor([t], dtype=torch.float32))
    expected = float(((prediction - (x0 - noise)) ** 2).mean())
    assert result["per_quantile"][0.3] == pytest.approx(expected, rel=1e-5)
    assert result["overall"] == result["per_quantile"][0.3] and result["n"] == 1


def test_validation_loss_is_deterministic_and_batching_changes_nothing(tiny):
    from ditctl.engine.validation import validation_loss

    family, dit = tiny
    rows = [_row("a"), _row("b", 64), _row("c"), _row("d", 64), _row("e")]
    source = FixedSource(rows)
    quantiles = [0.1, 0.5, 0.9]
    first = validation_loss(family, dit, rows, source, quantiles, seed=0, batch_size=1)
    again = validation_loss(family, dit, rows, source, quantiles, seed=0, batch_size=1)
    batched = validation_loss(family, dit, rows, source, quantiles, seed=0, batch_size=2)
    assert first == again
    assert list(first["per_quantile"]) == quantiles
    for q in quantiles:
        assert batched["per_quantile"][q] == pytest.approx(first["per_quantile"][q], rel=1e-5)
    assert first["overall"] == pytest.approx(sum(first["per_quantile"].values()) / 3)
    other_seed = validation_loss(family, dit, rows, source, quantiles, seed=1, batch_size=1)
    assert other_seed["overall"] != first["overall"]
    unshifted = validation_loss(family, dit, rows, source, quantiles, seed=0, batch_size=1,
                                resolution_shift=False)
    assert unshifted["per_quantile"][0.5] != first["per_quantile"][0.5]


def test_validation_loss_by_dataset(tiny):
    import dataclasses

    from ditctl.engine.validation import validation_loss

    family, dit = tiny
    rows = [dataclasses.replace(_row(name, size), dataset=d)
            for name, size, d in (("a", 32, 0), ("b", 64, 1), ("c", 32, 1), ("d", 32, 0),
                                  ("e", 64, 1))]
    result = validation_loss(family, dit, rows, FixedSource(rows), [0.2, 0.7], batch_size=2)
    by_dataset = result["per_dataset"]
    assert set(by_dataset) == {0, 1} and by_dataset[0] != by_dataset[1]
    assert result["overall"] == pytest.approx((2 * by_dataset[0] + 3 * by_dataset[1]) / 5)
    one = [dataclasses.replace(r, dataset=0) for r in rows]
    assert "per_dataset" not in validation_loss(family, dit, one, FixedSource(one), [0.5])


def test_validation_loss_needs_rows(tiny):
    from ditctl.errors import DataError
    from ditctl.engine.validation import validation_loss

    with pytest.raises(DataError, match="at least one image"):
        validation_loss(*tiny, [], FixedSource([]), [0.5])


def test_without_a_val_split_the_last_training_rows_are_held_out(tmp_path, tiny_model_dir):
    from ditctl.data.ingest import run_ingest
    from ditctl.evaluation.inputs import validation_set
    from ditctl.scaffold import init_workspace

    ws = init_workspace(tmp_path / "ws", model=str(tiny_model_dir), example=True).workspace
    text = ws.project_file.read_text().replace('val_data_path = "data/example/val.csv"\n', "")
    ws.project_file.write_text(text)
    config = ws.config()
    assert config.data.val_data_path is None
    run_ingest(ws, config)
    held = validation_set(ws, config)
    # each dataset's last tenth: round(48 * 0.1) green scenes + round(96 * 0.1) prior scenes
    assert held.kind == "holdout" and len(held.rows) == 15
    assert held.description == ("held-out slice of training data (the last 15 of 144 training "
                                "images: each dataset's last 0.1)")
    from ditctl.data.manifest import read_manifest
    from ditctl.evaluation.inputs import split_holdout
    train = read_manifest(ws, "train")
    assert held.rows == train[43:48] + train[134:]
    assert split_holdout(train, 0.1) == (train[:43] + train[48:134], held.rows)
    one = [r for r in train if r.dataset == 0]  # one dataset: its last rows, as always
    assert split_holdout(one, 0.1) == (one[:-5], one[-5:])

    with pytest.raises(Exception, match="no validation data"):
        validation_set(ws, ws.config({"eval.holdout_fraction": 0.0}))


# --- image scores -------------------------------------------------------------------------------

def build_tiny_clip(folder: Path) -> Path:
    """A random CLIP with a character-level BPE tokenizer, built offline."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer)

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_clip_score_is_100_times_the_cosine_of_the_embeddings(tiny_clip):
    from transformers import CLIPModel

    from ditctl.evaluation.clip import ClipScorer

    images = [Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (48, 32), (0, 0, 200))]
    prompts = ["a red circle", "a blue square on a black background"]
    scores = ClipScorer(tiny_clip).scores(images, prompts)
    assert scores == ClipScorer(tiny_clip).scores(images, prompts)

    # by hand for the first pair: the same tokens and pixels, through the model's projections
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_clip)
    ids = processor.tokenizer([prompts[0]], return_tensors="pt").input_ids
    pixels = processor.image_processor([images[0]], return_tensors="pt").pixel_values
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids)
        image = model.get_image_features(pixel_values=pixels)
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    cosine = float((text / text.norm()) @ (image / image.norm()).T)
    assert scores[0] == pytest.approx(100 * cosine, abs=1e-4)
    assert -100 <= scores[1] <= 100


def test_eval_clip_metrics_score_every_column_against_its_prompts(tiny_clip):
    from ditctl.config import build_config
    from ditctl.evaluation.clip import ClipScore, ClipScorer
    from ditctl.evaluation.metrics import ComparisonImages

    red, blue = Image.new("RGB", (32, 32), (220, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 220))
    columns = {"base": [red, red, blue, blue], "step-000010": [blue, red, red, blue]}
    prompts = ["a red circle", "a blue square"]  # two images per prompt
    config = build_config({"eval": {"clip_model_path": str(tiny_clip)}})
    metrics = ClipScore().score(ComparisonImages(prompts, columns, 2), config, "cpu")
    expected = ClipScorer(tiny_clip).scores(columns["step-000010"], [prompts[0]] * 2 + [prompts[1]] * 2)
    assert metrics["status"] == "computed"
    assert metrics["per_image"]["step-000010"] == expected
    assert metrics["columns"]["step-000010"] == pytest.approx(sum(expected) / 4)
    skipped = ClipScore().score(ComparisonImages(prompts, columns, 2), build_config({}), "cpu")
    assert skipped["status"] == "skipped" and "clip_model_path" in skipped["hint"]


def test_a_missing_clip_folder_is_a_config_error(tmp_path):
    from ditctl.errors import ConfigError
    from ditctl.evaluation.clip import ClipScorer

    with pytest.raises(ConfigError, match="clip_model_path"):
        ClipScorer(tmp_path / "nope")


def test_scene_captions_parse_and_other_prompts_do_not():
    from ditctl.demo.concept_metric import parse_scene_caption

    assert parse_scene_caption("a purple star on a black background") == {
        "colour": "purple", "shape": "star", "background": "black"}
    assert parse_scene_caption("A Red circle on a white background ") == {
        "colour": "red", "shape": "circle", "background": "white"}
    assert parse_scene_caption("a photo of a cat") is None
    assert parse_scene_caption("a pink circle on a white background") is None


def test_concept_metric_scores_each_column(tmp_path):
    from ditctl.demo.scenes import Scene, render
    from ditctl.demo.concept_metric import concept_metrics

    prompts = ["a green circle on a white background", "a red square on a black background"]
    truth = [render(Scene("circle", "green", "white", size=0.6)),
             render(Scene("square", "red", "black", size=0.6))]
    swapped = [render(Scene("square", "red", "white", size=0.6)),
               render(Scene("square", "red", "black", size=0.6))]
    metrics = concept_metrics(prompts, {"truth": truth, "swapped": swapped}, per_prompt=1)
    assert metrics["held_out_concept"] == "colour green"
    assert metrics["columns"]["truth"]["both"] == 1.0
    assert metrics["columns"]["truth"]["held_out"] == {"n": 1, "colour": 1.0, "shape": 1.0,
                                                       "both": 1.0}
    assert metrics["columns"]["swapped"]["both"] == 0.5
    assert metrics["columns"]["swapped"]["held_out"]["both"] == 0.0
    assert concept_metrics(["a photo of a cat"], {"x": truth[:1]}, 1) is None


# --- charts and grids ---------------------------------------------------------------------------

def test_image_grid_lays_out_rows_and_columns():
    from ditctl.grids import image_grid

    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    grid = image_grid([[red, blue], [blue, None]], min_cell=64)
    assert grid.size == (2 * 64 + 3 * 4, 2 * 64 + 3 * 4 + 2 * 4)
    assert grid.getpixel((4 + 32, 4 + 32)) == (255, 0, 0)
    assert grid.getpixel((4 + 64 + 4 + 32, 4 + 32)) == (0, 0, 255)
    second_row = 4 + 64 + 4 + 4  # cell, gap, (empty) caption band, gap
    assert grid.getpixel((4 + 64 + 4 + 32, second_row + 32)) == (255, 255, 255)  # blank cell
    big = image_grid([[Image.new("RGB", (1024, 1024))]], max_cell=256)
    assert big.size == (256 + 8, 256 + 8 + 4)


def test_line_chart_draws_every_series():
    from ditctl.grids import SERIES_COLOURS, line_chart

    chart = line_chart({"a": [(0, 1.0), (10, 0.5)], "b": [(0, 0.2), (10, 0.9)]}, title="t")
    pixels = np.asarray(chart).reshape(-1, 3)
    for colour in SERIES_COLOURS[:2]:
        assert (pixels == colour).all(axis=1).sum() > 50
