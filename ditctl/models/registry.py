"""Which family reads which model folder.

A family registers the pipeline class name its `model_index.json` carries, the module and
class that implement it, and a check of its folder layout. Adding a family is one module plus
one line in each table here.

Family modules import torch and diffusers (seconds), so they are imported only when a family
is loaded; naming and checking a folder (`check_folder`, for `ditctl status`) needs neither.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import ModelError
from .flite_layout import validate_folder as validate_flite_folder

if TYPE_CHECKING:
    from .base import ModelFamily

FAMILIES: dict[str, str] = {"flite": "ditctl.models.flite:FLiteFamily"}  # imported on use
LAYOUT_CHECKS: dict[str, Callable[[Path], object]] = {"flite": validate_flite_folder}
PIPELINE_CLASSES = {"FLitePipeline": "flite"}


def detect_family(path: Path) -> str:
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        validate_flite_folder(Path(path))  # raises the precise error
    class_name = json.loads(index_file.read_text()).get("_class_name", "")
    if class_name not in PIPELINE_CLASSES:
        raise ModelError(f"{path}: pipeline class {class_name!r} is not supported",
                         hint=f"supported: {', '.join(PIPELINE_CLASSES)}")
    return PIPELINE_CLASSES[class_name]


def check_folder(path: Path, family: str | None = None) -> str:
    """The family name of a local model folder, after checking its layout; loads no library."""
    name = family or detect_family(path)
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}", hint=f"known: {', '.join(FAMILIES)}")
    LAYOUT_CHECKS[name](Path(path))
    return name


def load_family(path: Path, family: str | None = None) -> ModelFamily:
    """The family object for a local model folder (validated; no weights are loaded yet)."""
    name = family or detect_family(path)
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}", hint=f"known: {', '.join(FAMILIES)}")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)(Path(path))
