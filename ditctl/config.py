"""The workspace configuration: one frozen dataclass per `project.toml` section.

Every key of the fine-tuning guide lives here once, with its default, its help text, its type
and its allowed range. Everything else is derived from these definitions: the commented
`templates/project.toml`, the command-line flags (`ditctl/cli/_options.py`), validation and
`ditctl status --config`.

Precedence: command-line flag > project.toml > default. Loading is strict: unknown keys (with
the closest valid key suggested), wrong types and out-of-range values are all collected and
reported together in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError
from .models.registry import DEFAULT_FAMILY, FAMILIES, family_names

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport (a dependency there)
    import tomli as tomllib

PRECISIONS = ("no", "fp16", "bf16")
# Seeds go to numpy's generator too (accelerate's set_seed), which takes 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1


def opt(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
    check: Callable[[Any], str | None] | None = None,
    aliases: tuple[str, ...] = (),
    flag: bool = True,
) -> Any:
    """A config key: its default plus what the loader, the template and the CLI need to know.

    `check` returns an error text for a bad value (or None). `aliases` are extra flag spellings
    (the guide's names for the same thing). `flag=False` keeps a key out of the command line.
    """
    meta = dict(help=help, choices=choices, min=min, max=max, min_exclusive=min_exclusive,
                max_exclusive=max_exclusive, check=check, aliases=aliases, flag=flag)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _size_problem(value: int | None, family: str) -> str | None:
    """Image sides must be multiples of the family's size multiple (VAE factor x patch)."""
    entry = FAMILIES.get(family)
    if value is None or entry is None or not value % entry.size_multiple:
        return None
    m = entry.size_multiple
    return (f"must be a multiple of {m} ({entry.size_reason}); "
            f"try {max(m, round(value / m) * m)}")


def parse_patterns(entries: tuple[str, ...], kind: type) -> dict[str, Any]:
    """ "regex=value" entries -> {regex: value}; raises ValueError naming the bad entry."""
    import re

    out: dict[str, Any] = {}
    for entry in entries:
        pattern, sep, value = entry.rpartition("=")
        pattern = pattern.strip()
        if not sep or not pattern:
            raise ValueError(f"{entry!r} is not \"regex=value\"")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        try:
            number = kind(value.strip())
        except ValueError:
            raise ValueError(f"{entry!r}: {value.strip()!r} is not "
                             f"{'an integer' if kind is int else 'a number'}") from None
        if not number > 0:
            raise ValueError(f"{entry!r}: the value must be > 0")
        out[pattern] = number
    return out


def _pattern_problem(entries: tuple[str, ...], kind: type) -> str | None:
    try:
        parse_patterns(entries, kind)
    except ValueError as exc:
        return str(exc)
    return None


def _fractions(values: tuple[float, ...]) -> str | None:
    if not values:
        return "needs at least one value"
    if any(not 0.0 < v < 1.0 for v in values):
        return "every value must lie strictly between 0 and 1"
    return None


@dataclass(frozen=True)
class ModelConfig:
    """[model]: which base model to fine-tune."""

    pretrained_model_path: str | None = opt(
        None, "Folder of the base model (a pipeline folder with model_index.json, in the "
        "layout of its family). Relative paths are relative to the workspace.")
    family: str = opt(DEFAULT_FAMILY, "Model family of the base model.", choices=family_names())


def _template_problem(template: str | None) -> str | None:
    if template is not None and "{caption}" not in template:
        return "must contain {caption} (where the caption goes), e.g. \"a photo of {caption}\""
    return None


ROLES = ("train", "regularization")


@dataclass(frozen=True)
class DatasetConfig:
    """[[data.datasets]]: one more dataset of the run. Unset keys take the [data] value."""

    path: str = opt("", "The dataset: a CSV file (image path + caption columns) or a folder of "
                    "images (required).", check=lambda v: None if v else "must be set")
    name: str | None = opt(None, "Name in reports (default: the file or folder name).")
    base_image_dir: str | None = opt(None, "Folder the CSV's image paths are relative to.")
    image_column: str | None = opt(None, "CSV column holding the image paths.")
    caption_column: str | None = opt(None, "CSV column holding the captions.")
    role: str = opt("train", "train, or regularization (prior-preservation images, as in "
                    "DreamBooth: their loss counts loss_weight times).", choices=ROLES)
    loss_weight: float = opt(1.0, "Factor on this dataset's per-image loss.", min=0.0)
    repeats: int = opt(1, "Times each image of this dataset appears per epoch.", min=1)
    weight: float | None = opt(
        None, "Relative sampling weight: with weights, an epoch keeps its length and each "
        "dataset fills weight / (sum of weights) of it (unset: 1).", min=0.0,
        min_exclusive=True)
    caption_dropout: float | None = opt(None, "Caption dropout of this dataset (default: "
                                        "[train] caption_dropout).", min=0.0, max=1.0)
    resolution: int | None = opt(None, "Training resolution of this dataset.", min=16)
    center_crop: bool | None = opt(None, "Centre crop (else a random crop).")
    random_flip: bool | None = opt(None, "Random horizontal flips.")
    use_resolution_buckets: bool | None = opt(None, "Aspect-ratio buckets.")
    max_upscale: float | None = opt(None, "Largest enlargement factor.", min=1.0)
    trigger_word: str | None = opt(None, "Word put in front of every caption.")
    caption_template: str | None = opt(None, "Template around every caption ({caption}).",
                                       check=lambda v: _template_problem(v))
    shuffle_tags: bool | None = opt(None, "Shuffle comma-separated tags at each step.")
    keep_tokens: int | None = opt(None, "Leading tags kept in place when shuffling.", min=0)


# keys of a dataset table that a [data] key of the same name gives a default to
DATASET_INHERITED = ("base_image_dir", "image_column", "caption_column", "resolution",
                     "center_crop", "random_flip", "use_resolution_buckets", "max_upscale",
                     "trigger_word", "caption_template", "shuffle_tags", "keep_tokens")


@dataclass(frozen=True)
class DataConfig:
    """[data]: where the images and captions are and how they become training tensors."""

    train_data_path: str | None = opt(
        None, "Training data: a CSV, JSONL or Parquet file (image path + caption columns), a "
        "folder of images, WebDataset tar shards (a folder, glob or {000..099} list), or a "
        "Hugging Face datasets folder (save_to_disk).",
        aliases=("--data-path", "--data_path"))
    val_data_path: str | None = opt(None, "Validation data: any source train_data_path takes.")
    base_image_dir: str | None = opt(
        None, "Folder that the image paths of a CSV, JSONL or Parquet file are relative to "
        "(default: that file's folder).")
    image_column: str = opt(
        "image_path", "CSV/JSONL/Parquet column holding the image paths (`shards/000.tar#k.jpg` "
        "names an image inside a tar shard); a datasets folder's Image column (found by itself "
        "when there is one).")
    caption_column: str = opt(
        "caption", "CSV/JSONL/Parquet/datasets column holding the captions (also the field of a "
        "WebDataset .json member).")
    resolution: int | None = opt(
        None, "Training resolution in pixels (side of a square of the same area). "
        "Unset: native sizes, rounded down to the family's size multiple.", min=16)
    center_crop: bool = opt(False, "Crop to the target size around the centre (else a random crop).")
    random_flip: bool = opt(False, "Flip images horizontally at random (both versions are cached).")
    use_resolution_buckets: bool = opt(
        False, "Group images into aspect-ratio buckets instead of cropping everything square.")
    max_upscale: float = opt(
        2.0, "Largest factor an image may be enlarged by to reach its target size; "
        "smaller images are reported as too small.", min=1.0)
    max_native_pixels: int = opt(
        1024 * 1024, "Largest area (pixels) of a native-size target when resolution is unset.",
        min=256)
    max_image_pixels: int = opt(
        100_000_000, "Images with more pixels than this are refused (decompression-bomb guard).",
        min=1)
    keep_empty_captions: bool = opt(
        False, "Keep images with an empty caption as unconditional samples (else skip them).")
    use_masks: bool = opt(
        False, "Weight the training loss by a per-image mask (white: learn, black: ignore): "
        "the CSV's mask_column, else a NAME.mask.png next to the image, else the image's alpha "
        "channel; images without one train everywhere.")
    mask_column: str = opt("mask_path", "CSV column holding the mask paths (use_masks; "
                                        "optional column, empty cells: no mask file).")
    trigger_word: str | None = opt(
        None, "Word (or words) put in front of every caption, as its first tag, e.g. \"ohwx "
        "dog\".")
    caption_template: str | None = opt(
        None, "Template around every caption; {caption} stands for it, e.g. \"a photo of "
        "{caption}\".", check=lambda v: _template_problem(v))
    shuffle_tags: bool = opt(
        False, "Shuffle the comma-separated tags of every caption at each step (tag-style "
        "captions); the first keep_tokens tags and the trigger word stay in front. Shuffled "
        "captions are encoded during training (the text encoder stays loaded).")
    keep_tokens: int = opt(0, "With shuffle_tags: how many leading tags stay in place.", min=0)
    num_workers: int = opt(
        2, "Training data-loading worker processes: they read cache entries, or decode and "
        "transform images on the fly, ahead of the step (0: read in the training process; the "
        "result is the same bits either way).", min=0)
    datasets: tuple["DatasetConfig", ...] = opt(
        (), "More datasets in one run: [[data.datasets]] tables (see the example below).",
        flag=False)


@dataclass(frozen=True)
class PrecomputeConfig:
    """[precompute]: the cache of VAE latents and text embeddings."""

    output_dir: str = opt("cache", "Cache folder (relative to the workspace).")
    mixed_precision: str = opt(
        "no", "Precision of the encoders and of the stored tensors.", choices=PRECISIONS)
    batch_size: int = opt(8, "Images per VAE batch (one bucket at a time).", min=1)
    num_workers: int = opt(2, "Worker processes decoding images and checking --verify (0: none).",
                           min=0)


@dataclass(frozen=True)
class TrainConfig:
    """[train]: the training run."""

    output_dir: str = opt("runs", "Folder that holds the runs (relative to the workspace).")
    run_name: str | None = opt(None, "Name of the run folder (default: run-<date>-<time>).")
    train_batch_size: int = opt(1, "Images per step on each process.", min=1)
    eval_batch_size: int = opt(1, "Images per batch during evaluation.", min=1)
    num_epochs: int = opt(1, "Passes over the training data.", min=1)
    max_steps: int | None = opt(
        None, "Optimiser steps to train for; overrides num_epochs (and may go beyond it).", min=1)
    gradient_accumulation_steps: int = opt(1, "Batches accumulated per optimiser step.", min=1)
    learning_rate: float = opt(1e-4, "Peak learning rate.", min=0.0, min_exclusive=True)
    weight_decay: float = opt(0.01, "AdamW weight decay.", min=0.0)
    lr_scheduler: str = opt("linear", "Learning-rate schedule after warm-up.",
                            choices=("linear", "cosine", "constant"))
    num_warmup_steps: int = opt(0, "Steps of linear warm-up from 0 to learning_rate.", min=0)
    use_8bit_adam: bool = opt(False, "Use bitsandbytes' 8-bit AdamW (smaller optimiser state).")
    # beta = 1 never updates the moment and divides by 1 - beta^t = 0 in the bias correction
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0.0, max=1.0, max_exclusive=True)
    adam_beta2: float = opt(0.95, "AdamW beta2 (the F-Lite guide uses 0.95).", min=0.0, max=1.0,
                            max_exclusive=True)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", min=0.0, min_exclusive=True)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0: no clipping).", min=0.0)
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass "
                                              "to save memory.")
    attention_backend: str = opt(
        "sdpa", "Attention kernel for train, sample and eval: sdpa (torch), math (reference), "
        "flash / flash3 / sage / xformers (CUDA, package needed), flex (CUDA).",
        choices=("sdpa", "math", "flash", "flash3", "sage", "xformers", "flex"))
    compile: bool = opt(False, "Compile each repeated transformer block once with torch.compile "
                        "(regional compilation); the first step includes the compile time.")
    mixed_precision: str = opt("no", "Autocast precision; trained weights stay fp32.",
                               choices=PRECISIONS)
    seed: int | None = opt(None, "Random seed (unset: drawn once and recorded in the run).", min=0,
                           max=MAX_SEED)
    batch_multiplicity: int = opt(
        1, "Repeat each sample this many times per batch, each with its own noise and timestep.",
        min=1)
    caption_dropout: float = opt(
        0.01, "Fraction of captions replaced by the model's unconditional input (an all-zero "
        "embedding, or an empty prompt's encoding where the model's pipeline uses that).",
        min=0.0, max=1.0)
    timestep_sampling: str = opt(
        "logit_normal", "How training timesteps are drawn: logit_normal (sigmoid of a normal "
        "draw, with a uniform fraction), uniform, mode (the SD3 paper's mode sampling, "
        "mode_scale) or cosmap (the SD3 paper's CosMap).",
        choices=("logit_normal", "uniform", "mode", "cosmap"))
    uniform_timestep_fraction: float = opt(
        0.1, "timestep_sampling = logit_normal: fraction of samples whose timestep is drawn "
        "uniformly (unshifted) instead.", min=0.0, max=1.0)
    logit_normal_mean: float = opt(0.0, "Mean of the logit-normal timestep density.")
    logit_normal_std: float = opt(1.0, "Std of the logit-normal timestep density.", min=0.0,
                                  min_exclusive=True)
    mode_scale: float = opt(
        1.29, "timestep_sampling = mode: the scale s (0: uniform; > 0 favours middle "
        "timesteps, < 0 the ends; at most 2/(pi-2) keeps the mapping monotone).",
        min=-1.0, max=2 / (math.pi - 2))
    resolution_shift: bool = opt(
        True, "Shift timesteps towards noise for larger images, by the model family's rule.")
    timestep_shift: float | None = opt(
        None, "A fixed time shift alpha (t' = alpha*t / (1 + (alpha-1)*t); 1: none) for "
        "training and validation timesteps, used instead of the family's resolution rule. "
        "Unset: resolution_shift decides.", min=0.0, min_exclusive=True)
    masked_loss_floor: float = opt(
        0.0, "[data] use_masks: the loss weight of masked-out (black) areas, so they still "
        "train a little (0: not at all).", min=0.0, max=1.0, max_exclusive=True)
    loss_weighting: str = opt(
        "none", "Per-sample loss weight by timestep t: none, sigma_sqrt (1/t^2, large near "
        "t = 0) or cosmap (2 / (pi*(1 - 2t + 2t^2))), as diffusers' SD3 training.",
        choices=("none", "sigma_sqrt", "cosmap"))
    embedded_guidance: float | None = opt(
        None, "Guidance-distilled models only (the denoiser reads the guidance scale as an "
        "input): the scale fed in training. Unset: the model family's default.", min=0.0)
    use_precomputed_data: bool = opt(
        True, "Train from the precompute cache (no VAE or text encoder loaded) when it is "
        "complete, or fill it first when the run sees its images more than once; off: "
        "encode every step on the fly.", aliases=(" /--no-precomputed-data",))
    precomputed_data_dir: str | None = opt(
        None, "Cache folder to train from (default: [precompute] output_dir).")
    checkpoint_every: int = opt(500, "Save a checkpoint every N optimiser steps.", min=1,
                                aliases=("--checkpointing-steps", "--checkpointing_steps"))
    checkpoints_total_limit: int | None = opt(
        None, "Keep at most this many checkpoints (oldest pruned after a new one is complete).",
        min=1)
    sample_every: int = opt(500, "Generate sample images every N steps (0: never).", min=0)
    eval_every: int = opt(500, "Compute validation loss every N steps (0: never).", min=0)
    sample_prompts_file: str | None = opt(
        None, "Prompts for samples during training, one per line (default: prompts.txt).")
    report_to: str = opt("tensorboard", "Where to log.",
                         choices=("tensorboard", "wandb", "all", "none"))
    project_name: str = opt("dit-finetune", "Project name for wandb.")
    log_every: int = opt(
        10, "Read the step losses back from the accelerator and write the logs every N steps "
        "(each step still gets its own record): the steps between never wait for the "
        "accelerator to finish.", min=1)
    max_nonfinite_steps: int = opt(
        5, "Stop after this many consecutive steps with a non-finite loss.", min=1)
    num_processes: int = opt(1, "Training processes (data parallel) on this machine.", min=1)
    ema_decay: float = opt(
        0.0, "Keep an exponential moving average (EMA) of the trained weights with this decay "
        "(e.g. 0.999); 0: no EMA.", min=0.0, max=1.0, max_exclusive=True)
    ema_warmup: bool = opt(
        False, "Warm the EMA up: update n uses decay min(ema_decay, (1 + n) / (10 + n)), so "
        "early updates follow the weights closely.")
    ema_every: int = opt(1, "Update the EMA every N optimiser steps.", min=1)
    ema_on_cpu: bool = opt(False, "Keep the EMA copy in host memory instead of on the "
                                  "accelerator (slower updates, no accelerator memory).")
    text_encoder_device: str = opt(
        "cpu", "Where training without the cache runs the text encoder: cpu (it never takes "
        "accelerator memory; encoding is slower) or accelerator (next to the DiT).",
        choices=("cpu", "accelerator"))


