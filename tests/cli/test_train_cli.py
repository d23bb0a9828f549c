"""`ditctl train` on the command line: every guide flag, dry runs, multi-process, signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_workspace  # noqa: E402

import ditctl.train as training  # noqa: E402

# (guide flag, value on the command line, config section, expected value)
GUIDE_FLAGS = [
    ("pretrained_model_path", "{model}", "model", "{model}"),
    ("train_data_path", "{csv}", "data", "{csv}"),
    ("val_data_path", "{csv}", "data", "{csv}"),
    ("base_image_dir", "{data}", "data", "{data}"),
    ("output_dir", "{out}", "train", "{out}"),
    ("image_column", "file", "data", "file"),
    ("caption_column", "text", "data", "text"),
    ("resolution", "48", "data", 48),
    ("center_crop", None, "data", True),
    ("random_flip", None, "data", True),
    ("use_resolution_buckets", None, "data", True),
    ("train_batch_size", "4", "train", 4),
    ("eval_batch_size", "3", "train", 3),
    ("num_epochs", "5", "train", 5),
    ("max_steps", "7", "train", 7),
    ("gradient_accumulation_steps", "2", "train", 2),
    ("learning_rate", "1e-5", "train", 1e-5),
    ("weight_decay", "0.1", "train", 0.1),
    ("lr_scheduler", "cosine", "train", "cosine"),
    ("num_warmup_steps", "10", "train", 10),
    ("use_8bit_adam", None, "train", True),
    ("use_lora", None, "lora", True),
    ("lora_rank", "16", "lora", 16),
    ("lora_alpha", "8", "lora", 8.0),
    ("lora_dropout", "0.1", "lora", 0.1),
    ("lora_target_modules", "qkv,proj", "lora", ("qkv", "proj")),
    ("lora_checkpoint", "{out}", "lora", "{out}"),
    ("sample_every", "100", "train", 100),
    ("eval_every", "50", "train", 50),
    ("sample_prompts_file", "{csv}", "train", "{csv}"),
    ("batch_multiplicity", "2", "train", 2),
    ("gradient_checkpointing", None, "train", True),
    ("mixed_precision", "bf16", "train", "bf16"),
    ("max_grad_norm", "0.5", "train", 0.5),
    ("seed", "123", "train", 123),
    ("report_to", "wandb", "train", "wandb"),
    ("project_name", "mine", "train", "mine"),
    ("use_precomputed_data", None, "train", True),
    ("precomputed_data_dir", "{out}", "train", "{out}"),
]


@pytest.fixture()
def captured(monkeypatch):
    seen = {}

    def fake_run_training(ws, config, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(training, "run_training", fake_run_training)
    return seen


@pytest.mark.parametrize("form", ["underscore", "dash"])
def test_every_guide_flag_reaches_the_config(tmp_path, tiny_model_dir, cli, captured, monkeypatch,
                                             form):
    ws = make_workspace(tmp_path / "w", tiny_model_dir)
    monkeypatch.chdir(ws.root)
    names = {"model": str(tiny_model_dir), "csv": str(ws.root / "data" / "train.csv"),
             "data": str(ws.root / "data"), "out": str(tmp_path / "out")}
    for flag, value, section, expected in GUIDE_FLAGS:
        name = flag if form == "underscore" else flag.replace("_", "-")
        args = ["train", f"--{name}"] + ([value.format(**names)] if value is not None else [])
        result = cli(*args)
        assert result.exit_code == 0, (flag, result.output)
        got = getattr(getattr(captured["config"], section), flag)
        want = expected.format(**names) if isinstance(expected, str) else expected
        assert got == want, flag


def test_lora_shorthand_sets_both(tmp_path, tiny_model_dir, cli, captured, monkeypatch):
    ws = make_workspace(tmp_path / "w", tiny_model_dir)
    monkeypatch.chdir(ws.root)
    cli("train", "--lora")
    assert captured["config"].lora.use_lora and captured["config"].lora.train_only_lora


def test_num_workers_is_the_loaders_on_train_and_precomputes_on_precompute(
        tmp_path, tiny_model_dir, cli, captured, monkeypatch):
    import ditctl.precompute

    ws = make_workspace(tmp_path / "w", tiny_model_dir)
    monkeypatch.chdir(ws.root)
    assert cli("train", "--num-workers", "0").exit_code == 0
    assert captured["config"].data.num_workers == 0
    assert captured["config"].precompute.num_workers == 2

    def fake_precompute(ws, config, **kwargs):
        captured["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(ditctl.precompute, "run_precompute", fake_precompute)
    assert cli("precompute", "--num-workers", "5").exit_code == 0
    assert captured["config"].precompute.num_workers == 5
    assert captured["config"].data.num_workers == 2
    assert "--num-workers" not in cli("ingest", "--help").output


def test_flag_errors_are_reported_together(tmp_path, tiny_model_dir, cli, monkeypatch):
    ws = make_workspace(tmp_path / "w", tiny_model_dir)
    monkeypatch.chdir(ws.root)
    result = cli("train", "--learning-rate", "-1", "--lr-scheduler", "step")
    assert result.exit_code == 1
    assert "--learning-rate = -1.0: must be > 0" in result.stderr
    assert "--lr-scheduler = 'step': must be one of" in result.stderr


def test_dry_run_plans_without_training(tmp_path, tiny_model_dir, cli, monkeypatch):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=10)
    monkeypatch.chdir(ws.root)
    base = json.loads(cli("train", "--dry-run", "--json", "--train-batch-size", "2",
                          "--num-epochs", "3").stdout)
    assert base["steps_per_epoch"] == 5 and base["total_steps"] == 15
    assert base["effective_batch"] == 2 and base["frozen_parameters"] == 0
    lora = json.loads(cli("train", "--dry-run", "--json", "--lora", "--lora-rank", "4",
                          "--use-8bit-adam", "--gradient-checkpointing", "--max-steps", "40").stdout)
    assert lora["total_steps"] == 40 and lora["trainable_parameters"] < base["trainable_parameters"]
    mb, ml = base["memory_estimate_bytes"], lora["memory_estimate_bytes"]
    assert ml["optimizer"] < mb["optimizer"] and ml["activations"] < mb["activations"]
    assert not (ws.root / "runs").exists()


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    logs = []
    for processes, batch in ((1, 4), (2, 2)):
        ws = make_workspace(tmp_path / f"p{processes}", tiny_model_dir, n_train=8,
                            lora={"use_lora": True, "train_only_lora": True, "lora_rank": 4})
        subprocess.run([sys.executable, "-m", "ditctl", "train", "-w", str(ws.root),
                        "--num-processes", str(processes), "--train-batch-size", str(batch),
                        "--max-steps", "3", "--learning-rate", "1e-3", "--run-name", "r"],
                       env=env, check=True, capture_output=True)
        lines = (ws.root / "runs" / "r" / "train_log.jsonl").read_text().splitlines()
        logs.append([json.loads(line)["train/loss"] for line in lines])
    assert len(logs[0]) == len(logs[1]) == 3
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=8,
                        lora={"use_lora": True, "train_only_lora": True, "lora_rank": 4})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ditctl", "train", "-w", str(ws.root),
                             "--max-steps", "100000", "--run-name", "r", "--checkpoint-every",
                             "100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = ws.root / "runs" / "r" / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err  # EX_TEMPFAIL: stopped, resumable, not finished
    assert "ditctl train --resume latest" in out
    checkpoints = sorted((ws.root / "runs" / "r" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "checkpoint.json").is_file()
    step = json.loads((checkpoints[0] / "checkpoint.json").read_text())["step"]
    resumed = subprocess.run([sys.executable, "-m", "ditctl", "train", "-w", str(ws.root),
                              "--resume", "latest", "--max-steps", str(step + 1)],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step-{step + 1:06d}" in resumed.stdout


def test_bf16_on_a_cpu_without_bf16_instructions_warns_to_train_in_fp32(tmp_path, tiny_model_dir,
                                                                       cli, monkeypatch):
    from ditctl.engine.precision import cpu_lacks_native_bf16

    without, with_amx = tmp_path / "cpuinfo-avx2", tmp_path / "cpuinfo-amx"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n")
    assert cpu_lacks_native_bf16(str(without)) is True
    assert cpu_lacks_native_bf16(str(with_amx)) is False
    assert cpu_lacks_native_bf16(str(tmp_path / "missing")) is False  # cannot tell: no advice

    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=2)
    monkeypatch.setattr(training, "cpu_lacks_native_bf16", lambda: True)
    result = cli("train", "-w", ws.root, "--max-steps", "1", "--mixed-precision", "bf16",
                 "--lora", "--run-name", "r")
    assert result.exit_code == 0, result.output
    assert "--mixed-precision no" in result.stderr
    monkeypatch.setattr(training, "cpu_lacks_native_bf16", lambda: False)
    result = cli("train", "-w", ws.root, "--max-steps", "1", "--mixed-precision", "bf16",
                 "--lora", "--run-name", "s")
    assert result.exit_code == 0 and "bf16 matrix instructions" not in result.stderr
