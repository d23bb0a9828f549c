"""The memory plan's parts against what they model, on F-Lite's DiT: autograd's saved tensors of
a block, the stored bytes of each base precision at a width where NF4's fixed per-layer state
is small (every family, at its tiny width, without NF4: test_family_conformance.py), and host
memory while streaming a full-width model in (plain bf16, and quantized as it streams)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditctl.config import build_config
from ditctl.engine.lora import add_lora, freeze_base, peft_config
from ditctl.engine.plan import StepShape, base_weight_bytes, lora_layout, saved_per_block
from ditctl.engine.precision import QuantizedLinear, quantize_loaded, quantized_storage_bytes
from ditctl.models.flite import shape_of_config
from ditctl.models.flite_dit import DiT

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("qkv", "q", "context_kv", "proj")


def _config(hidden=96, heads=4, text_dim=40, depth=2):
    return dict(in_channels=16, patch_size=2, hidden_size=hidden, depth=depth, num_heads=heads,
                mlp_ratio=4.0, cross_attn_input_size=text_dim, residual_v=True,
                train_bias_and_rms=False, use_rope=True)


def _quantize(model, precision):
    return quantize_loaded(model, precision)


def _lora(model, rank=4, kind="lora"):
    settings = build_config({"lora": {"use_lora": True, "train_only_lora": True,
                                      "lora_rank": rank, "lora_type": kind}}).lora
    add_lora(model, peft_config(settings, TARGETS, TARGETS))
    freeze_base(model)
    return model


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_saved_activations_of_a_block_are_what_the_plan_counts(precision):
    config = _config()
    torch.manual_seed(0)
    model = _lora(_quantize(DiT(**config).to(torch.bfloat16), precision))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    side, text_tokens = 6, 7
    tokens = side * side + 16
    x = torch.randn(1, tokens, config["hidden_size"], requires_grad=True)
    context = torch.randn(1, text_tokens, config["cross_attn_input_size"])
    t_emb = torch.randn(1, config["hidden_size"])
    v_0 = torch.randn(1, config["num_heads"], tokens, config["hidden_size"] // config["num_heads"],
                      dtype=torch.bfloat16)  # block 0's V, an input of every later block
    rope = model.rope(side, side, "cpu")
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.blocks[1](x, context, t_emb, v_0, rope)
    planned = saved_per_block(shape_of_config(config), StepShape(tokens, text_tokens, 1), "bf16",
                              lora_layout(model))
    assert planned == pytest.approx(sum(saved.values()), rel=0.01)


def _saved_bytes(model, config, batch, side=6, text_tokens=7) -> int:
    """Bytes autograd saves for block 1's forward under bf16 autocast (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = side * side + 16
    torch.manual_seed(1)
    x = torch.randn(batch, tokens, config["hidden_size"], requires_grad=True)
    context = torch.randn(batch, text_tokens, config["cross_attn_input_size"])
    t_emb = torch.randn(batch, config["hidden_size"])
    v_0 = torch.randn(batch, config["num_heads"], tokens,
                      config["hidden_size"] // config["num_heads"], dtype=torch.bfloat16)
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.blocks[1](x, context, t_emb, v_0, model.rope(side, side, "cpu"))
    return sum(saved.values())


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
def test_each_adapter_kind_s_saved_activations_are_what_the_plan_counts(kind):
    """Within 10% at batches 1 and 2 for every kind (LoKr and LoHa keep each layer's whole
    update once per step, DoRA two outputs per adapted layer and sample). DoRA's batch-1 count
    also holds peft's identity pass through A and B, freed before the next layer (not part of
    the peak), so DoRA is held to batch 2, where the outputs dominate."""
    config = _config()
    torch.manual_seed(0)
    model = _lora(DiT(**config).to(torch.bfloat16), kind=kind)
    for batch in (1, 2) if kind != "dora" else (2,):
        plan = saved_per_block(shape_of_config(config), StepShape(52, 7, batch), "bf16",
                               lora_layout(model))
        assert plan == pytest.approx(_saved_bytes(model, config, batch), rel=0.1), batch


@pytest.mark.parametrize("precision", ["bf16", "fp8", "int8", "nf4"])
def test_planned_base_bytes_are_the_stored_bytes(precision):
    config = _config(hidden=256, text_dim=128, depth=2)
    torch.manual_seed(0)
    model = _quantize(DiT(**config).to(torch.bfloat16), precision)
    assert any(isinstance(m, QuantizedLinear) for m in model.modules()) == (precision != "bf16")
    with torch.device("meta"):
        skeleton = _lora(DiT(**config))
    assert base_weight_bytes(skeleton, precision) == pytest.approx(
        quantized_storage_bytes(model), rel=0.01)
    # block streaming: the small parts plus two blocks' worth of the blocks
    blocks = sum(quantized_storage_bytes(b) for b in model.blocks)
    assert base_weight_bytes(skeleton, precision, blocks_resident=1) == pytest.approx(
        quantized_storage_bytes(model) - blocks / 2, rel=0.01)


@pytest.mark.slow  # reads the 0.7 GB model the quantized tests below read too
def test_streaming_a_full_width_model_never_holds_a_second_copy(full_width_block):
    """Peak RSS (VmHWM, a fresh process) while loading a full-width DiT block stored as
    sharded bf16 safetensors stays within its bf16 bytes plus a fixed margin (a second copy
    of the 0.7 GB would exceed it ten times over)."""
    folder = full_width_block
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(REPO)!r})
from bench.common import peak_rss_bytes, reset_peak_rss, rss_bytes
from ditctl.models.flite_dit import DiT
from ditctl.models.streaming import load_streaming
config = json.load(open({str(folder / "config.json")!r}))
baseline = rss_bytes()
reset_peak_rss()
with torch.device("meta"):
    model = DiT.from_config(config)
