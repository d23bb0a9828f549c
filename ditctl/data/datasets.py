"""The datasets of a run: what each one is, how its captions read, how often its images train.

A run trains on one or more datasets. `[data] train_data_path` is the first (named "train",
every [data] setting); each `[[data.datasets]]` table adds one, its unset keys taking the [data]
value (`config.DATASET_INHERITED`). Manifest rows carry their dataset's index.

Captions (`dataset_caption`, `training_caption`), in this order:
  1. shuffle_tags: the comma-separated tags are shuffled, the first keep_tokens staying in place
     (kohya sd-scripts' shuffle_caption / keep_tokens), a fresh order per (seed, epoch, image);
  2. trigger_word: put in front as the first tag ("ohwx, red car, sunset");
  3. caption_template: "{caption}" replaced by the result ("a photo of ohwx, red car").
Steps 2 and 3 are fixed per caption: the text cache keys hold the final text, so the cache
stays exact. Step 1 changes per step: those captions are encoded while training.

Epochs (`epoch_slots`): without weights, dataset d contributes repeats_d x images_d samples
(each image exactly repeats_d times). With weights (any table sets one; unset counts 1), the
epoch keeps that length, N = sum of repeats_d x images_d, and dataset d fills round(N x w_d /
sum w) of it (largest remainders, ties to the earlier dataset): its images in shuffled rounds,
so none appears more than once more than another. Only (seed, epoch) drive the choice, so it
is the same for any number of processes, accumulation steps and after a resume. The copies of
an image within one epoch share its flip and its shuffled caption (both drawn per epoch and
image); each copy gets its own noise and timestep (per position in the batch).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import DATASET_INHERITED, Config, DatasetConfig

TAG_SEPARATOR = ","


@dataclass(frozen=True)
class Dataset:
    """One dataset with every setting resolved ([data] defaults filled in)."""

    index: int
    name: str
    path: str
    base_image_dir: str | None
    image_column: str
    caption_column: str
    role: str
    loss_weight: float
    repeats: int
    weight: float | None
    caption_dropout: float
    resolution: int | None
    center_crop: bool
    random_flip: bool
    use_resolution_buckets: bool
    max_upscale: float
    trigger_word: str | None
    caption_template: str | None
    shuffle_tags: bool
    keep_tokens: int


def resolve_datasets(config: Config) -> tuple[Dataset, ...]:
    """The run's datasets in order: [data] train_data_path (when set), then the tables."""
    data = config.data
    tables: list[DatasetConfig] = []
    if data.train_data_path:
        tables.append(DatasetConfig(path=data.train_data_path, name="train"))
    tables += data.datasets
    out = []
    for index, table in enumerate(tables):
        inherited = {key: getattr(table, key) if getattr(table, key) is not None
                     else getattr(data, key) for key in DATASET_INHERITED}
        name = table.name or Path(table.path).stem or table.path
        dropout = (table.caption_dropout if table.caption_dropout is not None
                   else config.train.caption_dropout)
        out.append(Dataset(index=index, name=name, path=table.path, role=table.role,
                           loss_weight=table.loss_weight, repeats=table.repeats,
                           weight=table.weight, caption_dropout=dropout, **inherited))
    return tuple(out)


def uses_weights(datasets: Sequence[Dataset]) -> bool:
    return any(d.weight is not None for d in datasets)


# --- captions ---------------------------------------------------------------------------------

def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(TAG_SEPARATOR) if tag.strip()]


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """The tags after the first `keep_tokens` in a random order, joined by ", "."""
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


def _decorate(caption: str, dataset: Dataset) -> str:
    """Steps 2 and 3: the trigger word in front, then the template."""
    if dataset.trigger_word:
        caption = f"{dataset.trigger_word}, {caption}" if caption else dataset.trigger_word
    if dataset.caption_template:
        caption = dataset.caption_template.replace("{caption}", caption)
    return caption


def dataset_caption(raw: str, dataset: Dataset) -> str:
    """The caption as ingest records it (no shuffle): what evaluation and the cache use."""
    return _decorate(raw, dataset)


