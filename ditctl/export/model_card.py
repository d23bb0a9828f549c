"""The export's README.md: what it is, what it was trained on, how well, under which licence,
and how to load it.

Everything comes from files that already exist: the run's config.toml and run.json, the
checkpoint, runs/<run>/eval/metrics.json, the latest sample grid (copied in as samples.png) and
the base model folder's README front matter or LICENSE file (copied in, so the licence's use
restrictions travel with the weights). Absent files are stated as absent, never invented.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..runs import (METRICS, eval_dir, read_checkpoint_meta, read_run_info, run_config_file,
                    samples_dir)
from ..models.base import LoraLayout
from .parity import ParityReport, TrainedBaseReport
from .plan import ExportPlan

LICENCE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "LICENCE.md", "LICENCE.txt")
LICENCE_NAMES = {"creativeml-openrail-m": "CreativeML Open RAIL-M", "openrail": "OpenRAIL",
                 "openrail++": "OpenRAIL++", "apache-2.0": "Apache 2.0", "mit": "MIT"}
SAMPLES_FILE = "samples.png"
KIND_TITLES = {"merged": "A pipeline with the LoRA merged into its DiT",
               "full": "A fully fine-tuned pipeline",
               "lora": "A LoRA adapter"}


@dataclass(frozen=True)
class Licence:
    id: str  # the Hugging Face licence id, e.g. "creativeml-openrail-m"
    name: str
    source: str  # where it was read from
    file: Path | None  # licence text to carry into the export


UNKNOWN_LICENCE = ("unknown", "unknown (check the base model's terms)")


def find_licence(model_path: Path, family: str,
                 family_licence: tuple[str, str] = UNKNOWN_LICENCE) -> Licence:
    """The base model's licence: README front matter, else a LICENSE file, else the licence
    of the family's released weights (`ModelFamily.licence`)."""
    model_path = Path(model_path)
    text_file = next((model_path / n for n in LICENCE_FILES if (model_path / n).is_file()), None)
    front = _front_matter(model_path / "README.md")
    if front.get("license"):
        lid = front["license"]
        name = front.get("license_name") or LICENCE_NAMES.get(lid, lid)
        return Licence(lid, name, f"{model_path / 'README.md'}", text_file)
    if text_file is not None:
        first = next((line.strip("# \t") for line in text_file.read_text(errors="replace")
                      .splitlines() if line.strip()), text_file.name)
        return Licence("other", first, str(text_file), text_file)
    lid, name = family_licence
    return Licence(lid, name, f"the {family} family's released weights", None)


def _front_matter(readme: Path) -> dict[str, str]:
    """`key: value` lines of a README's leading `---` block (no YAML library needed for these)."""
    if not readme.is_file():
        return {}
    lines = readme.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    found = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        match = re.match(r"^([A-Za-z_]+):\s*(\S.*?)\s*$", line)
        if match:
            found[match[1]] = match[2].strip("'\"")
    return found


def hub_id(model_path: Path) -> str | None:
    """"owner/name" when the base model sits in the Hugging Face cache
    (.../models--owner--name/snapshots/<hash>); a local folder has no hub id."""
    match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", Path(model_path).as_posix() + "/")
    return f"{match[1]}/{match[2]}" if match else None


def find_sample_grid(run_dir: Path | None, step: int) -> Path | None:
    """runs/<run>/samples/<label>/grid.png for this step if one exists, else the newest grid."""
    if run_dir is None or not samples_dir(run_dir).is_dir():
        return None
    grids = [g for g in samples_dir(run_dir).glob("*/grid.png") if g.is_file()]
    for grid in grids:
        numbers = [int(n) for n in re.findall(r"\d+", grid.parent.name)]
        if step in numbers:
            return grid
    return max(grids, key=lambda g: g.stat().st_mtime, default=None)


def read_metrics(run_dir: Path | None) -> dict | None:
    file = eval_dir(run_dir) / METRICS if run_dir else None
    if file is None or not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        return None  # a metrics file being rewritten is not a reason to fail an export


