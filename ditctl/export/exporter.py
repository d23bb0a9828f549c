"""`export_checkpoint`: one checkpoint of a run -> a folder other tools load, checked on disk.

Steps:
1. Plan (plan.py): checkpoint, kind (merged / full / lora), name, output folder; refuse early.
2. Load the run's denoiser with the one loader (`load_denoiser`, fp32) and, with `verify`,
   record its output on fixed inputs: the reference.
3. Write into a temporary sibling of the output folder (`atomic_dir`): a pipeline (LoRA merged
   in fp32, then cast) or the adapter alone (PEFT folder or comfy file).
4. Free the run's model, reload the export from disk the way its users will, and compare
   (parity.py); a mismatch raises and the temporary folder is deleted.
5. Write the model card, rename the folder into place, record the export in the state file.
An interrupted or failed export leaves nothing under the final name.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..config import Config
from ..console import console
from ..engine.loading import load_denoiser, trained_base_precision
from ..engine.lora import (adapter_alpha, adapter_config_dict, adapter_kind, adapters_disabled,
                           has_lora, is_adapter_param, peft_state_dict)
from ..fsutil import (atomic_dir, check_free_space, folder_size, format_bytes, remove_leftovers,
                      restore_replaced, temp_leftovers)
from ..models.base import ModelFamily
from ..models.registry import load_family
from ..runs import read_run_info
from ..workspace import Workspace
from . import lora_formats, merge, parity
from .model_card import dataset_size, write_model_card
from .plan import ExportPlan, plan_export

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    name: str
    kind: str  # "merged" | "full" | "lora"
    format: str  # "pipeline" | "peft" | "comfy"
    dtype: str
    run: str
    checkpoint: Path
    step: int
    files: list[str]
    parity: parity.ParityReport | None
    base_precision: str = "full"  # what the LoRA trained against: full, fp8, int8 or nf4
    trained_parity: parity.TrainedBaseReport | None = None
    weights: str = "raw"  # the checkpoint's "ema" or "raw" trained weights

    def to_dict(self) -> dict:
        return {"path": str(self.path), "name": self.name, "kind": self.kind,
                "format": self.format, "dtype": self.dtype, "run": self.run,
                "checkpoint": str(self.checkpoint), "step": self.step, "files": self.files,
                "parity": self.parity.to_dict() if self.parity else None,
                "base_precision": self.base_precision, "weights": self.weights,
                "trained_parity": self.trained_parity.to_dict() if self.trained_parity
                else None}


def export_checkpoint(ws: Workspace, config: Config, *, run: str | None = None,
                      checkpoint: str | Path | None = None, name: str | None = None,
                      out: str | Path | None = None, force: bool = False,
                      lora_only: bool | None = None) -> ExportResult:
    """Export a checkpoint (default: the latest of the latest run) as [export] configures.

    The caller holds the workspace lock. Raises ExportError (nothing written) when the export
    cannot be made or fails its parity check.
    """
    # first of all (before the plan looks for an existing export), put back an export that a
    # killed `export --force` had moved aside: it is complete; its replacement never finished
    for folder in dict.fromkeys([ws.exports_dir, *([Path(out).resolve().parent] if out else [])]):
        for restored in restore_replaced(folder):
            console.warn(f"restored the export {restored} that a killed `export --force` was "
                         "replacing (its replacement never finished)")
    plan = plan_export(ws, config, run=run, checkpoint=checkpoint, name=name, out=out,
                       force=force, lora_only=lora_only)
    family = load_family(plan.model_path, plan.family)
    base_precision = trained_base_precision(plan.checkpoint)
    trained = None
    if plan.verify and base_precision is not None:
        # the run's own model: its LoRA on the base quantized as it was in training
        console.info(f"loading {plan.run_name}/{plan.checkpoint.name} as trained (base stored "
                     f"as {base_precision})")
        trained = _trained_outputs(family, plan.checkpoint, plan.weights)
    console.info(f"loading {plan.run_name}/{plan.checkpoint.name} on {family.path.name}")
    # the full-precision base, freshly loaded: LoRAs are merged in fp32, never into quantized
    # weights, and before any rounding
    denoiser = load_denoiser(family, plan.checkpoint, as_trained=False, weights=plan.weights)
    inputs = parity.fixed_inputs(family, denoiser)
    reference = parity.predict(family, denoiser, inputs) if plan.verify else None
    if trained is not None:
        with adapters_disabled(denoiser):
            base_output = parity.predict(family, denoiser, inputs)
        trained["base_error"] = parity.relative_difference(base_output, trained["base"])
    lora = lora_summary(denoiser)
    base_identity = family.denoiser_identity()
    images = dataset_size(read_run_info(plan.run_dir), ws.read_state().get("ingest"))
    check_free_space(plan.out_dir.parent, _estimated_bytes(plan, family, denoiser), "the export")

    report = trained_report = None
    _clean_torn_exports(ws.exports_dir)
    with atomic_dir(plan.out_dir, replace=plan.replace) as tmp:
        console.info(f"writing {plan.kind} export ({plan.format}, {plan.dtype})")
        if plan.kind == "lora":
            metadata = lora_metadata(plan, base_identity, lora, images)
            files = write_adapter(tmp, plan, denoiser, metadata, family)
        else:
            files = write_pipeline(tmp, plan, family, denoiser)
        # One fp32 copy of the model at a time: the reload below would double the memory.
        del denoiser
        gc.collect()
        if plan.verify:
            console.info("checking the export against the run (reloaded from disk)")
            reloaded = reload_export(tmp, plan, family)
            candidate = parity.predict(family, reloaded, inputs)
            report = parity.compare(reference, candidate, plan.dtype)
            del reloaded
            what = f"the export of {plan.run_name}/{plan.checkpoint.name}"
            parity.require_parity(report, what)
            if trained is not None:
                trained_report = parity.compare_to_trained(
                    trained["model"], candidate, trained["base_error"], base_precision,
                    plan.dtype)
                parity.require_trained_parity(trained_report, what)
        write_model_card(tmp, plan, base_identity=base_identity, lora=lora, parity=report,
                         files=files, dataset_images=images, base_precision=base_precision,
                         trained_parity=trained_report, family_licence=family.licence,
                         usage_note=family.usage_note, lora_layout=family.lora_layout)

    result = ExportResult(path=plan.out_dir, name=plan.name, kind=plan.kind, format=plan.format,
                          dtype=plan.dtype, run=plan.run_name, checkpoint=plan.checkpoint,
                          step=plan.step, files=files, parity=report,
                          base_precision=base_precision or "full",
                          trained_parity=trained_report, weights=plan.weights)
    ws.update_state("export", {k: v for k, v in result.to_dict().items() if k != "files"})
    return result


def _clean_torn_exports(exports_dir: Path) -> None:
    """Leftovers of killed exports go at the next export (we hold the lock: none is live)."""
    torn = temp_leftovers(exports_dir)
    if torn:
        reclaimed = remove_leftovers(torn)
        console.info(f"removed {len(torn)} torn temporary export folder(s) left by a killed "
                     f"export ({format_bytes(reclaimed)} reclaimed)")


def _trained_outputs(family: ModelFamily, checkpoint: Path, weights: str) -> dict:
    """The run's model (quantized base + LoRA) on the parity inputs, with and without its
    adapters; the model is freed before the full-precision one is loaded."""
    model = load_denoiser(family, checkpoint, weights=weights)
    inputs = parity.fixed_inputs(family, model)
    out = {"model": parity.predict(family, model, inputs)}
    with adapters_disabled(model):
        out["base"] = parity.predict(family, model, inputs)
    del model
    gc.collect()
    return out


# --- writing -------------------------------------------------------------------------------------

def write_pipeline(folder: Path, plan: ExportPlan, family: ModelFamily,
                   denoiser: torch.nn.Module) -> list[str]:
    """The family's native pipeline layout with the trained (LoRA-merged) DiT."""
    merge.merge_lora(denoiser)
    family.save_pipeline(denoiser, folder, copy_encoders=plan.copy_encoders,
                         dtype=DTYPES[plan.dtype], max_shard_size=plan.max_shard_size)
    return _listing(folder, family.copied_components)


