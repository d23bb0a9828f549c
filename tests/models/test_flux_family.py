"""The FLUX.1 family against diffusers' own FluxPipeline (tiny-flux, offline, CPU).

What the conformance suite cannot see: the time shift and latent packing are FluxPipeline's,
FLUX.1-dev reads the guidance scale (no unconditional pass), the kohya/BFL LoRA layout fuses
q/k/v exactly and diffusers' own kohya converter reads it, and the whole CLI chain ends in
exports that FluxPipeline loads: same images as `ditctl sample`, same predictions from the
diffusers-format LoRA as from the merged export.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditctl.engine.lora import add_lora, peft_state_dict  # noqa: E402
from ditctl.export import lora_formats, parity  # noqa: E402
from ditctl.models import flux, registry  # noqa: E402
from ditctl.models.base import GUIDANCE_EXTRA, Conditioning  # noqa: E402
from ditctl.sampling import Guidance, derive_seed, guided_velocity, time_grid  # noqa: E402
from ditctl.models.tiny_flux import scheduler_config, tiny_transformer_config  # noqa: E402

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return registry.build_tiny("flux", tmp_path_factory.mktemp("flux") / "model")


def _relative(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return ((candidate - reference).abs().max() / reference.abs().max()).item()


def _random_lora(denoiser: torch.nn.Module, targets, **kwargs) -> None:
    """Adapters on `targets` with random (non-zero) ups, so that every LoRA matters."""
    from peft import LoraConfig

    add_lora(denoiser, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                  init_lora_weights="gaussian", **kwargs))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


# --- FluxPipeline's math ------------------------------------------------------------------------

def test_time_shift_packing_and_ids_are_flux_pipelines(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    family = registry.load_family(tiny)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny / "scheduler")
    steps = 6
    for h, w in ((4, 4), (64, 96), (128, 128)):  # latent sides: 16 to 4096 tokens
        mu = calculate_shift((h // 2) * (w // 2), 256, 4096, 0.5, 1.15)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = time_grid(steps, family.resolution_shift(h, w)).float()
        torch.testing.assert_close(ours, scheduler.sigmas, atol=1e-6, rtol=0)

    x = torch.randn(2, 16, 6, 10)
    packed = FluxPipeline._pack_latents(x, 2, 16, 6, 10)
    assert torch.equal(flux.pack_latents(x), packed)
    assert torch.equal(flux.unpack_latents(packed, 6, 10),
                       FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8))
    assert torch.equal(flux.latent_image_ids(3, 5, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))


def test_dev_and_schnell_facts_come_from_the_folder(tiny):
    dev = registry.load_family(tiny)
    assert dev.embedded_guidance == 3.5 and dev.text_tokens() == 512
    assert (dev.sampling_defaults.steps, dev.sampling_defaults.guidance_scale) == (28, 3.5)
    assert "Non-Commercial" in dev.licence[1] and dev.unconditional_prompt == ""
    schnell = registry.load_family(tiny)  # the same folder read as schnell's configs say
    schnell._config = {**schnell._config, "guidance_embeds": False}
    schnell._scheduler = scheduler_config(schnell=True)
    assert schnell.embedded_guidance is None and schnell.text_tokens() == 256
    assert (schnell.sampling_defaults.steps, schnell.sampling_defaults.guidance_scale) == (4, 0.0)
    assert schnell.resolution_shift(128, 128) == 1.0 and schnell.licence[0] == "apache-2.0"
    assert dev.resolution_shift(128, 128) == pytest.approx(np.exp(1.15))


def test_dev_reads_the_guidance_scale_and_the_sampler_runs_one_conditional_pass(tiny):
    family = registry.load_family(tiny)
    denoiser = family.load_denoiser()
    x, t, cond = family.parity_inputs(denoiser)
    cond = Conditioning(cond.sequence, pooled=cond.pooled)
    low = dict(cond.extras, **{GUIDANCE_EXTRA: torch.tensor([1.0, 1.0])})
    high = dict(cond.extras, **{GUIDANCE_EXTRA: torch.tensor([5.0, 5.0])})
    with torch.no_grad():
        a = family.predict(denoiser, x, t, Conditioning(cond.sequence, pooled=cond.pooled,
                                                         extras=low))
        b = family.predict(denoiser, x, t, Conditioning(cond.sequence, pooled=cond.pooled,
                                                         extras=high))
    assert not torch.allclose(a, b)

    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(family, name)

        def predict(self, model, noisy, times, conditioning):
            seen.append(conditioning)
            return family.predict(model, noisy, times, conditioning)

    with torch.no_grad():
        v = guided_velocity(Spy(), denoiser, x[:1], 0.5, cond.rows(0), None, Guidance(5.0))
    assert len(seen) == 1 and seen[0].batch_size == 1  # no unconditional pass
    assert seen[0].extras[GUIDANCE_EXTRA].tolist() == [5.0]
    with torch.no_grad():
        torch.testing.assert_close(v, family.predict(denoiser, x[:1], torch.full((1,), 0.5),
                                                     seen[0]))


# --- LoRA layouts ---------------------------------------------------------------------------------

def test_kohya_layout_fuses_qkv_exactly_and_diffusers_converter_reads_it(tiny, tmp_path):
    """diffusers' kohya converter hard-codes FLUX.1's single-block widths (3072/12288), so this
    model has double blocks only; the single blocks' fused linear1 is checked below."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file

    folder = tmp_path / "double-only"
    shutil.copytree(tiny, folder)
    shutil.rmtree(folder / "transformer")
    config = json.loads((tiny / "transformer" / "config.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        FluxTransformer2DModel(**tiny_transformer_config(
            text_dim=config["joint_attention_dim"], pooled_dim=config["pooled_projection_dim"],
            single_layers=0)).save_pretrained(folder / "transformer")
    family = registry.load_family(folder)
    denoiser = family.load_denoiser()
    _random_lora(denoiser, family.lora_target_candidates)
    inputs = parity.fixed_inputs(family, denoiser)
    reference = parity.predict(family, denoiser, inputs)

    kohya = lora_formats.to_single_file(peft_state_dict(denoiser),
                                        lora_formats.comfy_alphas(denoiser), denoiser,
                                        family.lora_layout)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert kohya[f"{qkv}.lora_down.weight"].shape == (12, 32)  # q, k, v downs stacked
    assert kohya[f"{qkv}.lora_up.weight"].shape == (96, 12)  # their ups block-diagonal
    assert kohya[f"{qkv}.alpha"].item() == 24.0  # scale 8/4 kept at the fused rank 12
    assert kohya[f"{qkv}.lora_up.weight"][:32, 4:].abs().sum() == 0
    file = tmp_path / "kohya.safetensors"
    save_file(kohya, file)

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.load_lora_weights(file)
    assert _relative(reference, parity.predict(family, pipe.transformer, inputs)) <= 1e-5