def training_caption(raw: str, dataset: Dataset, seed: int, epoch: int, index: int) -> str:
    """The caption row `index` trains with in `epoch` (shuffled tags when the dataset asks)."""
    if dataset.shuffle_tags:
        raw = shuffle_tags(raw, dataset.keep_tokens,
                           random.Random(f"{seed}:{epoch}:{index}:tags"))
    return _decorate(raw, dataset)


# --- epochs -----------------------------------------------------------------------------------

def planned_counts(datasets: Sequence[Dataset], images: Sequence[int]) -> list[int]:
    """Samples per epoch from each dataset (`images[d]`: its training images)."""
    base = [d.repeats * n for d, n in zip(datasets, images)]
    if not uses_weights(datasets):
        return base
    active = [(d.weight if d.weight is not None else 1.0) if n else 0.0
              for d, n in zip(datasets, images)]
    total, weight_sum = sum(base), sum(active)
    exact = [total * w / weight_sum for w in active]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def epoch_slots(dataset_of_row: Sequence[int], datasets: Sequence[Dataset], seed: int,
                epoch: int) -> list[int] | None:
    """The row indices one epoch trains on (a row may repeat), or None when that is every row
    once (one dataset, no repeats: the plan of a single-dataset run is unchanged)."""
    members: list[list[int]] = [[] for _ in datasets]
    for row, d in enumerate(dataset_of_row):
        members[d].append(row)
    counts = planned_counts(datasets, [len(m) for m in members])
    if counts == [len(m) for m in members]:
        return None
    slots: list[int] = []
    for d, (rows, count) in enumerate(zip(members, counts)):
        if not uses_weights(datasets):
            slots += rows * datasets[d].repeats
            continue
        rng = random.Random(f"{seed}:{epoch}:dataset:{d}")
        taken: list[int] = []
        while len(taken) < count:  # shuffled rounds over the dataset's images
            round_ = list(rows)
            rng.shuffle(round_)
            taken += round_[:count - len(taken)]
        slots += taken
    return slots


# --- per-dataset settings of a manifest row ---------------------------------------------------

def per_dataset(config: Config, key: str) -> tuple:
    """A setting of every dataset, by dataset index (one value, [data]'s, without datasets)."""
    values = tuple(getattr(d, key) for d in resolve_datasets(config))
    return values or (getattr(config.data, key),)


def of_row(values: Sequence, dataset: int):
    """The value of a row's dataset (rows of a manifest with other datasets: the first's)."""
    return values[dataset] if dataset < len(values) else values[0]


def dataset_plan(datasets: Sequence[Dataset], rows: Sequence, step_batch: int) -> list[dict]:
    """What `train --dry-run` shows per dataset: its role, images, repeats, weight, images per
    epoch, loss weight, caption dropout and caption tools, and what shuffling costs: the text
    encoder runs for each sample whose caption has tags to shuffle (more than keep_tokens + 1;
    the others read the cache). `rows`: the training ManifestRows."""
    images = [0] * len(datasets)
    shuffled = [0] * len(datasets)
    for row in rows:
        images[row.dataset] += 1
        dataset = datasets[row.dataset]
        if dataset.shuffle_tags and len(split_tags(row.source_caption)) > dataset.keep_tokens + 1:
            shuffled[row.dataset] += 1
    counts = planned_counts(datasets, images)
    out = []
    for d, n, per_epoch, moving in zip(datasets, images, counts, shuffled):
        tools = [text for text, on in ((f"trigger {d.trigger_word!r}", d.trigger_word),
                                       (f"template {d.caption_template!r}", d.caption_template),
                                       (f"shuffle tags (keep {d.keep_tokens})", d.shuffle_tags))
                 if on]
        out.append({"name": d.name, "role": d.role, "images": n, "repeats": d.repeats,
                    "weight": d.weight, "images_per_epoch": per_epoch,
                    "loss_weight": d.loss_weight, "caption_dropout": d.caption_dropout,
                    "caption_tools": tools,
                    # a shuffled caption is new text: the text encoder runs for each sample
                    "captions_encoded_per_step": (
                        round(step_batch * per_epoch * moving / n / sum(counts), 2)
                        if moving and sum(counts) else 0)})
    return out
