"""F-Lite's DiT under `[train] attention_backend`: every attention call goes through the one
switch; sdpa (the default) is bit-identical to torch's SDPA, math agrees to float precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ditctl.engine.attention import attention_context
from ditctl.models import flite_dit
from ditctl.models.tiny import tiny_dit_config


def _dit_and_inputs():
    torch.manual_seed(0)
    model = flite_dit.DiT(**tiny_dit_config(32, hidden=64, depth=2))
    for param in model.parameters():
        torch.nn.init.normal_(param, 0.0, 0.05)
    return model, (torch.randn(2, 16, 8, 8), torch.randn(2, 7, 32), torch.rand(2))


def _sdpa(q, k, v):  # the DiT's attention before the dispatcher, for comparison
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2)).transpose(1, 2)


def test_sdpa_is_bit_identical_and_math_agrees(monkeypatch):
    model, inputs = _dit_and_inputs()
    with torch.no_grad(), attention_context("sdpa", "cpu"):
        dispatched = model(*inputs)
    with torch.no_grad(), attention_context("math", "cpu"):
        math = model(*inputs)
    monkeypatch.setattr(flite_dit, "attention", _sdpa)
    with torch.no_grad():
        direct = model(*inputs)
    assert torch.equal(dispatched, direct)
    torch.testing.assert_close(math, direct, rtol=1e-5, atol=1e-6)


def test_the_switch_reaches_every_attention_call(monkeypatch):
    from diffusers.models import attention_dispatch

    model, inputs = _dit_and_inputs()
    calls = []
    registry = attention_dispatch._AttentionBackendRegistry
    name = attention_dispatch.AttentionBackendName("_native_math")
    original = registry._backends[name]
    monkeypatch.setitem(registry._backends, name,
                        lambda **kw: calls.append(kw["query"].shape) or original(**kw))
    with torch.no_grad(), attention_context("math", "cpu"):
        model(*inputs)
    assert len(calls) == 2 * 2  # self- and cross-attention in each of the 2 blocks
