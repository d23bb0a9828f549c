"""Shared fixtures: offline environment, one tiny pipeline per test session.

Family-neutral: tests outside a family's own test files reach a family only through the model
folder's registry entry (`load_family`, `family_class`), so they hold for whichever family the
tiny model is (the registry's default). `tests/models/test_family_conformance.py` guards this.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One OpenMP thread per process, here and in every process a test starts (they inherit it),
# set before torch is first imported. The tests' models are small, so each op is short; with
# two threads on a busy machine (other processes, or a test's own subprocesses) every parallel
# op waits for a thread the scheduler has parked, and a test ran ~10x slower for it (measured
# at load ~6 on 2 cores: 359 s vs 38 s for test_base_does_not_draw_the_held_out_colour).
# Tests that mean to run with more threads say so in their subprocess's environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file (a plugin): the variable came too late
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from ditctl.console import quiet_libraries  # noqa: E402

quiet_libraries()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Training in-process initialises accelerate's process-wide state (mixed precision
    included); reset it after every test, so a later test may train with other settings."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random pipeline of the registry's default family, built once (do not modify it
    in tests)."""
    from ditctl.models.registry import DEFAULT_FAMILY, build_tiny

    return build_tiny(DEFAULT_FAMILY, tmp_path_factory.mktemp("tiny") / "model", seed=0)


def family_class(model_dir: Path) -> type:
    """The class implementing `model_dir`'s family: what a test monkeypatches to intercept a
    family method (loading the VAE, predicting, ...) for every instance the code under test
    makes, whichever family the folder is."""
    from ditctl.models.registry import load_family

    return type(load_family(model_dir))


def family_method_path(model_dir: Path, method: str) -> str:
    """The "module:Class.method" path of `model_dir`'s family's method, for patching it in a
    child process (which imports it by that path)."""
    from ditctl.models.registry import detect_family, family_entry

    return f"{family_entry(detect_family(model_dir)).implementation}.{method}"


@pytest.fixture()
def cli():
    """Invoke the ditctl CLI in-process: cli("status", "--json") -> click Result."""
    from typer.testing import CliRunner

    from ditctl.cli.app import app

    runner = CliRunner()

    def invoke(*args: str, **kwargs):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)

    return invoke


def write_test_checkpoint(model_dir: Path, folder: Path, *, lora: bool = True, rank: int = 4,
                          seed: int = 0, lora_settings: dict | None = None) -> Path:
    """A complete checkpoint folder as training writes it (with its manifest), with random
    trained weights: an adapter on the family's default targets (adapter_config.json +
    lora.safetensors; `lora_settings`: more [lora] keys, e.g. lora_type) or full
    (trainable.safetensors)."""
    import torch

    from ditctl.config import build_config
    from ditctl.engine.lora import (add_lora, adapter_config_dict, is_adapter_param, peft_config,
                                    peft_state_dict)
    from ditctl.models.registry import load_family
    from ditctl.runs import ADAPTER_CONFIG, LORA_WEIGHTS, TRAINABLE_FILE, CheckpointWriter
    from ditctl.tensorfile import write_safetensors

    family = load_family(model_dir)
    dit = family.load_denoiser()
    folder.mkdir(parents=True)
    files = CheckpointWriter(folder)
    gen = torch.Generator().manual_seed(seed)
    if lora:
        settings = build_config({"lora": {"use_lora": True, "lora_rank": rank, "lora_alpha": rank,
                                          "lora_target_modules": list(family.lora_targets),
                                          **(lora_settings or {})}})
        settings = settings.lora
        add_lora(dit, peft_config(settings, family.lora_target_candidates))
        with torch.no_grad():
            for name, p in dit.named_parameters():
                if "magnitude" in name:  # DoRA's row norms: moved, kept near the base's
                    p.mul_(1 + torch.randn(p.shape, generator=gen) * 0.1)
                elif is_adapter_param(name):
                    # LoKr and LoHa multiply more factors: larger ones for a visible update
                    scale = 0.1 if "lora_" in name else 0.3
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        with files.open(LORA_WEIGHTS) as fh:
            write_safetensors(fh, peft_state_dict(dit))
        files.write_json(ADAPTER_CONFIG, adapter_config_dict(dit))
    else:
        with torch.no_grad():
            state = {n: p + torch.randn(p.shape, generator=gen) * 0.01
                     for n, p in dit.named_parameters()}
        with files.open(TRAINABLE_FILE) as fh:
            write_safetensors(fh, state)
    files.finish({"step": 10, "base_identity": family.denoiser_identity(), "lora": lora})
    return folder


def make_workspace(root: Path, model_dir: Path, *, n_train: int = 8, n_val: int = 2,
                   seed: int = 0, sizes=((32, 32),), data: dict | None = None,
                   train: dict | None = None, lora: dict | None = None) -> "Workspace":
    """A workspace on `model_dir` with a small generated dataset (scenes at `sizes`) and the
    given [data]/[train]/[lora] settings written to project.toml."""
    import tomli_w

    from ditctl.demo.scenes import random_scenes, write_dataset
    from ditctl.models.registry import detect_family
    from ditctl.workspace import Workspace

    root.mkdir(parents=True)
    scenes = random_scenes(n_train + n_val, seed, sizes=sizes)
    write_dataset(root / "data", scenes[:n_train], csv_name="train.csv")
    if n_val:
        write_dataset(root / "data", scenes[n_train:], csv_name="val.csv")
    model = {"pretrained_model_path": str(model_dir)}
    if Path(model_dir).is_dir():  # some tests point at a folder that is never created
        model["family"] = detect_family(model_dir)
    settings = {
        "model": model,
        "data": {"train_data_path": "data/train.csv", "resolution": sizes[0][0],
                 **({"val_data_path": "data/val.csv"} if n_val else {}), **(data or {})},
        "train": {"sample_every": 0, "eval_every": 0, "report_to": "none", "seed": 7,
                  **(train or {})},
        "lora": lora or {},
    }
    (root / "project.toml").write_text(tomli_w.dumps(settings))
    (root / "prompts.txt").write_text("a red circle on a white background\n")
    return Workspace(root)
