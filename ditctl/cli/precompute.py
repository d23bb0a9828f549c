"""`ditctl precompute`: cache VAE latents and text embeddings for training without the encoders."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..console import console
from ..oneshot import command_workspace
from ._options import JsonOption, WorkspaceOption, config_flags


# precompute first: its num_workers (decoding for the VAE) owns --num-workers here, not
# [data] num_workers (the training loader's)
@config_flags("model", "precompute", "data")
def precompute(
    workspace: WorkspaceOption = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Re-check every cache entry (readable, right shape, finite values); "
                         "delete bad ones and re-encode them.")] = False,
    gc: Annotated[bool, typer.Option(
        "--gc", help="Delete cache entries the current data and config no longer use.")] = False,
    json_output: JsonOption = False,
    *,
    overrides,
) -> None:
    ws, overrides = command_workspace(workspace, overrides)
    if "precompute.output_dir" in overrides:
        # An explicit --output-dir names the cache this run fills, even where project.toml points
        # training at another one ([train] precomputed_data_dir decides ws.cache_dir otherwise).
        overrides["train.precomputed_data_dir"] = overrides["precompute.output_dir"]
    config = ws.config(overrides)
    # the ML stack (seconds to import) only once the workspace and config are good
    from ..precompute import print_summary, run_precompute

    with ws.lock("precompute"):
        summary = run_precompute(ws, config, verify=verify, gc=gc)
    if json_output:
        console.print(json.dumps(summary.counters(), indent=2), markup=False)
    else:
        print_summary(summary)