@dataclass(frozen=True)
class LoraConfig:
    """[lora]: low-rank adapters."""

    use_lora: bool = opt(False, "Add LoRA adapters to the DiT.")
    train_only_lora: bool = opt(False, "Freeze the base model and train only the LoRA weights.")
    lora_type: str = opt(
        "lora", "Adapter kind (all through peft): lora (low-rank B @ A), dora (LoRA plus a "
        "trained per-row magnitude: weight-decomposed LoRA), lokr (Kronecker product of two "
        "small matrices, LyCORIS) or loha (Hadamard product of two low-rank pairs, LyCORIS).",
        choices=("lora", "dora", "lokr", "loha"))
    lora_rank: int = opt(64, "Rank of the LoRA matrices.", min=1)
    lora_alpha: float = opt(64, "LoRA scaling numerator (scale = alpha / rank).", min=0.0,
                            min_exclusive=True)
    lora_rank_pattern: tuple[str, ...] = opt(
        (), "Per-module ranks as \"regex=rank\" (peft rank_pattern; the regex is matched "
        "against the end of the module's path, e.g. \"ff.*=16\"); other modules get lora_rank.",
        check=lambda v: _pattern_problem(v, int))
    lora_alpha_pattern: tuple[str, ...] = opt(
        (), "Per-module alphas as \"regex=alpha\" (peft alpha_pattern), like lora_rank_pattern.",
        check=lambda v: _pattern_problem(v, float))
    lokr_factor: int = opt(
        -1, "lokr: the Kronecker factor (each weight side is split as factor x rest; -1: the "
        "most balanced split). Larger factors train more parameters.", min=-1,
        check=lambda v: "must be -1 or a positive integer" if v == 0 else None)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA path.", min=0.0, max=1.0)
    lora_target_modules: tuple[str, ...] = opt(
        (), "Module names that get adapters (comma-separated); empty: the model family's "
        "default targets.")
    lora_checkpoint: str | None = opt(
        None, "LoRA weights to start from (a checkpoint or an exported adapter folder).")
    base_precision: str = opt(
        "auto", "How the frozen base is stored when only LoRA trains: auto (the compute dtype), "
        "bf16, fp8 (float8 + per-row scales, torchao), int8 (weight-only, torchao) or nf4 "
        "(4-bit NormalFloat, bitsandbytes, as QLoRA); computed in bf16. Needs --lora.",
        choices=("auto", "bf16", "fp8", "int8", "nf4"))
    offload_base_blocks: bool = opt(
        False, "Keep the frozen base's blocks in host memory and copy each to the accelerator "
        "just before it runs (the next one prefetched): the GPU holds ~2 blocks of the base. "
        "Needs --lora and gradient_checkpointing.")


