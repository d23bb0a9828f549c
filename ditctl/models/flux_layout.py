"""The FLUX.1 folder layout (diffusers' `FluxPipeline`): its components, and checking a folder.

Kept apart from flux.py (which imports torch and diffusers) so that commands which only look
at a folder (`status`, `init --model PATH`) start without the ML stack.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError

# Facts needed before torch is imported (config validation, ingest): the VAE downsamples 8x and
# the pipeline packs 2x2 latent pixels into one token, so image sides are multiples of 16.
VAE_FACTOR = 8
SIZE_MULTIPLE = 16
SIZE_REASON = "VAE 8x times 2x2 latent packing"

PIPELINE_CLASS = "FluxPipeline"
COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
              "transformer", "vae")
MODEL_INDEX = {
    "_class_name": PIPELINE_CLASS,
    "_diffusers_version": "0.42.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
}


def validate_folder(path: Path) -> dict:
    """Check that `path` is a complete FluxPipeline folder; returns its model_index.json."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist",
                         hint="pass the local folder of a FLUX.1 model (e.g. a download of "
                              "black-forest-labs/FLUX.1-dev)")
    if not index_file.is_file():
        raise ModelError(f"{path} has no model_index.json, so it is not a pipeline folder",
                         hint="point at the folder that holds model_index.json, transformer/, "
                              "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/ "
                              "and scheduler/")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_file} is not valid JSON ({exc})") from None
    missing = [c for c in COMPONENTS if c not in index or not (path / c).is_dir()]
    if missing:
        raise ModelError(f"{path} lacks the component(s) {', '.join(missing)} "
                         "(model_index.json entry and folder)",
                         hint="a FLUX.1 folder needs " + ", ".join(f"{c}/" for c in COMPONENTS))
    return index
