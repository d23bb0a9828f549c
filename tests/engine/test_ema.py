"""EMA of the trained weights: the update rule, training, exact resume, and which weights
sample / eval / export use (engine/ema.py, engine/loading.py)."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_workspace, write_test_checkpoint  # noqa: E402

from ditctl.config import build_config  # noqa: E402
from ditctl.engine.ema import EMA_WEIGHTS, EmaWeights  # noqa: E402
from ditctl.errors import CheckpointError, ConfigError  # noqa: E402
from ditctl.train import run_training  # noqa: E402

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


def _train(ws, **overrides):
    resume = overrides.pop("resume", None)
    force = overrides.pop("force", False)
    config = ws.config({k if "." in k else f"train.{k}": v for k, v in overrides.items()})
    return run_training(ws, config, resume=resume, force=force)


def _raw(model_dir: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's raw trained weights by parameter name, as the EMA names them."""
    from ditctl.engine.loading import load_denoiser
    from ditctl.models.registry import load_family

    model = load_denoiser(load_family(model_dir), checkpoint, weights="raw")
    names = load_file(checkpoint / EMA_WEIGHTS).keys()
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


def test_ema_update_is_the_documented_rule_with_warmup_and_every():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)  # frozen: not averaged
    train = build_config({"train": {"ema_decay": 0.9, "ema_warmup": True, "ema_every": 2}}).train
    ema = EmaWeights(layer, train)
    assert set(ema.shadow) == {"weight"} and ema.shadow["weight"].dtype == torch.float32
    expected, updates = layer.weight.detach().double().clone(), 0
    for step in range(1, 9):
        with torch.no_grad():
            layer.weight.add_(torch.randn(2, 3))
        assert ema.update(step) == (step % 2 == 0)
        if step % 2 == 0:
            decay = min(0.9, (1 + updates) / (10 + updates))
            expected = expected * decay + layer.weight.detach().double() * (1 - decay)
            updates += 1
        torch.testing.assert_close(ema.shadow["weight"].double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_trained_ema_equals_the_ema_hand_computed_from_each_steps_weights(
        tmp_path, tiny_model_dir, monkeypatch, lora):
    start = {}
    original = EmaWeights.__init__

    def spy(self, denoiser, train):  # the weights training starts from
        original(self, denoiser, train)
        start.update({k: v.clone() for k, v in self.state_dict().items()})

    monkeypatch.setattr(EmaWeights, "__init__", spy)
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA if lora else None,
                        train={"gradient_accumulation_steps": 2, "learning_rate": 1e-2})
    out = _train(ws, max_steps=3, checkpoint_every=1, ema_decay=0.5, lr_scheduler="constant",
                 eval_every=1 if lora else 0)
    checkpoints = sorted((out.run.folder / "checkpoints").iterdir())
    expected = {k: v.double() for k, v in start.items()}
    for checkpoint in checkpoints:
        raw = _raw(tiny_model_dir, checkpoint)
        assert raw.keys() == expected.keys()
        expected = {k: 0.5 * expected[k] + 0.5 * raw[k].double() for k in expected}
        saved = load_file(checkpoint / EMA_WEIGHTS)
        for name, value in expected.items():
            torch.testing.assert_close(saved[name].double(), value, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)  # the EMA lags the weights
    if lora:  # validation during training measured raw and EMA, and left training unchanged
        log = out.run.folder / "eval" / "during_training.jsonl"
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert [(d["step"], d["weights"]) for d in lines] == [
            (s, w) for s in (1, 2, 3) for w in ("raw", "ema")]
        assert lines[-1]["val_loss"] != lines[-2]["val_loss"]
    meta = json.loads((checkpoints[-1] / "checkpoint.json").read_text())
    assert meta["ema"] == {"decay": 0.5, "warmup": False, "every": 1}