@dataclass(frozen=True)
class DistributedConfig:
    """[distributed]: how training processes share the model, and multi-node launch."""

    strategy: str = opt(
        "ddp", "ddp: every process holds the whole model (data parallel; best for LoRA). fsdp: "
        "weights, gradients and optimiser state sharded across processes (PyTorch FSDP2, "
        "each DiT block a unit): for full fine-tuning of models that do not fit one GPU.",
        choices=("ddp", "fsdp"))
    cpu_offload: bool = opt(
        False, "fsdp: keep the sharded parameters, gradients and optimiser state in host "
        "memory (the optimiser steps on the CPU); the accelerator holds one block at a time.")
    nnodes: int = opt(1, "Machines taking part (torch.distributed.run --nnodes).", min=1)
    node_rank: int = opt(0, "This machine's index among --nnodes (0 on the first).", min=0)
    master_addr: str = opt(
        "127.0.0.1", "Address of node 0, where the processes meet (multi-node: reachable from "
        "every node).")
    master_port: int | None = opt(
        None, "Port on node 0 where the processes meet (default: a free one; multi-node: "
        "set it, the same on every node).", min=1, max=65535)


@dataclass(frozen=True)
class SampleConfig:
    """[sample]: image generation (ditctl sample, and samples during training)."""

    steps: int | None = opt(None, "Sampling steps (unset: the model family's default).", min=1)
    guidance_scale: float | None = opt(
        None, "Classifier-free guidance scale; at most 1: no guidance (the conditional "
        "prediction alone, as the families' own pipelines). Guidance-distilled models read it "
        "as an input instead (no unconditional pass). Unset: the family's default.",
        min=0.0)
    negative_prompt: str | None = opt(None, "Negative prompt (unset: the empty embedding).")
    width: int | None = opt(None, "Image width (default: the training resolution, else the "
                            "family's default).", min=16)
    height: int | None = opt(None, "Image height (default: the training resolution, else the "
                             "family's default).", min=16)
    seed: int = opt(0, "Base seed; image k of prompt p always gets the same derived seed.", min=0,
                    max=MAX_SEED)
    num_images_per_prompt: int = opt(1, "Images per prompt.", min=1)
    batch_size: int = opt(1, "Images generated together.", min=1)
    apg: bool = opt(False, "Adaptive projected guidance instead of plain CFG.")
    apg_threshold: float = opt(0.03, "APG: clamp the std of the orthogonal guidance to this.",
                               min=0.0, min_exclusive=True)
    shift: float | None = opt(None, "Resolution shift alpha (default: from the image size).",
                              min=0.0, min_exclusive=True)
    lora_scale: float = opt(1.0, "Strength of the LoRA when sampling a LoRA run.")
    weights: str = opt(
        "auto", "Which trained weights of a checkpoint to use: ema (the moving average), raw "
        "(as last trained), auto (ema when the checkpoint has it, else raw; eval: both).",
        choices=("auto", "ema", "raw"))
    offload: bool = opt(False, "Free the text encoder before the DiT runs (less peak memory).")
    text_encoder_device: str = opt(
        "accelerator", "Where prompts are encoded: accelerator, or cpu (the text encoder never "
        "takes accelerator memory; encoding is slower).", choices=("accelerator", "cpu"))