def write_adapter(folder: Path, plan: ExportPlan, denoiser: torch.nn.Module,
                  metadata: dict[str, str], family: ModelFamily) -> list[str]:
    """The LoRA alone, in the export dtype: a PEFT folder or one single file ("comfy"), in the
    family's LoRA layout (`family.lora_layout`)."""
    dtype = DTYPES[plan.dtype]
    state = {k: v.to(dtype) for k, v in peft_state_dict(denoiser).items()}
    layout = family.lora_layout
    lora = lora_summary(denoiser)
    if plan.format == "comfy":
        comfy = lora_formats.to_single_file(state, lora_formats.comfy_alphas(denoiser),
                                            denoiser, layout)
        kohya = {"ss_network_dim": str(lora["rank"]), "ss_network_alpha": f"{lora['alpha']:g}"}
        if lora["type"] in ("lokr", "loha"):  # how kohya's scripts record a LyCORIS network
            kohya.update(ss_network_module="lycoris.kohya",
                         ss_network_args=json.dumps({"algo": lora["type"]}))
        lora_formats.write_comfy(folder / f"{plan.name}.safetensors", comfy,
                                 {**metadata, **kohya, "format": "comfy"})
    else:
        config = {**adapter_config_dict(denoiser), "base_model_name_or_path": str(plan.model_path),
                  "inference_mode": True}
        lora_formats.write_peft(folder, state, config, metadata,
                                lora_formats.peft_layout(layout, lora["type"]))
    return _listing(folder)


