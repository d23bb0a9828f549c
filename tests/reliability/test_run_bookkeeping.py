"""Smaller lifecycle defects: the log after kill + resume, warm-up with a constant schedule,
what resuming a finished run reports, eval racing checkpoint pruning, and status counts that
come from the manifest and cache rather than state.json. (Issue 14, item 12; `--resume ''` is
in test_error_messages.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ditctl.config import build_config
from tests.conftest import make_workspace

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


def _logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in
            (run / "train_log.jsonl").read_text().splitlines()]


def test_resume_after_a_kill_truncates_the_log_to_the_checkpoint(cli, tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA)
    result = cli("train", "-w", ws.root, "--max-steps", "3", "--checkpoint-every", "2",
                 "--run-name", "r")
    assert result.exit_code == 0, result.output
    run = ws.root / "runs" / "r"
    # as if killed after logging step 3 (half-way through a 4th line) but before its checkpoint
    shutil.rmtree(run / "checkpoints" / "step-000003")
    with open(run / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 4, "train/lo')
    resumed = cli("train", "-w", ws.root, "--resume", "latest", "--max-steps", "4")
    assert resumed.exit_code == 0, resumed.output
    assert _logged_steps(run) == [1, 2, 3, 4]


def test_resuming_a_finished_run_names_its_checkpoint(cli, tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA)
    assert cli("train", "-w", ws.root, "--max-steps", "2", "--run-name", "r").exit_code == 0
    again = cli("train", "-w", ws.root, "--resume", "latest", "--max-steps", "2")
    assert again.exit_code == 0, again.output
    assert "checkpoint None" not in again.stdout
    assert f"checkpoint {ws.root / 'runs' / 'r' / 'checkpoints' / 'step-000002'}" in again.stdout


def test_constant_schedule_with_warmup_warms_up():
    from ditctl.engine.optim import build_scheduler

    train = build_config({"train": {"lr_scheduler": "constant", "num_warmup_steps": 4,
                                    "learning_rate": 1.0}}).train
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.learning_rate)
    scheduler = build_scheduler(optimizer, train, total_steps=10)
    rates = []
    for _ in range(7):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_the_example_config_ships_constant_with_warmup():
    from ditctl.scaffold import EXAMPLE_SETTINGS

    assert EXAMPLE_SETTINGS["train"]["lr_scheduler"] == "constant"
    assert EXAMPLE_SETTINGS["train"]["num_warmup_steps"] > 0  # the case the test above covers


def test_eval_of_a_checkpoint_pruned_under_it_says_so(cli, tmp_path, tiny_model_dir,
                                                      monkeypatch):
    from ditctl.evaluation import evaluate
    from ditctl.runs import remove_checkpoint

    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA)
    assert cli("train", "-w", ws.root, "--max-steps", "2", "--checkpoint-every", "1",
               "--run-name", "r").exit_code == 0
    resolve = evaluate.resolve_checkpoint

    def pruned_by_training(*args, **kwargs):  # training prunes it just after eval found it
        found = resolve(*args, **kwargs)
        remove_checkpoint(found)
        return found

    monkeypatch.setattr(evaluate, "resolve_checkpoint", pruned_by_training)
    result = cli("eval", "-w", ws.root, "--checkpoint", "1", "--steps", "1")
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.stderr
    assert "r/step-000001 no longer exists: it was removed while in use" in result.stderr
    assert "not a complete" not in result.stderr and "damaged" not in result.stderr
    assert "--checkpoint latest" in result.stderr


def test_status_counts_come_from_the_manifest_and_cache(cli, tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=3, n_val=2)
    assert cli("precompute", "-w", ws.root).exit_code == 0
    state = json.loads(ws.state_file.read_text())
    entries = state["precompute"]["entries"]
    # a kill between writing the manifest/cache and the state leaves the state stale
    state["ingest"].update(train_count=99, val_count=98)
    state["precompute"]["entries"] = 0
    ws.state_file.write_text(json.dumps(state))
    summary = json.loads(cli("status", "-w", ws.root, "--json").stdout)
    assert summary["data"]["ingest"]["train_count"] == 3
    assert summary["data"]["ingest"]["val_count"] == 2
    assert summary["cache"]["precompute"]["entries"] == entries
    text = cli("status", "-w", ws.root).stdout
    assert "3 train / 2 val images" in text and f"{entries} entries" in text