def test_resumed_ema_equals_the_uninterrupted_runs_bit_for_bit(tmp_path, tiny_model_dir,
                                                                monkeypatch):
    settings = dict(train={"train_batch_size": 2, "gradient_accumulation_steps": 2,
                           "learning_rate": 1e-2, "ema_decay": 0.8, "ema_warmup": True,
                           "ema_every": 2, "ema_on_cpu": True}, lora=LORA)
    straight = make_workspace(tmp_path / "a", tiny_model_dir, n_train=6, **settings)
    full = _train(straight, max_steps=5, checkpoint_every=100, run_name="r")
    split = make_workspace(tmp_path / "b", tiny_model_dir, n_train=6, **settings)
    from ditctl.engine.monitor import Monitor

    log_step = Monitor.log_step

    def stop_at_3(self, at, *args, **kwargs):  # SIGTERM during step 3, between EMA updates
        log_step(self, at, *args, **kwargs)
        if at == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Monitor, "log_step", stop_at_3)
    # the split run also measures raw and EMA validation loss at every step: swapping the EMA
    # in and out for it must leave training exactly as it was
    assert _train(split, max_steps=5, checkpoint_every=100, run_name="r",
                  eval_every=1).result.steps == 3
    monkeypatch.setattr(Monitor, "log_step", log_step)
    resumed = _train(split, max_steps=5, checkpoint_every=100, eval_every=1, resume="latest")
    for name in (EMA_WEIGHTS, "lora.safetensors"):
        a = load_file(full.result.checkpoint / name)
        b = load_file(resumed.result.checkpoint / name)
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_model_dir):
    """A LoRA run with an EMA (3 steps), its workspace and last checkpoint."""
    ws = make_workspace(tmp_path_factory.mktemp("ema") / "w", tiny_model_dir, n_train=4,
                        n_val=2, lora=LORA,
                        train={"learning_rate": 5e-2, "ema_decay": 0.5, "run_name": "r",
                               "lr_scheduler": "constant"})
    out = _train(ws, max_steps=3, checkpoint_every=3)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return ws, out.result.checkpoint


def test_loader_puts_the_ema_or_the_raw_weights_in_place(ema_run, tiny_model_dir):
    from ditctl.engine.loading import checkpoint_weights, load_denoiser
    from ditctl.models.registry import load_family

    _, checkpoint = ema_run
    family = load_family(tiny_model_dir)
    ema = load_file(checkpoint / EMA_WEIGHTS)
    params = {w: dict(load_denoiser(family, checkpoint, weights=w).named_parameters())
              for w in ("auto", "ema", "raw")}
    for name, value in ema.items():
        assert torch.equal(params["ema"][name], value) and torch.equal(params["auto"][name], value)
    assert any(not torch.equal(params["raw"][n], ema[n]) for n in ema)
    assert checkpoint_weights(checkpoint) == "ema" and checkpoint_weights(None) is None


def test_sample_with_weights_ema_and_raw_differ_and_record_which(ema_run, cli, tmp_path):
    ws, checkpoint = ema_run
    images = {}
    for weights in ("ema", "raw"):
        out = tmp_path / weights
        result = cli("sample", "-w", ws.root, "--checkpoint", checkpoint, "--weights", weights,
                     "--prompt", "a red circle", "--steps", "2", "--out", out)
        assert result.exit_code == 0, result.output
        index = json.loads((out / "index.json").read_text())
        assert index["settings"]["weights"] == weights
        png = next(p for p in out.iterdir() if p.name.startswith("p000"))
        images[weights] = png.read_bytes()
    assert images["ema"] != images["raw"]


def test_eval_shows_raw_and_ema_side_by_side(ema_run, cli):
    ws, _ = ema_run
    result = cli("eval", "-w", ws.root, "--run", "r", "--steps", "1")
    assert result.exit_code == 0, result.output
    metrics = json.loads((ws.root / "runs" / "r" / "eval" / "metrics.json").read_text())
    models = {m["label"]: m for m in metrics["models"]}
    assert list(models) == ["base", "step-000003 (raw)", "step-000003 (ema)"]
    assert models["step-000003 (raw)"]["weights"] == "raw"
    assert models["step-000003 (raw)"]["val_loss"] != models["step-000003 (ema)"]["val_loss"]
    assert [p["label"] for p in metrics["curve"]] == ["base", "step-000003 (ema)"]
    assert "step-000003 (ema)" in (ws.root / "runs" / "r" / "eval" / "report.html").read_text()


def test_export_with_weights_ema_and_raw_each_passes_its_parity_and_says_which(ema_run, cli):
    from ditctl.export import export_checkpoint

    ws, checkpoint = ema_run
    if not (ws.root / "runs" / "r" / "eval" / "metrics.json").is_file():  # run on its own
        assert cli("eval", "-w", ws.root, "--run", "r", "--steps", "1").exit_code == 0
    exported = {}
    for weights in ("ema", "raw"):
        result = export_checkpoint(ws, ws.config({"export.weights": weights,
                                                  "export.dtype": "fp32"}),
                                   checkpoint=str(checkpoint), name=f"x-{weights}")
        assert result.weights == weights and result.parity.passed
        card = (result.path / "README.md").read_text()
        assert ("exponential moving average (EMA)" in card) == (weights == "ema")
        assert f"| step-000003 ({weights}) (this export) |" in card
        assert card.count("(this export)") == 1
        exported[weights] = load_file(next(result.path.glob("*.safetensors")))
    assert any(not torch.equal(exported["ema"][k], exported["raw"][k]) for k in exported["ema"])


