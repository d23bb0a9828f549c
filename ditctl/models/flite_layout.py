"""The F-Lite folder layout: which components a model folder holds, and checking a folder.

Kept apart from flite.py (which imports torch and diffusers) so that commands which only look
at a folder (`status`, `init --model PATH`) start without the ML stack.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError

# Facts needed before torch is imported (config validation, ingest): the VAE downsamples 8x
# and the DiT cuts 2x2 patches, so image sides are multiples of 16.
VAE_FACTOR = 8
SIZE_MULTIPLE = 16
SIZE_REASON = "VAE 8x times patch 2"

COMPONENTS = ("dit_model", "text_encoder", "tokenizer", "vae")
MODEL_INDEX = {
    "_class_name": "FLitePipeline",
    "_diffusers_version": "0.32.2",
    "dit_model": ["f_lite.model", "DiT"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def validate_folder(path: Path) -> dict:
    """Check that `path` is a complete F-Lite-layout folder; returns its model_index.json."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist",
                         hint="pass the local folder of an F-Lite model (or --model tiny)")
    if not index_file.is_file():
        raise ModelError(f"{path} has no model_index.json, so it is not a pipeline folder",
                         hint="point at the folder that holds model_index.json, dit_model/, "
                              "text_encoder/, tokenizer/ and vae/")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_file} is not valid JSON ({exc})")
    missing = [c for c in COMPONENTS if c not in index or not (path / c).is_dir()]
    if missing:
        raise ModelError(f"{path} lacks the component(s) {', '.join(missing)} "
                         "(model_index.json entry and folder)",
                         hint="an F-Lite folder needs dit_model/, text_encoder/, tokenizer/, vae/")
    return index
