import io
import json
import shutil

import pytest

from ditctl.config import load_config
from ditctl.errors import WorkspaceError
from ditctl.models.registry import detect_family
from ditctl.scaffold import init_workspace


def test_init_scaffolds_a_workspace(tmp_path, cli, monkeypatch):
    result = cli("init", tmp_path / "proj", "--model", "tiny-random")
    assert result.exit_code == 0, result.output
    root = tmp_path / "proj"
    for name in ("project.toml", "prompts.txt", ".gitignore", "model/model_index.json"):
        assert (root / name).exists(), name
    config = load_config(root / "project.toml")
    assert config.model.pretrained_model_path == "model"
    assert "cache/" in (root / ".gitignore").read_text()

    monkeypatch.chdir(root)
    status = cli("status", "--json")
    summary = json.loads(status.stdout)
    assert summary["model"]["ok"] and summary["model"]["family"] == detect_family(root / "model")
    assert summary["runs"] == [] and "train_data_path" in summary["next"]


def test_init_example_counts_every_training_row(tmp_path, cli):
    import csv

    result = cli("init", tmp_path / "proj", "--model", "tiny", "--example")
    assert result.exit_code == 0, result.output
    def read(name):
        with open(tmp_path / "proj" / "data" / "example" / name, newline="") as fh:
            return list(csv.DictReader(fh))

    rows, prior, val_rows = read("train.csv"), read("prior.csv"), read("val.csv")
    green = sum(" green " in row["caption"] for row in rows + prior)
    assert (len(rows), len(prior), green, len(val_rows)) == (48, 96, 48, 8)
    shown = " ".join(result.stdout.split())  # rich wraps long lines
    assert "144 training images:" in shown
    assert "(48 green scenes to learn) +" in shown
    assert "(96 prior-preservation scenes of colours the model knows, a regularization dataset)"\
        in shown
    config = load_config(tmp_path / "proj" / "project.toml")
    assert [(d.path, d.role) for d in config.data.datasets] == \
        [("data/example/prior.csv", "regularization")]


def test_init_refuses_to_overwrite_unless_forced(tmp_path, cli):
    root = tmp_path / "proj"
    assert cli("init", root, "--model", "tiny-random").exit_code == 0
    (root / "runs").mkdir()
    (root / "runs" / "keep.txt").write_text("mine")
    refused = cli("init", root, "--model", "tiny-random")
    assert refused.exit_code == 1
    assert "already a workspace" in refused.stderr and "--force" in refused.stderr
    assert cli("init", root, "--model", "tiny-random", "--force").exit_code == 0
    assert (root / "runs" / "keep.txt").read_text() == "mine"


def test_init_with_a_local_model_path_validates_it(tmp_path, tiny_model_dir):
    result = init_workspace(tmp_path / "p", model=str(tiny_model_dir))
    config = load_config(result.workspace.project_file)
    assert config.model.pretrained_model_path == str(tiny_model_dir.resolve())
    assert not (tmp_path / "p" / "model").exists()  # referenced, never copied
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model_index.json").unlink()
    with pytest.raises(Exception, match="no model_index.json"):
        init_workspace(tmp_path / "q", model=str(broken))
    assert not (tmp_path / "q").exists()


def test_status_config_shows_flags_and_file(tmp_path, cli, monkeypatch):
    assert cli("init", tmp_path / "proj", "--model", "tiny-random").exit_code == 0
    monkeypatch.chdir(tmp_path / "proj")
    (tmp_path / "proj" / "project.toml").write_text(
        (tmp_path / "proj" / "project.toml").read_text().replace(
            "# learning_rate = 0.0001", "learning_rate = 3e-05"))
    out = json.loads(cli("status", "--config", "--json").stdout)
    assert out["train"]["learning_rate"] == 3e-05 and out["model"]["pretrained_model_path"] == "model"


def test_errors_are_one_line_with_a_next_step(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("status")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0].startswith("error: no workspace here")
    assert "next: run `ditctl init NAME`" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback_instead_of_one_line(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkspaceError, match="no workspace here"):
        cli("--debug", "status")
    result = cli("status")  # the flag does not stick to later commands
    assert result.exit_code == 1 and result.stderr.startswith("error: no workspace here")


def test_help_lists_every_command_with_a_one_line_help(cli):
    from ditctl.cli.app import app

    names = [c.name for c in app.registered_commands]
    assert names == ["init", "ingest", "precompute", "train", "sample", "eval", "export", "status"]
    assert all(c.help and "\n" not in c.help for c in app.registered_commands)
    out = cli("--help").stdout
    for name in names:
        assert name in out


def test_status_shows_the_data_that_was_ingested(tmp_path, cli, monkeypatch, tiny_model_dir):
    from ditctl.demo.scenes import random_scenes, write_dataset
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n_train=3, n_val=1)
    other = write_dataset(tmp_path / "other", random_scenes(2, seed=5, sizes=((32, 32),)),
                          csv_name="other.csv")
    monkeypatch.chdir(ws.root)
    assert cli("ingest", "--train-data-path", str(other)).exit_code == 0

    summary = json.loads(cli("status", "--json").stdout)
    ingest = summary["data"]["ingest"]
    assert ingest["train_data_path"] == str(other) and ingest["train_count"] == 2
    assert ingest["val_data_path"] == str(ws.root / "data" / "val.csv")
    assert summary["data"]["ingested_other_data"] is True
    shown = wide_status_table(summary)
    assert f"{other} + data/val.csv — 2 train / 1 val images" in shown
    assert "project.toml names data/train.csv + data/val.csv" in shown

    assert cli("ingest").exit_code == 0  # project.toml's data again
    summary = json.loads(cli("status", "--json").stdout)
    assert summary["data"]["ingest"]["train_data_path"] == str(ws.root / "data" / "train.csv")
    assert summary["data"]["ingested_other_data"] is False
    shown = wide_status_table(summary)
    assert "data/train.csv + data/val.csv — 3 train / 1 val images" in shown
    assert "project.toml names" not in shown


def wide_status_table(summary: dict) -> str:
    """`ditctl status`'s table as text, wide enough that no cell wraps."""
    from rich.console import Console

    from ditctl.cli.status import _table

    console = Console(width=500, record=True, file=io.StringIO())
    console.print(_table(summary))
    return console.export_text()
