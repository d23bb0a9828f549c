"""Evaluation: validation loss by timestep, before/after images, CLIP and concept scores.

`validation_loss` is the number to compare checkpoints by: the training loss at fixed
timesteps with fixed noise, so two checkpoints (or two runs) see exactly the same inputs and
only the weights differ. `run_eval` is `ditctl eval`: it evaluates the base model and one or
more checkpoints, generates the same prompts with the same seeds through each of them (the
comparison grid), scores the images when it can, and writes metrics.json, report.html, the
loss curve and tensorboard scalars. `compare_runs` puts two runs' results side by side.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .config import Config
from .console import console
from .data.manifest import ManifestRow, read_manifest
from .errors import CacheError, CheckpointError, ConfigError, DataError, DitctlError
from .fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from .grids import image_grid, line_chart, png_bytes
from .models.base import LatentDist, ModelFamily
from .sampling import (PromptEmbeddings, default_prompts_file, encode_prompts,
                       free_accelerator_memory, generate, inference_context, inference_device,
                       inference_dtype, locate_checkpoint, param_dtype, plan_images, read_prompts,
                       resolve_shift, run_of_checkpoint, sample_size, settings_dict,
                       text_encoder_device)
from .status import list_checkpoints
from .workspace import Workspace

VALIDATION_SEED = 0  # fixed, so that every run and checkpoint is measured on the same noise
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
COMPARISON_FILE = "comparison.png"
CURVE_FILE = "curve.png"
CURVE_JSON = "curve.json"


# --- validation data ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ValidationSet:
    rows: list[ManifestRow]
    kind: str  # "val": the validation split; "holdout": the last rows of the training split
    description: str


def split_holdout(train: Sequence[ManifestRow], fraction: float) -> tuple[list[ManifestRow],
                                                                         list[ManifestRow]]:
    """(rows to train on, held-out rows): the last round(len * fraction) rows are held out.

    Training must use the first part when the workspace has no validation split, or the
    "held-out" loss is measured on images the model has trained on.
    """
    count = round(len(train) * fraction)
    return list(train[:len(train) - count]), list(train[len(train) - count:])


def validation_set(ws: Workspace, config: Config) -> ValidationSet:
    """The manifest's val split; without one, the last `holdout_fraction` of the train rows."""
    val = read_manifest(ws, "val")
    if val:
        return ValidationSet(val, "val", f"validation split ({len(val)} images)")
    train = read_manifest(ws, "train")
    held = split_holdout(train, config.eval.holdout_fraction)[1]
    count = len(held)
    if not train or count == 0:
        raise DataError("no validation data: the manifest has no val split and [eval] "
                        f"holdout_fraction = {config.eval.holdout_fraction:g} of "
                        f"{len(train)} training images is none",
                        hint="set [data] val_data_path and run `ditctl ingest`, or raise "
                             "[eval] holdout_fraction")
    return ValidationSet(held, "holdout",
                         f"held-out slice of training data (last {count} of {len(train)} "
                         "training images)")


class MaterializedSource:
    """A source's inputs for a few rows, read once and kept in memory (CPU, fp32), so that
    several checkpoints are evaluated without encoding the images again."""

    def __init__(self, source: Any, rows: Sequence[ManifestRow]):
        self._dists: dict[ManifestRow, LatentDist] = {}
        self._texts: dict[str, torch.Tensor] = {}
        for row in console.track(rows, "reading validation images", total=len(rows), unit="img"):
            dist = source.latent_dist(row, False)
            self._dists[row] = LatentDist(dist.mean.detach().float().cpu(),
                                          dist.std.detach().float().cpu())
            if row.caption not in self._texts:
                self._texts[row.caption] = source.text_embedding(row.caption).detach().float().cpu()

    def latent_dist(self, row: ManifestRow, flip: bool = False) -> LatentDist:
        if flip:
            raise ValueError("validation inputs are never flipped")
        return self._dists[row]

    def text_embedding(self, caption: str) -> torch.Tensor:
        return self._texts[caption]


def cached_inputs(ws: Workspace, config: Config, family: ModelFamily,
                  rows: Sequence[ManifestRow], texts: Sequence[str]) -> tuple[Any, Any]:
    """(a CachedSource for the rows, one for the texts): each only when the precompute cache
    holds everything it must give (else None). Loads no weights."""
    from .data.batches import CachedSource
    from .data.cache import Cache, check_cache_complete

    found = []
    for what, kwargs in (("validation images", dict(rows=list(rows), prompts=[])),
                         ("prompts", dict(rows=[], prompts=list(texts)))):
        try:
            check_cache_complete(ws, config, family, **kwargs)
            found.append(CachedSource(Cache.open(ws, config, family)))
        except CacheError as exc:
            console.info(f"{what}: encoded on the fly, the cache lacks some ({exc})")
            found.append(None)
    return found[0], found[1]