def test_single_block_linear1_round_trips_with_padding_and_mixed_scales(tiny):
    family = registry.load_family(tiny)
    denoiser = family.load_denoiser()
    # the single block's q/k/v are adapted (its proj_mlp is not: a zero block pads it), and
    # one part has its own alpha (scales folded into the ups)
    _random_lora(denoiser, family.lora_targets,
                 alpha_pattern={"single_transformer_blocks.0.attn.to_k": 2})
    inputs = parity.fixed_inputs(family, denoiser)
    reference = parity.predict(family, denoiser, inputs)
    kohya = lora_formats.to_single_file(peft_state_dict(denoiser),
                                        lora_formats.comfy_alphas(denoiser), denoiser,
                                        family.lora_layout)
    linear1 = "lora_unet_single_blocks_0_linear1"
    assert kohya[f"{linear1}.lora_down.weight"].shape == (16, 32)  # 4 parts x rank 4
    assert kohya[f"{linear1}.lora_up.weight"].shape == (32 * 3 + 128, 16)
    assert kohya[f"{linear1}.alpha"].item() == 16.0  # mixed scales: folded, scale 1
    config, state = lora_formats.from_single_file(kohya, family.load_denoiser(),
                                                  family.lora_layout)
    assert "single_transformer_blocks.0.proj_mlp.lora_A.weight" not in state  # padding dropped
    fresh = family.load_denoiser()
    lora_formats.inject_adapter(fresh, config, state)
    assert _relative(reference, parity.predict(family, fresh, inputs)) <= 1e-6


# --- the whole chain through the CLI ----------------------------------------------------------

