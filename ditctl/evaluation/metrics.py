"""Image metrics of `ditctl eval`: one small interface, the built-in CLIP score, plug-ins.

A metric scores the comparison images: every evaluated model's images of the same prompts and
seeds. It returns a JSON-able result, stored under its `key` in metrics.json, whose
"columns" maps each model's label to its score (a number, or a dict the metric reads its
headline number from with `value`). It renders its own section of report.html. A result with
"status": "skipped" (and a "reason", maybe a "hint") says why it could not be computed; None
means the metric does not apply to these prompts and leaves no trace.

Metrics other than the built-in ones come from the `ditctl.image_metrics` entry-point group
(the demo's concept score is registered there in pyproject.toml), or `register_metric`, so
evaluation never imports the packages that provide them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, Sequence

import torch
from PIL import Image

from ..config import Config
from ..console import console

ENTRY_POINT_GROUP = "ditctl.image_metrics"


@dataclass(frozen=True)
class ComparisonImages:
    """The images to score: `columns` maps a model's label to its images, prompt-major,
    `per_prompt` images for each of `prompts`."""

    prompts: Sequence[str]
    columns: dict[str, list[Image.Image]]
    per_prompt: int

    def image_prompts(self) -> list[str]:
        """The prompt of each image of a column."""
        return [self.prompts[i // self.per_prompt]
                for i in range(len(self.prompts) * self.per_prompt)]


class ImageMetric(Protocol):
    key: str  # its entry in metrics.json ("clip")
    title: str  # its name in sentences and --compare tables ("CLIP score")
    column: str  # its short column header in the eval table ("CLIP")
    scalar: str  # its tensorboard tag, under eval/ ("clip_score")

    def score(self, images: ComparisonImages, config: Config,
              device: torch.device | str) -> dict[str, Any] | None:
        """The result (see the module doc), or None when the metric does not apply."""

    def value(self, result: dict[str, Any], label: str) -> float | None:
        """The headline number of model `label` in `result` (None if it has none)."""

    def html(self, result: dict[str, Any]) -> str:
        """Its section of report.html (use ditctl.report's helpers)."""


_registered: list[ImageMetric] = []
_plugins: list[ImageMetric] | None = None


def register_metric(metric: ImageMetric) -> None:
    """Add a metric for this process (plug-ins installed as packages use the entry points)."""
    if all(m.key != metric.key for m in _registered):
        _registered.append(metric)


def plugin_metrics() -> list[ImageMetric]:
    """Registered metrics, then those of the `ditctl.image_metrics` entry points (by name).

    An entry point names a metric object or a class to instantiate; one that fails to load is
    reported and left out."""
    global _plugins
    if _plugins is None:
        _plugins = []
        for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
            try:
                loaded = point.load()
                _plugins.append(loaded() if isinstance(loaded, type) else loaded)
            except Exception as exc:  # a broken plug-in must not stop the evaluation
                console.warn(f"image metric plug-in {point.name!r} ({point.value}) failed to "
                             f"load and is left out: {type(exc).__name__}: {exc}")
    found: list[ImageMetric] = []
    for metric in [*_registered, *_plugins]:
        if all(m.key != metric.key for m in found):
            found.append(metric)
    return found


def score_images(metrics: Sequence[ImageMetric], images: ComparisonImages, config: Config,
                 device: torch.device | str) -> dict[str, dict[str, Any]]:
    """{metric key: result} for every metric that applies."""
    results = {}
    for metric in metrics:
        result = metric.score(images, config, device)
        if result is not None:
            results[metric.key] = result
    return results
