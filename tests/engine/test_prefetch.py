"""The prefetch thread hands the loop exactly what it would have prepared itself, in order,
and a failure while preparing surfaces in the loop, naming the same error."""

from __future__ import annotations

import threading

import pytest
import torch

from ditctl.engine.objective import NoisedBatch
from ditctl.engine.prefetch import MicroJob, Peekable, Prefetcher
from ditctl.models.base import Conditioning


def _job(step, micro=0):
    return MicroJob(step, 0, step - 1, micro, (step,), (step,))


def _prepare(job, threads=None):
    if threads is not None:
        threads.append(threading.current_thread().name)
    if job.step == 99:
        raise ValueError("bad image in row 99")
    g = torch.Generator().manual_seed(job.seeds[0])
    x = torch.randn(1, 4, 2, 2, generator=g)
    return NoisedBatch(x, torch.rand(1, generator=g), Conditioning(torch.randn(1, 3, 5, generator=g)), -x)


def test_prefetched_batches_equal_the_ones_prepared_in_place():
    threads = []
    with Prefetcher(lambda j: _prepare(j, threads), pin_memory=False) as prefetcher:
        prefetcher.start(_job(1))
        first = prefetcher.take(_job(1))
        second = prefetcher.take(_job(2))  # never started: prepared now, in this thread
        prefetcher.start(_job(4))
        third = prefetcher.take(_job(3))  # another job was started: it is discarded
    for job, got in ((1, first), (2, second), (3, third)):
        expected = _prepare(_job(job))
        assert torch.equal(got.noisy, expected.noisy) and torch.equal(got.t, expected.t)
        assert torch.equal(got.cond.sequence, expected.cond.sequence)
    assert threads[0].startswith("ditctl-data") and threads[1] == "MainThread"


def test_a_failure_while_prefetching_reaches_the_loop():
    with Prefetcher(_prepare, pin_memory=False) as prefetcher:
        prefetcher.start(_job(99))
        with pytest.raises(ValueError, match="row 99"):
            prefetcher.take(_job(99))


def test_peekable_shows_the_next_item_without_consuming_it():
    items = Peekable(iter([1, 2, 3]))
    assert items.peek() == 1 and items.peek() == 1
    assert next(items) == 1 and next(items) == 2 and items.peek() == 3 and list(items) == [3]
