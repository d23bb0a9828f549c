"""`init --force` re-scaffolds under the workspace lock and destroys nothing a user made: an
edited project.toml or prompts.txt is kept (the new one is written next to it), and a model
that runs were trained on is never replaced. (Issue 14, item 4.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from ditctl.workspace import Workspace


@pytest.fixture()
def workspace(cli, tmp_path) -> Path:
    root = tmp_path / "proj"
    assert cli("init", root, "--model", "tiny-random").exit_code == 0
    return root


def _a_run(root: Path) -> Path:
    run = root / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text("")
    return run


def _model_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted((root / "model").rglob("*")) if p.is_file()}


def test_init_force_waits_for_the_workspace_lock(cli, workspace):
    before = (workspace / "project.toml").read_text()
    with Workspace(workspace).lock("train"):
        result = cli("init", workspace, "--model", "tiny-random", "--force")
    assert result.exit_code == 1
    assert "is busy" in result.stderr and "`train`" in result.stderr
    assert (workspace / "project.toml").read_text() == before


def test_init_force_never_replaces_the_model_runs_were_trained_on(cli, workspace):
    _a_run(workspace)
    model = _model_files(workspace)
    result = cli("init", workspace, "--model", "tiny-random", "--seed", "5", "--force")
    assert result.exit_code == 1
    assert "internal error" not in result.stderr
    assert "base model of 1 run(s)" in result.stderr and "would replace it" in result.stderr
    assert "--force" in result.stderr  # the fix: leave it out, or move the runs away first
    assert _model_files(workspace) == model


def test_init_force_keeps_edited_files_and_writes_the_new_ones_alongside(cli, workspace):
    project, prompts = workspace / "project.toml", workspace / "prompts.txt"
    edited = project.read_text() + "\n# my notes\n"
    project.write_text(edited)
    unedited_prompts = prompts.read_text()
    result = cli("init", workspace, "--model", "tiny-random", "--example", "--force")
    assert result.exit_code == 0, result.output
    assert project.read_text() == edited
    assert "kept your project.toml; the new one is project.toml.new" in result.stderr
    assert "train_data_path = \"data/example/train.csv\"" in \
        (workspace / "project.toml.new").read_text()
    # prompts.txt was as init wrote it: replaced by the example's prompts, nothing kept aside
    assert prompts.read_text() != unedited_prompts
    assert not (workspace / "prompts.txt.new").exists()
    # and once edited, it is kept too
    prompts.write_text("my prompt\n")
    again = cli("init", workspace, "--model", "tiny-random", "--force")
    assert again.exit_code == 0, again.output
    assert prompts.read_text() == "my prompt\n"
    assert (workspace / "prompts.txt.new").is_file()
    assert project.read_text() == edited


def test_init_force_onto_another_model_keeps_the_old_one_and_says_so(cli, workspace,
                                                                     tiny_model_dir):
    _a_run(workspace)
    model = _model_files(workspace)
    result = cli("init", workspace, "--model", tiny_model_dir, "--force")
    assert result.exit_code == 0, result.output
    assert "1 run(s)" in result.stderr and "were trained on the model the previous" in \
        result.stderr and "refused (unless --force)" in result.stderr
    assert _model_files(workspace) == model  # the runs' base model stays where it was
    assert str(tiny_model_dir.resolve()) in (workspace / "project.toml").read_text()