def dataset_summary(run_info: dict) -> dict[str, Any]:
    """The training-data part of run.json (training writes `train_images`, `val_images`,
    `buckets`): its `dataset`/`data` table if it has one, else the image/count/bucket keys."""
    for key in ("dataset", "data"):
        if isinstance(run_info.get(key), dict):
            return run_info[key]
    return {k: v for k, v in run_info.items()
            if any(word in k for word in ("images", "count", "bucket")) or k == "dataset_size"}


def dataset_size(run_info: dict, ingest_state: dict | None = None) -> int | None:
    """Training images: from run.json if it says, else the workspace's last ingest."""
    summary = dataset_summary(run_info)
    for key in ("train_images", "train_count", "num_train_images", "num_images", "dataset_size",
                "count", "size", "train"):
        if isinstance(summary.get(key), int) and not isinstance(summary.get(key), bool):
            return summary[key]
    if ingest_state and isinstance(ingest_state.get("train_count"), int):
        return ingest_state["train_count"]
    return None


def write_model_card(folder: Path, plan: ExportPlan, *, base_identity: str,
                     lora: dict | None, parity: ParityReport | None,
                     files: list[str], dataset_images: int | None,
                     base_precision: str | None = None,
                     trained_parity: TrainedBaseReport | None = None,
                     family_licence: tuple[str, str] = UNKNOWN_LICENCE,
                     usage_note: str = "", lora_layout: LoraLayout = LoraLayout()) -> Path:
    """Write README.md (plus samples.png and the licence file when they exist) into `folder`.
    `family_licence`, `usage_note` and `lora_layout` are the family's (`ModelFamily.licence`,
    `.usage_note`, `.lora_layout`)."""
    folder = Path(folder)
    licence = find_licence(plan.model_path, plan.family, family_licence)
    if licence.file is not None:
        shutil.copy2(licence.file, folder / licence.file.name)
    grid = find_sample_grid(plan.run_dir, plan.step)
    if grid is not None:
        shutil.copy2(grid, folder / SAMPLES_FILE)
    text = render_model_card(plan, base_identity=base_identity, lora=lora, parity=parity,
                             files=files, licence=licence,
                             samples_label=grid.parent.name if grid else None,
                             dataset_images=dataset_images, base_precision=base_precision,
                             trained_parity=trained_parity, usage_note=usage_note,
                             lora_layout=lora_layout)
    (folder / "README.md").write_text(text)
    return folder / "README.md"


