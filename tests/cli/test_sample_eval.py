"""`ditctl sample` and `ditctl eval` end to end on a tiny model (32 px images, 2 steps)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from PIL import Image

from ditctl.config import Config
from ditctl.grids import read_png_text
from ditctl.scaffold import init_workspace
from tests.conftest import write_test_checkpoint

SCENE = "a red circle on a white background"


def _make_run(root: Path, model_dir: Path, name: str, steps: tuple[int, ...]) -> Path:
    """runs/<name> with config.toml and one LoRA checkpoint per step (distinct weights)."""
    run = root / "runs" / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text(tomli_w.dumps(Config().to_dict()))
    for i, step in enumerate(steps):
        folder = write_test_checkpoint(model_dir, run / "checkpoints" / f"step-{step:06d}",
                                       seed=hash(name) % 100 + i)
        marker = folder / "checkpoint.json"
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "step": step}))
    return run


def _small_settings(root: Path) -> None:
    """32 px images, 2 sampling steps, validation loss at 3 timesteps in batches of 8."""
    project = root / "project.toml"
    text = re.sub(r"^# steps =.*$", "steps = 2", project.read_text(), count=1, flags=re.M)
    project.write_text(text
                       .replace("resolution = 64", "resolution = 32")
                       .replace("# eval_batch_size = 1", "eval_batch_size = 8")
                       .replace("# timestep_quantiles = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]",
                                "timestep_quantiles = [0.25, 0.5, 0.75]"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> Path:
    """An --example workspace (3 of its scene prompts; 144 train images, 48 green and 96
    prior-preservation, and 8 val images), ingested, with run r1 (checkpoints at steps 10, 20)."""
    from ditctl.data.ingest import run_ingest

    root = tmp_path_factory.mktemp("cli") / "ws"
    ws = init_workspace(root, model=str(tiny_model_dir), example=True).workspace
    _small_settings(root)
    prompts = (root / "prompts.txt").read_text().splitlines()
    kept = [p for p in prompts if p.startswith("#")] + [p for p in prompts if p.startswith("a ")][3:6]
    (root / "prompts.txt").write_text("\n".join(kept) + "\n")  # 1 held-out (green) + 2 trained colours
    run_ingest(ws, ws.config())
    _make_run(root, tiny_model_dir, "r1", (10, 20))
    return root


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# --- sample -------------------------------------------------------------------------------------

def test_sample_base_writes_pngs_with_metadata_a_grid_and_an_index(cli, workspace):
    result = cli("sample", "-w", workspace, "--base", "--prompt", SCENE, "--prompt", "a blue square",
                 "--num-images-per-prompt", "2", "--seed", "3")
    assert result.exit_code == 0, result.output
    out = workspace / "samples" / "base"
    assert str(out) in result.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["prompts"] == [SCENE, "a blue square"]
    assert [(e["prompt_index"], e["image_index"]) for e in index["images"]] == \
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    first = index["images"][0]
    assert first["file"] == f"p000-s{first['seed']}.png"
    text = read_png_text(out / first["file"])
    assert text["prompt"] == SCENE and text["seed"] == str(first["seed"])
    settings = json.loads(text["settings"])
    assert settings["steps"] == 2 and settings["seed"] == 3 and settings["width"] == 32
    assert settings["guidance_scale"] == 6.0
    assert _pixels(out / first["file"]).shape == (32, 32, 3)
    with Image.open(out / "grid.png") as grid:
        assert grid.width == 2 * 128 + 3 * 4  # two images per prompt, enlarged to 128 px


def test_sample_a_checkpoint_into_a_chosen_folder(cli, workspace, tmp_path):
    checkpoint = workspace / "runs" / "r1" / "checkpoints" / "step-000010"
    out = tmp_path / "mine"
    args = ("--prompt", SCENE, "--seed", "3")
    result = cli("sample", "-w", workspace, "--checkpoint", checkpoint, "--out", out, *args)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert index["checkpoint"] == str(checkpoint)
    name = index["images"][0]["file"]
    assert read_png_text(out / name)["checkpoint"] == str(checkpoint)
    # the same prompt and seed through the base model give the same noise but other weights
    base = tmp_path / "base"
    assert cli("sample", "-w", workspace, "--base", "--out", base, *args).exit_code == 0
    assert (base / name).is_file()
    assert not np.array_equal(_pixels(out / name), _pixels(base / name))
    # sampling again (the checkpoint named within its run) reproduces the image bit for bit
    again = tmp_path / "again"
    assert cli("sample", "-w", workspace, "--run", "r1", "--checkpoint", "step-000010",
               "--out", again, *args, "--batch-size", "4").exit_code == 0
    assert np.array_equal(_pixels(out / name), _pixels(again / name))


def test_sample_defaults_to_the_latest_checkpoint_and_the_workspace_prompts(cli, workspace):
    result = cli("sample", "-w", workspace)
    assert result.exit_code == 0, result.output
    out = workspace / "runs" / "r1" / "samples" / "step-000020-sample"
    index = json.loads((out / "index.json").read_text())
    assert index["prompts"] == ["a green triangle on a white background",
                                "a red circle on a white background",
                                "a blue square on a black background"]
    assert index["source"] == "run r1, checkpoint step-000020"


@pytest.fixture()
def bare_workspace(tmp_path, tiny_model_dir) -> Path:
    root = tmp_path / "bare"
    init_workspace(root, model=str(tiny_model_dir))
    _small_settings(root)
    return root


def test_sample_reports_bad_input_in_one_line(cli, bare_workspace, tiny_model_dir, tmp_path):
    root = bare_workspace
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    result = cli("sample", "-w", root, "--base", "--prompts", empty)
    assert result.exit_code == 1 and "holds no prompts" in result.stderr

    result = cli("sample", "-w", root)
    assert result.exit_code == 1 and "no training runs" in result.stderr

    run = root / "runs" / "fresh"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text(tomli_w.dumps(Config().to_dict()))
    result = cli("sample", "-w", root, "--run", "fresh")
    assert result.exit_code == 1 and "run fresh has no complete checkpoint" in result.stderr

    result = cli("sample", "-w", root, "--base", "--width", "40", "--prompt", "x")
    assert result.exit_code == 1 and "multiple of 16" in result.stderr

    result = cli("sample", "-w", root, "--base", "--run", "fresh", "--prompt", "x")
    assert result.exit_code == 1 and "give one of them" in result.stderr

    foreign = write_test_checkpoint(tiny_model_dir, tmp_path / "foreign" / "step-000001")
    marker = foreign / "checkpoint.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "base_identity": "dit:other"}))
    result = cli("sample", "-w", root, "--checkpoint", foreign, "--prompt", "x")
    assert result.exit_code == 1 and "trained on another base model" in result.stderr
    assert "Traceback" not in result.output


def test_sample_an_exported_pipeline_outside_a_workspace(cli, tiny_model_dir, tmp_path,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("sample", "--model", tiny_model_dir, "--prompt", "a cat", "--steps", "1",
                 "--width", "32", "--height", "32", "--json")
    assert result.exit_code == 0, result.output
    index = json.loads(result.stdout)
    assert Path(index["dir"]).parent == tmp_path / "samples"
    assert Path(index["dir"]).name.startswith(f"sample-{tiny_model_dir.name}-")
    assert len(index["images"]) == 1


# --- eval ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(workspace):
    """`ditctl eval --run r1 --all-checkpoints`, run once for the tests below."""
    from typer.testing import CliRunner

    from ditctl.cli.app import app

    result = CliRunner().invoke(app, ["eval", "-w", str(workspace), "--run", "r1",
                                      "--all-checkpoints"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return workspace / "runs" / "r1" / "eval", result


def test_eval_writes_metrics_with_every_model(evaluated):
    out, result = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"run", "model", "validation", "models", "curve", "comparison", "clip", "concept",
            "sample_settings"} <= set(metrics)
    assert metrics["run"] == "r1"
    assert metrics["validation"]["description"] == "validation split (8 images)"
    assert [m["label"] for m in metrics["models"]] == ["base", "step-000010", "step-000020"]
    assert metrics["validation"]["quantiles"] == [0.25, 0.5, 0.75]
    for model in metrics["models"]:
        assert list(model["val_loss_by_t"]) == ["0.25", "0.5", "0.75"]
        assert model["val_loss"] == pytest.approx(sum(model["val_loss_by_t"].values()) / 3)
    assert metrics["clip"]["status"] == "skipped" and "clip_model_path" in metrics["clip"]["hint"]
    assert set(metrics["concept"]["columns"]) == {"base", "step-000010", "step-000020"}
    assert metrics["concept"]["columns"]["base"]["n"] == 3
    assert metrics["concept"]["columns"]["base"]["held_out"]["n"] == 1
    assert metrics["comparison"]["columns"] == ["base", "step-000010", "step-000020"]
    assert "CLIP score skipped" in result.stdout and "report.html" in result.stdout


def test_eval_all_checkpoints_writes_the_loss_curve(evaluated):
    out, _ = evaluated
    curve = json.loads((out / "curve.json").read_text())
    assert [p["step"] for p in curve] == [0, 10, 20]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [p["val_loss"] for p in curve] == [m["val_loss"] for m in metrics["models"]]
    with Image.open(out / "curve.png") as chart:
        assert chart.size == (640, 360)
    logs = list((out.parent / "logs").glob("events.out.tfevents.*"))
    assert logs, "tensorboard scalars were not written"


def test_eval_comparison_grid_has_a_column_per_model(evaluated):
    out, _ = evaluated
    with Image.open(out / "comparison.png") as grid:
        assert grid.width == 3 * 128 + 4 * 4  # base + 2 checkpoints, 32 px images shown at 128
        assert grid.height > 3 * 128  # one row per prompt


def test_eval_report_is_self_contained(evaluated):
    out, _ = evaluated
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3  # curve, loss by t, comparison
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for text in ("validation split (8 images)", "step-000020", "Loss by timestep",
                 "CLIP score skipped", "Concept match", "[train]"):
        assert text in page


@pytest.mark.slow
def test_eval_report_renders_in_headless_chromium(evaluated, tmp_path):
    """The report's images must be visible in a real browser: the screenshot holds the
    comparison grid's colourful pixels. (Without Chromium: open report.html offline by hand.)"""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium/google-chrome on PATH: cannot check that report.html renders")
    out, _ = evaluated
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,2400", f"--screenshot={shot}",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("HSV")).reshape(-1, 3)
    colourful = ((pixels[:, 1] > 100) & (pixels[:, 2] > 60)).sum()
    assert colourful > 20_000, f"only {colourful} colourful pixels: images not rendered?"