model = load_streaming(model, {str(folder)!r}, dtype=torch.bfloat16)
print(json.dumps({{"peak": peak_rss_bytes() - baseline,
                   "bytes": sum(p.nbytes for p in model.parameters())}}))
"""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bytes"] == index["metadata"]["total_size"]  # the bytes the writer wrote
    margin = 64 * 2**20  # one tensor in flight (the largest is 72 MiB in bf16... read in place)
    assert result["peak"] <= result["bytes"] + margin, result


LOAD_CHILD = """
import json, sys, torch
sys.path.insert(0, {repo!r})
import bitsandbytes.functional, torchao.quantization  # imported: the baseline is an idle process
from bench.common import peak_rss_bytes, reset_peak_rss, rss_bytes
from ditctl.engine.precision import (QuantizedLinear, quantized_storage_bytes, quantizer,
                                     storage_dtype)
from ditctl.models.flite_dit import DiT
from ditctl.models.streaming import load_streaming
config = json.load(open({config!r}))
baseline = rss_bytes()
reset_peak_rss()
with torch.device("meta"):
    model = DiT.from_config(config)
model = load_streaming(model, {folder!r}, dtype=storage_dtype({precision!r}),
                       convert=quantizer({precision!r}))
print(json.dumps({{"peak": peak_rss_bytes() - baseline, "bytes": quantized_storage_bytes(model),
                   "blocks": quantized_storage_bytes(model.blocks),
                   "quantized_weights": sum(m.in_features * m.out_features
                                            for m in model.modules()
                                            if isinstance(m, QuantizedLinear))}}))
"""


@pytest.fixture(scope="module")
def full_width_block(tmp_path_factory):
    """One F-Lite block at the released width (hidden 3072, text 4096), sharded bf16."""
    sys.path.insert(0, str(REPO))
    from bench.common import DitShape, write_sharded_dit

    folder = tmp_path_factory.mktemp("full-width") / "dit"
    written = write_sharded_dit(folder, DitShape(3072, 1, 12, 4096), shard_bytes=300 * 2**20)
    assert written["shards"] > 1
    return folder


@pytest.mark.slow  # writes a 0.7 GB model and quantizes 337 M weights (~20 s on 2 quiet cores)
@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_streaming_a_quantized_base_never_holds_a_layer_at_full_precision(full_width_block,
                                                                          precision):
    """Peak RSS (VmHWM of a fresh, fully imported process) while streaming a full-width block
    into an fp8 or NF4 base stays within its quantized bytes x 1.15 (the issue's target) and
    within them plus a fixed 32 MiB (slices in flight, first-use kernel pages): the largest
    layer (adaLN, 3072 x 27648) alone is 162 MiB in bf16 and 648 MiB in fp32, so holding any
    layer whole at the source precision, or the libraries' whole-layer fp32 intermediates
    (3.7x and 5.1x the loaded bytes before slicing), fails it."""
    code = LOAD_CHILD.format(repo=str(REPO), config=str(full_width_block / "config.json"),
                             folder=str(full_width_block), precision=precision)
    # two threads: bitsandbytes quantizes NF4 on a CPU with torch ops (~10 s a thread here)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["quantized_weights"] > 240e6, result  # every Linear of the block
    assert result["blocks"] < 1.1 * result["quantized_weights"], result  # <= ~1 byte a weight
    assert result["peak"] <= 1.15 * result["bytes"], result
    assert result["peak"] <= result["bytes"] + 32 * 2**20, result
