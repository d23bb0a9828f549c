"""The whole CLI chain on `--model tiny-sd3`, and its exports in diffusers' own pipeline.

init -> ingest -> precompute -> train --lora -> sample -> eval -> export --merge-lora, then:
- `ditctl sample --model EXPORT` and `StableDiffusion3Pipeline.from_pretrained(EXPORT)` draw the
  same image (same prompt, seed, steps, guidance);
- the LoRA export (diffusers' layout) loaded with `pipe.load_lora_weights()` predicts what the
  merged export predicts (relative difference <= 1e-3, fp32), and the LoRA changed the base enough
  for that comparison to mean something.
"""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import tomli_w
import torch
from PIL import Image

from ditctl.models.registry import load_family
from ditctl.sampling import initial_noise, plan_images

PROMPT = "a red circle on a white background"
SIZE, STEPS, GUIDANCE, SEED = 32, 4, 4.0, 5


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
def test_tiny_sd3_through_the_whole_chain(tmp_path, cli, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    from ditctl.demo.scenes import random_scenes, write_dataset

    root = tmp_path / "ws"
    assert cli("init", root, "--model", "tiny-sd3").exit_code == 0
    scenes = random_scenes(6, 0, sizes=((SIZE, SIZE),))
    write_dataset(root / "data", scenes[:4], csv_name="train.csv")
    write_dataset(root / "data", scenes[4:], csv_name="val.csv")
    settings = tomllib.loads((root / "project.toml").read_text())
    assert settings["model"]["family"] == "sd3"
    settings["data"] = {"train_data_path": "data/train.csv", "val_data_path": "data/val.csv",
                        "resolution": SIZE}
    # a large learning rate, so the LoRA moves the model well beyond the comparisons' tolerance
    settings["train"] = {"sample_every": 0, "eval_every": 0, "report_to": "none", "seed": 7,
                         "train_batch_size": 2, "learning_rate": 2e-2, "num_warmup_steps": 0}
    settings["sample"] = {"steps": STEPS, "guidance_scale": GUIDANCE, "seed": SEED}
    (root / "project.toml").write_text(tomli_w.dumps(settings))
    monkeypatch.chdir(root)

    for command in (("ingest",), ("precompute",), ("train", "--lora", "--max-steps", "4"),
                    ("sample", "--prompt", PROMPT), ("eval",),
                    ("export", "--merge-lora", "--dtype", "fp32", "--name", "merged"),
                    ("export", "--dtype", "fp32", "--name", "lora")):
        result = cli(*command)
        assert result.exit_code == 0, (command, result.output)
    merged, lora = root / "exports" / "merged", root / "exports" / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    assert "load_lora_weights" in (lora / "README.md").read_text()
    refused = cli("export", "--format", "comfy", "--name", "comfy")
    assert refused.exit_code == 1 and "no single-file (comfy) layout" in refused.stderr

    # ditctl sample on the merged export vs diffusers' pipeline loaded from it
    out = tmp_path / "samples"
    result = cli("sample", "--model", merged, "--prompt", PROMPT, "--out", out)
    assert result.exit_code == 0, result.output
    ours = np.asarray(Image.open(next(out.glob("*.png")))).astype(int)
    pipe = StableDiffusion3Pipeline.from_pretrained(merged).to(torch.float32)
    noise = initial_noise(plan_images(1, 1, SEED)[0].seed,
                          load_family(merged).latent.latent_shape(SIZE, SIZE)).unsqueeze(0)
    with torch.no_grad():
        theirs = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE, latents=noise, output_type="np").images[0]
    theirs = (theirs * 255).round().astype(int)
    assert ours.shape == theirs.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() <= 1  # measured: 0/255

    # the diffusers-format LoRA on the base predicts what the merged export predicts
    family = load_family(merged)
    base = StableDiffusion3Pipeline.from_pretrained(root / "model").to(torch.float32)
    x, t, cond = family.parity_inputs(base.transformer)
    with torch.no_grad():
        before = family.predict(base.transformer, x, t, cond)
        base.load_lora_weights(lora)
        with_lora = family.predict(base.transformer, x, t, cond)
        expected = family.predict(family.load_denoiser(), x, t, cond)
    assert _relative(with_lora, expected) <= 1e-3  # measured: ~1e-7
    assert _relative(before, expected) > 1e-2  # the LoRA did change the model
    report = json.loads(cli("status", "--json").stdout)
    assert sorted(report["exports"]) == ["lora", "merged"]
