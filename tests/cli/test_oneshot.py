"""The F-Lite guide's command lines, run as they are, outside any workspace."""

import json
from pathlib import Path

from ditctl.demo.scenes import random_scenes, write_dataset
from ditctl.runs import list_checkpoints


def _data(root: Path) -> None:
    write_dataset(root / "data", random_scenes(6, 0, sizes=((32, 32),)), csv_name="train.csv")


def test_basic_usage_without_init(tmp_path, tiny_model_dir, cli, monkeypatch):
    _data(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = cli("train", "--pretrained_model_path", tiny_model_dir,
                 "--train_data_path", "./data/train.csv", "--base_image_dir", "./data",
                 "--output_dir", "./dit_finetuned", "--train_batch_size", "2", "--num_epochs", "1",
                 "--learning_rate", "1e-5", "--sample_every", "0", "--eval_every", "0",
                 "--report_to", "none")
    assert result.exit_code == 0, result.output
    out = tmp_path / "dit_finetuned"
    assert (out / "project.toml").is_file()  # the output folder became a workspace
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1 and list_checkpoints(runs[0])


def test_precompute_then_lora_from_the_cache_without_init(tmp_path, tiny_model_dir, cli,
                                                          monkeypatch):
    _data(tmp_path)
    monkeypatch.chdir(tmp_path)
    pre = cli("precompute", "--pretrained_model_path", tiny_model_dir,
              "--data_path", "./data/train.csv", "--base_image_dir", "./data",
              "--output_dir", "./precomputed_data", "--resolution", "32",
              "--mixed_precision", "no", "--json")
    assert pre.exit_code == 0, pre.output
    assert json.loads(pre.stdout)["latents"]["added"] == 6
    train = cli("train", "--pretrained_model_path", tiny_model_dir, "--use_precomputed_data",
                "--precomputed_data_dir", "./precomputed_data", "--output_dir",
                "./dit_finetuned_lora", "--use_lora", "--train_only_lora", "--lora_rank", "4",
                "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                "--learning_rate", "1e-5", "--gradient_checkpointing", "--max_steps", "2",
                "--sample_every", "0", "--eval_every", "0", "--report_to", "none")
    assert train.exit_code == 0, train.output
    runs = list((tmp_path / "dit_finetuned_lora" / "runs").iterdir())
    assert (list_checkpoints(runs[0])[-1] / "lora.safetensors").is_file()


def test_without_workspace_or_output_dir_the_error_says_what_to_do(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("train", "--lora")
    assert result.exit_code == 1
    assert "no workspace here" in result.stderr and "ditctl init" in result.stderr
