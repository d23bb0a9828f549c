"""Which family reads which model folder, and the facts shared code may ask before loading one.

A family registers one `FamilyEntry`: its name, the module and class that implement it, the
pipeline class names its `model_index.json` carries, a check of its folder layout, and its
image size multiple (config validation and ingest need it without loading anything). Adding a
family is one module plus one entry in `FAMILIES` (docs/architecture.md, "Adding a family").

Family modules import torch and diffusers (seconds), so they are imported only when a family
is loaded; naming and checking a folder (`check_folder`, for `ditctl status`), the config's
choices and the size rules need neither.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import ModelError
from . import flite_layout, flux_layout, sd3_layout

if TYPE_CHECKING:
    from .base import ModelFamily


@dataclass(frozen=True)
class FamilyEntry:
    name: str
    implementation: str  # "module:Class", imported on use
    pipeline_classes: tuple[str, ...]  # model_index.json _class_name values it reads
    check_layout: Callable[[Path], object]  # raises ModelError naming what is wrong
    size_multiple: int  # image sides must be multiples of this (VAE factor x patch size)
    size_reason: str  # why, for error messages
    tiny: str  # "module:function" writing a tiny random model folder offline: (folder, seed)


FAMILIES: dict[str, FamilyEntry] = {entry.name: entry for entry in (
    FamilyEntry("flite", "ditctl.models.flite:FLiteFamily", ("FLitePipeline",),
                flite_layout.validate_folder, flite_layout.SIZE_MULTIPLE,
                flite_layout.SIZE_REASON, "ditctl.models.tiny:build_tiny_pipeline"),
    FamilyEntry("flux", "ditctl.models.flux:FluxFamily", (flux_layout.PIPELINE_CLASS,),
                flux_layout.validate_folder, flux_layout.SIZE_MULTIPLE, flux_layout.SIZE_REASON,
                "ditctl.models.tiny_flux:build_tiny_flux"),
    FamilyEntry("sd3", "ditctl.models.sd3:SD3Family", (sd3_layout.PIPELINE_CLASS,),
                sd3_layout.validate_folder, sd3_layout.SIZE_MULTIPLE, sd3_layout.SIZE_REASON,
                "ditctl.models.tiny_sd3:build_tiny_sd3"),
)}
# `init --model tiny`: the trained tiny model that ships in ditctl/assets/ (a folder of this family)
SHIPPED_TINY_MODEL = "tiny-flite"  # an F-Lite-layout folder
DEFAULT_FAMILY = next(iter(FAMILIES))  # the first family ditctl supported: old configs name it
PIPELINE_CLASSES = {cls: entry.name for entry in FAMILIES.values()
                    for cls in entry.pipeline_classes}


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_entry(name: str) -> FamilyEntry:
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}", hint=f"known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def size_multiple(name: str) -> int:
    return family_entry(name).size_multiple


def detect_family(path: Path) -> str:
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        FAMILIES[DEFAULT_FAMILY].check_layout(Path(path))  # raises the precise error
    try:
        class_name = json.loads(index_file.read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{index_file} is not valid JSON ({exc})") from None
    if class_name not in PIPELINE_CLASSES:
        raise ModelError(f"{path}: pipeline class {class_name!r} is not supported",
                         hint=f"supported: {', '.join(PIPELINE_CLASSES)}")
    return PIPELINE_CLASSES[class_name]


def check_folder(path: Path, family: str | None = None) -> str:
    """The family name of a local model folder, after checking its layout; loads no library."""
    name = family or detect_family(path)
    family_entry(name).check_layout(Path(path))
    return name


def build_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """Write the family's tiny random model (real classes, small configs) into `folder`."""
    module, function = family_entry(name).tiny.split(":")
    return getattr(importlib.import_module(module), function)(Path(folder), seed=seed)


def load_family(path: Path, family: str | None = None) -> ModelFamily:
    """The family object for a local model folder (validated; no weights are loaded yet)."""
    name = family or detect_family(path)
    module, cls = family_entry(name).implementation.split(":")
    return getattr(importlib.import_module(module), cls)(Path(path))
