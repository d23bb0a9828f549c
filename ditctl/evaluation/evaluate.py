"""`ditctl eval` as a library call: evaluate the base model and checkpoints side by side.

`plan_eval` decides which models (always the base, plus the chosen checkpoints, found by
`runs.resolve_checkpoint`) and where to write; `run_eval` measures each model's validation loss
(`engine.validation`), generates the same prompts with the same seeds through each (the
comparison grid), scores the images with every image metric that applies (metrics.py), and
writes the results (report.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import Config
from ..console import console
from ..data.batches import OnTheFlySource
from ..data.datasets import of_row, per_dataset, resolve_datasets
from ..engine.attention import attention_context, check_attention_backend
from ..engine.loading import checkpoint_weights, has_ema, load_denoiser
from ..engine.objective import training_guidance
from ..engine.validation import VALIDATION_SEED, MaterializedSource, validation_loss
from ..errors import DitctlError
from ..fsutil import atomic_write_text
from ..models.base import ModelFamily, unconditional_text
from ..models.registry import load_family
from ..report import render_comparison
from ..runs import (EVAL, checkpoint_step, eval_dir, latest_checkpoint, list_checkpoints,
                    resolve_checkpoint, resolve_run, run_of_checkpoint, verify_checkpoint)
from ..sampling import (default_prompts_file, encode_prompts, free_accelerator_memory, generate,
                        inference_device, inference_dtype, plan_images, read_prompts,
                        resolve_shift, sample_size, settings_dict, text_encoder_device)
from ..workspace import Workspace
from .clip import ClipScore
from .inputs import cached_embeddings, cached_inputs, validation_set
from .metrics import ComparisonImages, ImageMetric, plugin_metrics, score_images
from .report import (COMPARISON_FILE, comparison_images, comparison_table, read_metrics,
                     write_outputs)


def image_metrics() -> list[ImageMetric]:
    """The metrics `ditctl eval` scores images with: CLIP, then the plug-ins."""
    return [ClipScore(), *plugin_metrics()]


@dataclass
class Evaluated:
    """One evaluated model: the base (step 0) or a checkpoint."""

    label: str
    step: int
    checkpoint: Path | None
    weights: str | None = None  # "ema" / "raw" of a checkpoint; None: the base model
    loss: dict[str, Any] | None = None
    images: list[Image.Image] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "step": self.step,
                               "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                               "weights": self.weights}
        if self.loss is not None:
            out["val_loss"] = self.loss["overall"]
            out["val_loss_by_t"] = {f"{q:g}": v for q, v in self.loss["per_quantile"].items()}
            if "per_dataset" in self.loss:  # several datasets: each one's loss on its own
                out["val_loss_by_dataset"] = self.loss["per_dataset"]
        return out


@dataclass
class EvalPlan:
    family: ModelFamily
    run_dir: Path | None
    checkpoints: list[Path]
    out_dir: Path


def plan_eval(ws: Workspace, config: Config, *, run: str | None = None,
              checkpoint: str | Path | None = None, base: bool = False,
              all_checkpoints: bool = False, out_dir: Path | None = None) -> EvalPlan:
    """Which models to evaluate (always the base, plus the chosen checkpoints) and where to
    write: runs/<run>/eval, or <workspace>/eval/base for the base model alone. --checkpoint
    and --run are read as by every command (`runs.resolve_checkpoint`)."""
    if base and (run or checkpoint or all_checkpoints):
        raise DitctlError("--base evaluates the base model alone; it does not go with --run, "
                          "--checkpoint or --all-checkpoints",
                          hint="drop --base: the base model is always evaluated alongside "
                               "checkpoints")
    if checkpoint and all_checkpoints:
        raise DitctlError("--checkpoint and --all-checkpoints pick different checkpoints",
                          hint="give one of them (--run NAME --all-checkpoints for a whole run)")
    family = load_family(ws.model_path(config), config.model.family)
    if base:
        return EvalPlan(family, None, [], Path(out_dir or ws.root / EVAL / "base"))
    runs_dir = ws.runs_dir(config)
    if all_checkpoints:
        run_dir = resolve_run(runs_dir, run)
        checkpoints = list_checkpoints(run_dir) or [latest_checkpoint(run_dir)]  # (raises)
    else:
        found = resolve_checkpoint(runs_dir, checkpoint, run=run)
        run_dir = run_of_checkpoint(found)
        checkpoints = [found]
    for found in checkpoints:  # every file against its manifest, before anything is loaded
        verify_checkpoint(found)
    default = eval_dir(run_dir) if run_dir is not None else ws.root / EVAL / checkpoints[0].name
    return EvalPlan(family, run_dir, checkpoints, Path(out_dir or default))


def run_eval(ws: Workspace, config: Config, plan: EvalPlan,
             device: torch.device | None = None) -> dict[str, Any]:
    """Evaluate the base model and the plan's checkpoints; write metrics.json, report.html,
    comparison.png, curve.png/curve.json and tensorboard scalars. Returns the metrics."""
    device = device or inference_device()
    dtype = inference_dtype(device)
    family = plan.family
    settings = config.sample
    check_attention_backend(config.train.attention_backend, device)  # fail before any work
    models = [Evaluated("base", 0, None)] + [
        model for c in plan.checkpoints for model in evaluated_weights(c, settings.weights)]
    width, height = sample_size(config, family)
    validation = validation_set(ws, config)
    prompts, prompts_note = _comparison_prompts(ws, config)

    # Inputs once, for every model: from the precompute cache where it has them (then the text
    # encoder is never loaded), else encoded here; the text encoder is freed before any DiT.
    vae = family.load_vae(torch.float32, device)
    negative_text = unconditional_text(family, settings.negative_prompt)
    texts = prompts + ([negative_text] if negative_text is not None else [])
    source, text_source = cached_inputs(ws, config, family, validation.rows, texts)
    source_how = "read from the precompute cache" if source is not None else "encoded on the fly"
    text_encoder = None
    if source is None or (prompts and text_source is None):
        text_encoder = family.load_text_encoder(dtype, text_encoder_device(settings, device))
    inputs = MaterializedSource(source or OnTheFlySource(family, vae, text_encoder, config.data,
                                                  per_dataset(config, "center_crop")),
                                validation.rows)
    embeddings = None
    if prompts and text_source is not None:
        embeddings = cached_embeddings(family, text_source, prompts, settings.negative_prompt)
    elif prompts:
        embeddings = encode_prompts(family, text_encoder, prompts, settings.negative_prompt)
    del source, text_source, text_encoder
    free_accelerator_memory()

    for model in models:
        console.info(f"evaluating {model.label}")
        denoiser = load_denoiser(family, model.checkpoint, lora_scale=settings.lora_scale,
                                 dtype=dtype, device=device, weights=model.weights or "auto")
        with attention_context(config.train.attention_backend, device):
            model.loss = validation_loss(family, denoiser, validation.rows, inputs,
                                         config.eval.timestep_quantiles, VALIDATION_SEED,
                                         config.train.eval_batch_size,
                                         resolution_shift=config.train.resolution_shift,
                                         fixed_shift=config.train.timestep_shift,
                                         guidance=training_guidance(family, config.train))
            if "per_dataset" in model.loss:
                names = [d.name for d in resolve_datasets(config)]
                model.loss["per_dataset"] = {of_row(names, d) if names else str(d): value
                                             for d, value in model.loss["per_dataset"].items()}
            if embeddings is not None:
                model.images = generate(family, denoiser, vae, prompts, settings, width=width,
                                        height=height, embeddings=embeddings)
        del denoiser
        free_accelerator_memory()

    per_prompt = settings.num_images_per_prompt
    seeds = [job.seed for job in plan_images(len(prompts), per_prompt, settings.seed)]
    metrics: dict[str, Any] = {
        "run": plan.run_dir.name if plan.run_dir else None,
        "model": str(family.path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "validation": {"kind": validation.kind, "description": validation.description,
                       "images": len(validation.rows), "inputs": source_how,
                       "quantiles": list(config.eval.timestep_quantiles), "seed": VALIDATION_SEED,
                       "resolution_shift": config.train.resolution_shift,
                       "timestep_shift": config.train.timestep_shift},
        "models": [m.summary() for m in models],
        # one point per step: a checkpoint's EMA where it has one (what sample/export default to)
        "curve": [{"step": m.step, "label": m.label, "weights": m.weights,
                   "val_loss": m.loss["overall"]} for m in models
                  if not (m.weights == "raw" and any(o.checkpoint == m.checkpoint
                                                     and o.weights == "ema" for o in models))],
        "sample_settings": settings_dict(settings, width=width, height=height,
                                         shift=resolve_shift(family, settings, width, height)),
        "comparison": {"prompts": prompts, "seeds": seeds, "columns": [m.label for m in models],
                       "grid": COMPARISON_FILE if prompts else None, "note": prompts_note},
    }
    columns = {m.label: m.images for m in models} if prompts else {}
    scorers = image_metrics()
    metrics.update(score_images(scorers, ComparisonImages(prompts, columns, per_prompt), config,
                                device))
    write_outputs(plan.out_dir, plan.run_dir, config, metrics, columns, prompts, seeds,
                  per_prompt, scorers)
    return metrics


def evaluated_weights(checkpoint: Path, choice: str) -> list[Evaluated]:
    """The models a checkpoint contributes to the comparison: with an EMA and `choice` auto,
    its raw and its EMA weights side by side ("step-000100 (raw)", "step-000100 (ema)");
    otherwise the weights `choice` picks (labelled by name alone when it has no EMA)."""
    step = checkpoint_step(checkpoint)
    if not has_ema(checkpoint):
        which = checkpoint_weights(checkpoint, choice)  # --weights ema: refused here
        return [Evaluated(checkpoint.name, step, checkpoint, which)]
    picks = ["raw", "ema"] if choice == "auto" else [choice]
    return [Evaluated(f"{checkpoint.name} ({w})", step, checkpoint, w) for w in picks]


def _comparison_prompts(ws: Workspace, config: Config) -> tuple[list[str], str | None]:
    path = default_prompts_file(ws, config)
    try:
        return read_prompts(path), None
    except DitctlError as exc:
        console.warn(f"no before/after images: {exc}")
        return [], str(exc)


def compare_runs(ws: Workspace, config: Config, run_a: str, run_b: str,
                 out: Path | None = None) -> tuple[list[list[str]], Path]:
    """Two evaluated runs side by side: (table rows, path of the HTML page)."""
    runs_dir = ws.runs_dir(config)
    runs = [resolve_run(runs_dir, name) for name in (run_a, run_b)]
    if runs[0].resolve() == runs[1].resolve():
        raise DitctlError(f"--compare got the same run twice ({runs[0].name})",
                          hint="name two different runs")
    metrics = {run.name: read_metrics(run) for run in runs}
    table = comparison_table(metrics, image_metrics())
    path = Path(out or ws.root / EVAL / f"compare-{runs[0].name}-vs-{runs[1].name}.html")
    atomic_write_text(path, render_comparison(metrics, table, comparison_images(runs)))
    return table, path
