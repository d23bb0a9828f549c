"""`ditctl ingest`: validate the training data and write the manifest."""

from __future__ import annotations

from typing import Annotated

import typer

from ..workspace import Workspace
from ._options import WorkspaceOption, config_flags


@config_flags("data", skip=("num_workers",))  # the training loader's, not ingest's
def ingest(
    workspace: WorkspaceOption = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Fail (exit 1, manifest unchanged) if any row is bad, instead of "
                         "skipping bad rows with a warning.")] = False,
    *,
    overrides,
) -> None:
    ws = Workspace.find(workspace)
    config = ws.config(overrides)
    # numpy/PIL only when there is work: `--help` and a missing workspace stay instant
    from ..data.ingest import StrictIngestError, print_bad_rows, print_summary, run_ingest

    with ws.lock("ingest"):
        try:
            summary = run_ingest(ws, config, strict=strict)
        except StrictIngestError as exc:
            print_bad_rows(exc.summary)
            raise
    print_summary(summary)
