"""The CLIP score: 100 x cosine similarity of prompt and image embeddings, from a local CLIP
model folder ([eval] clip_model_path); skipped, with the reason, when none is set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..config import Config
from ..errors import ConfigError
from ..report import escape, fmt, html_table, note
from .metrics import ComparisonImages


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


class ClipScore:
    """The built-in image metric (see metrics.py): one CLIP score per model, the mean over its
    comparison images, each scored against its own prompt."""

    key = "clip"
    title = "CLIP score"
    column = "CLIP"
    scalar = "clip_score"

    def score(self, images: ComparisonImages, config: Config,
              device: torch.device | str) -> dict[str, Any]:
        if not config.eval.clip_model_path:
            return {"status": "skipped", "reason": "[eval] clip_model_path is not set",
                    "hint": "set [eval] clip_model_path (or --clip-model-path) to a local CLIP "
                            "model folder, e.g. a downloaded openai/clip-vit-large-patch14"}
        if not images.columns:
            return {"status": "skipped", "reason": "no comparison images"}
        scorer = ClipScorer(Path(config.eval.clip_model_path), device)
        prompts = images.image_prompts()
        scores = {label: scorer.scores(column, prompts)
                  for label, column in images.columns.items()}
        return {"status": "computed", "model": config.eval.clip_model_path,
                "columns": {label: sum(s) / len(s) for label, s in scores.items()},
                "per_image": scores}

    def value(self, result: dict[str, Any], label: str) -> float | None:
        return (result.get("columns") or {}).get(label)

    def html(self, result: dict[str, Any]) -> str:
        if result.get("status") != "computed":
            return note(f"CLIP score skipped: {result.get('reason', 'not computed')}"
                        + (f". To enable: {result['hint']}." if result.get("hint") else ""))
        return (f"<p>CLIP score (100 &times; cosine similarity of prompt and image; model "
                f"{escape(result.get('model'))}):</p>"
                + html_table(["model", "CLIP score"],
                             [[label, fmt(v, 2)] for label, v in result["columns"].items()]))
