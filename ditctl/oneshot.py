"""Which workspace a command works in, including the guide's one-shot command lines.

Inside a workspace, commands use it. Outside one, the F-Lite guide's command lines still work:
`ditctl train --pretrained_model_path M --train_data_path D --output_dir OUT` (and
`ditctl precompute ... --output_dir OUT`) turn OUT into a workspace (created on first use) whose
project.toml records the model and data given, so later commands there need no flags.

Paths given as flags are relative to the current folder (as a user typing them expects), so
they are made absolute before they meet the workspace-relative paths of project.toml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import activate_keys, read_toml
from .errors import WorkspaceError
from .fsutil import atomic_write_text
from .workspace import PROJECT_FILE, Workspace

PATH_KEYS = {"model.pretrained_model_path", "data.train_data_path", "data.val_data_path",
             "data.base_image_dir", "precompute.output_dir", "train.output_dir",
             "train.precomputed_data_dir", "train.sample_prompts_file", "lora.lora_checkpoint",
             "eval.clip_model_path"}
DATA_KEYS = ("train_data_path", "val_data_path", "base_image_dir", "image_column",
             "caption_column", "resolution", "center_crop", "random_flip", "use_resolution_buckets")


def absolute_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: str(Path(v).expanduser().resolve()) if k in PATH_KEYS and v else v
            for k, v in overrides.items()}


def command_workspace(workspace: Path | None, overrides: dict[str, Any]) -> tuple[Workspace, dict]:
    """(workspace, overrides to apply) for a command given `--workspace` and its flags."""
    overrides = absolute_paths(overrides)
    if workspace is not None:
        return Workspace.find(workspace), overrides
    try:
        return Workspace.find(), overrides
    except WorkspaceError:
        out = overrides.get("train.output_dir") or overrides.get("precompute.output_dir")
        if not out or "model.pretrained_model_path" not in overrides:
            raise
    return oneshot_workspace(Path(out), overrides)


def oneshot_workspace(folder: Path, overrides: dict[str, Any]) -> tuple[Workspace, dict]:
    """Use (or create) `folder` as the workspace of a guide-style one-shot command."""
    from .scaffold import templates_dir

    folder = folder.resolve()
    rest = {k: v for k, v in overrides.items()
            if k not in ("train.output_dir", "precompute.output_dir")}
    if "precompute.output_dir" in overrides:
        rest["precompute.output_dir"] = "."  # the folder itself holds the cache
    cache = rest.get("train.precomputed_data_dir")
    if cache and "data.train_data_path" not in rest and (Path(cache) / PROJECT_FILE).is_file():
        # train from a one-shot precompute folder: adopt its data so the manifests agree
        data = read_toml(Path(cache) / PROJECT_FILE).get("data", {})
        rest.update({f"data.{k}": v for k, v in data.items() if k in DATA_KEYS})
    if not (folder / PROJECT_FILE).is_file():
        settings: dict[str, dict[str, Any]] = {}
        for dotted, value in rest.items():
            section, key = dotted.split(".", 1)
            if section in ("model", "data", "precompute"):
                settings.setdefault(section, {})[key] = value
        folder.mkdir(parents=True, exist_ok=True)
        text = activate_keys((templates_dir() / "project.toml").read_text(), settings)
        atomic_write_text(folder / PROJECT_FILE, text)
    return Workspace(folder), rest
