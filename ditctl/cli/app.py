"""The `ditctl` command: wires the command modules together, nothing else."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from ..console import quiet_libraries

# Before the command modules import torch/diffusers: their import-time notices are noise here.
quiet_libraries()

from ._errors import reports_errors, set_debug  # noqa: E402
from . import eval as eval_cmd  # noqa: E402
from . import export as export_cmd  # noqa: E402
from . import ingest as ingest_cmd  # noqa: E402
from . import init as init_cmd  # noqa: E402
from . import precompute as precompute_cmd  # noqa: E402
from . import sample as sample_cmd  # noqa: E402
from . import status as status_cmd  # noqa: E402
from . import train as train_cmd  # noqa: E402

app = typer.Typer(
    name="ditctl",
    help="Fine-tune text-to-image Diffusion Transformers (F-Lite) on your own images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ditctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Workspaces for fine-tuning DiTs: init, ingest, precompute, train, sample, eval, export."""
    set_debug(debug)


def register(name: str, command, help: str) -> None:
    app.command(name, help=help, short_help=help)(reports_errors(command))


# In workflow order, as `ditctl --help` lists them.
register("init", init_cmd.init, "Create a workspace (project.toml, prompts, model, example data).")
register("ingest", ingest_cmd.ingest, "Validate every image, plan buckets, write the manifest.")
register("precompute", precompute_cmd.precompute,
         "Cache VAE latents and text embeddings (train without the encoders).")
register("train", train_cmd.train, "Fine-tune the model (full or --lora); resumes exactly.")
register("sample", sample_cmd.sample, "Generate images from a checkpoint, the base model or an export.")
register("eval", eval_cmd.eval_command,
         "Validation loss by timestep, before/after grid, scores, HTML report.")
register("export", export_cmd.export,
         "Write a checkpoint as a pipeline folder (--merge-lora) or a LoRA file.")
register("status", status_cmd.status, "Show what the workspace holds and the next step.")
