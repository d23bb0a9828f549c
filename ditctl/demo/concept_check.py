"""Does a model draw what it is asked for? Generate scene prompts, classify the pixels, score.

The acceptance numbers of the tiny base model and of the example LoRA come from here, so the
training script (bench/train_tiny_base.py), the tests and the demo all measure the same way:
fixed prompts, fixed seeds (`ditctl.sampling.derive_seed`), the shared sampler, and the
hand-written pixel classifier of `ditctl.demo.concepts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .concepts import score
from .scenes import BACKGROUNDS, COLOURS, HELD_OUT, SHAPES, Scene


@dataclass(frozen=True)
class PromptScene:
    """What a prompt asks for; `caption` is the same sentence the training data uses."""

    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return Scene(self.shape, self.colour, self.background).caption

    def expected(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "background": self.background}


def _visible_backgrounds(colour: str) -> list[str]:
    return [b for b in BACKGROUNDS if b != colour]


def trained_prompts() -> list[PromptScene]:
    """Every trained colour with every shape once; backgrounds rotate so each appears evenly."""
    kind, value = HELD_OUT
    colours = [c for c in COLOURS if not (kind == "colour" and c == value)]
    out = []
    for i, colour in enumerate(colours):
        for j, shape in enumerate(SHAPES):
            backgrounds = _visible_backgrounds(colour)
            out.append(PromptScene(colour, shape, backgrounds[(i + j) % len(backgrounds)]))
    return out


def held_out_prompts() -> list[PromptScene]:
    """The held-out colour with every shape on every background."""
    kind, value = HELD_OUT
    if kind != "colour":  # pragma: no cover - the scenes module holds out a colour
        raise ValueError(f"held-out {kind} is not a colour")
    return [PromptScene(value, shape, background) for shape in SHAPES
            for background in _visible_backgrounds(value)]


def sample_settings(*, steps: int, guidance_scale: float, seed: int = 0,
                    images_per_prompt: int = 1, shift: float | None = None) -> Any:
    """A validated [sample] section for `generate` (batch 1: images independent of batching)."""
    from ..config import build_config

    values: dict[str, Any] = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed,
                              "num_images_per_prompt": images_per_prompt}
    if shift is not None:
        values["shift"] = shift
    return build_config({"sample": values}).sample


def concept_scores(family: Any, denoiser: torch.nn.Module, vae: Any, text_encoder: Any,
                   prompts: Sequence[PromptScene], settings: Any, *, width: int = 64,
                   height: int = 64) -> dict[str, Any]:
    """Generate `settings.num_images_per_prompt` images per prompt and score them.

    Returns `concepts.score`'s fractions ("n", "colour", "shape", "both") plus "images" (the
    PIL images, prompt-major) so callers can save or show them.
    """
    from ..sampling import generate

    images = generate(family, denoiser, vae, [p.caption for p in prompts], settings,
                      width=width, height=height, text_encoder=text_encoder, show_progress=False)
    per_prompt = settings.num_images_per_prompt
    expected = [prompts[i // per_prompt].expected() for i in range(len(images))]
    return {**score(images, expected), "images": images}