@dataclass(frozen=True)
class EvalConfig:
    """[eval]: validation loss and image metrics."""

    timestep_quantiles: tuple[float, ...] = opt(
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        "Fixed timesteps at which validation loss is measured.", check=_fractions)
    holdout_fraction: float = opt(
        0.1, "Without a validation set: fraction of training data held out for evaluation.",
        min=0.0, max=0.5)
    clip_model_path: str | None = opt(
        None, "Local CLIP model folder for the CLIP score (unset: CLIP score skipped).")


@dataclass(frozen=True)
class ExportConfig:
    """[export]: writing models other tools load."""

    dtype: str = opt("bf16", "Precision of the exported DiT weights.",
                     choices=("fp32", "fp16", "bf16"))
    merge_lora: bool = opt(False, "Merge the LoRA into the base DiT and write a full pipeline.")
    format: str = opt("peft", "LoRA-only export format.", choices=("peft", "comfy"))
    copy_encoders: bool = opt(
        True, "Copy (hard-link where possible) vae/text_encoder/tokenizer into the export; "
        "off: reference the base model's folders instead.")
    verify: bool = opt(True, "Reload the export and check it predicts what the run predicts.")
    max_shard_size: str = opt("5GB", "Largest safetensors shard of an exported DiT.")
    weights: str = opt(
        "auto", "Which trained weights to export: ema (the moving average), raw (as last "
        "trained), auto (ema when the checkpoint has it, else raw).",
        choices=("auto", "ema", "raw"))


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a workspace."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain dict (tuples as lists), keys with value None left out, as TOML would hold it."""
        out: dict[str, dict[str, Any]] = {}
        for name, section in SECTIONS.items():
            values = {}
            for f in dataclasses.fields(section):
                value = getattr(getattr(self, name), f.name)
                if f.name == "datasets":  # [[data.datasets]] tables; none: no key at all
                    if value:
                        values[f.name] = [_table(table) for table in value]
                elif value is not None:
                    values[f.name] = list(value) if isinstance(value, tuple) else value
            out[name] = values
        return out

    def hash(self, sections: tuple[str, ...] | None = None) -> str:
        """Stable fingerprint of (some sections of) the config, for runs and checkpoints."""
        data = self.to_dict()
        if sections is not None:
            data = {k: data[k] for k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, section: str, **changes: Any) -> "Config":
        """A copy with some keys of one section changed (values are validated)."""
        overrides = {f"{section}.{k}": v for k, v in changes.items()}
        return build_config(self.to_dict(), overrides, source="(internal)")


