"""`ditctl export`: write a checkpoint as a pipeline folder or a LoRA other tools load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..console import console
from ..workspace import Workspace
from ._options import JsonOption, WorkspaceOption, config_flags


@config_flags("export")
def export(
    workspace: WorkspaceOption = None,
    run: Annotated[Optional[str], typer.Option(
        "--run", help="Run to export (default: the latest run).", show_default=False)] = None,
    checkpoint: Annotated[Optional[str], typer.Option(
        "--checkpoint", help="Checkpoint folder, its name (step-000100) or its step (100) "
                             "(default: the run's latest).", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Export name under exports/ (default: <run>-step<N>-merged|full|lora).",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Write the export to this folder instead of exports/<name>.",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing export of the same name.")] = False,
    json_output: JsonOption = False,
    *,
    overrides,
) -> None:
    ws = Workspace.find(workspace)
    config = ws.config(overrides)
    # the ML stack (seconds to import) only once the workspace and config are good
    from ..export import export_checkpoint
    # --format on the command line asks for the adapter alone (an error for a full run)
    lora_only = True if "export.format" in overrides else None
    with ws.lock("export"):
        result = export_checkpoint(ws, config, run=run, checkpoint=checkpoint, name=name,
                                   out=out, force=force, lora_only=lora_only)
    if json_output:
        console.print(json.dumps(result.to_dict(), indent=2), markup=False)
        return
    check = (f"parity passed: {result.parity.describe()}" if result.parity
             else "parity check skipped (--no-verify)")
    console.print(f"exported [bold]{escape(result.name)}[/] ({result.kind}, {result.format}, "
                  f"{result.dtype}) from {escape(result.run)} step {result.step}")
    console.print(f"  {escape(str(result.path))}")
    console.print(f"  {check}")
    if result.trained_parity is not None:
        t = result.trained_parity
        console.print(f"  vs the run's model (base {t.base_precision}): relative "
                      f"{t.relative_diff:.2g}, base quantization error {t.base_error:.2g}, "
                      f"allowed {t.tolerance:.2g}")
