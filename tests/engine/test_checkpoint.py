import json

import pytest
import torch

from ditctl.config import build_config
from ditctl.engine.checkpoint import Position, load_checkpoint, save_checkpoint
from ditctl.engine.optim import build_optimizer, build_scheduler, load_state, save_state
from ditctl.engine.setup import build_denoiser
from ditctl.errors import CheckpointError, ConfigError
from ditctl.models.registry import load_family
from ditctl.runs import CheckpointWriter, list_checkpoints


def _config(**train):
    return build_config({"train": {"learning_rate": 1e-2, **train},
                         "lora": {"use_lora": True, "train_only_lora": True, "lora_rank": 4}})


def _step(denoiser, optimizer, scheduler, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 4, 4, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g)
    loss = denoiser(x, ctx, torch.tensor([0.3, 0.7])).pow(2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("eight_bit", [False, True])
def test_optimizer_state_round_trips_exactly(tiny_model_dir, tmp_path, eight_bit):
    family = load_family(tiny_model_dir)
    config = _config(use_8bit_adam=eight_bit)
    denoiser = build_denoiser(family, config)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.train)
    scheduler = build_scheduler(optimizer, config.train, 10)
    _step(denoiser, optimizer, scheduler, 0)
    save_state(optimizer.state_dict(), CheckpointWriter(tmp_path), "optimizer")
    restored = load_state(tmp_path, "optimizer")
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"] or \
        json.dumps(restored["param_groups"], default=str) == json.dumps(original["param_groups"], default=str)
    for idx, state in original["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(restored["state"][idx][key], value), key


def test_scheduler_drives_the_stepped_optimizer_under_lora(tiny_model_dir):
    family = load_family(tiny_model_dir)
    config = build_config({"train": {"learning_rate": 1.0, "lr_scheduler": "linear",
                                     "num_warmup_steps": 2},
                           "lora": {"use_lora": True, "train_only_lora": True, "lora_rank": 2}})
    denoiser = build_denoiser(family, config)
    optimizer = build_optimizer([p for p in denoiser.parameters() if p.requires_grad], config.train)
    scheduler = build_scheduler(optimizer, config.train, 6)
    lrs = []
    for step in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        _step(denoiser, optimizer, scheduler, step)
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])


def test_checkpoint_resume_restores_everything(tiny_model_dir, tmp_path):
    family = load_family(tiny_model_dir)
    config = _config()

    def fresh():
        d = build_denoiser(family, config)
        o = build_optimizer([p for p in d.parameters() if p.requires_grad], config.train)
        return d, o, build_scheduler(o, config.train, 10)

    d1, o1, s1 = fresh()
    for i in range(2):
        _step(d1, o1, s1, i)
    folder = save_checkpoint(tmp_path, Position(2, 0, 4), d1, o1, s1, {"seed": 1}, keep=None)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "checkpoint.json", "lora.safetensors", "optimizer.json",
        "optimizer.safetensors", "rng.json", "rng.safetensors", "scheduler.json"]
    _step(d1, o1, s1, 2)

    d2, o2, s2 = fresh()
    position, meta = load_checkpoint(folder, d2, o2, s2)
    assert position == Position(2, 0, 4) and meta["seed"] == 1
    _step(d2, o2, s2, 2)
    for (n1, p1), (n2, p2) in zip(d1.named_parameters(), d2.named_parameters()):
        assert torch.equal(p1, p2), n1
    assert s1.get_last_lr() == s2.get_last_lr()


def test_pruning_keeps_the_newest_and_torn_checkpoints_are_skipped(tiny_model_dir, tmp_path):
    family = load_family(tiny_model_dir)
    config = _config()
    d = build_denoiser(family, config)
    o = build_optimizer([p for p in d.parameters() if p.requires_grad], config.train)
    s = build_scheduler(o, config.train, 10)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, Position(step, 0, step), d, o, s, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    torn = tmp_path / "checkpoints" / "step-000004"
    torn.mkdir()
    (torn / "lora.safetensors").write_bytes(b"partial")
    assert list_checkpoints(tmp_path)[-1].name == "step-000003"
    with pytest.raises(CheckpointError, match="not a complete ditctl checkpoint"):
        load_checkpoint(torn, d, o, s)


def test_unknown_lora_target_lists_valid_ones(tiny_model_dir):
    family = load_family(tiny_model_dir)
    targets = f"{family.lora_targets[0]},no_such_module"
    config = build_config({"lora": {"use_lora": True, "lora_target_modules": targets}})
    with pytest.raises(ConfigError, match="unknown module.*no_such_module") as err:
        build_denoiser(family, config)
    assert all(name in err.value.hint for name in family.lora_target_candidates)
