"""`--compile`: each repeated block compiled once; training still learns the same LoRA (to
float tolerance: compiled kernels may fuse differently), checkpoints keep their keys, the
compiling step is logged apart from steady-state steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_workspace  # noqa: E402
from ditctl.errors import ConfigError  # noqa: E402

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 2, "lora_alpha": 2}


def test_compile_refuses_block_streaming():
    from ditctl.config import build_config
    from ditctl.engine.compile import check_compile_config

    config = build_config({"train": {"compile": True, "gradient_checkpointing": True},
                           "lora": {"use_lora": True, "offload_base_blocks": True}})
    with pytest.raises(ConfigError, match="offload_base_blocks"):
        check_compile_config(config)


def test_compile_blocks_compiles_every_repeated_block_and_keeps_keys(tiny_model_dir):
    from ditctl.engine.compile import compile_blocks
    from ditctl.models.registry import load_family

    denoiser = load_family(tiny_model_dir).load_denoiser()
    keys = list(denoiser.state_dict())
    assert compile_blocks(denoiser) == len(denoiser.blocks)
    assert all(block._compiled_call_impl is not None for block in denoiser.blocks)
    assert list(denoiser.state_dict()) == keys


@pytest.mark.slow
def test_a_compiled_run_trains_the_eager_runs_lora(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from ditctl.runs import train_log_file
    from ditctl.train import run_training

    weights, logs = [], []
    for compiled in (False, True):
        ws = make_workspace(tmp_path / f"ws-{compiled}", tiny_model_dir, n_train=2, n_val=0,
                            lora=LORA, train={"max_steps": 3, "sample_every": 0,
                                              "gradient_checkpointing": True})
        outcome = run_training(ws, ws.config({"train.compile": compiled,
                                              "eval.holdout_fraction": 0.0}))
        weights.append(load_file(outcome.result.checkpoint / "lora.safetensors"))
        logs.append([json.loads(line) for line in
                     train_log_file(outcome.run.folder).read_text().splitlines()])
    eager, compiled = weights
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6)
    assert "time/compile_step_s" in logs[1][0] and "time/step_s" not in logs[1][0]
    assert all("time/step_s" in entry for entry in logs[1][1:])
    assert all("time/step_s" in entry for entry in logs[0])
