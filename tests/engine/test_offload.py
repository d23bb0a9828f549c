"""Offload: training with the frozen base streamed block by block, and where the text encoder
runs. (That streamed blocks give the same outputs and gradients is checked for every family in
tests/models/test_family_conformance.py.)"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import family_class, make_workspace  # noqa: E402

from ditctl.config import build_config  # noqa: E402
from ditctl.train import run_training  # noqa: E402

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


def test_training_with_streamed_blocks_equals_training_without(tmp_path, tiny_model_dir):
    settings = dict(train={"mixed_precision": "bf16", "gradient_checkpointing": True,
                           "learning_rate": 1e-3}, n_train=4)
    lora = {**LORA, "base_precision": "nf4"}
    a = make_workspace(tmp_path / "a", tiny_model_dir, lora=lora, **settings)
    b = make_workspace(tmp_path / "b", tiny_model_dir, lora={**lora, "offload_base_blocks": True},
                       **settings)
    wa = load_file(run_training(a, a.config({"train.max_steps": 2})).result.checkpoint
                   / "lora.safetensors")
    wb = load_file(run_training(b, b.config({"train.max_steps": 2})).result.checkpoint
                   / "lora.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_on_the_fly_training_runs_the_text_encoder_where_configured(tmp_path, tiny_model_dir,
                                                                   monkeypatch):
    from ditctl.models.registry import load_family
    from ditctl.training_source import make_source

    devices = []
    cls = family_class(tiny_model_dir)
    original = cls.load_text_encoder

    def record(self, dtype=torch.float32, device="cpu"):
        devices.append(torch.device(device).type)
        return original(self, dtype, device)

    monkeypatch.setattr(cls, "load_text_encoder", record)
    ws = make_workspace(tmp_path / "w", tiny_model_dir)
    family = load_family(tiny_model_dir)
    for where in ("cpu", "accelerator"):
        source = make_source(ws, ws.config({"train.text_encoder_device": where,
                                            "train.use_precomputed_data": False}), family, [])
        embedding = source.conditioning("a red circle").sequence
        assert embedding.device.type == "cpu"  # batches stay on the CPU, as from the cache
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices == ["cpu", expected]


def test_sampling_keeps_the_text_encoder_on_the_cpu_when_asked(tiny_model_dir, monkeypatch):
    from ditctl.models.registry import load_family
    from ditctl.sampling import ModelChoice, load_for_sampling

    seen = []
    cls = family_class(tiny_model_dir)
    original = cls.load_text_encoder

    def record(self, dtype=torch.float32, device="cpu"):
        seen.append(torch.device(device))
        return original(self, dtype, device)

    monkeypatch.setattr(cls, "load_text_encoder", record)
    family = load_family(tiny_model_dir)
    choice = ModelChoice(family, None, None, "base")
    settings = build_config({"sample": {"text_encoder_device": "cpu", "offload": True}}).sample
    denoiser, vae, embeddings = load_for_sampling(choice, settings, ["a red circle"],
                                                  torch.device("cpu"))
    assert seen == [torch.device("cpu")] and embeddings.cond.batch_size == 1
