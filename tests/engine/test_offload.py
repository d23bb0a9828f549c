"""Offload: the frozen base streamed block by block, and where the text encoder runs."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import family_class, make_workspace  # noqa: E402

from ditctl.config import build_config  # noqa: E402
from ditctl.train import run_training  # noqa: E402

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _lora_model(tiny_model_dir, precision):
    from ditctl.engine.setup import build_denoiser
    from ditctl.models.registry import load_family

    config = build_config({"lora": {**LORA, "base_precision": precision},
                           "train": {"mixed_precision": "bf16", "gradient_checkpointing": True}})
    torch.manual_seed(0)
    model = build_denoiser(load_family(tiny_model_dir), config)
    with torch.no_grad():  # adapters that change the output, so their gradients are real
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def _step(family, model):
    x, t, cond = family.parity_inputs(model, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = family.predict(model, x, t, cond)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_streamed_blocks_give_identical_outputs_and_gradients(tiny_model_dir, precision):
    from ditctl.engine.offload import stream_base_blocks
    from ditctl.models.blocks import repeated_blocks
    from ditctl.models.registry import load_family

    family = load_family(tiny_model_dir)
    plain = _lora_model(tiny_model_dir, precision)
    expected_out, expected_grads = _step(family, plain)
    streamed = _lora_model(tiny_model_dir, precision)
    streamer = stream_base_blocks(streamed, "cpu")
    out, grads = _step(family, streamed)
    assert torch.equal(out, expected_out)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], expected_grads[name]), name
    # forward (2 blocks) and the recomputation in backward (reverse order) each ran every block
    depth = len(repeated_blocks(streamed))
    assert streamer.copies == 2 * depth
    assert streamer.resident_peak <= 2  # the running block and the prefetched one
    # the backward's last recomputation may stop before the block's end (no post-hook): at most
    # that one block is still resident; parked, every block points at its host tensors again
    assert sum(slot.live is not None for slot in streamer.slots) <= 1
    streamer.park_all()
    for slot in streamer.slots:
        assert slot.live is None
        for (module, name), host in slot.host.items():
            current = module._parameters.get(name, module._buffers.get(name))
            assert current is host and not host.requires_grad
    assert all(p.requires_grad for n, p in streamed.named_parameters() if "lora_" in n)


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
