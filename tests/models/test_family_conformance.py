"""Every registered model family keeps the ModelFamily contract (`ditctl/models/base.py`).

Parametrized over `ditctl.models.registry.FAMILIES`, each on its own tiny random model (built
offline by the family's `tiny` builder): load, encode, predict shapes, the training target's
sign, save/load round trip, one training step through the engine (cached = on the fly), exact
resume, the attention switch, the cache round trip, the export round trip, the memory plan's
base bytes and block streaming. A new family is registered only when this whole file passes
for it; this is the one place tests name families in general (a family's own behaviour has its
own test file; every other test is family-neutral, which the last test here checks).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_workspace  # noqa: E402

from ditctl.data.cache import read_entry_file, text_file_bytes  # noqa: E402
from ditctl.engine.objective import per_sample_mse  # noqa: E402
from ditctl.export import parity  # noqa: E402
from ditctl.models import registry  # noqa: E402
from ditctl.models.base import (Conditioning, ModelFamily, flow_noisy,  # noqa: E402
                                flow_target)
from ditctl.sampling import euler_sample, time_grid  # noqa: E402

FAMILIES = registry.family_names()
PROMPTS = ["a red circle on a white background", "a blue star"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, its tiny model folder) for each registered family, built once per module."""
    folder = registry.build_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model")
    return registry.load_family(folder), folder


def _image_side(family: ModelFamily) -> int:
    return 2 * family.latent.size_multiple


def _inputs(family: ModelFamily, batch: int = 2, seed: int = 0):
    side = _image_side(family)
    shape = family.latent.latent_shape(side, side)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=gen), torch.linspace(0.3, 0.8, batch)


# --- load -------------------------------------------------------------------------------------

def test_the_registry_detects_and_checks_the_family_without_loading_it(tiny):
    family, folder = tiny
    assert isinstance(family, ModelFamily)
    assert registry.detect_family(folder) == family.name
    assert registry.check_folder(folder) == family.name
    assert registry.size_multiple(family.name) == family.latent.size_multiple
    assert family.latent.size_multiple % family.latent.spatial_factor == 0
    assert set(family.lora_targets) <= set(family.lora_target_candidates)
    defaults = family.sampling_defaults
    assert defaults.steps >= 1 and defaults.resolution % family.latent.size_multiple == 0
    assert family.licence[0] and family.usage_note


# --- encode -----------------------------------------------------------------------------------

def test_prompts_encode_to_a_conditioning_of_the_family_text_length(tiny):
    family, _ = tiny
    encoder = family.load_text_encoder()
    cond = family.encode_prompts(encoder, PROMPTS)
    assert isinstance(cond, Conditioning) and cond.batch_size == 2
    assert cond.sequence.shape[1] == family.text_tokens()
    assert all(t.dtype == torch.float32 for t in cond.named_tensors().values()
               if t.is_floating_point())
    # one prompt alone encodes as it does in a batch (precompute and on-the-fly agree)
    alone = family.encode_prompts(encoder, PROMPTS[1:])
    for name, tensor in alone.named_tensors().items():
        torch.testing.assert_close(tensor, cond.rows(1).named_tensors()[name])
    empty = family.empty_conditioning(3, like=cond)
    assert {k: v.shape[1:] for k, v in empty.named_tensors().items()} == \
        {k: v.shape[1:] for k, v in cond.named_tensors().items()}
    assert family.count_tokens(encoder, PROMPTS[0]) >= 1


def test_images_encode_and_decode_at_the_family_geometry(tiny):
    family, _ = tiny
    vae = family.load_vae()
    side = _image_side(family)
    images = torch.rand(1, 3, side, side) * 2 - 1
    dist = family.encode_images(vae, images)
    assert tuple(dist.mean.shape[1:]) == family.latent.latent_shape(side, side)
    latents = family.sample_latents(dist, torch.Generator().manual_seed(0))
    assert family.decode_latents(vae, latents).shape == images.shape


