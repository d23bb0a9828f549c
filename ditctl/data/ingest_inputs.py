"""Every file an ingest's result depends on, so that a re-ingest can tell in milliseconds that
nothing changed.

When all images live inside containers (tar shards, Arrow files), a manifest depends only on
a handful of files: the source files (a CSV/JSONL/Parquet file, a `datasets` folder's
state.json and dataset_info.json, the shard listing of a folder or glob) and the containers.
Their paths, sizes and mtimes are recorded in the manifest's meta (`inputs`). If the same
settings find every one unchanged, ingest keeps the manifest and the report as they are,
without reading a row: a no-change re-ingest of a million samples costs a few hundred stats.

Sources that list image files one by one (a folder of images, a CSV of paths) have no such
summary: every file must be stat'ed anyway, and the normal incremental path does that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from .table_sources import is_datasets_folder
from .webdataset import is_shard_spec, list_shards


def source_files(data_path: Path) -> list[str] | None:
    """The files that decide which rows a source lists (besides the containers named by its
    rows), or None for a source of loose image files."""
    spec = os.path.abspath(os.path.expanduser(str(data_path)))
    if os.path.isdir(spec):
        if is_datasets_folder(Path(spec)):
            return [os.path.join(spec, "state.json"), os.path.join(spec, "dataset_info.json")]
        from .sources import holds_shards  # sources imports this package's readers

        return list_shards(spec)[0] if holds_shards(Path(spec)) else None  # images: None
    if os.path.isfile(spec) or not is_shard_spec(spec):
        return [spec]
    try:
        return list_shards(spec)[0]
    except Exception:  # no shard matches: not unchanged
        return None


def _stat(path: str) -> list:
    try:
        info = os.stat(path)
    except OSError:
        return [path, -1, -1]
    return [path, info.st_size, info.st_mtime_ns]


def record(sources: dict[str, Path], containers: Iterable[str], loose_files: bool,
           ) -> dict[str, Any] | None:
    """The `inputs` meta entry of a manifest, or None when it depends on loose image files."""
    if loose_files:
        return None
    listed = {}
    for split, path in sources.items():
        files = source_files(path)
        if files is None:
            return None
        listed[split] = files
    paths = sorted({p for files in listed.values() for p in files} | set(containers))
    return {"sources": listed, "stats": [_stat(p) for p in paths]}


def unchanged(recorded: dict[str, Any] | None, sources: dict[str, Path]) -> bool:
    """Whether every input recorded by the last ingest is still what it was."""
    if not recorded:
        return False
    if set(recorded.get("sources", {})) != set(sources):
        return False
    for split, path in sources.items():
        if source_files(path) != recorded["sources"][split]:
            return False
    return all(_stat(path) == [path, size, mtime]
               for path, size, mtime in recorded.get("stats", []))
