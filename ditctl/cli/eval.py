"""`ditctl eval`: validation loss by timestep, before/after images, scores, an HTML report.

Like `sample`, it reads checkpoints and writes only under the run's eval/ (or eval/ of the
workspace), so it takes no workspace lock and can run beside training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..console import console
from ..errors import DitctlError
from ..oneshot import absolute_paths
from ..workspace import Workspace
from ._options import JsonOption, WorkspaceOption, config_flags


@config_flags("model", "eval", "sample")
def eval_command(
    workspace: WorkspaceOption = None,
    run: Annotated[Optional[str], typer.Option(
        "--run", help="Evaluate this run (default: the latest run).")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(
        "--checkpoint", help="Evaluate this checkpoint: its step (100), its name (step-000100) "
                             "or its folder (default: the run's latest).")] = None,
    base: Annotated[bool, typer.Option(
        "--base", help="Evaluate the base model alone.")] = False,
    all_checkpoints: Annotated[bool, typer.Option(
        "--all-checkpoints", help="Evaluate every checkpoint of the run (the loss curve).")] = False,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Put two evaluated runs side by side: --compare RUN_A RUN_B.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Output folder (default: runs/<run>/eval, or eval/base).")] = None,
    runs: Annotated[Optional[list[str]], typer.Argument(
        help="The two runs of --compare.", show_default=False)] = None,
    json_output: JsonOption = False,
    *,
    overrides: dict[str, Any],
) -> None:
    ws = Workspace.find(workspace)
    config = ws.config(absolute_paths(overrides))
    # the ML stack (seconds to import) only once the workspace and config are good
    from ..evaluation.evaluate import compare_runs, image_metrics, plan_eval, run_eval
    from ..evaluation.report import metrics_rows
    if compare or runs:
        runs = list(runs or [])
        if not compare or len(runs) != 2:
            raise DitctlError(f"--compare needs exactly two runs, got {len(runs)}"
                              if compare else f"unexpected argument(s) {' '.join(runs)}",
                              hint="ditctl eval --compare RUN_A RUN_B")
        table, page = compare_runs(ws, config, runs[0], runs[1], out)
        if json_output:
            console.print(json.dumps({"table": table, "report": str(page)}, indent=2), markup=False)
            return
        console.print(_table(["metric", *runs], table))
        console.print(f"report {page}", markup=False)
        return

    plan = plan_eval(ws, config, run=run, checkpoint=checkpoint, base=base,
                     all_checkpoints=all_checkpoints, out_dir=out)
    metrics = run_eval(ws, config, plan)
    if json_output:
        console.print(json.dumps(metrics, indent=2), markup=False)
        return
    console.print(f"validation: {metrics['validation']['description']}, "
                  f"{metrics['validation']['inputs']}", markup=False)
    scorers = image_metrics()
    console.print(_table(["model", "step", "val loss", *(s.column for s in scorers)],
                         metrics_rows(metrics, scorers)))
    for model in metrics["models"]:  # several datasets: each one's validation loss
        if model.get("val_loss_by_dataset"):
            console.print(f"{model['label']}: val loss by dataset " + ", ".join(
                f"{name} {loss:.5f}" for name, loss in model["val_loss_by_dataset"].items()),
                markup=False)
    for scorer in scorers:
        result = metrics.get(scorer.key) or {}
        if result.get("status") == "skipped":
            console.print(f"{scorer.title} skipped: {result['reason']}" +
                          (f" ({result['hint']})" if result.get("hint") else ""), markup=False)
    console.print(f"[green]wrote[/] {escape(str(plan.out_dir / 'report.html'))}")


def _table(header: list[str], rows: list[list[str]]) -> Table:
    table = Table()
    for name in header:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table
