"""Which family reads which model folder.

A family registers the pipeline class name its `model_index.json` carries. Adding a family is
one module plus one line here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..errors import ModelError
from .base import ModelFamily
from .flite import FLiteFamily, validate_folder

FAMILIES: dict[str, Callable[[Path], ModelFamily]] = {"flite": FLiteFamily}
PIPELINE_CLASSES = {"FLitePipeline": "flite"}


def detect_family(path: Path) -> str:
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        validate_folder(Path(path))  # raises the precise error
    class_name = json.loads(index_file.read_text()).get("_class_name", "")
    if class_name not in PIPELINE_CLASSES:
        raise ModelError(f"{path}: pipeline class {class_name!r} is not supported",
                         hint=f"supported: {', '.join(PIPELINE_CLASSES)}")
    return PIPELINE_CLASSES[class_name]


def load_family(path: Path, family: str | None = None) -> ModelFamily:
    """The family object for a local model folder (validated; no weights are loaded yet)."""
    name = family or detect_family(path)
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}", hint=f"known: {', '.join(FAMILIES)}")
    return FAMILIES[name](Path(path))