def _table(obj: Any) -> dict[str, Any]:
    """A frozen config dataclass as a TOML table: unset (None) keys left out, tuples as lists."""
    return {f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(obj) if (v := getattr(obj, f.name)) is not None}


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def key_spec(section: str, key: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}[key]


# --- type checking and coercion ---------------------------------------------------------------

def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of a field annotation string/object."""
    hint = annotation
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    return hint, optional


_HINTS: dict[type, dict[str, Any]] = {}


def field_type(section: str | type, key: str) -> tuple[Any, bool]:
    """The type of a key of a section (by name) or of a config dataclass."""
    cls = SECTIONS[section] if isinstance(section, str) else section
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _base_type(_HINTS[cls][key])


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def coerce(section: str | type, key: str, value: Any) -> Any:
    """Convert a TOML/CLI value to the field's type; raises ValueError with the expected type."""
    hint, optional = field_type(section, key)
    if value is None:
        if optional:
            return None
        raise ValueError(f"expected {_type_name(hint)}, got nothing")
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected {_type_name(hint)}")
        return tuple(_coerce_scalar(item, v) for v in value)
    return _coerce_scalar(hint, value)


def _coerce_scalar(hint: Any, value: Any) -> Any:
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ValueError(f"expected {_type_name(hint)}, got {type(value).__name__}")
    if hint is float:
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):  # nan would pass every range comparison
            raise ValueError("expected a finite number")
    return value


