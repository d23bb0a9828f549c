"""SampleTable: training's view of a manifest split, row for row what `read_manifest` gives,
with only ids, buckets and datasets held in memory."""

from __future__ import annotations

import multiprocessing
import pickle
import tracemalloc
from pathlib import Path

import pytest

from ditctl.data import batches
from ditctl.data.manifest import ManifestRow, MaskRef, read_manifest, write_manifest
from ditctl.data.sample_table import (SampleTable, bucket_keys, masked_count, row_datasets,
                                      select)
from ditctl.evaluation.inputs import split_holdout
from ditctl.workspace import Workspace

BUCKETS = [(32, 32), (48, 32), (32, 48), (64, 16)]


def sample(n: int, split: str, root: Path) -> ManifestRow:
    w, h = BUCKETS[(n * 7) % len(BUCKETS)]
    member = f"{n:05d}.jpg" if n % 3 else ""
    return ManifestRow(
        split=split, source=f"row {n}", path=root / (f"shard-{n // 10}.tar" if member
                                                     else f"img-{n}.png"),
        caption=f"caption {n}" if n % 11 else "", sha256=f"{n:064x}", size_bytes=100 + n,
        mtime_ns=n, width=w + 1, height=h + 2, format="JPEG" if member else "PNG",
        bucket_w=w, bucket_h=h, member=member, offset=512 * n if member else -1,
        mask=MaskRef("alpha" if n % 2 else "file", root / f"m-{n}.png", f"{n:064x}", 5, 6)
        if n % 5 == 0 else None,
        dataset=n % 3, raw_caption=f"raw {n}" if n % 4 == 0 else None)


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    ws = Workspace(tmp_path)
    rows = [sample(n, "train", tmp_path) for n in range(2500)]
    rows += [sample(n, "val", tmp_path) for n in range(2500, 2540)]
    write_manifest(ws.manifest_db, rows, [], {})
    return ws


def test_a_table_reads_back_the_rows_read_manifest_gives(workspace):
    for split in ("train", "val"):
        table = SampleTable.read(workspace.manifest_db, split)
        rows = read_manifest(workspace, split)
        assert len(table) == len(rows) and list(table) == rows          # streamed in chunks
        assert [table[i] for i in (0, 1, len(rows) - 1, -1)] == [rows[i] for i in
                                                                 (0, 1, len(rows) - 1, -1)]
        assert bucket_keys(table).tolist() == bucket_keys(rows).tolist()
        assert row_datasets(table).tolist() == [r.dataset for r in rows]
        assert masked_count(table) == masked_count(rows) > 0
        assert [table.bucket(i) for i in range(5)] == [rows[i].bucket for i in range(5)]
    with pytest.raises(IndexError):
        table[len(table)]


def test_subsets_slices_and_holdout_keep_the_order_and_the_counts(workspace):
    table = SampleTable.read(workspace.manifest_db, "train")
    rows = read_manifest(workspace, "train")
    picked = [7, 3, 2400, 3, 0]
    assert list(select(table, picked)) == select(rows, picked) == [rows[i] for i in picked]
    assert list(table[10:20]) == rows[10:20]
    keep, held = split_holdout(table, 0.1)
    keep_rows, held_rows = split_holdout(rows, 0.1)
    assert list(keep) == keep_rows and list(held) == held_rows
    assert masked_count(held) == masked_count(held_rows)


def test_epoch_plans_are_the_same_from_a_table_and_from_a_list(workspace):
    table = SampleTable.read(workspace.manifest_db, "train")
    rows = read_manifest(workspace, "train")
    for epoch in range(3):
        assert batches.epoch_batches(table, 8, 5, epoch) == batches.epoch_batches(rows, 8, 5,
                                                                                  epoch)


def _read_in_child(table: SampleTable, index: int, queue) -> None:
    queue.put(table[index].source)


def test_a_forked_or_unpickled_table_opens_its_own_connection(workspace):
    table = SampleTable.read(workspace.manifest_db, "train")
    assert table[5].source == "row 5"  # the parent's connection is open before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(table, 1234, queue))
    child.start()
    child.join(30)
    assert child.exitcode == 0 and queue.get(timeout=5) == "row 1234"
    copy = pickle.loads(pickle.dumps(table))
    assert copy[17] == table[17] and len(copy) == len(table)


def retained_bytes(build) -> tuple[object, int]:
    """What `build()` returns, and the bytes still allocated for it after it returns."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        built = build()
        return built, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_a_table_holds_20_bytes_per_sample_where_the_rows_take_hundreds(workspace):
    SampleTable.read(workspace.manifest_db, "train")  # one-time costs (module caches) first
    table, table_bytes = retained_bytes(
        lambda: SampleTable.read(workspace.manifest_db, "train"))
    rows, rows_bytes = retained_bytes(lambda: read_manifest(workspace, "train"))
    assert table_bytes / len(table) < 60          # ids, bucket keys, datasets: 20 B + fixed
    assert rows_bytes / len(rows) > 300           # what training held before


def test_reading_every_row_keeps_nothing_per_row(workspace):
    """A run reads every row, epoch after epoch, in each loader process: the reader must not
    keep what it built (it once kept every image file's path: ~0.45 KB per file)."""
    table = SampleTable.read(workspace.manifest_db, "train")
    sum(1 for _ in table[:10])  # the connection and statement caches first
    _, kept = retained_bytes(lambda: sum(1 for _ in table))
    assert kept < 50_000  # 2,500 rows, 833 of them loose files: ~580 KB when paths were kept
