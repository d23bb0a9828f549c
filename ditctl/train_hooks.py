"""Samples and validation loss during training, through the shared sampler and evaluator.

`ditctl.train` builds these hooks and hands them to the engine's loop in its
`TrainingContext`; the engine calls them without knowing what is behind them.

Both hooks take the live denoiser and a step, run on the main process only, and leave the
model's mode and the RNG as they were (the sampler and evaluator guarantee it). When training
reads the precomputed cache, prompts come from the cache too and the VAE is loaded only while
sampling, then freed: the text encoder is never loaded.
"""

from __future__ import annotations

import gc
import json
from typing import Any

from PIL import Image

from .config import Config
from .console import console
from .data.datasets import of_row, resolve_datasets
from .engine.context import EvalHook, SampleHook
from .engine.objective import training_guidance
from .engine.run import Run
from .engine.validation import MaterializedSource, validation_loss
from .errors import DitctlError
from .evaluation.inputs import cached_embeddings, validation_set
from .models.base import ModelFamily
from .runs import DURING_TRAINING_EVAL, eval_dir, training_samples_dir
from .sampling import (default_prompts_file, encode_prompts, generate, read_prompts,
                       sample_during_training,
                       sample_size)
from .workspace import Workspace


def make_sampler(ws: Workspace, config: Config, family: ModelFamily, run: Run,
                 source: Any, writes: bool = True) -> SampleHook | None:
    """A `(denoiser, step) -> grid image` hook, or None when there is nothing to sample.
    `writes=False` (the other processes of a sharded run): the same denoising passes, which
    the sharded model needs every process to take part in, and nothing written."""
    if not config.train.sample_every:
        return None
    try:
        prompts = read_prompts(default_prompts_file(ws, config))
    except DitctlError as exc:
        console.warn(f"no samples during training: {exc}")
        return None
    width, height = sample_size(config, family)
    negative = config.sample.negative_prompt
    vae = getattr(source, "vae", None)
    text_encoder = getattr(source, "text_encoder", None)
    embeddings = (encode_prompts(family, text_encoder, prompts, negative) if text_encoder is not None
                  else cached_embeddings(family, source, prompts, negative))

    def sample(denoiser, step: int) -> Image.Image | None:
        if not writes:
            generate(family, denoiser, vae if vae is not None else family.load_vae(), prompts,
                     config.sample, width=width, height=height, embeddings=embeddings,
                     show_progress=False)
            return None
        decoder = vae if vae is not None else family.load_vae()
        out_dir = training_samples_dir(run.folder, step)
        grid = sample_during_training(family, denoiser, decoder, prompts, out_dir, config.sample,
                                      width=width, height=height, embeddings=embeddings,
                                      metadata={"run": run.name, "step": step})
        if vae is None:
            del decoder
            gc.collect()
        with Image.open(grid) as image:
            return image.convert("RGB")

    return sample


def make_evaluator(ws: Workspace, config: Config, family: ModelFamily, run: Run,
                   source: Any, writes: bool = True) -> EvalHook | None:
    """A `(denoiser, step) -> metrics` hook on the validation set (fixed timesteps and noise),
    appending each result to runs/<run>/eval/during_training.jsonl."""
    if not config.train.eval_every:
        return None
    try:
        val = validation_set(ws, config)
    except DitctlError as exc:
        console.warn(f"no validation loss during training: {exc}")
        return None
    inputs: dict[str, Any] = {}
    log = eval_dir(run.folder) / DURING_TRAINING_EVAL

    def evaluate(denoiser, step: int, weights: str = "raw") -> dict[str, float]:
        if "source" not in inputs:  # read once, reused at every evaluation
            inputs["source"] = MaterializedSource(source, val.rows)
        result = validation_loss(family, denoiser, val.rows, inputs["source"],
                                 config.eval.timestep_quantiles,
                                 batch_size=config.train.eval_batch_size,
                                 resolution_shift=config.train.resolution_shift,
                                 fixed_shift=config.train.timestep_shift,
                                 guidance=training_guidance(family, config.train))
        metrics = {"val_loss": result["overall"],
                   **{f"val_loss_t{q:.2f}": v for q, v in result["per_quantile"].items()}}
        names = [d.name for d in resolve_datasets(config)]
        for d, value in result.get("per_dataset", {}).items():  # several datasets: each one
            metrics[f"val_loss_{of_row(names, d) if names else d}"] = value
        if not writes:  # another process of a sharded run: only the main one records
            return metrics
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "weights": weights, **metrics,
                                 "data": val.description}) + "\n")
        return metrics

    return evaluate
