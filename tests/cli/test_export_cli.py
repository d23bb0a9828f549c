"""`ditctl export` through the CLI: default LoRA export, --merge-lora, refusals."""

from __future__ import annotations

import json
import re

import tomli_w
import torch

from ditctl.config import Config
from ditctl.engine.loading import load_denoiser
from ditctl.models.registry import load_family
from ditctl.scaffold import init_workspace
from tests.conftest import write_test_checkpoint

RUN = "run-cli"


def make_workspace(root, model_dir, *, lora=True):
    init_workspace(root, model=str(model_dir))
    run_dir = root / "runs" / RUN
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(tomli_w.dumps(Config().to_dict()))
    return write_test_checkpoint(model_dir, run_dir / "checkpoints" / "step-000010", lora=lora)


@torch.no_grad()
def outputs(model):
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 6, 32, generator=gen)
    return model.float().eval()(x, text, torch.tensor([0.2, 0.7]))


def test_export_merge_lora_and_default_lora(tmp_path, tiny_model_dir, cli, monkeypatch):
    root = tmp_path / "ws"
    checkpoint = make_workspace(root, tiny_model_dir)
    monkeypatch.chdir(root)

    merged = cli("export", "--merge-lora", "--dtype", "fp32", "--json")
    assert merged.exit_code == 0, merged.output
    info = json.loads(merged.stdout)
    folder = root / "exports" / f"{RUN}-step10-merged"
    assert info["path"] == str(folder) and info["kind"] == "merged"
    assert info["parity"]["passed"] and info["parity"]["relative_diff"] < 1e-5
    family = load_family(tiny_model_dir)
    got = outputs(load_family(folder).load_denoiser())
    expected = outputs(load_denoiser(family, checkpoint))
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5

    lora = cli("export")
    assert lora.exit_code == 0, lora.output
    folder = root / "exports" / f"{RUN}-step10-lora"
    assert "exported" in lora.stdout and f"{RUN}-step10-lora" in lora.stdout
    parity = next(line for line in lora.stdout.splitlines() if "parity" in line).strip()
    assert re.fullmatch(r"parity passed: relative difference \S+ <= limit 0\.02 \(bf16 weights; "
                        r"max abs diff \S+\)", parity), parity
    assert (folder / "adapter_model.safetensors").is_file()
    assert (folder / "adapter_config.json").is_file() and (folder / "README.md").is_file()
    state = json.loads((root / ".ditctl" / "state.json").read_text())["export"]
    assert state["name"] == f"{RUN}-step10-lora" and state["format"] == "peft"

    again = cli("export")
    assert again.exit_code == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert cli("export", "--force").exit_code == 0

    status = json.loads(cli("status", "--json").stdout)
    assert sorted(status["exports"]) == [f"{RUN}-step10-lora", f"{RUN}-step10-merged"]


def test_export_comfy_of_a_full_run_is_refused_with_a_hint(tmp_path, tiny_model_dir, cli,
                                                           monkeypatch):
    root = tmp_path / "ws"
    make_workspace(root, tiny_model_dir, lora=False)
    monkeypatch.chdir(root)
    refused = cli("export", "--format", "comfy")
    assert refused.exit_code == 1
    assert "full fine-tune" in refused.stderr and "next:" in refused.stderr
    assert not (root / "exports").exists() or not any((root / "exports").iterdir())

    full = cli("export", "--dtype", "fp32", "--no-copy-encoders", "--name", "mine")
    assert full.exit_code == 0, full.output
    assert (root / "exports" / "mine" / "vae").is_symlink()