def _number(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _range_error(spec: dataclasses.Field, value: Any) -> str | None:
    meta = spec.metadata
    if value is None:
        return None
    if meta["choices"] is not None and value not in meta["choices"]:
        return "must be one of " + ", ".join(repr(c) for c in meta["choices"])
    low, high = meta["min"], meta["max"]
    if low is not None and (value < low or (meta["min_exclusive"] and value == low)):
        return f"must be {'>' if meta['min_exclusive'] else '>='} {_number(low)}"
    if high is not None and (value > high or (meta["max_exclusive"] and value == high)):
        return f"must be {'<' if meta['max_exclusive'] else '<='} {_number(high)}"
    if meta["check"] is not None:
        return meta["check"](value)
    return None


# --- loading ----------------------------------------------------------------------------------

def _suggest(name: str, valid: list[str], noun: str = "keys") -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; valid {noun}: {', '.join(valid)}"


def build_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None,
                 source: str = "project.toml") -> Config:
    """Validate a parsed project.toml plus flag overrides ("section.key" -> value) into a Config.

    Every problem is collected; one ConfigError lists them all.
    """
    errors: list[str] = []
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}

    for section, table in raw.items():
        if section not in SECTIONS:
            errors.append(f"{source}: unknown section [{section}]{_suggest(section, list(SECTIONS), 'sections')}")
            continue
        if not isinstance(table, dict):
            errors.append(f"{source}: [{section}] must be a table")
            continue
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        for key, value in table.items():
            where = f"{source} [{section}] {key}"
            if key not in valid:
                errors.append(f"{source} [{section}]: unknown key '{key}'{_suggest(key, valid)}")
                continue
            _set(values, section, key, value, where, errors)

    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        _set(values, section, key, value, f"--{key.replace('_', '-')}", errors)

    _cross_checks(values, errors)
    _dataset_checks(values, errors, source)
    if errors:
        noun = "problem" if len(errors) == 1 else "problems"
        raise ConfigError(f"{len(errors)} configuration {noun}:\n  " + "\n  ".join(errors),
                          hint="fix the keys above (ditctl status --config shows the resolved "
                               "configuration)")
    return Config(**{name: SECTIONS[name](**vals) for name, vals in values.items()})


def _set(values: dict, section: str, key: str, value: Any, where: str, errors: list[str]) -> None:
    if (section, key) == ("data", "datasets"):
        tables = _dataset_tables(value, where.rsplit(" [data]", 1)[0], errors)
        if tables is not None:
            values[section][key] = tables
        return
    try:
        value = coerce(section, key, value)
    except ValueError as exc:
        errors.append(f"{where} = {value!r}: {exc}")
        return
    problem = _range_error(key_spec(section, key), value)
    if problem:
        errors.append(f"{where} = {value!r}: {problem}")
        return
    values[section][key] = value


