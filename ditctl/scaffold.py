"""Creating a workspace from `templates/`: project.toml, prompts.txt, .gitignore, model, data.

`--force` re-scaffolds an existing workspace under its lock, and destroys nothing a user made:
runs, cache and exports are kept; a project.toml or prompts.txt that differs from what init
last wrote (state.json records their sha256) is kept and the new one written next to it as
`<name>.new`; and a model folder that runs were trained on is never replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import activate_keys
from .errors import DitctlError, WorkspaceError
from .fsutil import atomic_write_text
from .workspace import PROJECT_FILE, Workspace

TINY_PREFIX = "tiny-"  # `tiny-<family>`: that family's tiny random model (registry.build_tiny)


def builtin_models() -> tuple[str, ...]:
    """"tiny", "tiny-random" (the first family's tiny random model) and "tiny-<family>" for
    every registered family."""
    from .models.registry import family_names  # torch-free

    return ("tiny", "tiny-random", *(TINY_PREFIX + name for name in family_names()))


def _tiny_family(model: str) -> str:
    """The family whose tiny random model `model` ("tiny-random" or "tiny-<family>") names."""
    from .models.registry import DEFAULT_FAMILY

    return DEFAULT_FAMILY if model == "tiny-random" else model[len(TINY_PREFIX):]


# `--model tiny`: how the shipped base model was trained and measured (bench/train_tiny_base.py):
# without the family's resolution shift, which at 64x64 (alpha 0.25) would put nearly every step
# at low noise, where a small scene's layout is already decided; 20 Euler steps, CFG 5.
TINY_MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "train": {"resolution_shift": False},
    "sample": {"shift": 1.0, "steps": 20, "guidance_scale": 5.0},
}

# `--example` settings: `ditctl train --lora` teaches the tiny base model the held-out colour
# in under 2 minutes on 2 CPU cores (measured: tests/demo/test_tiny_base.py), with samples,
# validation loss and checkpoints every 250 steps. Rank 16 at 2e-3 learns the colour within
# 500 steps; the example data's prior-preservation scenes keep the other colours intact.
EXAMPLE_SETTINGS: dict[str, dict[str, Any]] = {
    "train": {"train_batch_size": 8, "max_steps": 1000, "learning_rate": 2e-3,
              "lr_scheduler": "constant", "num_warmup_steps": 20, "seed": 0,
              "sample_every": 250, "eval_every": 250, "checkpoint_every": 250,
              "checkpoints_total_limit": 4},
    "lora": {"lora_rank": 16, "lora_alpha": 16},
}


def templates_dir() -> Path:
    """`templates/` inside an installed wheel, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "project.toml").is_file():
            return candidate
    raise WorkspaceError("ditctl's templates/ folder is missing from this installation",
                         hint="reinstall ditctl")


@dataclass
class InitResult:
    workspace: Workspace
    model_path: Path
    example: dict[str, Any] | None = None
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what --force kept, and where it wrote


def init_workspace(root: Path, *, model: str = "tiny", example: bool = False,
                   force: bool = False, seed: int = 0) -> InitResult:
    """Scaffold a workspace at `root`.

    `model` is "tiny" (the shipped trained tiny model, copied into the workspace), "tiny-random"
    or "tiny-<family>" (a random tiny pipeline of the first / that family, built inside the
    workspace) or the path of a local pipeline
    folder (validated, referenced by absolute path, never copied).
    """
    root = Path(root).resolve()
    existing = (root / PROJECT_FILE).exists()
    if existing and not force:
        raise WorkspaceError(f"{root} is already a workspace (it has {PROJECT_FILE})",
                             hint="pick another name, or pass --force to re-scaffold it "
                                  "(runs, cache and exports are kept)")
    if root.exists() and not root.is_dir():
        raise WorkspaceError(f"{root} exists and is not a folder", hint="pick another name")
    # re-scaffolding changes the workspace: not while another command (training) uses it
    with Workspace(root).lock("init --force") if existing else contextlib.nullcontext():
        return _scaffold(root, model=model, example=example, seed=seed, existing=existing)


