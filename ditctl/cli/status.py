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


def _short(path: str, root: str) -> str:
    """A path inside the workspace, relative to it."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _table(summary: dict) -> Table:
    table = Table(title=f"workspace {summary['workspace']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("state")
    model = summary["model"]
    table.add_row("model", f"{model['path']} ({model['family']})" if model["ok"]
                  else f"[red]{escape(str(model.get('problem')))}[/]")
    data = summary["data"]
    ingest = data["ingest"]
    table.add_row("data", f"{data['train_data_path'] or '[yellow]not set[/]'}" +
                  (f" — {ingest.get('train_count', '?')} train / {ingest.get('val_count', 0)} val "
                   f"images, {ingest.get('bad_count', 0)} bad" if ingest else " — not ingested"))
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
