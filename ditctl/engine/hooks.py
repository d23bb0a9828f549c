"""Samples and validation loss during training, through the shared sampler and evaluator.

Both hooks take the live denoiser and a step, run on the main process only, and leave the
model's mode and the RNG as they were (the sampler and evaluator guarantee it). When training
reads the precomputed cache, prompts come from the cache too and the VAE is loaded only while
sampling, then freed: the text encoder is never loaded.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..config import Config
from ..console import console
from ..errors import DitctlError
from ..models.base import ModelFamily
from ..workspace import Workspace


def make_sampler(ws: Workspace, config: Config, family: ModelFamily, run,
                 source: Any) -> Callable | None:
    """A `(denoiser, step) -> grid image` hook, or None when there is nothing to sample."""
    from ..sampling import (default_prompts_file, encode_prompts, read_prompts, sample_size,
                            sample_during_training)
    from ..evaluation import cached_embeddings

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
                  else cached_embeddings(source, prompts, negative))

    def sample(denoiser, step: int) -> Image.Image:
        decoder = vae if vae is not None else family.load_vae()
        out_dir = run.samples_dir / f"step-{step:06d}"
        grid = sample_during_training(family, denoiser, decoder, prompts, out_dir, config.sample,
                                      width=width, height=height, embeddings=embeddings,
                                      metadata={"run": run.name, "step": step})
        if vae is None:
            del decoder
            gc.collect()
        with Image.open(grid) as image:
            return image.convert("RGB")

    return sample


def make_evaluator(ws: Workspace, config: Config, family: ModelFamily, run,
                   source: Any) -> Callable | None:
    """A `(denoiser, step) -> metrics` hook on the validation set (fixed timesteps and noise),
    appending each result to runs/<run>/eval/during_training.jsonl."""
    from ..evaluation import MaterializedSource, validation_loss, validation_set

    if not config.train.eval_every:
        return None
    try:
        val = validation_set(ws, config)
    except DitctlError as exc:
        console.warn(f"no validation loss during training: {exc}")
        return None
    inputs: dict[str, Any] = {}
    log = Path(run.folder) / "eval" / "during_training.jsonl"

    def evaluate(denoiser, step: int) -> dict[str, float]:
        if "source" not in inputs:  # read once, reused at every evaluation
            inputs["source"] = MaterializedSource(source, val.rows)
        result = validation_loss(family, denoiser, val.rows, inputs["source"],
                                 config.eval.timestep_quantiles,
                                 batch_size=config.train.eval_batch_size,
                                 resolution_shift=config.train.resolution_shift)
        metrics = {"val_loss": result["overall"],
                   **{f"val_loss_t{q:.2f}": v for q, v in result["per_quantile"].items()}}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **metrics, "data": val.description}) + "\n")
        return metrics

    return evaluate