def test_the_attention_switch_reaches_every_block(tiny, monkeypatch):
    """`[train] attention_backend` selects the kernel of the family's attention too: every
    repeated block attends through diffusers' dispatcher, and math agrees with sdpa."""
    from diffusers.models import attention_dispatch

    from ditctl.engine.attention import attention_context
    from ditctl.models.blocks import repeated_blocks

    family, _ = tiny
    denoiser = family.load_denoiser()
    x, t = _inputs(family)
    cond = family.encode_prompts(family.load_text_encoder(), PROMPTS)
    calls = []
    registry = attention_dispatch._AttentionBackendRegistry
    name = attention_dispatch.AttentionBackendName("_native_math")
    original = registry._backends[name]
    monkeypatch.setitem(registry._backends, name,
                        lambda **kw: calls.append(kw["query"].shape) or original(**kw))
    with torch.no_grad():
        with attention_context("math", "cpu"):
            math = family.predict(denoiser, x, t, cond)
        with attention_context("sdpa", "cpu"):
            sdpa = family.predict(denoiser, x, t, cond)
    assert len(calls) >= len(repeated_blocks(denoiser)) > 0
    torch.testing.assert_close(math, sdpa, rtol=1e-4, atol=1e-5)


# --- the denoiser's contract ------------------------------------------------------------------