def _dataset_tables(value: Any, source: str, errors: list[str],
                    ) -> tuple[DatasetConfig, ...] | None:
    """[[data.datasets]] tables -> DatasetConfigs; each problem names the table and its key."""
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(t, (dict, DatasetConfig)) for t in value):
        errors.append(f"{source} [data] datasets: must be [[data.datasets]] tables")
        return None
    valid = [f.name for f in dataclasses.fields(DatasetConfig)]
    specs = {f.name: f for f in dataclasses.fields(DatasetConfig)}
    tables, ok = [], True
    for number, table in enumerate(value, 1):
        if isinstance(table, DatasetConfig):
            table = _table(table)
        label = f"{source} [[data.datasets]] #{number}"
        keys: dict[str, Any] = {}
        for key, item in table.items():
            if key not in valid:
                errors.append(f"{label}: unknown key '{key}'{_suggest(key, valid)}")
                ok = False
                continue
            try:
                item = coerce(DatasetConfig, key, item)
                problem = _range_error(specs[key], item)
            except ValueError as exc:
                problem = str(exc)
            if problem:
                errors.append(f"{label} {key} = {table[key]!r}: {problem}")
                ok = False
                continue
            keys[key] = item
        if "path" not in table:
            errors.append(f"{label}: path is not set (a CSV file or a folder of images)")
            ok = False
        if ok:
            tables.append(DatasetConfig(**keys))
    return tuple(tables) if ok else None


def _dataset_checks(values: dict[str, dict[str, Any]], errors: list[str], source: str) -> None:
    """What a dataset table may only hold together with the rest of the configuration."""
    family = values["model"].get("family", DEFAULT_FAMILY)
    # [data] train_data_path is the dataset named "train" (data/datasets.py)
    names: dict[str, str] = ({"train": "[data] train_data_path's"}
                             if values["data"].get("train_data_path") else {})
    for number, table in enumerate(values["data"].get("datasets", ()), 1):
        label = f"{source} [[data.datasets]] #{number}"
        problem = _size_problem(table.resolution, family)
        if problem:
            errors.append(f"{label} resolution = {table.resolution}: {problem}")
        name = table.name or Path(table.path).stem or table.path
        if name in names:
            errors.append(f"{label} name = {name!r}: already the name of {names[name]} "
                          "dataset; give each dataset its own name (name = \"...\")")
        names.setdefault(name, f"#{number}")


def _cross_checks(values: dict[str, dict[str, Any]], errors: list[str]) -> None:
    family = values["model"].get("family", DEFAULT_FAMILY)
    for section, key in (("data", "resolution"), ("sample", "width"), ("sample", "height")):
        problem = _size_problem(values[section].get(key), family)
        if problem:
            errors.append(f"[{section}] {key} = {values[section][key]}: {problem}")
    lora = {**_defaults("lora"), **values["lora"]}
    if lora["train_only_lora"] and not lora["use_lora"]:
        errors.append("[lora] train_only_lora = true needs use_lora = true "
                      "(or use `ditctl train --lora`, which sets both)")
    _lora_type_checks(lora, errors)
    distributed = {**_defaults("distributed"), **values["distributed"]}
    if distributed["node_rank"] >= distributed["nnodes"]:
        errors.append(f"[distributed] node_rank = {distributed['node_rank']} must be below "
                      f"nnodes = {distributed['nnodes']} (nodes count from 0)")
    if distributed["nnodes"] > 1 and distributed["master_port"] is None:
        errors.append("[distributed] nnodes > 1 needs master_port (the same on every node)")
    if distributed["cpu_offload"] and distributed["strategy"] != "fsdp":
        errors.append("[distributed] cpu_offload offloads FSDP shards: it needs strategy = 'fsdp'")
    train = {**_defaults("train"), **values["train"]}
    if train["ema_decay"] > 0 and distributed["strategy"] == "fsdp":
        errors.append("[train] ema_decay needs [distributed] strategy = 'ddp' (an FSDP run's EMA "
                      "is not kept); set ema_decay = 0 or use strategy = 'ddp'")
    data = {**_defaults("data"), **values["data"]}
    if train["masked_loss_floor"] > 0 and not data["use_masks"]:
        errors.append("[train] masked_loss_floor needs [data] use_masks = true (there is no "
                      "mask to weight without it)")
    # density parameters read only by one timestep_sampling: another value would be ignored
    defaults = _defaults("train")
    for key, sampling in (("uniform_timestep_fraction", "logit_normal"),
                          ("logit_normal_mean", "logit_normal"),
                          ("logit_normal_std", "logit_normal"), ("mode_scale", "mode")):
        if train[key] != defaults[key] and train["timestep_sampling"] != sampling:
            errors.append(f"[train] {key} = {train[key]!r} is read only with timestep_sampling = "
                          f"'{sampling}' (it is {train['timestep_sampling']!r}); set "
                          f"timestep_sampling = '{sampling}' or leave {key} at its default")
    if train["ema_decay"] == 0 and (train["ema_warmup"] or train["ema_every"] != 1
                                    or train["ema_on_cpu"]):
        errors.append("[train] ema_warmup / ema_every / ema_on_cpu need ema_decay > 0 "
                      "(e.g. ema_decay = 0.999)")


