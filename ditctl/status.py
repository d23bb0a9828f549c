"""What a workspace holds, at a glance, and the next sensible command."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from .config import Config
from .errors import DitctlError
from .fsutil import connect_read_only, entry_size, folder_size, temp_leftovers
from .runs import list_checkpoints, list_runs, torn_temporaries
from .workspace import Workspace


def workspace_summary(ws: Workspace, config: Config) -> dict[str, Any]:
    """What the workspace holds. Counts come from the manifest and the cache index, which are
    the truth (state.json only records what the last command reported: a kill between writing
    the manifest and the state would leave it stale)."""
    state = ws.read_state()
    summary: dict[str, Any] = {"workspace": str(ws.root)}

    try:
        from .models.registry import check_folder  # checks the layout without importing torch
        path = ws.model_path(config).resolve()
        summary["model"] = {"path": str(path), "family": check_folder(path, config.model.family),
                            "ok": True}
    except DitctlError as exc:
        summary["model"] = {"path": config.model.pretrained_model_path, "ok": False,
                            "problem": str(exc)}

    ingest = state.get("ingest")
    counts = _manifest_counts(ws)
    if counts is not None:
        ingest = {**(ingest or {}), "train_count": counts["train"], "val_count": counts["val"]}
    summary["data"] = {"train_data_path": _first_data_path(config),
                       "val_data_path": config.data.val_data_path,
                       "ingest": ingest,
                       "ingested_other_data": bool(ingest) and _ingested_other_data(ws, config,
                                                                                     ingest)}
    cache_dir = ws.cache_dir(config)
    precompute = state.get("precompute")
    entries = _cache_entries(cache_dir)
    if entries is not None:
        precompute = {**(precompute or {}), "entries": entries}
    summary["cache"] = {"path": str(cache_dir), "precompute": precompute,
                        "bytes": folder_size(cache_dir) if cache_dir.is_dir() else 0}
    runs = []
    for run in list_runs(ws.runs_dir(config)):
        checkpoints = list_checkpoints(run)
        runs.append({"name": run.name, "path": str(run), "checkpoints": len(checkpoints),
                     "latest": checkpoints[-1].name if checkpoints else None})
    summary["runs"] = runs
    exports = sorted(p.name for p in ws.exports_dir.iterdir() if p.is_dir()
                     and not p.name.startswith(".")) if ws.exports_dir.is_dir() else []
    summary["exports"] = exports
    # torn temporary folders of killed checkpoint saves and exports: the next train/export
    # removes them (they need the lock, which status does not take)
    summary["leftovers"] = [{"path": str(p), "bytes": entry_size(p)} for p in
                            torn_temporaries(ws.runs_dir(config)) + temp_leftovers(ws.exports_dir)]
    summary["next"] = next_step(summary)
    return summary


def _manifest_counts(ws: Workspace) -> dict[str, int] | None:
    from .data.manifest import manifest_counts  # sqlite and PIL, no torch

    return manifest_counts(ws)


def _cache_entries(cache_dir: Path) -> int | None:
    """Complete entries in the cache index (data/cache.py's index.sqlite; read here with
    sqlite alone, as that module needs torch)."""
    index = cache_dir / "index.sqlite"
    if not index.is_file():
        return None
    try:
        with contextlib.closing(connect_read_only(index)) as db:
            return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
    except sqlite3.DatabaseError:
        return None


def _first_data_path(config: Config) -> str | None:
    """[data] train_data_path, else the first [[data.datasets]] table's path."""
    if config.data.train_data_path or not config.data.datasets:
        return config.data.train_data_path
    return config.data.datasets[0].path


def _ingested_other_data(ws: Workspace, config: Config, ingest: dict[str, Any]) -> bool:
    """Whether the last ingest read other data than project.toml names (an ingest run with
    --train-data-path, say). State files from before paths were recorded: assume not."""
    if "train_data_path" not in ingest:
        return False
    wanted = {"train_data_path": _first_data_path(config),
              "val_data_path": config.data.val_data_path}
    return any((str(ws.resolve(path)) if path else None) != ingest.get(key)
               for key, path in wanted.items())


def next_step(summary: dict[str, Any]) -> str:
    if not summary["model"]["ok"]:
        return "set [model] pretrained_model_path in project.toml to a local model folder"
    if not summary["data"]["train_data_path"]:
        return "set [data] train_data_path in project.toml (a CSV or an image folder)"
    if not summary["data"]["ingest"]:
        return "ditctl ingest"
    if not summary["runs"]:
        return "ditctl precompute && ditctl train --lora"
    if not any(r["checkpoints"] for r in summary["runs"]):
        return "ditctl train --resume latest"
    if not summary["exports"]:
        return "ditctl sample --prompts prompts.txt, ditctl eval, then ditctl export --merge-lora"
    return "ditctl sample --model exports/" + summary["exports"][-1]