def cached_embeddings(source: Any, prompts: Sequence[str],
                      negative_prompt: str | None) -> PromptEmbeddings:
    cond = torch.cat([source.text_embedding(p) for p in prompts])
    negative = source.text_embedding(negative_prompt) if negative_prompt else None
    return PromptEmbeddings(cond, negative)


# --- validation loss ----------------------------------------------------------------------------

def validation_generator(seed: int, index: int) -> torch.Generator:
    """The generator of validation sample `index`: its posterior eps, then one noise per quantile."""
    from .engine.objective import sample_seed

    return torch.Generator().manual_seed(sample_seed(seed, index))


def validation_loss(family: ModelFamily, denoiser: torch.nn.Module, rows: Sequence[ManifestRow],
                    source: Any, quantiles: Sequence[float], seed: int = VALIDATION_SEED,
                    batch_size: int = 1, *, resolution_shift: bool = True) -> dict[str, Any]:
    """The training loss at fixed timesteps, with fixed noise.

    Sample i draws, from `validation_generator(seed, i)`, its posterior eps (x0 =
    family.sample_latents) and then one noise tensor per quantile in order; the timestep of
    quantile q is q warped by the resolution shift (as in training, when `resolution_shift`).
    Loss = MSE(prediction, family.training_target(x0, noise)) per sample (fp32), averaged per
    quantile; "overall" is the mean over quantiles. Returns {"per_quantile": {q: loss},
    "overall": loss, "n": samples}.
    """
    from .engine.objective import per_sample_mse, shift_timesteps

    if not rows:
        raise DataError("validation loss needs at least one image", hint="add validation data")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = next(denoiser.parameters()).device, param_dtype(denoiser)
    losses: dict[float, list[torch.Tensor]] = {float(q): [] for q in quantiles}
    inputs = [_validation_inputs(family, source, row, seed, i, len(quantiles))
              for i, row in enumerate(rows)]
    groups: dict[tuple, list[int]] = {}  # one latent shape per forward
    for i, (x0, _, _) in enumerate(inputs):
        groups.setdefault(tuple(x0.shape), []).append(i)

    with inference_context(denoiser):
        for shape, members in groups.items():
            alpha = family.resolution_shift(shape[-2], shape[-1]) if resolution_shift else 1.0
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                x0 = torch.cat([inputs[i][0] for i in chunk])
                text = torch.cat([inputs[i][2] for i in chunk])
                for j, q in enumerate(losses):
                    noise = torch.cat([inputs[i][1][j] for i in chunk])
                    t = shift_timesteps(torch.full((len(chunk),), q, dtype=torch.float32), alpha)
                    noisy = family.noisy_latents(x0, noise, t)
                    prediction = family.predict(denoiser, noisy.to(device, dtype), t.to(device),
                                                text.to(device, dtype))
                    target = family.training_target(x0, noise).to(device)
                    losses[q].append(per_sample_mse(prediction, target).cpu())
    per_quantile = {q: float(torch.cat(values).mean()) for q, values in losses.items()}
    return {"per_quantile": per_quantile,
            "overall": sum(per_quantile.values()) / len(per_quantile), "n": len(rows)}