def _lora_type_checks(lora: dict[str, Any], errors: list[str]) -> None:
    """Keys that only one adapter kind reads, and the kinds peft cannot put on an NF4 base."""
    kind = lora["lora_type"]
    if lora["lokr_factor"] != -1 and kind != "lokr":
        errors.append(f"[lora] lokr_factor = {lora['lokr_factor']} only applies to "
                      f"lora_type = 'lokr' (now {kind!r}); remove it or set lora_type = 'lokr'")
    if lora["lora_dropout"] > 0 and kind in ("lokr", "loha"):
        errors.append(f"[lora] lora_dropout is LoRA's input dropout; lora_type = {kind!r} has "
                      "none: set lora_dropout = 0")
    if kind in ("lokr", "loha") and lora["base_precision"] == "nf4":
        errors.append(f"[lora] lora_type = {kind!r} cannot train on base_precision = 'nf4' "
                      "(peft shapes its weight update like the stored weight, which NF4 packs "
                      "two to a byte): use base_precision = 'int8' or 'fp8', or lora_type = "
                      "'lora' / 'dora'")


def _defaults(section: str) -> dict[str, Any]:
    return {f.name: getattr(SECTIONS[section](), f.name) for f in dataclasses.fields(SECTIONS[section])}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", hint="run `ditctl init NAME` to create a workspace")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})", hint="fix the syntax at that line")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start}); TOML files are UTF-8",
                          hint=f"save {Path(path).name} as UTF-8") from None


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read project.toml (if any), apply flag overrides, validate everything at once."""
    raw = read_toml(path) if path is not None else {}
    return build_config(raw, overrides, source=str(path) if path else "defaults")


# --- the commented template -------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def render_template(set_values: dict[str, dict[str, Any]] | None = None) -> str:
    """The commented project.toml: every key with its help and default.

    Keys in `set_values` are written active; all others are commented out at their default, so
    a user sees every option and what it does without anything being pinned.
    """
    set_values = set_values or {}
    lines = [
        "# ditctl workspace configuration.",
        "# Every key is listed with its default; uncomment a line to change it.",
        "# Precedence: command-line flag > this file > default.",
        "# `ditctl status --config` prints the resolved configuration.",
    ]
    for name, cls in SECTIONS.items():
        purpose = cls.__doc__.split(":", 1)[1].strip()
        lines += ["", f"[{name}]", f"# {purpose[0].upper()}{purpose[1:]}"]
        for f in dataclasses.fields(cls):
            if f.name == "datasets":
                lines += _dataset_example()
                continue
            default = getattr(cls(), f.name)
            meta = f.metadata
            help_text = meta["help"]
            if meta["choices"]:
                help_text += " One of: " + ", ".join(str(c) for c in meta["choices"]) + "."
            lines.append(f"# {help_text}")
            if f.name in set_values.get(name, {}):
                lines.append(f"{f.name} = {_toml_value(set_values[name][f.name])}")
            elif default is None:
                lines.append(f"# {f.name} =            (default: unset)")
            else:
                lines.append(f"# {f.name} = {_toml_value(default)}")
    return "\n".join(lines) + "\n"


def _dataset_example() -> list[str]:
    """The commented [[data.datasets]] example of the template: every key with its help."""
    lines = ["# More datasets in one run: one [[data.datasets]] table each, after [data] (unset",
             "# keys take the [data] value). [data] train_data_path, when set, is the first "
             "dataset.",
             "# datasets = []",
             "# [[data.datasets]]"]
    example = {"path": "data/regularization", "role": "regularization"}
    for f in dataclasses.fields(DatasetConfig):
        default = example.get(f.name, f.default)
        lines.append(f"#   {f.metadata['help']}")
        shown = "(default: from [data])" if f.name in DATASET_INHERITED else "(default: unset)"
        lines.append(f"#   {f.name} = {_toml_value(default)}" if default not in (None, "")
                     else f"#   {f.name} =            {shown}")
    return lines


def activate_keys(template: str, values: dict[str, dict[str, Any]]) -> str:
    """Set keys in a rendered template: `# key = default` in [section] becomes `key = value`."""
    lines = template.splitlines()
    section = None
    pending = {s: dict(v) for s, v in values.items()}
    tables = pending.get("data", {}).pop("datasets", [])
    for i, line in enumerate(lines):
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        for key, value in list(pending.get(section, {}).items()):
            if line.startswith(f"# {key} ="):
                lines[i] = f"{key} = {_toml_value(value)}"
                del pending[section][key]
    left = [f"[{s}] {k}" for s, keys in pending.items() for k in keys]
    if left:
        raise KeyError(f"template has no line for {', '.join(left)}")
    if tables:  # [[data.datasets]] tables go at the end of [data], after its commented example
        end = next(i for i, line in enumerate(lines) if line.startswith("[")
                   and lines.index("[data]") < i)
        lines[end:end] = [line for table in tables for line in (
            "[[data.datasets]]", *(f"{k} = {_toml_value(v)}" for k, v in table.items()), "")]
    return "\n".join(lines) + "\n"