@pytest.mark.slow
def test_cli_chain_ends_in_exports_flux_pipeline_loads(tmp_path, cli, monkeypatch):
    """init -> ingest -> precompute -> train --lora (samples and eval during training) ->
    sample -> eval -> export --merge-lora / diffusers LoRA / kohya LoRA -> train --dry-run;
    then `ditctl sample --model MERGED` equals FluxPipeline on the same folder (measured max
    pixel difference: 0), and the diffusers-format LoRA loaded with `load_lora_weights`
    predicts what the merged export predicts (measured relative difference 2e-7)."""
    from diffusers import FluxPipeline
    from PIL import Image

    from ditctl.config import activate_keys
    from ditctl.demo.scenes import random_scenes, write_dataset

    root = tmp_path / "ws"
    assert cli("init", root, "--model", "tiny-flux").exit_code == 0
    scenes = random_scenes(6, 0, sizes=((32, 32),))
    write_dataset(root / "data", scenes[:4], csv_name="train.csv")
    write_dataset(root / "data", scenes[4:], csv_name="val.csv")
    project = root / "project.toml"
    project.write_text(activate_keys(project.read_text(), {
        "data": {"train_data_path": "data/train.csv", "val_data_path": "data/val.csv",
                 "resolution": 32},
        "train": {"train_batch_size": 2, "max_steps": 2, "sample_every": 2, "eval_every": 2,
                  "checkpoint_every": 2, "report_to": "none", "seed": 1,
                  "use_precomputed_data": True},
        "lora": {"lora_rank": 4, "lora_alpha": 4},
        "sample": {"steps": 3}}))
    assert 'family = "flux"' in project.read_text()
    monkeypatch.chdir(root)
    for command in (["ingest"], ["precompute"], ["train", "--lora"], ["sample"], ["eval"],
                    ["export", "--merge-lora", "--dtype", "fp32", "--name", "merged"],
                    ["export", "--dtype", "fp32", "--name", "lora"],
                    ["export", "--format", "comfy", "--dtype", "fp32", "--name", "kohya"],
                    ["train", "--dry-run"]):
        result = cli(*command)
        assert result.exit_code == 0, (command, result.output)
    exports = root / "exports"
    assert (exports / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (exports / "kohya" / "kohya.safetensors").is_file()

    # ditctl sample on the merged export vs FluxPipeline on the same folder
    out = tmp_path / "ours"
    assert cli("sample", "--model", exports / "merged", "--prompt", PROMPT, "--steps", "4",
               "--guidance-scale", "3.5", "--width", "32", "--height", "32", "--seed", "0",
               "--out", out).exit_code == 0
    index = json.loads((out / "index.json").read_text())
    ours = np.asarray(Image.open(out / index["images"][0]["file"])).astype(int)
    pipe = FluxPipeline.from_pretrained(exports / "merged")
    image = pipe(PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                 generator=torch.Generator().manual_seed(derive_seed(0, 0, 0)),
                 max_sequence_length=512, output_type="np").images[0]
    theirs = (image * 255).round().astype(int)
    assert ours.std() > 1 and np.abs(ours - theirs).max() <= 1

    # the diffusers-format LoRA on the base predicts what the merged export predicts
    merged = registry.load_family(exports / "merged")
    transformer = merged.load_denoiser()
    inputs = parity.fixed_inputs(merged, transformer)
    reference = parity.predict(merged, transformer, inputs)
    base = FluxPipeline.from_pretrained(root / "model")
    base.load_lora_weights(exports / "lora")
    assert _relative(reference, parity.predict(merged, base.transformer, inputs)) <= 1e-3


def test_resume_is_bit_identical(tiny, tmp_path, monkeypatch):
    """A run stopped after step 1 (SIGTERM, as a job scheduler) and resumed ends with exactly
    the weights and losses of the run that never stopped (guidance input and packed tokens
    included)."""
    import os
    import signal

    from accelerate.state import AcceleratorState
    from conftest import make_workspace
    from safetensors.torch import load_file

    from ditctl.engine.monitor import Monitor
    from ditctl.train import run_training

    lora = {"use_lora": True, "train_only_lora": True, "lora_rank": 2, "lora_alpha": 2}
    settings = dict(n_train=4, n_val=0, lora=lora, train={"train_batch_size": 2,
                                                          "caption_dropout": 0.5})

    def train(ws, resume=None):
        try:
            return run_training(ws, ws.config({"train.max_steps": 3, "train.run_name": "r",
                                               "eval.holdout_fraction": 0.0}), resume=resume)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)

    straight = train(make_workspace(tmp_path / "a", tiny, **settings))
    split = make_workspace(tmp_path / "b", tiny, **settings)
    original = Monitor.log_step

    def log_step(self, at, *args, **kwargs):
        original(self, at, *args, **kwargs)
        if at == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Monitor, "log_step", log_step)
    assert train(split).result.steps == 1
    monkeypatch.undo()
    resumed = train(split, resume="latest")
    assert resumed.result.steps == 3
    a = load_file(straight.result.checkpoint / "lora.safetensors")
    b = load_file(resumed.result.checkpoint / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [(ws / "runs" / "r" / "train_log.jsonl").read_text() for ws in (tmp_path / "a",
                                                                            tmp_path / "b")]
    losses = [[json.loads(line).get("train/loss") for line in log.splitlines()] for log in logs]
    assert losses[0] == losses[1]


def test_schnell_samples_what_flux_pipeline_samples(tiny, tmp_path, cli):
    """schnell: no guidance input, 256 T5 tokens, no time shift; `ditctl sample` (its defaults:
    4 steps, guidance 0) draws FluxPipeline's image."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from PIL import Image

    folder = tmp_path / "schnell"
    shutil.copytree(tiny, folder, ignore=shutil.ignore_patterns("transformer", "scheduler"))
    config = json.loads((tiny / "transformer" / "config.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        FluxTransformer2DModel(**tiny_transformer_config(
            text_dim=config["joint_attention_dim"], pooled_dim=config["pooled_projection_dim"],
            guidance=False)).save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler(**scheduler_config(schnell=True)).save_pretrained(
        folder / "scheduler")
    family = registry.load_family(folder)
    assert family.embedded_guidance is None and family.text_tokens() == 256

    out = tmp_path / "ours"
    assert cli("sample", "--model", folder, "--prompt", PROMPT, "--width", "32", "--height", "48",
               "--seed", "3", "--out", out).exit_code == 0
    index = json.loads((out / "index.json").read_text())
    assert (index["settings"]["steps"], index["settings"]["guidance_scale"]) == (4, 0.0)
    ours = np.asarray(Image.open(out / index["images"][0]["file"])).astype(int)
    pipe = FluxPipeline.from_pretrained(folder)
    image = pipe(PROMPT, height=48, width=32, num_inference_steps=4, guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(derive_seed(3, 0, 0)),
                 max_sequence_length=256, output_type="np").images[0]
    assert ours.std() > 1 and np.abs(ours - (image * 255).round().astype(int)).max() <= 1


def test_init_on_a_flux_folder_names_the_family(tiny, tmp_path, cli):
    assert cli("init", tmp_path / "ws", "--model", tiny).exit_code == 0
    assert 'family = "flux"' in (tmp_path / "ws" / "project.toml").read_text()
    status = json.loads(cli("status", "--json", "--workspace", tmp_path / "ws").stdout)
    assert "flux" in json.dumps(status["model"])


def test_dora_exports_in_diffusers_layout_and_lokr_refuses_the_kohya_file(tiny, tmp_path):
    """A DoRA adapter keeps the diffusers LoRA layout (FluxPipeline.load_lora_weights reads its
    magnitudes and predicts what the run predicts); LoKr has no kohya (fused q/k/v) form: a
    one-line error naming the formats that hold it."""
    from diffusers import FluxPipeline

    from ditctl.engine.loading import load_denoiser
    from ditctl.errors import ExportError
    from ditctl.export import export_checkpoint
    from tests.test_lora_variants import _run_with_checkpoint

    family = registry.load_family(tiny)
    ws, checkpoint = _run_with_checkpoint(tmp_path / "dora", tiny, {"lora_type": "dora"})
    result = export_checkpoint(ws, ws.config({"export.dtype": "fp32"}))
    assert (result.path / "pytorch_lora_weights.safetensors").is_file()
    run = load_denoiser(family, checkpoint)
    inputs = parity.fixed_inputs(family, run)
    reference = parity.predict(family, run, inputs)
    pipe = FluxPipeline.from_pretrained(tiny)
    pipe.load_lora_weights(result.path)
    assert _relative(reference, parity.predict(family, pipe.transformer, inputs)) <= 1e-5

    ws, _ = _run_with_checkpoint(tmp_path / "lokr", tiny, {"lora_type": "lokr"})
    with pytest.raises(ExportError) as info:
        export_checkpoint(ws, ws.config({"export.format": "comfy"}))
    assert "holds plain LoRA only, not a lokr adapter" in str(info.value)
    assert "--format peft" in info.value.hint and "\n" not in str(info.value)
