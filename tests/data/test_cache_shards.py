"""The sharded storage of the precompute cache (ditctl.data.cache_shards): a bounded number of
files, kill safety, compaction, reading out of shards (also in another process)."""

from __future__ import annotations

import pickle

import pytest
import torch

from ditctl.data import cache_shards as shards
from ditctl.data.cache import (INDEX_LAYOUT, Cache, CacheIndex, IndexEntry, KeySpec, tensor_bytes,
                               tensors_sha256)
from ditctl.data.cache_shards import ShardWriter, compact, remove_unindexed, stored_shards


def _entry(i: int, kind: str = "latent") -> tuple[IndexEntry, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(i)
    tensors = {"mean": torch.randn(4, 2, 3, generator=generator),
               "std": torch.rand(4, 2, 3, generator=generator) + 0.1}
    key = f"{i:064x}"
    return IndexEntry(key, kind, (4, 2, 3), "fp32", tensor_bytes(tensors), False, f"img{i}.png",
                      sha256=tensors_sha256(tensors)), tensors


def _cache(root) -> Cache:
    return Cache(root, KeySpec("", "", None, "fp32", False))


def _write(root, index, ids, **limits) -> dict[str, dict[str, torch.Tensor]]:
    writer = ShardWriter(root, index, "latent", **limits)
    written = {}
    for i in ids:
        entry, tensors = _entry(i)
        writer.add(entry, tensors)
        written[entry.key] = tensors
    writer.flush()
    return written


def _reads_back(root, written) -> None:
    cache = _cache(root)
    for key, tensors in written.items():
        entry = cache.lookup(key)
        assert entry is not None and entry.shard is not None
        back, metadata = cache.read_stored(entry)
        assert back.keys() == tensors.keys()
        assert all(torch.equal(back[n], tensors[n]) for n in tensors)
        assert cache.check(entry) is None and metadata["sha256"] == entry.sha256


def test_files_stay_a_small_fraction_of_the_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_ENTRIES", 100)  # 2048 by default: the same, faster
    with CacheIndex(tmp_path / "index.sqlite") as index:
        written = _write(tmp_path, index, range(250))
        assert len(stored_shards(tmp_path)) == 3  # 100 + 100 + 50
        assert len(index.shard_names()) == 3
        # the byte bound closes shards too: 96 bytes per tensor, 2 tensors per entry
        _write(tmp_path, index, range(250, 260), max_bytes=2 * 96 * 4)
        assert len(stored_shards(tmp_path)) == 3 + 3  # 4 + 4 + 2
    _reads_back(tmp_path, written)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 260 // 26  # the index files and 6 shards


def test_a_kill_between_rename_and_commit_leaves_an_invisible_shard(tmp_path, monkeypatch):
    with CacheIndex(tmp_path / "index.sqlite") as index:
        first = _write(tmp_path, index, range(3))

        def killed(*args, **kwargs):
            raise KeyboardInterrupt  # the process dies after the rename, before the commit

        monkeypatch.setattr(index, "add", killed)
        with pytest.raises(KeyboardInterrupt):
            _write(tmp_path, index, range(3, 6))
        monkeypatch.undo()
        assert len(stored_shards(tmp_path)) == 2 and len(index.shard_names()) == 1
        assert index.keys() == set(first)  # readers see only the committed shard
        # a kill inside the write leaves a temporary file
        (tmp_path / "shards" / ".tmp-latent-0123.safetensors.x").write_bytes(b"half")
        assert remove_unindexed(tmp_path, index) == 2
        assert stored_shards(tmp_path) == sorted(index.shard_names())
        assert not list((tmp_path / "shards").glob(".tmp-*"))
        again = _write(tmp_path, index, range(3, 6))  # the rerun writes what was lost
    _reads_back(tmp_path, {**first, **again})


def test_compaction_reclaims_dead_shards_and_mostly_dead_ones(tmp_path):
    with CacheIndex(tmp_path / "index.sqlite") as index:
        written = _write(tmp_path, index, range(16), max_entries=4)  # 0-3, 4-7, 8-11, 12-15
        dead, mostly_dead, mostly_live, also_mostly_dead = sorted(
            index.shard_names(), key=lambda name: min(e.key for e in index.entries_in_shard(name)))
        index.remove([f"{i:064x}" for i in (0, 1, 2, 3, 4, 5, 6, 8, 12, 13, 14)])
        live = {k: v for k, v in written.items() if k in index.keys()}
        assert compact(tmp_path, index) == (1, 2)
        names = index.shard_names()
        assert mostly_live in names and not {dead, mostly_dead, also_mostly_dead} & names
        assert len(names) == 2 and stored_shards(tmp_path) == sorted(names)
        usage = {name: entries for name, _, _, entries, _ in index.shard_usage()}
        assert usage[mostly_live] == 3
        assert usage[(names - {mostly_live}).pop()] == 2  # the two survivors, merged
        assert compact(tmp_path, index) == (0, 0)  # nothing left to reclaim
    _reads_back(tmp_path, live)


def test_a_kill_inside_compaction_loses_nothing(tmp_path, monkeypatch):
    with CacheIndex(tmp_path / "index.sqlite") as index:
        written = _write(tmp_path, index, range(4))
        index.remove([f"{i:064x}" for i in (0, 1, 2)])
        live = {k: v for k, v in written.items() if k in index.keys()}

        def killed(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(index, "add", killed)  # the new shard is in place, not committed
        with pytest.raises(KeyboardInterrupt):
            compact(tmp_path, index)
        monkeypatch.undo()
        _reads_back(tmp_path, live)  # still read from the old shard
        assert remove_unindexed(tmp_path, index) == 1
        assert compact(tmp_path, index) == (0, 1)
        assert len(stored_shards(tmp_path)) == 1
    _reads_back(tmp_path, live)


def test_reading_in_another_process_or_thread(tmp_path):
    """A Cache crosses into DataLoader workers by pickling (no connection or map with it),
    and reopens what it needs there."""
    with CacheIndex(tmp_path / "index.sqlite") as index:
        written = _write(tmp_path, index, range(5))
    cache = _cache(tmp_path)
    key = next(iter(written))
    assert cache.lookup(key) is not None  # opens the connection and (below) the map
    cache.read_stored(cache.lookup(key))
    copy = pickle.loads(pickle.dumps(cache))
    assert copy._db is None
    assert torch.equal(copy.read_stored(copy.lookup(key))[0]["mean"], written[key]["mean"])


def test_an_index_of_the_one_file_layout_is_upgraded_in_place(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE entries (key TEXT PRIMARY KEY, kind TEXT NOT NULL, shape TEXT NOT NULL,
                dtype TEXT NOT NULL, bytes INTEGER NOT NULL, flip INTEGER NOT NULL,
                source TEXT NOT NULL, created REAL NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '1');
            INSERT INTO entries VALUES ('k', 'text', '[1, 2]', 'fp32', 8, 0, 'a caption', 0);
        """)
    db.close()
    assert _cache(tmp_path).lookup("k") is None  # not upgraded yet: read as a one-file entry
    with CacheIndex(tmp_path / "index.sqlite") as index:
        (entry,) = index.entries()
        assert entry.shard is None and entry.sha256 is None and entry.source == "a caption"
        assert index.get_meta("index_layout") == INDEX_LAYOUT


def test_shard_limits_are_read_when_a_writer_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_ENTRIES", 2)
    with CacheIndex(tmp_path / "index.sqlite") as index:
        _write(tmp_path, index, range(5))
    assert len(stored_shards(tmp_path)) == 3


def test_one_file_entries_are_listed_a_chunk_at_a_time_while_they_move(tmp_path):
    """Packing reads the one-file entries in chunks and moves them into shards as it goes
    (commits between chunks): every entry is listed exactly once, and nothing is held for
    the whole cache."""
    with CacheIndex(tmp_path / "index.sqlite") as index:
        index.add([_entry(i)[0] for i in range(7)])  # no shard: files of their own
        _write(tmp_path, index, [100])
        assert index.count() == 8 and index.count(one_file=True) == 7
        writer = ShardWriter(tmp_path, index, "latent")
        seen = []
        for entry in index.one_file_entries(chunk=2):
            seen.append(entry.key)
            if len(seen) % 2:  # move every other one, as packing does (its rows are replaced)
                writer.add(*_entry(int(entry.key, 16)))
                writer.flush()
        assert seen == [f"{i:064x}" for i in range(7)]
        assert index.count(one_file=True) == 3
