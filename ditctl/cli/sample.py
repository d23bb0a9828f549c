"""`ditctl sample`: images from a checkpoint, the base model or an exported pipeline.

It only reads the workspace (and writes its own output folder), so it takes no workspace lock:
samples of a finished checkpoint can be made while training goes on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from ..config import load_config
from ..console import console
from ..errors import DitctlError, WorkspaceError
from ..oneshot import absolute_paths
from ..workspace import Workspace
from ._options import JsonOption, WorkspaceOption, config_flags


@config_flags("model", "sample")
def sample(
    workspace: WorkspaceOption = None,
    prompts_file: Annotated[Optional[Path], typer.Option(
        "--prompts", help="File of prompts, one per line (# comments and blank lines skipped). "
                          "Default: the workspace's prompts.txt.")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", help="A prompt (repeatable); instead of --prompts.")] = None,
    run: Annotated[Optional[str], typer.Option(
        "--run", help="Sample the latest checkpoint of this run (default: the latest run).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="Sample this checkpoint folder.")] = None,
    base: Annotated[bool, typer.Option(
        "--base", help="Sample the base model, without fine-tuning.")] = False,
    model: Annotated[Optional[Path], typer.Option(
        "--model", help="Sample an exported pipeline folder (works outside a workspace).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Output folder (default: runs/<run>/samples/<checkpoint>-sample, or "
                      "samples/base).")] = None,
    json_output: JsonOption = False,
    *,
    overrides: dict[str, Any],
) -> None:
    overrides = absolute_paths(overrides)
    ws = _workspace(workspace, model)
    config = ws.config(overrides) if ws is not None else load_config(None, overrides)
    # the ML stack (seconds to import) only once the workspace and config are good
    from ..sampling import (choose_model, default_out_dir, default_prompts_file, read_prompts,
                            run_sample)
    if prompt and prompts_file:
        raise DitctlError("--prompt and --prompts both give prompts", hint="use one of them")
    if prompt:
        prompts = [p.strip() for p in prompt if p.strip()]
        if not prompts:
            raise DitctlError("--prompt is empty", hint='pass --prompt "a red circle"')
    elif prompts_file or ws is not None:
        prompts = read_prompts(prompts_file or default_prompts_file(ws, config))
    else:
        raise DitctlError("no prompts: outside a workspace, pass --prompt TEXT or --prompts FILE")

    choice = choose_model(ws, config, run=run, checkpoint=checkpoint, base=base, model=model)
    out_dir = out or default_out_dir(ws, choice)
    console.info(f"sampling {len(prompts)} prompt(s) x {config.sample.num_images_per_prompt} "
                 f"from {choice.describe()}")
    index = run_sample(choice, config, prompts, out_dir)
    if json_output:
        console.print(json.dumps(index, indent=2), markup=False)
        return
    console.print(f"[green]wrote[/] {len(index['images'])} image(s) to {escape(str(out_dir))}")
    console.print(f"  grid {Path(out_dir) / index['grid']}", markup=False)


def _workspace(workspace: Path | None, model: Path | None) -> Workspace | None:
    """The workspace; none is needed to sample an exported model with --model."""
    try:
        return Workspace.find(workspace)
    except WorkspaceError:
        if model is None or workspace is not None:
            raise
        return None
