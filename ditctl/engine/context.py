"""What the training loop is handed: the data plan, the model, the run, and the hooks.

`ditctl.train` builds a `TrainingContext` (preparing data, run folder, model and the hooks that
sample and evaluate during training) and passes it to `engine.loop.train_loop`. The hooks are
plain callables, so the engine knows nothing of the sampler or the evaluator behind them.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
import torch

from ..config import Config
from ..data.batches import (Batch, BatchInputs, SampleSource, encode_inputs, epoch_batches,
                             flip_for, read_inputs)
from ..data.datasets import Dataset, epoch_slots, of_row, training_caption
from ..data.manifest import ManifestRow
from ..data.sample_table import bucket_keys, masked_count, row_datasets
from ..models.base import ModelFamily
from .run import Run
from .setup import Schedule

if TYPE_CHECKING:
    from accelerate import Accelerator
    from PIL import Image


class SampleHook(Protocol):
    """Samples of the live denoiser at `step`; returns the grid image to log (or None)."""

    def __call__(self, denoiser: torch.nn.Module, step: int) -> "Image.Image | None": ...


class EvalHook(Protocol):
    """Validation metrics of the live denoiser at `step` ({"val_loss": ..., ...}, or None);
    `weights`: "raw" (as trained) or "ema" (the run's EMA, swapped in by the loop)."""

    def __call__(self, denoiser: torch.nn.Module, step: int,
                 weights: str = "raw") -> dict[str, float] | None: ...


@dataclass
class TrainingData:
    """The training set as the loop sees it: one planned batch per optimiser step, and loading.

    Each epoch's bucketed, shuffled batches have `step_batch` samples. The last batch of a
    bucket is filled up with other images of the same bucket (shuffled, cycling when the bucket
    is small), so every image is seen at least once per epoch, nothing is dropped, and every
    step trains on a full batch: accumulation and multi-process training then equal one big
    batch exactly.

    `datasets` (ditctl.data.datasets; empty: one dataset with [data]'s settings) give each
    row's repeats and sampling weight (the epoch's slots), flips, caption tools, caption
    dropout and loss weight.

    `rows`: a list, or (what training uses) a `SampleTable`, which holds only each row's
    bucket and dataset and reads a row from the manifest when it is loaded.
    """

    rows: Sequence[ManifestRow]
    source: SampleSource | None  # CachedSource or OnTheFlySource; set once the run exists
    seed: int
    step_batch: int
    random_flip: bool
    datasets: tuple[Dataset, ...] = ()

    def dataset(self, index: int) -> Dataset | None:
        return of_row(self.datasets, self._dataset_of[index]) if self.datasets else None

    @functools.cached_property
    def _dataset_of(self) -> "np.ndarray":
        return row_datasets(self.rows)

    @functools.cached_property
    def _bucket_keys(self) -> "np.ndarray":
        return bucket_keys(self.rows)

    # the epoch the loop trains and the next one (the data loader reads ahead into it); an
    # older plan is made again if asked for (the same plan: it depends on seed and epoch only)
    # - each holds an index per sample, ~60 MB at a million
    @functools.lru_cache(maxsize=2)
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        slots = epoch_slots(self._dataset_of.tolist(), self.datasets, self.seed,
                            epoch) if len(self.datasets) > 1 or any(
            d.repeats > 1 for d in self.datasets) else None
        batches = epoch_batches(self.rows, self.step_batch, self.seed, epoch, slots)
        rng = random.Random(f"{self.seed}:{epoch}:fill")
        return [batch if len(batch) == self.step_batch else self._fill(batch, rng)
                for batch in batches]

    def _fill(self, batch: list[int], rng: random.Random) -> list[int]:
        keys = self._bucket_keys
        others = [i for i in np.flatnonzero(keys == keys[batch[0]]).tolist() if i not in batch]
        rng.shuffle(others)
        pool = others + list(batch)
        return batch + [pool[k % len(pool)] for k in range(self.step_batch - len(batch))]

    @functools.cached_property
    def masked(self) -> bool:
        """Whether any row has a loss mask ([data] use_masks): then every batch carries masks."""
        return masked_count(self.rows) > 0

    def read(self, indices: list[int], epoch: int) -> BatchInputs:
        """The rows' inputs as the source's model-free reader gives them (decoded pixels or
        cached entries): what a data-loading worker computes (engine/loader.py)."""
        flips = [flip_for(self.seed, epoch, i, self._flips(i)) for i in indices]
        captions = None
        if any(d.shuffle_tags for d in self.datasets):
            captions = [training_caption(self.rows[i].source_caption, self.dataset(i), self.seed,
                                         epoch, i) for i in indices]
        return read_inputs(self.source.reader, self.rows, indices, flips, masks=self.masked,
                           captions=captions)

    def encode(self, inputs: BatchInputs) -> Batch:
        """The batch of `read`'s inputs (encoded on the fly where they are not cached)."""
        return encode_inputs(self.source, inputs)

    def load(self, indices: list[int], epoch: int) -> Batch:
        return self.encode(self.read(indices, epoch))

    def _flips(self, index: int) -> bool:
        dataset = self.dataset(index)
        return self.random_flip if dataset is None else dataset.random_flip

    def caption_dropouts(self, indices: list[int], default: float) -> list[float]:
        """Each sample's caption dropout (its dataset's, else `default`: [train]'s)."""
        return [default if (d := self.dataset(i)) is None else d.caption_dropout
                for i in indices]

    def loss_weights(self, indices: list[int]) -> list[float] | None:
        """Each sample's loss weight (its dataset's), or None when every dataset weighs 1."""
        if all(d.loss_weight == 1.0 for d in self.datasets):
            return None
        return [self.dataset(i).loss_weight for i in indices]

    __hash__ = object.__hash__


@dataclass
class TrainingContext:
    """Everything one training run needs, prepared by `ditctl.train.run_training`."""

    accelerator: "Accelerator"
    family: ModelFamily
    config: Config
    data: TrainingData
    schedule: Schedule
    seed: int
    run: Run
    denoiser: torch.nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    sampler: SampleHook | None = None
    evaluator: EvalHook | None = None

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"base_identity": self.info["base_identity"], "config_hash": self.config.hash(),
                "manifest_fingerprint": self.info["manifest_fingerprint"], "seed": self.seed,
                "lora": self.config.lora.use_lora, "run": self.run.name,
                "base_precision": self.info.get("base_precision", "fp32")}
