"""The Stable Diffusion 3 / 3.5 folder layout (diffusers' `StableDiffusion3Pipeline`): which
components a model folder holds, and checking a folder.

Kept apart from sd3.py (which imports torch and diffusers) so that commands which only look at
a folder (`status`, `init --model PATH`) start without the ML stack.

```
model_index.json  {"_class_name": "StableDiffusion3Pipeline", ...}
scheduler/        FlowMatchEulerDiscreteScheduler (shift 3.0 for SD3 and SD3.5)
text_encoder/     CLIPTextModelWithProjection (CLIP-L)   + tokenizer/
text_encoder_2/   CLIPTextModelWithProjection (CLIP-G)   + tokenizer_2/ (pads with "!")
text_encoder_3/   T5EncoderModel (T5-XXL)                + tokenizer_3/  (optional: the
                  pipeline runs without T5, its states then zeros)
transformer/      SD3Transformer2DModel (MMDiT; SD3.5-medium adds dual attention and qk norm)
vae/              AutoencoderKL, 16 channels, 8x; latents (z - shift_factor) * scaling_factor
```
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError

# Facts needed before torch is imported (config validation, ingest): the VAE downsamples 8x
# and the transformer cuts 2x2 patches, so image sides are multiples of 16.
VAE_FACTOR = 8
SIZE_MULTIPLE = 16
SIZE_REASON = "VAE 8x times patch 2"

PIPELINE_CLASS = "StableDiffusion3Pipeline"
REQUIRED = ("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
            "transformer", "vae")
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")  # both present, or both absent (null)
MODEL_INDEX = {
    "_class_name": PIPELINE_CLASS,
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _present(index: dict, path: Path, component: str) -> bool:
    entry = index.get(component)
    return bool(entry) and entry[0] is not None and (path / component).is_dir()


def has_t5(index: dict, path: Path) -> bool:
    """Whether the folder carries the T5 encoder (the pipeline also runs with it left out)."""
    return all(_present(index, Path(path), c) for c in T5_COMPONENTS)


def validate_folder(path: Path) -> dict:
    """Check that `path` is a complete StableDiffusion3Pipeline folder; returns its
    model_index.json."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist",
                         hint="pass the local folder of an SD3/SD3.5 model (or --model tiny-sd3)")
    if not index_file.is_file():
        raise ModelError(f"{path} has no model_index.json, so it is not a pipeline folder",
                         hint="point at the folder that holds model_index.json and transformer/")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_file} is not valid JSON ({exc})") from None
    missing = [c for c in REQUIRED if not _present(index, path, c)]
    if missing:
        raise ModelError(f"{path} lacks the component(s) {', '.join(missing)} "
                         "(model_index.json entry and folder)",
                         hint="download the whole StableDiffusion3Pipeline folder")
    t5 = [_present(index, path, c) for c in T5_COMPONENTS]
    if any(t5) and not all(t5):
        lacking = T5_COMPONENTS[t5.index(False)]
        raise ModelError(f"{path} has one of text_encoder_3/tokenizer_3 but lacks {lacking}",
                         hint="download both, or set both to [null, null] in model_index.json "
                              "to run without T5")
    return index
