"""Shared fixtures: offline environment, one tiny pipeline per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ditctl.console import quiet_libraries  # noqa: E402

quiet_libraries()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random F-Lite-layout pipeline, built once (do not modify it in tests)."""
    from ditctl.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture()
def cli():
    """Invoke the ditctl CLI in-process: cli("status", "--json") -> click Result."""
    from typer.testing import CliRunner

    from ditctl.cli.app import app

    runner = CliRunner()

    def invoke(*args: str, **kwargs):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)

    return invoke
