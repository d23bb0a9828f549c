"""Procedurally generated simple scenes: one coloured shape on a plain background.

These are the training data of the tiny demo base model and of `ditctl init --example`. The
base model sees every colour except the held-out one (`HELD_OUT`); the example fine-tuning
dataset holds only that colour, so a short LoRA run has something visible to teach, and
`ditctl.demo.concepts` can tell from the pixels whether it was learnt.
"""

from __future__ import annotations

import csv
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw

from ..errors import DataError
from ..fsutil import atomic_write_bytes, atomic_write_text

# Foreground colours, chosen far apart in RGB: the closest pair (orange/yellow) is ~80 apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 40, 190),
    "orange": (250, 130, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")

# The concept the base model never sees. A colour rather than a shape: a colour is one RGB
# value over the whole shape, which a short LoRA run can teach a tiny model, and which the pixel
# classifier reads without ambiguity. Green in particular is a corner of the colour set: no mix
# of the other colours comes within the classifier's reach of it (the closest is >= 100 away),
# so a base model that blends known colours for an unknown word still draws no green. (Purple,
# the obvious first choice, is a red-blue mix, and the base model drew it without being taught.)
HELD_OUT = ("colour", "green")

# Side of the shape's bounding square as a fraction of the short side, and how far the centre
# strays from the middle (a fraction of width / height). Large shapes near the middle: at 64 px
# a shape spans 4-6 latent pixels, enough for a tiny model to draw it crisply, and the spread
# still varies size and position.
SIZE_RANGE = (0.5, 0.75)
CENTRE_SPREAD = 0.12
ASPECT_SIZES = ((64, 64), (80, 48), (48, 80))
# Draw at 4x and average each 4x4 block (BOX): every pixel gets its exact coverage. LANCZOS
# would be a little sharper but rings up to 3 px outside the shape and overshoots.
SUPERSAMPLE = 4
MARGIN_PX = 1  # shapes keep at least this far from the canvas edge


@dataclass(frozen=True)
class Scene:
    """One image: `cx`, `cy` (centre) are fractions of width/height, `size` of the short side."""

    shape: str
    colour: str
    background: str
    cx: float = 0.5
    cy: float = 0.5
    size: float = 0.5
    width: int = 64
    height: int = 64

    def __post_init__(self) -> None:
        for kind, value, known in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                   ("background", self.background, BACKGROUNDS)):
            if value not in known:
                raise DataError(f"unknown scene {kind} {value!r}",
                                hint=f"use one of: {', '.join(known)}")
        if self.colour == self.background:
            raise DataError(f"a {self.colour} shape on a {self.background} background is invisible",
                            hint="pick a colour that differs from the background")
        if self.width % 16 or self.height % 16 or self.width <= 0 or self.height <= 0:
            raise DataError(f"scene size {self.width}x{self.height} is not a multiple of 16",
                            hint="use sizes such as 64x64, 80x48 or 48x80")
        reach = self.half_side_px + MARGIN_PX - 1e-6  # slack for float rounding
        if not (reach <= self.cx * self.width <= self.width - reach
                and reach <= self.cy * self.height <= self.height - reach):
            raise DataError(f"the {self.shape} at ({self.cx}, {self.cy}) with size {self.size} "
                            f"sticks out of the {self.width}x{self.height} canvas",
                            hint="move it towards the centre or make it smaller")

    @property
    def half_side_px(self) -> float:
        return self.size * min(self.width, self.height) / 2

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def _fit(points: Sequence[tuple[float, float]], cx: float, cy: float, half: float) -> list:
    """Scale and centre a polygon so that its bounding box fits the square of side 2*half."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    scale = 2 * half / max(max(xs) - min(xs), max(ys) - min(ys))
    mx, my = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return [(cx + (x - mx) * scale, cy + (y - my) * scale) for x, y in points]


def _star(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    # A fat star (inner radius half the outer) stays a star after blur at 64 px.
    return [((1.0 if i % 2 == 0 else inner) * math.sin(i * math.pi / points),
             -(1.0 if i % 2 == 0 else inner) * math.cos(i * math.pi / points))
            for i in range(2 * points)]


_POLYGONS = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],  # point up, fills half its bounding box
    "star": _star(),
    "cross": [(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 2), (0, 2),
              (0, 1), (1, 1)],  # a plus sign with arms a third of its width
}


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as an RGB image of `scene.width` x `scene.height` pixels."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (scene.width * s, scene.height * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy, half = scene.cx * scene.width * s, scene.cy * scene.height * s, scene.half_side_px * s
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        draw.polygon(_fit(_POLYGONS[scene.shape], cx, cy, half), fill=fill)
    return image.resize((scene.width, scene.height), Image.Resampling.BOX)


def random_scenes(n: int, seed: int, *, sizes: Iterable[tuple[int, int]] = ((64, 64),),
                  colours: Iterable[str] | None = None, shapes: Iterable[str] | None = None,
                  backgrounds: Iterable[str] | None = None) -> list[Scene]:
    """`n` scenes drawn uniformly from the given choices; the same seed gives the same list."""
    sizes, shapes = list(sizes), list(shapes or SHAPES)
    colours, backgrounds = list(colours or COLOURS), list(backgrounds or BACKGROUNDS)
    if not sizes or not any(c != b for c in colours for b in backgrounds):
        raise DataError("no visible scene can be drawn from these choices",
                        hint="give at least one size and a colour that differs from a background")
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < n:
        width, height = rng.choice(sizes)
        colour = rng.choice(colours)
        choices = [b for b in backgrounds if b != colour]
        if not choices:  # this colour has no background it shows on: draw another
            continue
        size = rng.uniform(*SIZE_RANGE)
        half = size * min(width, height) / 2 + MARGIN_PX
        scenes.append(Scene(
            shape=rng.choice(shapes), colour=colour, background=rng.choice(choices),
            cx=_centre(rng, half / width), cy=_centre(rng, half / height),
            size=size, width=width, height=height))
    return scenes


def _centre(rng: random.Random, reach: float) -> float:
    """A centre coordinate near the middle that keeps a shape of half-extent `reach` inside."""
    low, high = max(reach, 0.5 - CENTRE_SPREAD), min(1 - reach, 0.5 + CENTRE_SPREAD)
    return rng.uniform(low, high) if low < high else 0.5


def _held_out_split(held_out: bool) -> dict[str, list[str]]:
    kind, value = HELD_OUT
    table = {"colour": list(COLOURS), "shape": list(SHAPES), "background": list(BACKGROUNDS)}
    table[kind] = [value] if held_out else [v for v in table[kind] if v != value]
    return {f"{k}s": v for k, v in table.items()}


def base_training_scenes(n: int, seed: int, *, sizes=ASPECT_SIZES) -> list[Scene]:
    """Scenes for the base model: every concept except the held-out one."""
    return random_scenes(n, seed, sizes=sizes, **_held_out_split(False))


def held_out_scenes(n: int, seed: int, *, sizes=ASPECT_SIZES) -> list[Scene]:
    """Scenes that all show the held-out concept (the fine-tuning data)."""
    return random_scenes(n, seed, sizes=sizes, **_held_out_split(True))


def write_dataset(folder: Path, scenes: Sequence[Scene], *, csv_name: str = "train.csv",
                  subfolders: bool = True, image_dir: str = "images") -> Path:
    """Write the scenes as PNGs plus a CSV (image_path,caption; paths relative to `folder`).

    Images go to `folder/image_dir/<shape>/` (or straight into `image_dir` without
    `subfolders`), named after the CSV so that train and val sets can share a folder. Every
    image is written atomically before the CSV, so a CSV never names a missing image.
    """
    folder = Path(folder)
    stem = Path(csv_name).stem
    rows = []
    for index, scene in enumerate(scenes):
        relative = Path(image_dir, scene.shape if subfolders else "", f"{stem}-{index:05d}.png")
        buffer = io.BytesIO()
        render(scene).save(buffer, format="PNG")
        atomic_write_bytes(folder / relative, buffer.getvalue())
        rows.append((relative.as_posix(), scene.caption))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("image_path", "caption"))
    writer.writerows(rows)
    csv_path = folder / csv_name
    atomic_write_text(csv_path, text.getvalue())
    return csv_path


def write_example_dataset(folder: Path, *, seed: int = 0, n_train: int = 48, n_val: int = 8,
                          n_prior: int = 96) -> dict:
    """The `ditctl init --example` data: train.csv, prior.csv and val.csv.

    train.csv holds `n_train` scenes of the held-out concept; prior.csv `n_prior` scenes of
    concepts the base model knows, trained as a second dataset with role = "regularization"
    (prior preservation, as in DreamBooth): trained on the new concept alone, a LoRA learns
    "everything is green" and the base model's other colours are lost. Validation holds only
    new held-out scenes (another seed, `seed + 1`).
    """
    folder = Path(folder)
    train = write_dataset(folder, held_out_scenes(n_train, seed), csv_name="train.csv")
    prior = write_dataset(folder, base_training_scenes(n_prior, seed + 2), csv_name="prior.csv")
    val = write_dataset(folder, held_out_scenes(n_val, seed + 1), csv_name="val.csv")
    return {"train_csv": train, "prior_csv": prior, "val_csv": val,
            "image_dir": folder / "images", "n_train": n_train, "n_prior": n_prior,
            "n_val": n_val, "concept": HELD_OUT[1], "train_rows": n_train + n_prior}


def example_prompts() -> list[str]:
    """Sample prompts: the held-out colour (what the LoRA should learn) and trained colours."""
    held = HELD_OUT[1]
    return [
        f"a {held} circle on a white background",
        f"a {held} star on a black background",
        f"a {held} square on a gray background",
        f"a {held} triangle on a white background",
        "a red circle on a white background",
        "a blue square on a black background",
        "a yellow star on a gray background",
        "a purple triangle on a white background",
    ]
