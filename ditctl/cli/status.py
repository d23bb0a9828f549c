"""`ditctl status`: what the workspace holds and what to run next."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import tomli_w
import typer
from rich.markup import escape
from rich.table import Table

from ..console import console
from ..fsutil import format_bytes
from ..status import workspace_summary
from ..workspace import Workspace
from ._options import JsonOption, WorkspaceOption


def status(
    workspace: WorkspaceOption = None,
    json_output: JsonOption = False,
    show_config: Annotated[bool, typer.Option(
        "--config", help="Print the resolved configuration (defaults + project.toml).")] = False,
) -> None:
    ws = Workspace.find(workspace)
    config = ws.config()
    if show_config:
        if json_output:
            console.print(json.dumps(config.to_dict(), indent=2), markup=False)
        else:
            console.print(tomli_w.dumps(config.to_dict()), markup=False)
        return
    summary = workspace_summary(ws, config)
    if json_output:
        console.print(json.dumps(summary, indent=2), markup=False)
        return
    console.print(_table(summary))
    console.print(f"next: [bold]{escape(summary['next'])}[/]")


def _data_cell(data: dict, root: Path) -> str:
    """What the last ingest read and found; what project.toml names, where it differs."""
    ingest = data["ingest"]
    if not ingest:
        if not data["train_data_path"]:
            return "[yellow]not set[/]"
        return escape(data["train_data_path"]) + " — not ingested"
    # state files written before ingest recorded its paths: project.toml's are the best guess
    train = ingest.get("train_data_path", data["train_data_path"])
    val = ingest.get("val_data_path", data["val_data_path"])
    cell = (escape(_short(train, root)) + (f" + {escape(_short(val, root))}" if val else "")
            + f" — {ingest.get('train_count', '?')} train / {ingest.get('val_count', 0)} val "
              f"images, {ingest.get('bad_count', 0)} bad")
    datasets = ingest.get("datasets") or {}
    if len(datasets) > 1:
        cell += "\n" + ", ".join(f"{escape(name)} ({d['role']}): {d['images']}"
                                 for name, d in datasets.items())
    if data["ingested_other_data"]:
        named = " + ".join(escape(p) for p in (data["train_data_path"], data["val_data_path"]) if p)
        cell += (f"\n[yellow]project.toml names {named or 'no data'}: a plain `ditctl ingest` "
                 "or `ditctl train` reads that instead[/]")
    return cell


def _short(path: str, root: Path) -> str:
    """A path inside the workspace relative to it; others as they are."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _table(summary: dict) -> Table:
    table = Table(title=f"workspace {summary['workspace']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("state")
    model = summary["model"]
    table.add_row("model", f"{model['path']} ({model['family']})" if model["ok"]
                  else f"[red]{escape(str(model.get('problem')))}[/]")
    table.add_row("data", _data_cell(summary["data"], Path(summary["workspace"])))
    cache = summary["cache"]
    pre = cache["precompute"]
    table.add_row("cache", f"{cache['path']} — {cache['bytes'] / 1e6:.1f} MB"
                  + (f", {pre.get('entries', '?')} entries" if pre else " — not precomputed"))
    runs = summary["runs"]
    table.add_row("runs", "\n".join(f"{r['name']}: {r['checkpoints']} checkpoint(s)"
                                    + (f", latest {r['latest']}" if r["latest"] else "")
                                    for r in runs) or "none")
    table.add_row("exports", ", ".join(summary["exports"]) or "none")
    leftovers = summary.get("leftovers") or []
    if leftovers:
        size = format_bytes(sum(item["bytes"] for item in leftovers))
        table.add_row("leftovers", f"[yellow]{len(leftovers)} torn temporary folder(s), {size}[/] "
                      "(left by killed commands; the next train or export removes them)\n"
                      + "\n".join(escape(_short(item["path"], summary["workspace"]))
                                   for item in leftovers))
    return table
