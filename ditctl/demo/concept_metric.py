"""The concept score as an image metric of `ditctl eval` (a plug-in: pyproject.toml registers
it in the `ditctl.image_metrics` entry-point group; evaluation does not import the demo).

For prompts that are all demo scene captions ("a red circle on a white background"), the
fraction of each model's comparison images whose colour and shape, read back from the pixels by
`concepts.score`, match the prompt; also on the prompts naming the concept the example dataset
teaches (`scenes.HELD_OUT`). Any other prompt makes the metric not apply.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from PIL import Image

from ..config import Config
from ..evaluation.metrics import ComparisonImages
from ..report import fmt, html_table
from .concepts import score
from .scenes import BACKGROUNDS, COLOURS, HELD_OUT, SHAPES


def parse_scene_caption(prompt: str) -> dict[str, str] | None:
    """{"colour", "shape", "background"} of a demo scene caption ("a red circle on a white
    background"); None for any other prompt."""
    pattern = (rf"an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) on an? "
               rf"({'|'.join(BACKGROUNDS)}) background")
    found = re.fullmatch(pattern, prompt.strip().lower())
    if not found:
        return None
    return dict(zip(("colour", "shape", "background"), found.groups()))


def concept_metrics(prompts: Sequence[str], columns: dict[str, list[Image.Image]],
                    per_prompt: int) -> dict[str, Any] | None:
    """Per column, the fraction of images whose colour/shape match their prompt (demo scenes
    only: None unless every prompt is a scene caption). Also scored on the prompts that name
    the concept the example dataset teaches (`held_out`)."""
    parsed = [parse_scene_caption(p) for p in prompts]
    if not prompts or any(p is None for p in parsed):
        return None
    expected = [parsed[i // per_prompt] for i in range(len(prompts) * per_prompt)]
    kind, value = HELD_OUT
    held = [i for i, want in enumerate(expected) if want.get(kind) == value]
    result: dict[str, Any] = {"held_out_concept": f"{kind} {value}", "columns": {}}
    for label, images in columns.items():
        entry = score(images, expected)
        if held:
            entry["held_out"] = score([images[i] for i in held], [expected[i] for i in held])
        result["columns"][label] = entry
    return result


class ConceptScore:
    """The image-metric interface (ditctl.evaluation.metrics) around `concept_metrics`."""

    key = "concept"
    title = "concept match (colour+shape)"
    column = "concept"
    scalar = "concept_both"

    def score(self, images: ComparisonImages, config: Config,
              device: torch.device | str) -> dict[str, Any] | None:
        if not images.prompts:
            return None
        return concept_metrics(images.prompts, images.columns, images.per_prompt)

    def value(self, result: dict[str, Any], label: str) -> float | None:
        column = (result.get("columns") or {}).get(label)
        return column.get("both") if isinstance(column, dict) else None

    def html(self, result: dict[str, Any]) -> str:
        rows = []
        for label, entry in result["columns"].items():
            held = entry.get("held_out") or {}
            rows.append([label, fmt(entry["colour"], 2), fmt(entry["shape"], 2),
                         fmt(entry["both"], 2), fmt(held.get("both"), 2)])
        return ("<p>Concept match: fraction of comparison images whose colour and shape, "
                "read back from the pixels, match the prompt.</p>"
                + html_table(["model", "colour", "shape", "both",
                              f"both, {result['held_out_concept']} prompts"], rows))


metric = ConceptScore()  # the entry point
