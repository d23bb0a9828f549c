"""Micro-batch inputs read ahead by DataLoader worker processes, in the run's planned order.

The CPU-heavy half of preparing a micro-batch — reading cache entries, or decoding, resizing,
cropping and flipping images and loss masks on the fly — needs no model (`SampleReader`,
data/batches.py). It runs here in `[data] num_workers` worker processes of a
`torch.utils.data.DataLoader`: a map-style dataset indexed by the run's `MicroJob`s, with a
sampler that yields exactly the jobs the loop will train, in order, from the resume position to
the last step. Encoding (VAE, text encoder, on the fly), repetition and noising stay in the
training process (the prefetch thread, engine/prefetch.py), so workers never load or touch a
model.

Exactness: what a worker returns depends only on the job (its rows, epoch and flips, decided
by fixed seeds) and is the same tensor the training process would have read itself; the noise
is drawn later, from each sample's own counter-based generator. So any number of workers — 0
reads in the calling thread — gives the same bits, and a resume restarts the sampler at the
checkpoint's position with nothing else to restore.

Workers are forked (they inherit the rows and the source's model-free reader instead of
pickling them; `fork`, also where Python's default is another start method) and, first thing,
die with the training process, close its workspace lock, ignore Ctrl-C and SIGTERM (the
training process decides when to stop, and shuts them down), and use one torch thread. A
worker's `DitctlError` (a changed image, a corrupt cache entry) comes back as a value and is
raised again in the training process with its one-line message and hint. The loader's single
pass spans the whole run, so its workers live as long as the run (persistent) without
`persistent_workers`.

DataLoader's own pinning is off: a worker's tensors are intermediate (they are encoded,
repeated and noised next); the batch that is copied to the accelerator is pinned by the
prefetcher.
"""

from __future__ import annotations

import signal
from typing import Callable, Iterator

import torch

from ..errors import DitctlError
from ..procutil import worker_started
from .context import TrainingData
from .prefetch import MicroJob

PREFETCH_FACTOR = 2  # micro-batches each worker keeps ready (DataLoader's prefetch_factor)


class PlannedJobs(torch.utils.data.Sampler):
    """The run's micro-batch jobs in training order, up to and including `last_step`."""

    def __init__(self, jobs: Callable[[], Iterator[MicroJob]], last_step: int):
        self._jobs = jobs
        self._last_step = last_step

    def __iter__(self) -> Iterator[MicroJob]:
        for job in self._jobs():
            if job.step > self._last_step:
                return
            yield job


class MicroBatchReads(torch.utils.data.Dataset):
    """dataset[job]: (job.key, the micro-batch's `BatchInputs`, None), or (job.key, None,
    (error type, message, hint)) when reading failed with a user-facing error."""

    def __init__(self, data: TrainingData):
        self.data = data

    def __getitem__(self, job: MicroJob):
        try:
            return job.key, self.data.read(list(job.rows), job.epoch), None
        except DitctlError as exc:  # exceptions cross as tracebacks: send the parts instead
            return job.key, None, (type(exc), exc.message, exc.hint)


# The training process stops the workers, not the terminal's Ctrl-C (it reaches the whole
# process group) nor a SIGTERM (the loop checkpoints first): forked with these signals blocked,
# they ignore them before unblocking, so none lands in between.
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_init(worker_id: int) -> None:
    worker_started()  # die with the training process, without its workspace lock
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    torch.set_num_threads(1)  # the workers are the parallelism; no oversubscribed intra-op pool


def _as_is(item):
    return item


class InputLoader:
    """Hands the loop each planned micro-batch's inputs, read ahead by worker processes (see
    the module doc). `read` must be called for the jobs in planned order."""

    def __init__(self, data: TrainingData, jobs: Callable[[], Iterator[MicroJob]],
                 last_step: int, num_workers: int):
        self.num_workers = num_workers
        self._loader = torch.utils.data.DataLoader(
            MicroBatchReads(data), batch_size=None, sampler=PlannedJobs(jobs, last_step),
            num_workers=num_workers, collate_fn=_as_is, worker_init_fn=_worker_init,
            prefetch_factor=PREFETCH_FACTOR if num_workers else None,
            multiprocessing_context="fork" if num_workers else None)
        self._items: Iterator | None = None

    def start(self) -> None:
        """Start the workers (they begin reading ahead); `read` does it if not done yet."""
        if self._items is None:
            # blocked in this thread while it forks: pending here until unblocked, never
            # delivered to a worker that has not set its handlers yet
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                self._items = iter(self._loader)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def read(self, job: MicroJob):
        """`job`'s `BatchInputs`; raises the reading's error (naming the file) as it was."""
        self.start()
        try:
            key, inputs, failure = next(self._items)  # type: ignore[arg-type]
        except StopIteration:
            raise RuntimeError(f"the data loader's plan ended before step {job.step}") from None
        if key != job.key:  # the loop and the sampler walk the same plan: a bug otherwise
            raise RuntimeError(f"the data loader read micro-batch {key}, the loop wants {job.key}")
        if failure is not None:
            kind, message, hint = failure
            raise kind(message, hint=hint)
        return inputs

    def close(self) -> None:
        """Stop the workers now (also when an error or a stop unwinds the loop)."""
        items, self._items = self._items, None
        shutdown = getattr(items, "_shutdown_workers", None)
        if shutdown is not None:  # multi-process iterators; dropping the last reference does it
            shutdown()            # too, but not while a traceback still holds the iterator

    def __enter__(self) -> "InputLoader":
        # from the thread that lives as long as the run: a worker's parent-death signal
        # (procutil.die_with_parent) fires when the thread that forked it ends
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
