"""Options shared by the commands, and config keys turned into flags.

`config_flags("data", "train")` decorates a command so that every key of those project.toml
sections is also a flag, in the dash form (`--train-batch-size`) with the guide's underscore form
as an alias (`--train_batch_size`), with the key's help text. A flag left out is None and does
not override project.toml; the command receives the given ones as `overrides`
({"section.key": value}), which `Workspace.config(overrides)` validates with everything else.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from ..config import SECTIONS, field_type

WorkspaceOption = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Workspace folder (default: the one containing the "
                 "current folder).", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def _flag_type(section: str, key: str) -> Any:
    hint, _ = field_type(section, key)
    if typing.get_origin(hint) is tuple:
        return Optional[str]  # comma-separated on the command line
    return Optional[hint]


def _declarations(spec: dataclasses.Field, bool_flag: bool) -> list[str]:
    dash = "--" + spec.name.replace("_", "-")
    under = "--" + spec.name
    if bool_flag:
        decls = [f"{dash}/--no-{spec.name.replace('_', '-')}"]
    else:
        decls = [dash]
    if under != dash:
        decls.append(under)
    decls += list(spec.metadata["aliases"])
    return decls


def config_flags(*sections: str, skip: tuple[str, ...] = ()) -> Callable:
    """Give a command one flag per key of `sections` (except `skip`), collected as `overrides`."""

    def decorate(command: Callable) -> Callable:
        generated: dict[str, str] = {}  # parameter name -> "section.key"
        params = []
        for section in sections:
            for spec in dataclasses.fields(SECTIONS[section]):
                if not spec.metadata["flag"] or spec.name in skip or spec.name in generated:
                    continue
                flag_type = _flag_type(section, spec.name)
                is_bool = flag_type is Optional[bool]
                option = typer.Option(*_declarations(spec, is_bool), help=spec.metadata["help"],
                                      rich_help_panel=f"{section} settings (project.toml)",
                                      show_default=False)
                generated[spec.name] = f"{section}.{spec.name}"
                params.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY,
                                                default=None,
                                                annotation=Annotated[flag_type, option]))

        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.name != "overrides"]
        clash = {p.name for p in own} & set(generated)
        if clash:
            raise TypeError(f"{command.__name__}: parameters {clash} shadow config keys")

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            overrides = {generated[name]: kwargs.pop(name) for name in list(kwargs)
                         if name in generated}
            overrides = {k: v for k, v in overrides.items() if v is not None}
            return command(overrides=overrides, **kwargs)

        # Typer reads the signature and the type hints: both must describe the new parameters.
        wrapper.__signature__ = inspect.Signature(own + params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own + params}
        del wrapper.__wrapped__
        return wrapper

    return decorate