def test_bad_ema_combinations_are_one_line_errors(tmp_path, tiny_model_dir, cli):
    with pytest.raises(ConfigError, match="ema_decay needs .*strategy = 'ddp'"):
        build_config({"train": {"ema_decay": 0.99}, "distributed": {"strategy": "fsdp"}})
    with pytest.raises(ConfigError, match="need ema_decay > 0"):
        build_config({"train": {"ema_on_cpu": True}})
    with pytest.raises(ConfigError, match="ema_decay"):
        build_config({"train": {"ema_decay": 1.0}})
    from ditctl.engine.loading import checkpoint_weights

    plain = write_test_checkpoint(tiny_model_dir, tmp_path / "plain" / "step-000001")
    assert checkpoint_weights(plain) == "raw"
    with pytest.raises(CheckpointError, match="holds no EMA"):
        checkpoint_weights(plain, "ema")
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4)
    result = cli("sample", "-w", ws.root, "--checkpoint", plain, "--weights", "ema",
                 "--prompt", "x")
    assert result.exit_code == 1 and "holds no EMA" in result.stderr
    result = cli("sample", "-w", ws.root, "--base", "--weights", "ema", "--prompt", "x")
    assert result.exit_code == 1
    assert "error: --weights ema picks a checkpoint's moving average; base model" in result.stderr
    assert "Traceback" not in result.output
    plan = cli("train", "-w", ws.root, "--dry-run", "--ema-decay", "0.99", "--ema-on-cpu")
    assert plan.exit_code == 0 and "EMA in host memory" in plan.stdout


def test_resuming_a_run_without_ema_with_ema_on_is_refused(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA)
    _train(ws, max_steps=1, run_name="r")
    with pytest.raises(CheckpointError, match="ema_decay 0.0 -> 0.9"):
        _train(ws, max_steps=2, ema_decay=0.9, resume="latest")
    with pytest.raises(CheckpointError, match="holds no ema.safetensors"):
        _train(ws, max_steps=2, ema_decay=0.9, resume="latest", force=True)


def test_dry_run_plan_counts_the_ema_copy_on_the_device_or_in_host_memory(tmp_path,
                                                                           tiny_model_dir):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4, lora=LORA)
    plans = {name: run_training(ws, ws.config(overrides), dry_run=True).plan
             for name, overrides in (("off", {}), ("device", {"train.ema_decay": 0.99}),
                                     ("host", {"train.ema_decay": 0.99,
                                               "train.ema_on_cpu": True}))}
    memory = {name: plan["memory_estimate_bytes"] for name, plan in plans.items()}
    ema = plans["off"]["trainable_parameters"] * 4
    assert memory["device"]["ema_weights"] == ema and "ema_weights" not in memory["off"]
    assert memory["device"]["total"] == memory["off"]["total"] + ema
    assert memory["host"]["ema_host"] == ema and memory["host"]["total"] == memory["off"]["total"]


@pytest.mark.slow
def test_ddp_ranks_keep_the_same_ema_and_rank_0_saves_it(tmp_path, tiny_model_dir):
    """Two DDP processes (gloo): every rank's EMA after the last update, dumped by a
    sitecustomize hook, is bit-identical, and equals the checkpoint's."""
    import subprocess
    import textwrap

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os
        if os.environ.get("RANK") is not None:
            from safetensors.torch import save_file
            from ditctl.engine.ema import EmaWeights
            _update = EmaWeights.update
            def update(self, step):
                done = _update(self, step)
                save_file(self.state_dict(), "{hooks}/rank" + os.environ["RANK"] + ".safetensors")
                return done
            EmaWeights.update = update
    """))
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=8, lora=LORA)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "ditctl", "train", "-w", str(ws.root),
                           "--num-processes", "2", "--train-batch-size", "2", "--max-steps", "3",
                           "--learning-rate", "1e-2", "--ema-decay", "0.5", "--run-name", "r"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(hooks / f"rank{r}.safetensors") for r in (0, 1)]
    saved = load_file(ws.root / "runs" / "r" / "checkpoints" / "step-000003" / EMA_WEIGHTS)
    assert ranks[0].keys() == ranks[1].keys() == saved.keys()
    for name in saved:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(ranks[0][name], saved[name]), name