def render_model_card(plan: ExportPlan, *, base_identity: str, lora: dict | None,
                      parity: ParityReport | None, files: list[str], licence: Licence,
                      samples_label: str | None, dataset_images: int | None,
                      base_precision: str | None = None,
                      trained_parity: TrainedBaseReport | None = None,
                      usage_note: str = "", lora_layout: LoraLayout = LoraLayout()) -> str:
    sections = [
        _front_matter_block(plan, licence),
        [f"# {plan.name}", "",
         f"{KIND_TITLES[plan.kind]} ({plan.family}), exported by ditctl {__version__} on "
         f"{time.strftime('%Y-%m-%d')} from run `{plan.run_name}`, checkpoint "
         f"`{plan.checkpoint.name}` (step {plan.step}).", "", _weights_line(plan)],
        _base_section(plan, base_identity, base_precision),
        _contents_section(plan, lora, files),
        _data_section(read_run_info(plan.run_dir), dataset_images),
        _config_section(plan),
        _evaluation_section(plan, parity, trained_parity),
        _samples_section(samples_label),
        _licence_section(licence),
        ["## How to load it", "", *_usage(plan, usage_note, lora_layout,
                                          (lora or {}).get("type", "lora"))],
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _weights_line(plan: ExportPlan) -> str:
    if plan.weights != "ema":
        return "Weights: the trained weights as they were at that step (raw)."
    ema = read_checkpoint_meta(plan.checkpoint).get("ema") or {}
    how = f"decay {ema['decay']:g}" if "decay" in ema else "as the run kept it"
    if ema.get("warmup"):
        how += ", warm-up min(decay, (1 + n) / (10 + n))"
    if ema.get("every", 1) != 1:
        how += f", updated every {ema['every']} steps"
    return f"Weights: the exponential moving average (EMA) of the trained weights ({how})."


def _front_matter_block(plan: ExportPlan, licence: Licence) -> list[str]:
    """Hugging Face card metadata; base_model only when it is a hub id, never a local path."""
    lines = ["---", f"license: {licence.id}"]
    if licence.id == "other":
        lines.append(f"license_name: {json.dumps(licence.name)}")
    repo = hub_id(plan.model_path)
    if repo:
        lines.append(f"base_model: {repo}")
    tags = ["ditctl", plan.family, "text-to-image"] + (["lora"] if plan.kind == "lora" else [])
    return lines + ["tags:"] + [f"- {t}" for t in tags] + ["---"]


def _base_section(plan: ExportPlan, base_identity: str,
                  base_precision: str | None = None) -> list[str]:
    lines = ["## Base model", "", f"- folder: `{plan.model_path}`", f"- family: {plan.family}",
             f"- denoiser identity: `{base_identity}`"]
    if base_precision:
        merged = (" The LoRA was merged into the base loaded in full precision from the folder "
                  "above, not into the quantized weights." if plan.kind == "merged" else "")
        lines.append(f"- the LoRA was trained against this base stored as **{base_precision}** "
                     f"(`[lora] base_precision`, QLoRA-style).{merged}")
    if plan.kind != "lora":
        how = ("copied (hard links where possible)" if plan.copy_encoders else
               "symbolic links to the base model's folders: keep the base model where it is")
        lines.append(f"- text_encoder, tokenizer, vae: {how}")
    return lines


def _contents_section(plan: ExportPlan, lora: dict | None, files: list[str]) -> list[str]:
    lines = ["## What was exported", ""] + [f"- `{f}`" for f in files]
    lines += ["- `README.md` (this card)", f"- weights stored as {plan.dtype}"]
    if lora:
        kind = lora.get("type", "lora")
        extra = "".join(f", {key.replace('_', ' ')} `{json.dumps(lora[key])}`"
                        for key in ("rank_pattern", "alpha_pattern", "lokr_factor")
                        if key in lora)
        lines.append(f"- {ADAPTER_TITLES[kind]} rank {lora['rank']}, alpha {lora['alpha']:g}"
                     f"{extra}, target modules: {', '.join(lora['targets'])}"
                     + (" (merged into the DiT weights)" if plan.kind == "merged" else "")
                     + f"; `[lora] lora_type = \"{kind}\"`")
    return lines


ADAPTER_TITLES = {"lora": "LoRA", "dora": "DoRA (weight-decomposed LoRA)",
                  "lokr": "LoKr (LyCORIS Kronecker product)",
                  "loha": "LoHa (LyCORIS Hadamard product)"}
PEFT_CONFIG_CLASSES = {"lora": "LoraConfig", "dora": "LoraConfig", "lokr": "LoKrConfig",
                       "loha": "LoHaConfig"}


def _data_section(run_info: dict, dataset_images: int | None) -> list[str]:
    summary = dataset_summary(run_info)
    if summary:
        return ["## Training data", "", *_render_mapping(summary)]
    if dataset_images is not None:
        return ["## Training data", "", f"- training images: {dataset_images} (the workspace's "
                "last ingest; the run recorded no counts)"]
    return ["## Training data", "", "Not recorded (the run has no run.json)."]


def _config_section(plan: ExportPlan) -> list[str]:
    config_file = run_config_file(plan.run_dir) if plan.run_dir else None
    if config_file is None or not config_file.is_file():
        return ["## Training configuration", "",
                "Not available (the checkpoint is not inside a run folder)."]
    return ["## Training configuration", "",
            f"The run's resolved configuration (`{plan.run_name}/config.toml`):", "",
            "```toml", config_file.read_text().rstrip(), "```"]


def _evaluation_section(plan: ExportPlan, parity: ParityReport | None,
                        trained_parity: TrainedBaseReport | None = None) -> list[str]:
    lines = ["## Evaluation", ""]
    metrics = read_metrics(plan.run_dir)
    if metrics:
        lines += ["From the run's `eval/metrics.json`:", "",
                  *_metrics_lines(metrics, plan.step, plan.weights)]
    else:
        lines.append("No evaluation metrics (run `ditctl eval` before exporting to include them).")
    if parity is not None:
        lines += ["", "Export check passed: the exported weights, reloaded from disk, predict "
                  f"the run's output with {parity.describe()}; the relative difference is "
                  "`max|export - run| / max|run|` on fixed inputs."]
    if trained_parity is not None:
        lines += ["", f"Against the run's own model (base stored as "
                  f"{trained_parity.base_precision}): relative difference "
                  f"{trained_parity.relative_diff:.3g}, where the base's quantization error alone "
                  f"is {trained_parity.base_error:.3g} (allowed {trained_parity.tolerance:.3g}: "
                  f"1.5 x that error plus {plan.dtype} rounding)."]
    return lines


def _samples_section(samples_label: str | None) -> list[str]:
    if not samples_label:
        return []
    return ["## Samples", "", f"Generated during training (`samples/{samples_label}`):", "",
            f"![samples {samples_label}]({SAMPLES_FILE})"]


def _licence_section(licence: Licence) -> list[str]:
    lines = ["## Licence", "", f"{licence.name} (`{licence.id}`), carried over from the base "
             f"model (source: {licence.source})."]
    if licence.file is not None:
        lines.append(f"The licence text is included as `{licence.file.name}`.")
    return lines + ["Its use restrictions apply to this derivative as well."]


def _usage(plan: ExportPlan, usage_note: str = "",
           lora_layout: LoraLayout = LoraLayout(), kind: str = "lora") -> list[str]:
    folder = str(plan.out_dir)
    if plan.kind != "lora":
        return [
            "With ditctl:", "", "```sh", f"ditctl sample --model {folder} --prompts prompts.txt",
            "```", "",
            f"In Python ({usage_note or 'ditctl'}):", "", "```python",
            "from ditctl.models.registry import load_family",
            f"family = load_family({folder!r})",
            "dit = family.load_denoiser()  # the fine-tuned DiT",
            "```"]
    base = str(plan.model_path)
    if lora_layout.pipeline_class is not None and kind in ("lora", "dora"):
        return _pipeline_lora_usage(plan, lora_layout)
    if plan.format == "comfy":
        keys = {"lokr": "`diffusion_model.<module>.lokr_w1/lokr_w2(_a/_b)/alpha`, as LyCORIS",
                "loha": "`diffusion_model.<module>.hada_w1_a/.../hada_w2_b/alpha`, as LyCORIS"
                }.get(kind, "`diffusion_model.<module>.lora_down/lora_up/alpha`")
        return [
            f"`{plan.name}.safetensors` uses the key naming of community UIs "
            f"({keys}). Back to PEFT in Python:",
            "", "```python",
            "from safetensors.torch import load_file",
            "from ditctl.export.lora_formats import comfy_to_peft, inject_adapter",
            "from ditctl.models.registry import load_family",
            f"dit = load_family({base!r}).load_denoiser()",
            f"config, state = comfy_to_peft(load_file({f'{folder}/{plan.name}.safetensors'!r}))",
            "inject_adapter(dit, config, state)", "```"]
    load_base = ["from ditctl.models.registry import load_family",
                 f"dit = load_family({base!r}).load_denoiser()  # the base DiT"]
    cls = PEFT_CONFIG_CLASSES[kind]
    diffusers = [
        "With diffusers (the DiT class inherits `PeftAdapterMixin`; the keys have no prefix):",
        "", "```python", *load_base,
        f"dit.load_lora_adapter({folder!r}, weight_name=\"adapter_model.safetensors\", "
        "prefix=None)", "```", ""] if kind in ("lora", "dora") else [
        f"diffusers loads LoRA and DoRA adapters only; load this {ADAPTER_TITLES[kind]} "
        "adapter with peft:", ""]
    return [
        *diffusers,
        "With peft directly:", "", "```python",
        f"from peft import {cls}, inject_adapter_in_model, set_peft_model_state_dict",
        "from safetensors.torch import load_file", *load_base,
        f"inject_adapter_in_model({cls}.from_pretrained({folder!r}), dit)",
        f"set_peft_model_state_dict(dit, load_file({folder + '/adapter_model.safetensors'!r}))",
        "```", "",
        "(`PeftModel.from_pretrained` expects keys prefixed `base_model.model.`; use "
        + ("one of the two ways above.)" if kind in ("lora", "dora") else "the way above.)"), "",
        "With ditctl, to continue training from it: set `[lora] lora_checkpoint = "
        f"\"{folder}\"` (and `lora_type = \"{kind}\"`) in project.toml. For `ditctl sample "
        "--model`, export the run with `--merge-lora`."]


def _pipeline_lora_usage(plan: ExportPlan, layout: LoraLayout) -> list[str]:
    """A LoRA of a family whose diffusers pipeline reads its LoRA files itself."""
    folder, base, cls = str(plan.out_dir), str(plan.model_path), layout.pipeline_class
    if plan.format == "comfy":
        target = f"{folder}/{plan.name}.safetensors"
        intro = [f"`{plan.name}.safetensors` uses the key naming of kohya's sd-scripts "
                 f"({layout.single_file_keys}), the layout community UIs such as ComfyUI load; "
                 "diffusers reads it through its kohya converter:"]
        resume = ("To continue training it with ditctl, export the run in the default (peft) "
                  "format and set `[lora] lora_checkpoint` to that folder.")
    else:
        target = folder
        intro = [f"`{layout.weights_file}` is in diffusers' LoRA layout "
                 f"(`{layout.key_prefix}<module>.lora_A/lora_B.weight`):"]
        resume = ("With ditctl, to continue training from it: set `[lora] lora_checkpoint = "
                  f"\"{folder}\"` in project.toml.")
    return [*intro, "", "```python", f"from diffusers import {cls}",
            f"pipe = {cls}.from_pretrained({base!r})",
            f"pipe.load_lora_weights({target!r})", "```", "",
            resume + " For `ditctl sample --model`, export the run with `--merge-lora`."]


def _metrics_lines(metrics: dict, step: int, weights: str | None = None) -> list[str]:
    """`ditctl eval` metrics: validation loss (and CLIP score, when computed) of the base model
    and of the evaluated checkpoints; any other JSON: its scalar values."""
    models = metrics.get("models")
    if not (isinstance(models, list) and models and all(isinstance(m, dict) for m in models)):
        rows = [(k, v) for k, v in _flatten(metrics) if not isinstance(v, (list, dict))]
        return ["| metric | value |", "|---|---|"] + [f"| {k} | {_format(v)} |" for k, v in rows]
    clip = (metrics.get("clip") or {}).get("columns") or {}
    lines = ["| model | step | validation loss |" + (" CLIP score |" if clip else ""),
             "|---|---|---|" + ("---|" if clip else "")]
    for model in models:
        label = model.get("label", "?")
        # a checkpoint with an EMA is listed twice (raw, ema): the export is one of them
        same_weights = model.get("weights") in (None, weights)
        mark = " (this export)" if model.get("step") == step and same_weights else ""
        row = f"| {label}{mark} | {model.get('step', '?')} | {_format(model.get('val_loss'))} |"
        lines.append(row + (f" {_format(clip.get(label, '-'))} |" if clip else ""))
    validation = metrics.get("validation") or {}
    if validation.get("description"):
        lines += ["", f"Validation data: {validation['description']}"
                  + (f" ({validation['images']} images)." if validation.get("images") else ".")]
    return lines


def _render_mapping(mapping: dict) -> list[str]:
    lines = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value and all(not isinstance(v, (dict, list))
                                                     for v in value.values()):
            lines.append(f"- {key}:")
            lines += [f"  - {k}: {_format(v)}" for k, v in value.items()]
        else:
            lines.append(f"- {key}: {_format(value)}")
    return lines


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value) + "`"
    return str(value)