def test_eval_compare_puts_two_runs_side_by_side(cli, workspace, tiny_model_dir, evaluated):
    _make_run(workspace, tiny_model_dir, "r2", (5,))
    result = cli("eval", "-w", workspace, "--run", "r2")
    assert result.exit_code == 0, result.output
    metrics = json.loads((workspace / "runs" / "r2" / "eval" / "metrics.json").read_text())
    assert [m["label"] for m in metrics["models"]] == ["base", "step-000005"]

    result = cli("eval", "-w", workspace, "--compare", "r1", "r2")
    assert result.exit_code == 0, result.output
    assert "step-000020" in result.stdout and "step-000005" in result.stdout
    page_path = workspace / "eval" / "compare-r1-vs-r2.html"
    page = page_path.read_text()
    assert page.count('src="data:image/png;base64,') == 4  # two curves, two grids
    # the base model's loss is the same in both runs: same data, noise and weights
    base_row = next(line for line in result.stdout.splitlines() if "base validation loss" in line)
    values = [v for v in base_row.split("│") if v.strip()][1:]
    assert len(values) == 2 and values[0].strip() == values[1].strip()

    missing = cli("eval", "-w", workspace, "--compare", "r1")
    assert missing.exit_code == 1 and "exactly two runs" in missing.stderr


def test_eval_of_a_run_without_checkpoints_is_a_one_line_error(cli, bare_workspace):
    run = bare_workspace / "runs" / "fresh"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text(tomli_w.dumps(Config().to_dict()))
    result = cli("eval", "-w", bare_workspace, "--run", "fresh")
    assert result.exit_code == 1 and "has no complete checkpoint" in result.stderr
