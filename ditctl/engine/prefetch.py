"""The next micro-batch is prepared while the current one trains.

What the loop needs for a micro-batch — its rows' latents and text states (read from the cache
or encoded on the fly), repeated `batch_multiplicity` times and noised with each sample's own
counter-based generator — depends only on where it is in the run (epoch, batch, micro-batch,
process), never on the model or the global RNGs. So one background thread can prepare micro-
batch n+1 while the accelerator computes micro-batch n, and the result is the same tensors the
loop would have built itself: exact resume and cached = on-the-fly hold unchanged. On CUDA the
prepared tensors are pinned, so their copies to the GPU are asynchronous.

The reading itself (cache entries, or decoding and transforming images) runs further ahead in
data-loading worker processes (engine/loader.py); this thread does the rest, which needs the
training process: encoding on the fly with the loaded encoders (never loaded again per
worker), repeating and noising — torch ops that release the GIL, on tensors the loop then uses
without a copy.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, TypeVar

import torch

from .objective import NoisedBatch

T = TypeVar("T")


@dataclass(frozen=True)
class MicroJob:
    """Where a micro-batch sits in the run; everything needed to prepare it."""

    step: int
    epoch: int
    batch_index: int
    micro: int
    rows: tuple[int, ...]      # manifest row indices this process loads
    seeds: tuple[int, ...]     # one generator seed per (row, repetition)

    @property
    def key(self) -> Hashable:
        return (self.step, self.micro)


class Peekable(Iterator[T]):
    """An iterator that can show its next item without consuming it."""

    _EMPTY = object()

    def __init__(self, items: Iterator[T]):
        self._items = items
        self._next: object = self._EMPTY

    def __next__(self) -> T:
        if self._next is not self._EMPTY:
            item, self._next = self._next, self._EMPTY
            return item  # type: ignore[return-value]
        return next(self._items)

    def peek(self) -> T:
        if self._next is self._EMPTY:
            self._next = next(self._items)
        return self._next  # type: ignore[return-value]


def pin(batch: NoisedBatch) -> NoisedBatch:
    """The batch in pinned host memory (asynchronous copies to a CUDA device)."""
    return batch.map(lambda t: t.pin_memory())


class Prefetcher:
    """Prepares one micro-batch ahead in a background thread (see the module doc)."""

    def __init__(self, prepare: Callable[[MicroJob], NoisedBatch], pin_memory: bool):
        self._prepare = prepare
        self._pin = pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ditctl-data")
        self._pending: tuple[Hashable, Future] | None = None

    def _job(self, job: MicroJob) -> NoisedBatch:
        batch = self._prepare(job)
        return pin(batch) if self._pin else batch

    def start(self, job: MicroJob) -> None:
        """Begin preparing `job` in the background (if it is not already)."""
        if self._pending is None or self._pending[0] != job.key:
            self._discard()
            self._pending = (job.key, self._pool.submit(self._job, job))

    def take(self, job: MicroJob) -> NoisedBatch:
        """`job`'s batch: the prefetched one, or prepared now if it was not started."""
        if self._pending is not None and self._pending[0] == job.key:
            future, self._pending = self._pending[1], None
            return future.result()  # re-raises what preparing raised (bad entry, bad image)
        self._discard()
        return self._job(job)

    def _discard(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None

    def close(self) -> None:
        self._discard()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_device(batch: NoisedBatch, device: torch.device) -> NoisedBatch:
    """The batch on `device` (non-blocking: pinned sources copy asynchronously)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return batch.map(move)
