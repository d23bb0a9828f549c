"""A checkpoint carries a manifest of its files (sizes, sha256), written last, and every load
checks it: a missing, truncated or damaged file is refused in one line naming the file and the
previous good checkpoint, never replaced by the base model or by freshly initialised weights.
(Issue 14, item 1.)"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ditctl.train import run_training
from tests.conftest import make_workspace

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_alpha": 4}


def _trained(root: Path, model_dir: Path, lora: dict | None) -> Path:
    """A workspace whose run r has complete checkpoints at steps 1 and 2."""
    ws = make_workspace(root, model_dir, n_train=4, lora=lora)
    config = ws.config({"train.max_steps": 2, "train.checkpoint_every": 1,
                        "train.run_name": "r"})
    run_training(ws, config)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return root


@pytest.fixture(scope="module")
def lora_template(tmp_path_factory, tiny_model_dir):
    return _trained(tmp_path_factory.mktemp("lora") / "w", tiny_model_dir, LORA)


@pytest.fixture(scope="module")
def full_template(tmp_path_factory, tiny_model_dir):
    return _trained(tmp_path_factory.mktemp("full") / "w", tiny_model_dir, None)


def _copy(template: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a fresh copy of the workspace, its latest checkpoint step-000002)."""
    root = shutil.copytree(template, tmp_path / "w", symlinks=True)
    return root, root / "runs" / "r" / "checkpoints" / "step-000002"


def _one_line_refusal(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_the_manifest_lists_every_file_with_its_size_and_hash_and_is_written_last(
        lora_template):
    checkpoint = lora_template / "runs" / "r" / "checkpoints" / "step-000002"
    marker = checkpoint / "checkpoint.json"
    files = json.loads(marker.read_text())["files"]
    on_disk = sorted(p.name for p in checkpoint.iterdir() if p.name != "checkpoint.json")
    assert sorted(files) == on_disk
    assert {"lora.safetensors", "adapter_config.json", "optimizer.safetensors",
            "rng.safetensors", "scheduler.json"} <= set(files)
    for name, record in files.items():
        data = (checkpoint / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    last = max((checkpoint / name).stat().st_mtime_ns for name in files)
    assert marker.stat().st_mtime_ns >= last


def test_export_refuses_a_full_checkpoint_missing_its_trained_weights(cli, full_template,
                                                                       tmp_path):
    root, checkpoint = _copy(full_template, tmp_path)
    (checkpoint / "trainable.safetensors").unlink()
    result = cli("export", "-w", root)
    _one_line_refusal(result, "r/step-000002", "trainable.safetensors is missing",
                      "step-000001")
    assert not (root / "exports").exists() or not any((root / "exports").iterdir())


def test_export_refuses_a_lora_checkpoint_missing_its_adapter_config(cli, lora_template,
                                                                     tmp_path):
    root, checkpoint = _copy(lora_template, tmp_path)
    (checkpoint / "adapter_config.json").unlink()
    for args in ([], ["--merge-lora"]):
        result = cli("export", "-w", root, *args)
        _one_line_refusal(result, "adapter_config.json is missing", "step-000001")
    assert not (root / "exports").exists() or not any((root / "exports").iterdir())


def test_resume_refuses_a_lora_checkpoint_missing_its_weights(cli, lora_template, tmp_path):
    root, checkpoint = _copy(lora_template, tmp_path)
    (checkpoint / "lora.safetensors").unlink()
    result = cli("train", "-w", root, "--resume", "latest", "--max-steps", "3")
    _one_line_refusal(result, "lora.safetensors is missing", "step-000001")
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step-000001", "step-000002"]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


COMMANDS = {
    "sample": ["sample", "--steps", "1", "--checkpoint", "2"],
    "eval": ["eval", "--steps", "1", "--checkpoint", "2"],
    "export": ["export", "--checkpoint", "2"],
    "resume": ["train", "--resume", "2", "--max-steps", "3"],
}


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_load_refuses_damaged_weights(cli, lora_template, tmp_path, command, damage):
    root, checkpoint = _copy(lora_template, tmp_path)
    (_flip_a_byte if damage == "flipped byte" else _truncate)(checkpoint / "lora.safetensors")
    result = cli(*COMMANDS[command][:1], "-w", root, *COMMANDS[command][1:])
    expected = "its content does not match" if damage == "flipped byte" else "bytes, its manifest"
    _one_line_refusal(result, "lora.safetensors", expected, "step-000001")


def test_a_damaged_marker_is_named(cli, lora_template, tmp_path):
    root, checkpoint = _copy(lora_template, tmp_path)
    (checkpoint / "checkpoint.json").write_text('{"step": 2, "fil')
    result = cli("export", "-w", root, "--checkpoint", str(checkpoint))
    _one_line_refusal(result, "checkpoint.json is damaged", "step-000001")


def test_checkpoints_written_before_manifests_load_with_a_warning(cli, lora_template, tmp_path):
    """The choice for old checkpoints: accepted (their checkpoint.json marks them complete),
    with a warning, after checking that the weight files the marker implies are there."""
    root, checkpoint = _copy(lora_template, tmp_path)
    marker = checkpoint / "checkpoint.json"
    meta = json.loads(marker.read_text())
    del meta["files"]
    marker.write_text(json.dumps(meta))
    result = cli("export", "-w", root, "--json")
    assert result.exit_code == 0, result.output
    assert "written before checkpoint manifests" in result.stderr

    (checkpoint / "adapter_config.json").unlink()  # an old LoRA checkpoint must still have it
    result = cli("export", "-w", root, "--name", "again")
    _one_line_refusal(result, "adapter_config.json is missing", "step-000001")


def test_starting_from_a_damaged_lora_checkpoint_is_refused(cli, lora_template, tmp_path):
    root, checkpoint = _copy(lora_template, tmp_path)
    _flip_a_byte(checkpoint / "lora.safetensors")
    result = cli("train", "-w", root, "--lora-checkpoint", checkpoint, "--run-name", "from",
                 "--max-steps", "1")
    _one_line_refusal(result, "lora.safetensors", "does not match")
    assert not (root / "runs" / "from").exists()