def lora_summary(denoiser: torch.nn.Module) -> dict | None:
    """Kind (lora / dora / lokr / loha), rank, alpha, per-module patterns and target module
    names of the model's adapter (None without one)."""
    if not has_lora(denoiser):
        return None
    config = adapter_config_dict(denoiser)
    summary = {"type": adapter_kind(config), "rank": int(config["r"]),
               "alpha": adapter_alpha(config), "targets": sorted(config["target_modules"])}
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            summary[key] = dict(config[key])
    if summary["type"] == "lokr":
        summary["lokr_factor"] = int(config.get("decompose_factor", -1))
    return summary


def lora_metadata(plan: ExportPlan, base_identity: str, lora: dict,
                  dataset_images: int | None) -> dict[str, str]:
    """The str→str safetensors metadata of an exported adapter file."""
    return {"ditctl_version": __version__, "family": plan.family,
            "base_model": str(plan.model_path), "base_model_identity": base_identity,
            "lora_type": lora["type"], "rank": str(lora["rank"]), "alpha": f"{lora['alpha']:g}",
            "target_modules": ",".join(lora["targets"]), "steps": str(plan.step),
            "dataset_size": str(dataset_images) if dataset_images is not None else "unknown",
            "run": plan.run_name, "checkpoint": plan.checkpoint.name, "dtype": plan.dtype}


# --- reading back --------------------------------------------------------------------------------

def reload_export(folder: Path, plan: ExportPlan, family: ModelFamily) -> torch.nn.Module:
    """The export loaded fresh from disk, as its users load it, in fp32 for the comparison."""
    if plan.kind != "lora":
        return load_family(folder, plan.family).load_denoiser(torch.float32)
    base = family.load_denoiser(torch.float32)
    layout = family.lora_layout
    if plan.format == "comfy":
        config, state = lora_formats.from_single_file(
            lora_formats.read_comfy(folder / f"{plan.name}.safetensors"), base, layout)
        lora_formats.inject_adapter(base, config, state)
    else:
        config = json.loads((folder / lora_formats.PEFT_CONFIG_FILE).read_text())
        _, state = lora_formats.read_peft(
            folder, lora_formats.peft_layout(layout, adapter_kind(config)))
        lora_formats.inject_adapter(base, config, state)
    return base.eval().requires_grad_(False)


# --- helpers -------------------------------------------------------------------------------------

def _listing(folder: Path, copied: tuple[str, ...] = ()) -> list[str]:
    """The export's files; `copied` component folders (copies or links of the base's) as one
    entry each."""
    entries = []
    for path in sorted(Path(folder).iterdir()):
        if path.name in copied:
            entries.append(path.name + "/" + (" -> " + os.readlink(path) if path.is_symlink()
                                              else ""))
        elif path.is_dir():
            entries += [f"{path.name}/{p.name}" for p in sorted(path.iterdir())]
        else:
            entries.append(path.name)
    return entries


def _estimated_bytes(plan: ExportPlan, family: ModelFamily, denoiser: torch.nn.Module) -> int:
    itemsize = DTYPES[plan.dtype].itemsize
    lora_params = sum(p.numel() for n, p in denoiser.named_parameters() if is_adapter_param(n))
    if plan.kind == "lora":
        return lora_params * itemsize
    size = (sum(p.numel() for p in denoiser.parameters()) - lora_params) * itemsize
    target = next(p for p in (plan.out_dir.parent, *plan.out_dir.parents) if p.exists())
    if plan.copy_encoders and os.stat(target).st_dev != os.stat(family.path).st_dev:
        size += sum(folder_size(family.path / c) for c in family.copied_components)  # no hard links across disks
    return size