def test_predict_returns_the_shape_of_its_input(tiny):
    family, _ = tiny
    denoiser = family.load_denoiser()
    x, t = _inputs(family)
    cond = family.encode_prompts(family.load_text_encoder(), PROMPTS)
    with torch.no_grad():
        out = family.predict(denoiser, x, t, cond)
        uncond = family.predict(denoiser, x, t, family.empty_conditioning(2, like=cond))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(out, uncond)  # the conditioning reaches the output
    shape = family.denoiser_shape()
    _, h, w = x.shape[1:]
    assert family.image_tokens(h, w) == \
        (h // shape.patch_size) * (w // shape.patch_size) + shape.extra_tokens


def test_training_on_the_target_makes_the_sampler_land_on_the_data(tiny):
    """The sign contract end to end: regress `predict` on `flow_target` at t = 1 for one sample,
    then one Euler step of the sampler from that noise must land near x0 (with the opposite
    sign anywhere it would land near 2·noise - x0, far away)."""
    family, _ = tiny
    torch.manual_seed(0)
    denoiser = family.load_denoiser().train()
    x0, _ = _inputs(family, batch=1, seed=1)
    noise, _ = _inputs(family, batch=1, seed=2)
    cond = family.encode_prompts(family.load_text_encoder(), PROMPTS[:1])
    t = torch.ones(1)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    for _ in range(60):
        loss = per_sample_mse(family.predict(denoiser, flow_noisy(x0, noise, t), t, cond),
                              flow_target(x0, noise)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    denoiser.eval()
    with torch.no_grad():
        landed = euler_sample(lambda x, s: family.predict(denoiser, x, torch.full((1,), s), cond),
                              noise, time_grid(1, 1.0))
    assert (landed - x0).norm() < 0.3 * (noise - x0).norm()


def test_a_pixel_mask_lies_on_the_latents_the_loss_compares(tiny):
    """A loss mask made at the image's size and area-averaged to the latent grid has the shape
    of `predict`'s output (packed families unpack inside `predict`), and a masked-out half
    gets no gradient."""
    from ditctl.data.transforms import latent_mask
    from ditctl.engine.objective import NoisedBatch, per_sample_loss

    family, _ = tiny
    side = _image_side(family)
    pixels = torch.ones(1, 1, side, side)
    pixels[..., : side // 2] = 0
    mask = latent_mask(pixels, family.latent.spatial_factor)
    x, t = _inputs(family, batch=1)
    cond = family.encode_prompts(family.load_text_encoder(), PROMPTS[:1])
    prediction = family.predict(family.load_denoiser(), x, t, cond).detach().requires_grad_()
    assert mask.shape[-2:] == prediction.shape[-2:]
    batch = NoisedBatch(x, t, cond, torch.zeros_like(x), mask=mask)
    per_sample_loss(prediction, batch).sum().backward()
    half = prediction.shape[-1] // 2
    assert torch.equal(prediction.grad[..., :half], torch.zeros_like(prediction.grad[..., :half]))
    assert (prediction.grad[..., half:] != 0).any()


# --- the memory plan -----------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp8", "int8"])
def test_planned_base_bytes_are_the_stored_bytes(tiny, precision):
    """The dry-run plan prices the frozen base from the meta skeleton (LoRA injected): its bytes
    are what the loaded base quantized to `precision` stores, whole and with block streaming.
    (Not NF4 here: its fixed ~1 KB of quantization state per layer, which the plan's per-weight
    rate leaves out, outweighs a tiny model's layers; test_flite_memory_plan.py checks it at a
    width where it does not.)"""
    from ditctl.config import build_config
    from ditctl.engine.lora import add_lora, freeze_base, peft_config
    from ditctl.engine.plan import base_weight_bytes
    from ditctl.engine.precision import QuantizedLinear, quantize_loaded, quantized_storage_bytes
    from ditctl.models.blocks import repeated_blocks

    family, _ = tiny
    torch.manual_seed(0)
    model = quantize_loaded(family.load_denoiser(torch.bfloat16), precision)
    assert any(isinstance(m, QuantizedLinear) for m in model.modules()) == (precision != "bf16")
    settings = build_config({"lora": {"use_lora": True, "train_only_lora": True,
                                      "lora_rank": 4}}).lora
    with torch.device("meta"):
        skeleton = family.build_denoiser_skeleton()
        add_lora(skeleton, peft_config(settings, family.lora_target_candidates,
                                       family.lora_targets))
    freeze_base(skeleton)
    stored = quantized_storage_bytes(model)
    assert base_weight_bytes(skeleton, precision) == pytest.approx(stored, rel=0.01)
    # block streaming: the parts outside the blocks plus one block's share of the blocks
    blocks = repeated_blocks(model)
    block_bytes = sum(quantized_storage_bytes(b) for b in blocks)
    assert base_weight_bytes(skeleton, precision, blocks_resident=1) == pytest.approx(
        stored - block_bytes + block_bytes / len(blocks), rel=0.01)


def _streaming_lora_model(family: ModelFamily, precision: str) -> torch.nn.Module:
    """The denoiser as a frozen-base LoRA run builds it (bf16 compute, checkpointing), with
    adapters that change the output, so their gradients are real."""
    from ditctl.config import build_config
    from ditctl.engine.setup import build_denoiser

    config = build_config({"lora": {"use_lora": True, "train_only_lora": True, "lora_rank": 2,
                                    "lora_alpha": 2, "base_precision": precision},
                           "train": {"mixed_precision": "bf16", "gradient_checkpointing": True}})
    torch.manual_seed(0)
    model = build_denoiser(family, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def _streaming_step(family: ModelFamily, model: torch.nn.Module):
    x, t, cond = family.parity_inputs(model, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = family.predict(model, x, t, cond)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_streamed_base_blocks_give_identical_outputs_and_gradients(tiny, precision):
    """`[lora] offload_base_blocks`: the family's blocks streamed to the device one at a time
    (prefetching the next) give the outputs and gradients of the resident model, bit for bit."""
    from ditctl.engine.offload import stream_base_blocks
    from ditctl.models.blocks import repeated_blocks

    family, _ = tiny
    expected_out, expected_grads = _streaming_step(family, _streaming_lora_model(family, precision))
    streamed = _streaming_lora_model(family, precision)
    streamer = stream_base_blocks(streamed, "cpu")
    out, grads = _streaming_step(family, streamed)
    assert torch.equal(out, expected_out)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], expected_grads[name]), name
    # forward and the recomputation in backward (reverse order) each ran every block
    assert streamer.copies == 2 * len(repeated_blocks(streamed))
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


# --- round trips ------------------------------------------------------------------------------

def test_save_pipeline_round_trips_the_denoiser_exactly(tiny, tmp_path):
    family, _ = tiny
    denoiser = family.load_denoiser()
    family.save_pipeline(denoiser, tmp_path / "out", copy_encoders=False, dtype=torch.float32,
                         max_shard_size="5GB")
    reloaded = registry.load_family(tmp_path / "out")
    assert reloaded.name == family.name
    inputs = parity.fixed_inputs(family, denoiser)
    assert torch.equal(parity.predict(family, denoiser, inputs),
                       parity.predict(reloaded, reloaded.load_denoiser(), inputs))


def test_export_round_trip_passes_the_parity_check(tiny, tmp_path):
    family, _ = tiny
    denoiser = family.load_denoiser()
    inputs = parity.fixed_inputs(family, denoiser)
    reference = parity.predict(family, denoiser, inputs)
    family.save_pipeline(denoiser, tmp_path / "bf16", copy_encoders=True, dtype=torch.bfloat16,
                         max_shard_size="5GB")
    exported = registry.load_family(tmp_path / "bf16")
    report = parity.compare(reference, parity.predict(exported, exported.load_denoiser(), inputs),
                            "bf16")
    assert report.passed and report.max_abs_diff > 0  # rounded, but within bf16's tolerance
    for component in family.copied_components:
        assert (tmp_path / "bf16" / component).is_dir()


def test_conditioning_round_trips_through_a_cache_record(tiny, tmp_path):
    family, _ = tiny
    cond = family.encode_prompts(family.load_text_encoder(), PROMPTS[:1])
    path = tmp_path / "entry.safetensors"
    path.write_bytes(text_file_bytes(cond, torch.float32))
    back = Conditioning.from_record(read_entry_file(path))
    assert back.named_tensors().keys() == cond.named_tensors().keys()
    for name, tensor in cond.named_tensors().items():
        assert torch.equal(back.named_tensors()[name], tensor), name


@pytest.mark.slow
def test_one_training_step_through_the_engine_cached_equals_on_the_fly(tiny, tmp_path):
    """ingest -> precompute -> one LoRA step from the cache, and one on the fly: same weights."""
    from ditctl.precompute import run_precompute
    from ditctl.train import ensure_manifest, run_training

    family, folder = tiny
    side = _image_side(family)
    lora = {"use_lora": True, "train_only_lora": True, "lora_rank": 2, "lora_alpha": 2}
    weights = []
    for cached in (False, True):
        ws = make_workspace(tmp_path / f"ws-{cached}", folder, n_train=2, n_val=0,
                            sizes=((side, side),), lora=lora,
                            data={"resolution": side}, train={"max_steps": 1})
        config = ws.config({"train.use_precomputed_data": cached,
                            "eval.holdout_fraction": 0.0, "model.family": family.name})
        if cached:
            ensure_manifest(ws, config)
            run_precompute(ws, config)
        outcome = run_training(ws, config)
        assert outcome.result.steps == 1
        from safetensors.torch import load_file
        weights.append(load_file(outcome.result.checkpoint / "lora.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


@pytest.mark.slow
def test_resuming_a_run_is_bit_identical_to_running_it_straight(tiny, tmp_path):
    """2 LoRA steps straight, and 1 step then a resume to 2: the same adapter, bit for bit
    (a constant learning rate: a decaying schedule is planned over max_steps)."""
    from safetensors.torch import load_file

    from ditctl.train import run_training

    family, folder = tiny
    side = _image_side(family)
    lora = {"use_lora": True, "train_only_lora": True, "lora_rank": 2, "lora_alpha": 2}
    finals = []
    for split in (False, True):
        ws = make_workspace(tmp_path / f"ws-{split}", folder, n_train=4, n_val=0,
                            sizes=((side, side),), lora=lora, data={"resolution": side},
                            train={"train_batch_size": 2, "learning_rate": 1e-3,
                                   "lr_scheduler": "constant", "num_warmup_steps": 0,
                                   "run_name": "r"})
        config = {"eval.holdout_fraction": 0.0, "model.family": family.name}
        if split:
            run_training(ws, ws.config({**config, "train.max_steps": 1}))
        outcome = run_training(ws, ws.config({**config, "train.max_steps": 2}),
                               resume="latest" if split else None)
        assert outcome.result.steps == 2
        finals.append(load_file(outcome.result.checkpoint / "lora.safetensors"))
    assert finals[0].keys() == finals[1].keys()
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name


# --- no family in shared code -----------------------------------------------------------------

def _family_words() -> set[str]:
    """Each family's name, pipeline class names and implementing class."""
    words = set()
    for entry in registry.FAMILIES.values():
        words |= {entry.name, *entry.pipeline_classes, entry.implementation.split(":")[1]}
    return words


def test_no_shared_module_names_a_registered_family():
    """Outside ditctl/models/, code says nothing family-specific: no family name, no pipeline
    class name as an identifier or string (prose about the F-Lite guide is allowed)."""
    package = Path(registry.__file__).resolve().parents[1]
    pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, sorted(_family_words())))
                         + r")(?!\w)")
    offenders = []
    for path in package.rglob("*.py"):
        if "models" in path.relative_to(package).parts[:1]:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(package)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_only_a_familys_own_tests_and_this_suite_name_it():
    """Tests outside a family's own files (tests/**/test_<family>*.py) and this suite reach a
    family through the registry and the tiny model's folder (tests/conftest.py: `load_family`,
    `family_class`), so they hold for every family: none names a family, its pipeline or
    implementing class, or imports a family's modules (ditctl/models/ files named after it,
    and its tiny builder)."""
    tests = Path(__file__).resolve().parents[1]
    models = Path(registry.__file__).resolve().parent
    names = registry.family_names()
    words = _family_words() | {path.stem for path in models.glob("*.py")
                               if any(name in path.stem for name in names)}
    builders = {entry.tiny.split(":")[0].rpartition(".")[2] for entry in registry.FAMILIES.values()}
    pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, sorted(words))) + r")(?!\w)"
                         + r"|\bmodels(\.| import )(" + "|".join(sorted(builders)) + r")\b")
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        if path == Path(__file__).resolve() or \
                any(path.name.startswith(f"test_{name}") for name in names):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(tests.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