def _scaffold(root: Path, *, model: str, example: bool, seed: int,
              existing: bool) -> InitResult:

    from .models.registry import DEFAULT_FAMILY, check_folder

    builtin = builtin_models()
    if model not in builtin:
        model_path = Path(model).expanduser().resolve()
        family = check_folder(model_path)  # any registered family's layout; loads no library
    else:
        family = DEFAULT_FAMILY if model == "tiny" else _tiny_family(model)
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    settings: dict[str, dict[str, Any]] = {"model": {}}
    if family != DEFAULT_FAMILY:
        settings["model"]["family"] = family

    notes: list[str] = []
    runs = _trained_runs(ws) if existing else []
    if model in builtin:
        model_path = root / "model"
        if model_path.exists() and runs:
            raise WorkspaceError(
                f"{model_path} is the base model of {len(runs)} run(s) in {runs[0].parent}; "
                "init --force would replace it",
                hint="keep it (leave --force out), or move the runs away (or the model) first")
        _build_builtin_model(model, model_path, seed)
        settings["model"]["pretrained_model_path"] = "model"
        if model == "tiny":
            settings.update({k: dict(v) for k, v in TINY_MODEL_SETTINGS.items()})
    else:
        settings["model"]["pretrained_model_path"] = str(model_path)

    templates = templates_dir()
    prompts = (templates / "prompts.txt").read_text()
    result = InitResult(ws, model_path)
    if example:
        from .demo.scenes import example_prompts, write_example_dataset

        result.example = write_example_dataset(root / "data" / "example", seed=seed)
        # the prior-preservation scenes: a second dataset (role = "regularization")
        settings["data"] = {"train_data_path": "data/example/train.csv",
                            "val_data_path": "data/example/val.csv",
                            "resolution": 64, "use_resolution_buckets": True,
                            "datasets": [{"path": "data/example/prior.csv", "name": "prior",
                                          "role": "regularization", "loss_weight": 1.0}]}
        for section, values in EXAMPLE_SETTINGS.items():
            settings.setdefault(section, {}).update(values)
        prompts = _prompt_header(prompts) + "\n".join(example_prompts()) + "\n"

    result.settings = settings
    result.notes = notes
    toml = activate_keys((templates / "project.toml").read_text(), settings)
    previous = ws.read_state().get("init", {}) if existing else {}
    written = previous.get("written", {})
    written = {**written, "prompts.txt": _write_unless_edited(root / "prompts.txt", prompts,
                                                              written, notes)}
    atomic_write_text(root / ".gitignore", (templates / "gitignore").read_text())
    # project.toml last: its presence marks a complete workspace
    written[PROJECT_FILE] = _write_unless_edited(root / PROJECT_FILE, toml, written, notes)
    if runs and model not in builtin and written[PROJECT_FILE] == _sha256(toml) \
            and previous.get("model") != str(model_path):
        notes.append(f"{len(runs)} run(s) in {runs[0].parent} were trained on the model the "
                     f"previous project.toml named; they are kept, and resuming them on "
                     f"{model_path} is refused (unless --force)")
    ws.update_state("init", {"model": str(model_path), "example": bool(example),
                             "written": written})
    return result


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_unless_edited(path: Path, text: str, written: dict[str, str],
                         notes: list[str]) -> str:
    """Write a user-editable file, unless the one there differs from what init last wrote
    (`written`: name -> sha256): then the new one goes to `<name>.new`. Returns the sha256
    init has now written under the name (the kept file's, when it was kept)."""
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        current = None
    if current is not None and hashlib.sha256(current).hexdigest() != written.get(path.name):
        if current == text.encode("utf-8"):
            return _sha256(text)
        atomic_write_text(path.with_name(path.name + ".new"), text)
        notes.append(f"kept your {path.name}; the new one is {path.name}.new (compare and merge)")
        return written.get(path.name, "")
    atomic_write_text(path, text)
    return _sha256(text)


def _trained_runs(ws: Workspace) -> list[Path]:
    """Run folders of the workspace (their checkpoints depend on its base model)."""
    from .runs import list_runs

    try:
        runs_dir = ws.runs_dir(ws.config())
    except DitctlError:  # an invalid project.toml: the default place
        runs_dir = ws.root / "runs"
    return list_runs(runs_dir)


def _prompt_header(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))


def shipped_tiny_model() -> Path:
    """The trained tiny base model that ships inside the package (bench/train_tiny_base.py)."""
    from .models.registry import SHIPPED_TINY_MODEL

    folder = Path(__file__).resolve().parent / "assets" / SHIPPED_TINY_MODEL
    if not (folder / "model_index.json").is_file():
        raise WorkspaceError(f"ditctl's tiny base model is missing from this installation ({folder})",
                             hint="reinstall ditctl, or use --model tiny-random")
    return folder


def _build_builtin_model(kind: str, target: Path, seed: int) -> None:
    """Put the tiny pipeline in a temporary folder and move it into place when complete:
    "tiny" copies the shipped trained model, "tiny-random" / "tiny-<family>" build random
    weights from `seed`."""
    tmp = target.with_name(".tmp-" + target.name)
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "tiny":
        shutil.copytree(shipped_tiny_model(), tmp)  # a copy: the workspace may change its model
    else:
        from .models.registry import build_tiny  # the builder imports torch: seconds

        build_tiny(_tiny_family(kind), tmp, seed=seed)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
