"""The memory plan of a dry run: it reads no weights and prices the base by its precision.
(The plan's parts against what they model are per family: test_family_conformance.py for
the stored bytes of each base precision, test_flite_memory_plan.py for F-Lite's activations
and streaming host memory.)"""

import sys
from pathlib import Path

import torch

from ditctl.models.blocks import repeated_blocks
from ditctl.models.registry import load_family

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import family_class, make_workspace  # noqa: E402


def test_dry_run_plans_each_base_precision_from_the_skeleton(tmp_path, tiny_model_dir,
                                                             monkeypatch):
    """--dry-run reads no weights (the skeleton is on the meta device) and prices the base by
    its precision; block streaming leaves two blocks' worth on the device."""
    from accelerate.state import AcceleratorState

    from ditctl.train import run_training

    def refuse(*args, **kwargs):
        raise AssertionError("the plan must not load weights")

    monkeypatch.setattr(family_class(tiny_model_dir), "load_denoiser", refuse)
    ws = make_workspace(tmp_path / "w", tiny_model_dir)
    plans = {}
    for precision, offload in (("bf16", False), ("fp8", False), ("nf4", False), ("nf4", True)):
        config = ws.config({"lora.use_lora": True, "lora.train_only_lora": True,
                            "lora.base_precision": precision, "train.mixed_precision": "bf16",
                            "train.gradient_checkpointing": True,
                            "lora.offload_base_blocks": offload})
        plans[(precision, offload)] = run_training(ws, config, dry_run=True).plan
        AcceleratorState._reset_state(reset_partial_state=True)
    memory = {k: v["memory_estimate_bytes"] for k, v in plans.items()}
    assert plans[("nf4", False)]["base_precision"] == "nf4"
    assert memory[("nf4", False)]["base_weights"] < memory[("fp8", False)]["base_weights"] \
        < memory[("bf16", False)]["base_weights"]
    # streaming keeps 2 blocks on the device: all of them when the model has no more (fewer
    # resident blocks are checked in test_family_conformance.py's planned base bytes)
    with torch.device("meta"):
        depth = len(repeated_blocks(load_family(tiny_model_dir).build_denoiser_skeleton()))
    streamed, whole = memory[("nf4", True)]["base_weights"], memory[("nf4", False)]["base_weights"]
    assert streamed == whole if depth <= 2 else streamed < whole
    assert plans[("nf4", True)]["memory_estimate_bytes"]["offload_base_blocks"]
    for m in memory.values():
        assert m["total"] == sum(m[k] for k in ("base_weights", "trainable_weights", "gradients",
                                                "optimizer", "activations", "working_set"))
        assert m["activations_if_checkpointing_toggled"] > m["activations"]
