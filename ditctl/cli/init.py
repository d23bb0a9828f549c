"""`ditctl init NAME`: scaffold a workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import console


def init(
    name: Annotated[Path, typer.Argument(help="Folder of the new workspace.")],
    model: Annotated[str, typer.Option(
        "--model", help="'tiny' (the tiny trained model shipped with ditctl, for trying it), "
        "'tiny-random' (random weights, for tests), 'tiny-<family>' (that family's tiny random model) "
        "or the path of a local model folder (any supported family).")] = "tiny",
    example: Annotated[bool, typer.Option(
        "--example", help="Add a small generated example dataset (train + validation).")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Re-scaffold an existing workspace: runs, cache and exports are kept, "
        "an edited project.toml or prompts.txt too (the new one is written as *.new); a model "
        "that runs were trained on is never replaced.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the tiny model and example data.")] = 0,
) -> None:
    from ..scaffold import init_workspace  # numpy/PIL for --example; torch for tiny-random

    with console.err.status(f"creating workspace {name} ..."):
        result = init_workspace(name, model=model, example=example, force=force, seed=seed)
    ws = result.workspace
    console.print(f"[green]created[/] workspace {ws.root}")
    console.print(f"  model   {result.model_path}")
    if result.example:
        ex = result.example
        console.print(f"  data    {ex['train_rows']} training images: {ex['train_csv']} "
                      f"({ex['n_train']} {ex['concept']} scenes to learn) + {ex['prior_csv']} "
                      f"({ex['n_prior']} prior-preservation scenes of colours the model knows, "
                      f"a regularization dataset); {ex['n_val']} validation images")
    console.print(f"  config  {ws.project_file}")
    for note in result.notes:
        console.warn(note)
    console.print(f"next: cd {name} && ditctl status")