def _validation_inputs(family: ModelFamily, source: Any, row: ManifestRow, seed: int, index: int,
                       n_quantiles: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(x0 [1,C,h,w], one noise per quantile, text [1,L,D]) of one validation sample (CPU)."""
    dist = source.latent_dist(row, False)
    dist = LatentDist(dist.mean.float().cpu(), dist.std.float().cpu())
    generator = validation_generator(seed, index)
    x0 = family.sample_latents(dist, generator)
    noises = [torch.randn(x0.shape, generator=generator, dtype=torch.float32)
              for _ in range(n_quantiles)]
    return x0, noises, source.text_embedding(row.caption).float().cpu()


# --- image scores -------------------------------------------------------------------------------

class ClipScorer:
    """CLIP score: 100 x cosine similarity of prompt and image embeddings (a local CLIP folder)."""

    def __init__(self, path: Path, device: torch.device | str = "cpu"):
        from transformers import AutoProcessor, CLIPModel

        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"[eval] clip_model_path = {str(path)!r}: no such folder",
                              hint="point it at a local CLIP model folder (config.json, weights, "
                                   "tokenizer and preprocessor files), or unset it")
        try:
            self.model = CLIPModel.from_pretrained(path).eval().to(device)
            self.processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[eval] clip_model_path = {str(path)!r}: cannot load a CLIP model "
                              f"({exc})", hint="save one there with save_pretrained, or unset it")
        self.device = device
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """One score per (image, prompt) pair."""
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt",
                                padding=True, truncation=True, max_length=self.max_tokens)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        text = self.model.get_text_features(input_ids=inputs["input_ids"],
                                            attention_mask=inputs.get("attention_mask"))
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        text, image = _features(text), _features(image)
        cosine = torch.nn.functional.cosine_similarity(text.float(), image.float(), dim=-1)
        return [100.0 * float(c) for c in cosine]


def _features(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor (or, in some transformers versions, a model output)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def parse_scene_caption(prompt: str) -> dict[str, str] | None:
    """{"colour", "shape", "background"} of a demo scene caption ("a red circle on a white
    background"); None for any other prompt."""
    from .demo.scenes import BACKGROUNDS, COLOURS, SHAPES

    pattern = (rf"an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) on an? "
               rf"({'|'.join(BACKGROUNDS)}) background")
    found = re.fullmatch(pattern, prompt.strip().lower())
    if not found:
        return None
    return dict(zip(("colour", "shape", "background"), found.groups()))


def concept_metrics(prompts: Sequence[str], columns: dict[str, list[Image.Image]],
                    per_prompt: int) -> dict[str, Any] | None:
    """Per column, the fraction of images whose colour/shape match their prompt (demo scenes
    only: None unless every prompt is a scene caption). Also scored on the prompts that name
    the concept the example dataset teaches (`held_out`)."""
    from .demo.concepts import score
    from .demo.scenes import HELD_OUT

    parsed = [parse_scene_caption(p) for p in prompts]
    if not prompts or any(p is None for p in parsed):
        return None
    expected = [parsed[i // per_prompt] for i in range(len(prompts) * per_prompt)]
    kind, value = HELD_OUT
    held = [i for i, want in enumerate(expected) if want.get(kind) == value]
    result: dict[str, Any] = {"held_out_concept": f"{kind} {value}", "columns": {}}
    for label, images in columns.items():
        entry = score(images, expected)
        if held:
            entry["held_out"] = score([images[i] for i in held], [expected[i] for i in held])
        result["columns"][label] = entry
    return result


# --- ditctl eval --------------------------------------------------------------------------------

@dataclass
class Evaluated:
    """One evaluated model: the base (step 0) or a checkpoint."""

    label: str
    step: int
    checkpoint: Path | None
    loss: dict[str, Any] | None = None
    images: list[Image.Image] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "step": self.step,
                               "checkpoint": str(self.checkpoint) if self.checkpoint else None}
        if self.loss is not None:
            out["val_loss"] = self.loss["overall"]
            out["val_loss_by_t"] = {f"{q:g}": v for q, v in self.loss["per_quantile"].items()}
        return out


def checkpoint_step(checkpoint: Path) -> int:
    from .engine.loading import read_checkpoint_meta

    meta = read_checkpoint_meta(checkpoint)
    if "step" in meta:
        return int(meta["step"])
    return int(Path(checkpoint).name.split("-", 1)[1])


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
    write: runs/<run>/eval, or <workspace>/eval/base for the base model alone."""
    from .engine.loading import read_checkpoint_meta, resolve_checkpoint, resolve_run
    from .models.registry import load_family

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
        return EvalPlan(family, None, [], Path(out_dir or ws.root / "eval" / "base"))
    if checkpoint:
        path = locate_checkpoint(ws, config, run, checkpoint)
        read_checkpoint_meta(path)
        run_dir = run_of_checkpoint(path)
        checkpoints = [path]
    else:
        run_dir = resolve_run(ws, config, run)
        checkpoints = list_checkpoints(run_dir) if all_checkpoints else \
            [resolve_checkpoint(ws, config, run=str(run_dir))]
        if not checkpoints:
            raise CheckpointError(f"run {run_dir.name} has no complete checkpoint yet",
                                  hint="let training reach checkpoint_every steps, or evaluate "
                                       "the base model with --base")
    default = (run_dir / "eval") if run_dir is not None else ws.root / "eval" / path.name
    return EvalPlan(family, run_dir, checkpoints, Path(out_dir or default))


def run_eval(ws: Workspace, config: Config, plan: EvalPlan,
             device: torch.device | None = None) -> dict[str, Any]:
    """Evaluate the base model and the plan's checkpoints; write metrics.json, report.html,
    comparison.png, curve.png/curve.json and tensorboard scalars. Returns the metrics."""
    from .engine.loading import load_denoiser

    device = device or inference_device()
    dtype = inference_dtype(device)
    family = plan.family
    settings = config.sample
    width, height = sample_size(config, family)
    validation = validation_set(ws, config)
    prompts, prompts_note = _comparison_prompts(ws, config)

    # Inputs once, for every model: from the precompute cache where it has them (then the text
    # encoder is never loaded), else encoded here; the text encoder is freed before any DiT.
    from .data.batches import OnTheFlySource

    vae = family.load_vae(torch.float32, device)
    texts = prompts + ([settings.negative_prompt] if settings.negative_prompt else [])
    source, text_source = cached_inputs(ws, config, family, validation.rows, texts)
    source_how = "read from the precompute cache" if source is not None else "encoded on the fly"
    text_encoder = None
    if source is None or (prompts and text_source is None):
        text_encoder = family.load_text_encoder(dtype, text_encoder_device(settings, device))
    inputs = MaterializedSource(source or OnTheFlySource(family, vae, text_encoder, config.data),
                                validation.rows)
    embeddings = None
    if prompts and text_source is not None:
        embeddings = cached_embeddings(text_source, prompts, settings.negative_prompt)
    elif prompts:
        embeddings = encode_prompts(family, text_encoder, prompts, settings.negative_prompt)
    del source, text_source, text_encoder
    free_accelerator_memory()

    models = [Evaluated("base", 0, None)] + [
        Evaluated(c.name, checkpoint_step(c), c) for c in plan.checkpoints]
    for model in models:
        console.info(f"evaluating {model.label}")
        denoiser = load_denoiser(family, model.checkpoint, lora_scale=settings.lora_scale,
                                 dtype=dtype, device=device)
        model.loss = validation_loss(family, denoiser, validation.rows, inputs,
                                     config.eval.timestep_quantiles, VALIDATION_SEED,
                                     config.train.eval_batch_size,
                                     resolution_shift=config.train.resolution_shift)
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
                       "resolution_shift": config.train.resolution_shift},
        "models": [m.summary() for m in models],
        "curve": [{"step": m.step, "label": m.label, "val_loss": m.loss["overall"]} for m in models],
        "sample_settings": settings_dict(settings, width=width, height=height,
                                         shift=resolve_shift(family, settings, width, height)),
        "comparison": {"prompts": prompts, "seeds": seeds, "columns": [m.label for m in models],
                       "grid": COMPARISON_FILE if prompts else None, "note": prompts_note},
    }
    columns = {m.label: m.images for m in models} if prompts else {}
    metrics["clip"] = _clip_metrics(config, columns, prompts, per_prompt, device)
    concept = concept_metrics(prompts, columns, per_prompt) if prompts else None
    if concept is not None:
        metrics["concept"] = concept
    _write_outputs(plan, config, metrics, columns, prompts, seeds, per_prompt)
    return metrics


def _comparison_prompts(ws: Workspace, config: Config) -> tuple[list[str], str | None]:
    path = default_prompts_file(ws, config)
    try:
        return read_prompts(path), None
    except DitctlError as exc:
        console.warn(f"no before/after images: {exc}")
        return [], str(exc)


def _clip_metrics(config: Config, columns: dict[str, list[Image.Image]], prompts: list[str],
                  per_prompt: int, device: torch.device) -> dict[str, Any]:
    if not config.eval.clip_model_path:
        return {"status": "skipped", "reason": "[eval] clip_model_path is not set",
                "hint": "set [eval] clip_model_path (or --clip-model-path) to a local CLIP "
                        "model folder, e.g. a downloaded openai/clip-vit-large-patch14"}
    if not columns:
        return {"status": "skipped", "reason": "no comparison images"}
    scorer = ClipScorer(Path(config.eval.clip_model_path), device)
    expanded = [prompts[i // per_prompt] for i in range(len(prompts) * per_prompt)]
    scores = {label: scorer.scores(images, expanded) for label, images in columns.items()}
    return {"status": "computed", "model": config.eval.clip_model_path,
            "columns": {label: sum(s) / len(s) for label, s in scores.items()},
            "per_image": scores}


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


def _write_outputs(plan: EvalPlan, config: Config, metrics: dict[str, Any],
                   columns: dict[str, list[Image.Image]], prompts: list[str], seeds: list[int],
                   per_prompt: int) -> None:
    from .report import render_report

    out = plan.out_dir
    images: dict[str, Image.Image] = {"curve": curve_chart(metrics),
                                      "loss_by_t": loss_by_t_chart(metrics)}
    if prompts:
        images["comparison"] = comparison_grid(prompts, seeds, per_prompt, columns)
        atomic_write_bytes(out / COMPARISON_FILE, png_bytes(images["comparison"]))
    atomic_write_bytes(out / CURVE_FILE, png_bytes(images["curve"]))
    atomic_write_json(out / CURVE_JSON, metrics["curve"])
    config_text = _run_config_text(plan, config)
    atomic_write_json(out / METRICS_FILE, metrics)
    atomic_write_text(out / REPORT_FILE, render_report(metrics, images, config_text))
    if plan.run_dir is not None and config.train.report_to != "none":
        log_scalars(plan.run_dir / "logs", metrics)


def _run_config_text(plan: EvalPlan, config: Config) -> str:
    import tomli_w

    if plan.run_dir is not None and (plan.run_dir / "config.toml").is_file():
        return (plan.run_dir / "config.toml").read_text()
    return tomli_w.dumps(config.to_dict())


def log_scalars(log_dir: Path, metrics: dict[str, Any]) -> None:
    """The evaluation numbers as tensorboard scalars at each model's step."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        clip = metrics.get("clip", {}).get("columns", {})
        concept = metrics.get("concept", {}).get("columns", {})
        for model in metrics["models"]:
            step, label = model["step"], model["label"]
            writer.add_scalar("eval/val_loss", model["val_loss"], step)
            for q, value in model["val_loss_by_t"].items():  # tags as training logs them
                writer.add_scalar(f"eval/val_loss_t{float(q):.2f}", value, step)
            if label in clip:
                writer.add_scalar("eval/clip_score", clip[label], step)
            if label in concept:
                writer.add_scalar("eval/concept_both", concept[label]["both"], step)
    finally:
        writer.close()


# --- ditctl eval --compare ----------------------------------------------------------------------

def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "eval" / METRICS_FILE
    if not path.is_file():
        raise DitctlError(f"run {run_dir.name} has not been evaluated ({path} is missing)",
                          hint=f"run `ditctl eval --run {run_dir.name}` first")
    return json.loads(path.read_text())


def comparison_table(metrics: dict[str, dict[str, Any]]) -> list[list[str]]:
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
    for key, name in (("clip", "CLIP score"), ("concept", "concept match (colour+shape)")):
        values = []
        for run_metrics, model in zip(metrics.values(), latest.values()):
            column = (run_metrics.get(key) or {}).get("columns", {}).get(model["label"])
            value = column.get("both") if isinstance(column, dict) else column
            values.append("-" if value is None else f"{value:.3f}")
        if any(v != "-" for v in values):
            rows.append([name] + values)
    rows.append(["validation data"] + [m["validation"]["description"] for m in metrics.values()])
    return rows


def compare_runs(ws: Workspace, config: Config, run_a: str, run_b: str,
                 out: Path | None = None) -> tuple[list[list[str]], Path]:
    """Two evaluated runs side by side: (table rows, path of the HTML page)."""
    from .engine.loading import resolve_run
    from .report import render_comparison

    runs = [resolve_run(ws, config, name) for name in (run_a, run_b)]
    if runs[0].resolve() == runs[1].resolve():
        raise DitctlError(f"--compare got the same run twice ({runs[0].name})",
                          hint="name two different runs")
    metrics = {run.name: read_metrics(run) for run in runs}
    table = comparison_table(metrics)
    images = {}
    for run in runs:
        for name in (COMPARISON_FILE, CURVE_FILE):
            path = run / "eval" / name
            if path.is_file():
                images[f"{run.name}/{name}"] = path.read_bytes()
    path = Path(out or ws.root / "eval" / f"compare-{runs[0].name}-vs-{runs[1].name}.html")
    atomic_write_text(path, render_comparison(metrics, table, images))
    return table, path


def metrics_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Rows [model, step, loss, clip, concept] for printing."""
    clip = (metrics.get("clip") or {}).get("columns", {})
    concept = (metrics.get("concept") or {}).get("columns", {})
    rows = []
    for model in metrics["models"]:
        label = model["label"]
        rows.append([label, str(model["step"]), f"{model['val_loss']:.5f}",
                     f"{clip[label]:.2f}" if label in clip else "-",
                     f"{concept[label]['both']:.2f}" if label in concept else "-"])
    return rows

