"""What `ditctl eval` writes and prints: metrics.json, report.html, the comparison grid, the loss
curves, tensorboard scalars, and the tables of `ditctl eval` and `--compare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import tomli_w
from PIL import Image

from ..config import Config
from ..errors import DitctlError
from ..fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..grids import image_grid, line_chart, png_bytes
from ..report import render_report
from ..runs import METRICS, eval_dir, logs_dir, run_config_file
from .metrics import ImageMetric

METRICS_FILE = METRICS
REPORT_FILE = "report.html"
COMPARISON_FILE = "comparison.png"
CURVE_FILE = "curve.png"
CURVE_JSON = "curve.json"


def comparison_grid(prompts: Sequence[str], seeds: Sequence[int], per_prompt: int,
                    columns: dict[str, list[Image.Image]]) -> Image.Image:
    """Rows = prompts (one per image of each prompt), columns = models."""
    labels = list(columns)
    rows, row_labels = [], []
    for i in range(len(prompts) * per_prompt):
        rows.append([columns[label][i] for label in labels])
        row_labels.append(prompts[i // per_prompt] + (f" (seed {seeds[i]})" if per_prompt > 1 else ""))
    return image_grid(rows, row_labels=row_labels, column_labels=labels)


def curve_chart(metrics: dict[str, Any]) -> Image.Image:
    points = [(float(p["step"]), float(p["val_loss"])) for p in metrics["curve"]]
    return line_chart({"validation loss": points}, title="validation loss by step",
                      x_label="step", y_label="loss")


def loss_by_t_chart(metrics: dict[str, Any]) -> Image.Image:
    series = {m["label"]: [(float(q), v) for q, v in m["val_loss_by_t"].items()]
              for m in metrics["models"]}
    return line_chart(series, title="validation loss by timestep", x_label="t (1 = noise)",
                      y_label="loss")


def write_outputs(out: Path, run_dir: Path | None, config: Config, metrics: dict[str, Any],
                  columns: dict[str, list[Image.Image]], prompts: list[str], seeds: list[int],
                  per_prompt: int, scorers: Sequence[ImageMetric]) -> None:
    """Everything `ditctl eval` writes into `out`, and the scalars into the run's logs."""
    out = Path(out)
    images: dict[str, Image.Image] = {"curve": curve_chart(metrics),
                                      "loss_by_t": loss_by_t_chart(metrics)}
    if prompts:
        images["comparison"] = comparison_grid(prompts, seeds, per_prompt, columns)
        atomic_write_bytes(out / COMPARISON_FILE, png_bytes(images["comparison"]))
    atomic_write_bytes(out / CURVE_FILE, png_bytes(images["curve"]))
    atomic_write_json(out / CURVE_JSON, metrics["curve"])
    scores = [scorer.html(metrics[scorer.key]) for scorer in scorers if scorer.key in metrics]
    atomic_write_json(out / METRICS_FILE, metrics)
    atomic_write_text(out / REPORT_FILE, render_report(metrics, images,
                                                       _run_config_text(run_dir, config), scores))
    if run_dir is not None and config.train.report_to != "none":
        log_scalars(logs_dir(run_dir), metrics, scorers)


def _run_config_text(run_dir: Path | None, config: Config) -> str:
    if run_dir is not None and run_config_file(run_dir).is_file():
        return run_config_file(run_dir).read_text()
    return tomli_w.dumps(config.to_dict())


def log_scalars(log_dir: Path, metrics: dict[str, Any], scorers: Sequence[ImageMetric]) -> None:
    """The evaluation numbers as tensorboard scalars at each model's step."""
    from torch.utils.tensorboard import SummaryWriter  # tensorboard loads slowly: only here

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for model in metrics["models"]:
            step, label = model["step"], model["label"]
            writer.add_scalar("eval/val_loss", model["val_loss"], step)
            for q, value in model["val_loss_by_t"].items():  # tags as training logs them
                writer.add_scalar(f"eval/val_loss_t{float(q):.2f}", value, step)
            for name, value in (model.get("val_loss_by_dataset") or {}).items():
                writer.add_scalar(f"eval/val_loss_{name}", value, step)
            for scorer in scorers:
                value = scorer.value(metrics[scorer.key], label) if scorer.key in metrics else None
                if value is not None:
                    writer.add_scalar(f"eval/{scorer.scalar}", value, step)
    finally:
        writer.close()


# --- ditctl eval --compare ----------------------------------------------------------------------

def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = eval_dir(run_dir) / METRICS_FILE
    if not path.is_file():
        raise DitctlError(f"run {run_dir.name} has not been evaluated ({path} is missing)",
                          hint=f"run `ditctl eval --run {run_dir.name}` first")
    return json.loads(path.read_text())


def comparison_table(metrics: dict[str, dict[str, Any]],
                     scorers: Sequence[ImageMetric]) -> list[list[str]]:
    """Rows [metric, value per run] for the latest checkpoint of each run."""
    latest = {name: m["models"][-1] for name, m in metrics.items()}
    rows = [["checkpoint"] + [model["label"] for model in latest.values()],
            ["validation loss"] + [f"{model['val_loss']:.5f}" for model in latest.values()]]
    quantiles = list(dict.fromkeys(q for model in latest.values() for q in model["val_loss_by_t"]))
    for q in quantiles:
        rows.append([f"  at t = {q}"] + [
            f"{model['val_loss_by_t'][q]:.5f}" if q in model["val_loss_by_t"] else "-"
            for model in latest.values()])
    rows.append(["base validation loss"] + [f"{m['models'][0]['val_loss']:.5f}"
                                            for m in metrics.values()])
    for scorer in scorers:
        values = []
        for run_metrics, model in zip(metrics.values(), latest.values()):
            result = run_metrics.get(scorer.key)
            value = scorer.value(result, model["label"]) if result else None
            values.append("-" if value is None else f"{value:.3f}")
        if any(v != "-" for v in values):
            rows.append([scorer.title] + values)
    rows.append(["validation data"] + [m["validation"]["description"] for m in metrics.values()])
    return rows


def comparison_images(run_dirs: Sequence[Path]) -> dict[str, bytes]:
    """Each run's comparison grid and loss curve, keyed "<run>/<file>"."""
    images = {}
    for run in run_dirs:
        for name in (COMPARISON_FILE, CURVE_FILE):
            path = eval_dir(run) / name
            if path.is_file():
                images[f"{run.name}/{name}"] = path.read_bytes()
    return images


def metrics_rows(metrics: dict[str, Any], scorers: Sequence[ImageMetric]) -> list[list[str]]:
    """Rows [model, step, loss, one column per image metric] for printing."""
    rows = []
    for model in metrics["models"]:
        label = model["label"]
        row = [label, str(model["step"]), f"{model['val_loss']:.5f}"]
        for scorer in scorers:
            value = scorer.value(metrics[scorer.key], label) if scorer.key in metrics else None
            row.append("-" if value is None else f"{value:.2f}")
        rows.append(row)
    return rows
