"""Tests for ditctl.models.flite_dit: F-Lite DiT state-dict layout and math (docs/flite-format.md §2).

The strongest check is `reference_forward` below: a plain float64 re-implementation of the forward
pass written from the spec, using only the state dict (explicit matmuls, einsums, softmax), that the
module must match. The expected state-dict keys are likewise derived by hand from the §2 table.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditctl.models.flite_dit import DiT

# head_dim 16 (hidden 64 / 4 heads), so RoPE uses 8 angles per token, 4 frequencies per axis.
SMALL = dict(in_channels=16, patch_size=2, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
             cross_attn_input_size=32)
REFERENCE_LIKE = {**SMALL, "residual_v": False, "train_bias_and_rms": True}
RELEASED_LIKE = {**SMALL, "depth": 3, "residual_v": True, "train_bias_and_rms": False}
NO_ROPE = {**SMALL, "use_rope": False}

FLITE_CONFIG_KEYS = {
    "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "cross_attn_input_size",
    "residual_v", "train_bias_and_rms", "use_rope", "gradient_checkpoint", "dynamic_softmax_temperature",
    "rope_base",
}


def make_model(cfg: dict, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return DiT(**cfg).eval()


def randomize(model: DiT, seed: int = 1, std: float = 0.1) -> DiT:
    """Give every parameter, the zero-initialised ones included, non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda_param"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.6 + 0.2)
            elif "norm" in name:  # RMSNorm weights around 1
                p.copy_(1 + std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def inputs(cfg: dict, b: int = 2, h: int = 8, w: int = 8, text_len: int = 7, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg["in_channels"], h, w, generator=gen)
    context = torch.randn(b, text_len, cfg["cross_attn_input_size"], generator=gen)
    t = torch.rand(b, generator=gen)
    return x, context, t


# ---------------------------------------------------------------------------------------------
# Independent derivations from docs/flite-format.md §2
# ---------------------------------------------------------------------------------------------

def expected_state_dict_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The §2 table, written out by hand."""
    C, p, H = cfg["in_channels"], cfg["patch_size"], cfg["hidden_size"]
    X = cfg["cross_attn_input_size"]
    M = int(H * cfg.get("mlp_ratio", 4.0))
    bias_rms = cfg.get("train_bias_and_rms", True)
    residual_v = cfg.get("residual_v", False)
    keys = {
        "patch_embed.patch_proj.weight": (H, C, p, p),
        "patch_embed.patch_proj.bias": (H,),
        "register_tokens": (1, 16, H),
        "time_embed.0.weight": (4 * H, H),
        "time_embed.0.bias": (4 * H,),
        "time_embed.2.weight": (H, 4 * H),
        "time_embed.2.bias": (H,),
        "final_modulation.1.weight": (2 * H, H),
        "final_modulation.1.bias": (2 * H,),
        "final_proj.weight": (p * p * C, H),
        "final_proj.bias": (p * p * C,),
    }
    if not cfg.get("use_rope", True):
        keys["positional_embedding"] = (1, 2048, H)
    if bias_rms:
        keys["final_norm.weight"] = (H,)
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        keys[b + "self_attn.qkv.weight"] = (3 * H, H)
        keys[b + "self_attn.proj.weight"] = (H, H)
        keys[b + "cross_attn.q.weight"] = (H, H)
        keys[b + "cross_attn.context_kv.weight"] = (2 * H, X)
        keys[b + "cross_attn.proj.weight"] = (H, H)
        keys[b + "mlp.0.weight"] = (M, H)
        keys[b + "mlp.0.bias"] = (M,)
        keys[b + "mlp.2.weight"] = (H, M)
        keys[b + "mlp.2.bias"] = (H,)
        keys[b + "adaLN_modulation.1.weight"] = (9 * H, H)
        keys[b + "adaLN_modulation.1.bias"] = (9 * H,)
        if bias_rms:
            for n in ("norm1", "norm2", "norm3"):
                keys[b + n + ".weight"] = (H,)
            keys[b + "self_attn.qkv.bias"] = (3 * H,)
            keys[b + "cross_attn.q.bias"] = (H,)
            keys[b + "cross_attn.context_kv.bias"] = (2 * H,)
        if residual_v:
            keys[b + "self_attn.lambda_param"] = (1,)
    return keys


def reference_forward(sd: dict, cfg: dict, x, context, t) -> torch.Tensor:
    """F-Lite's forward pass (§2 steps 1-8) in float64, from the state dict alone."""
    sd = {k: v.double() for k, v in sd.items()}
    x, context, t = x.double(), context.double(), t.double()
    C, p, H, nh = cfg["in_channels"], cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    hd = H // nh
    use_rope = cfg.get("use_rope", True)
    residual_v = cfg.get("residual_v", False)
    base = cfg.get("rope_base", 10000)
    B, _, h, w = x.shape
    gh, gw = h // p, w // p
    T = gh * gw

    def linear(v, name):
        out = v @ sd[name + ".weight"].T
        return out + sd[name + ".bias"] if name + ".bias" in sd else out

    def silu(v):
        return v / (1 + torch.exp(-v))

    def gelu(v):  # exact GELU
        return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))

    def rms(v, weight_name=None):
        v = v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-6)
        return v * sd[weight_name] if weight_name in sd else v

    def attention(q, k, v):  # [B, nh, L, hd]
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(hd)
        return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v)

    # 1. Patchify: a stride-p conv is a matmul on flattened (c p1 p2) patches; tokens row-major.
    patches = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, T, C * p * p)
    tokens = patches @ sd["patch_embed.patch_proj.weight"].reshape(H, -1).T + sd["patch_embed.patch_proj.bias"]
    # 2. Registers first.
    seq = torch.cat([sd["register_tokens"].expand(B, 16, H), tokens], dim=1)  # [B, 16+T, H]
    L = seq.shape[1]
    if not use_rope:
        seq = seq + sd["positional_embedding"][:, :L]

    # 3. 2-D RoPE angles: dim = hd/2, inv_freq[j] = 1/base^(2j/dim), angles [r·inv_freq, c·inv_freq].
    dim = hd // 2
    j = torch.arange(dim // 2, dtype=torch.float64)
    inv_freq = 1.0 / base ** (2 * j / dim)
    r = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)  # row of token i
    c = torch.arange(gw, dtype=torch.float64).repeat(gh)  # column of token i
    angles = torch.cat([r[:, None] * inv_freq, c[:, None] * inv_freq], dim=1)  # [T, dim]
    angles = torch.cat([torch.zeros(16, dim, dtype=torch.float64), angles])  # registers: cos 1, sin 0
    cos, sin = torch.cos(angles), torch.sin(angles)

    def rope(v):  # half-split rotation
        x1, x2 = v[..., : hd // 2], v[..., hd // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)

    # 4. Timestep embedding of t·1000, cos first.
    half = H // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = (t * 1000)[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    temb = linear(silu(linear(temb, "time_embed.0")), "time_embed.2")  # [B, H]

    v_0 = None
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}."
        mod = linear(silu(temb), pre + "adaLN_modulation.1")[:, None, :]
        shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca, shift_mlp, scale_mlp, gate_mlp = [
            mod[..., k * H:(k + 1) * H] for k in range(9)
        ]
        # 6. Self-attention: qkv split as (k h d).
        y = rms(seq, pre + "norm1.weight") * (1 + scale_sa) + shift_sa
        qkv = linear(y, pre + "self_attn.qkv").reshape(B, L, 3, nh, hd)
        q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))  # [B, nh, L, hd]
        if residual_v:
            if i == 0:
                v_0 = v
            else:
                lam = sd[pre + "self_attn.lambda_param"]
                v = lam * v + (1 - lam) * v_0
        if use_rope:
            q, k = rope(q), rope(k)
        q, k = rms(q), rms(k)
        o = attention(q, k, v).transpose(1, 2).reshape(B, L, H)
        seq = seq + gate_sa * linear(o, pre + "self_attn.proj")
        # 7. Cross-attention: context_kv split as (k h d), no RoPE, no mask.
        y = rms(seq, pre + "norm2.weight") * (1 + scale_ca) + shift_ca
        q = linear(y, pre + "cross_attn.q").reshape(B, L, nh, hd).transpose(1, 2)
        kv = linear(context, pre + "cross_attn.context_kv").reshape(B, context.shape[1], 2, nh, hd)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        o = attention(rms(q), rms(k), v).transpose(1, 2).reshape(B, L, H)
        seq = seq + gate_ca * linear(o, pre + "cross_attn.proj")
        # MLP.
        y = rms(seq, pre + "norm3.weight") * (1 + scale_mlp) + shift_mlp
        seq = seq + gate_mlp * linear(gelu(linear(y, pre + "mlp.0")), pre + "mlp.2")

    # 8. Drop registers, final modulation (shift first), projection, unpatchify.
    out = seq[:, 16:]
    fm = linear(silu(temb), "final_modulation.1")[:, None, :]
    shift, scale = fm[..., :H], fm[..., H:]
    out = linear(rms(out, "final_norm.weight") * (1 + scale) + shift, "final_proj")  # [B, T, p·p·C]
    out = out.reshape(B, gh, gw, p, p, C)  # b (h w) (p1 p2 c)
    return torch.einsum("bhwpqc->bchpwq", out).reshape(B, C, h, w)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_output_shape(hw):
    model = make_model(REFERENCE_LIKE)
    x, context, t = inputs(REFERENCE_LIKE, h=hw[0], w=hw[1])
    with torch.no_grad():
        out = model(x, context, t)
    assert out.shape == x.shape


def test_latent_not_multiple_of_patch_raises():
    model = make_model(REFERENCE_LIKE)
    x, context, t = inputs(REFERENCE_LIKE, h=7, w=8)
    with pytest.raises(ValueError, match="patch_size"):
        model(x, context, t)


def test_deterministic():
    a, b = make_model(RELEASED_LIKE, seed=3), make_model(RELEASED_LIKE, seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    randomize(a), randomize(b)
    x, context, t = inputs(RELEASED_LIKE)
    with torch.no_grad():
        out1, out2, out3 = a(x, context, t), a(x, context, t), b(x, context, t)
    assert torch.equal(out1, out2) and torch.equal(out1, out3)


def test_fresh_model_outputs_exact_zero():
    model = make_model(RELEASED_LIKE)
    x, context, t = inputs(RELEASED_LIKE)
    with torch.no_grad():
        out = model(x, context, t)
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(p) == 0 for p in (model.final_proj.weight, model.final_proj.bias))
    # Everything else that is not zero-initialised is non-trivial.
    assert model.blocks[0].self_attn.qkv.weight.std() > 0


def _grads(model, x, context, t):
    model.zero_grad(set_to_none=True)
    out = model(x, context, t)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    # Block 0's lambda_param gets no gradient: block 0 has no earlier V to mix with (as in F-Lite).
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_activation_bytes(model, x, context, t) -> int:
    """Bytes autograd keeps for the backward pass (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in params:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, context, t).sum()
    return total


@pytest.mark.parametrize("how", ["enable_gradient_checkpointing", "config"])
def test_gradient_checkpointing_same_gradients_less_memory(how):
    cfg = RELEASED_LIKE
    plain = randomize(make_model(cfg)).train()
    if how == "config":
        ckpt = DiT(**{**cfg, "gradient_checkpoint": True}).train()
        ckpt.load_state_dict(plain.state_dict())
    else:
        ckpt = randomize(make_model(cfg)).train()
        ckpt.enable_gradient_checkpointing()
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    x, context, t = inputs(cfg)
    g_plain, g_ckpt = _grads(plain, x, context, t), _grads(ckpt, x, context, t)
    assert g_plain.keys() == g_ckpt.keys()
    assert set(dict(plain.named_parameters())) - set(g_plain) == {"blocks.0.self_attn.lambda_param"}
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in g_plain.values())
    # Checkpointing must actually keep fewer activations for the backward.
    assert _saved_activation_bytes(ckpt, x, context, t) < 0.5 * _saved_activation_bytes(plain, x, context, t)
    # And it can be switched off again.
    ckpt.disable_gradient_checkpointing()
    assert not ckpt.is_gradient_checkpointing


@pytest.mark.parametrize("cfg", [REFERENCE_LIKE, RELEASED_LIKE, NO_ROPE], ids=["reference", "released", "no_rope"])
def test_state_dict_keys_and_shapes(cfg):
    model = make_model(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_state_dict_shapes(cfg)
    assert sorted(got) == sorted(expected)
    assert got == expected
    assert not any(k.startswith("rope.") for k in got)
    if cfg.get("residual_v"):
        assert all(b.self_attn.lambda_param.item() == 0.5 for b in model.blocks)


@pytest.mark.parametrize("cfg", [REFERENCE_LIKE, RELEASED_LIKE], ids=["reference", "released"])
def test_load_checkpoint_with_reference_rope_buffers(cfg, tmp_path):
    src = randomize(make_model(cfg))
    x, context, t = inputs(cfg, h=6, w=10)
    with torch.no_grad():
        expected = src(x, context, t)
    half = cfg["hidden_size"] // cfg["num_heads"] // 2
    sd = dict(src.state_dict())
    sd["rope.freqs_hw_cos"] = torch.randn(512, 512, half)  # values are irrelevant: recomputed
    sd["rope.freqs_hw_sin"] = torch.randn(512, 512, half)

    dst = make_model(cfg, seed=9)
    result = dst.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "rope.freqs_hw_cos" in sd  # the caller's dict is left alone
    with torch.no_grad():
        torch.testing.assert_close(dst(x, context, t), expected, rtol=0, atol=0)

    # The same through diffusers' from_pretrained (a folder as the reference writes it).
    src.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    for low_cpu_mem_usage in (True, False):
        loaded = DiT.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, context, t), expected, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [REFERENCE_LIKE, RELEASED_LIKE, NO_ROPE], ids=["reference", "released", "no_rope"])
def test_matches_hand_written_reference(cfg):
    model = randomize(make_model(cfg))
    for hw in [(8, 8), (6, 10)]:
        x, context, t = inputs(cfg, h=hw[0], w=hw[1])
        with torch.no_grad():
            out = model(x, context, t)
        ref = reference_forward(model.state_dict(), cfg, x, context, t)
        assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_reference_check_detects_a_wrong_rope():
    # Guard on the reference itself: interleaved instead of half-split rotation must not pass.
    cfg = REFERENCE_LIKE
    model = randomize(make_model(cfg))
    x, context, t = inputs(cfg)
    from ditctl.models import flite_dit

    def interleaved(v, cos, sin):
        x1, x2 = v[..., 0::2].float(), v[..., 1::2].float()
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).to(v.dtype)

    ref = reference_forward(model.state_dict(), cfg, x, context, t)
    original = flite_dit.apply_rope
    try:
        flite_dit.apply_rope = interleaved
        with torch.no_grad():
            wrong = model(x, context, t)
    finally:
        flite_dit.apply_rope = original
    assert not torch.allclose(wrong.double(), ref, rtol=1e-5, atol=1e-5)


def test_save_pretrained_round_trip(tmp_path):
    cfg = RELEASED_LIKE
    model = randomize(make_model(cfg))
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config) == FLITE_CONFIG_KEYS | {"_class_name", "_diffusers_version"}
    assert config["_class_name"] == "DiT"
    assert {k: config[k] for k in cfg} == cfg
    weights = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    # F-Lite's own save_pretrained writes its persistent RoPE buffers: so does ours
    assert set(weights) == set(expected_state_dict_shapes(cfg)) | set(ROPE_BUFFERS)
    tables = reference_rope_buffers(cfg)
    for name in ROPE_BUFFERS:
        torch.testing.assert_close(weights[name], tables[name], rtol=0, atol=0, msg=name)
    # only the file holds them: the model in memory has no RoPE state
    assert not any(k.startswith("rope.") for k in model.state_dict())

    loaded = DiT.from_pretrained(tmp_path).eval()
    x, context, t = inputs(cfg, h=6, w=10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, context, t), model(x, context, t), rtol=0, atol=0)


ROPE_BUFFERS = ("rope.freqs_hw_cos", "rope.freqs_hw_sin")


def reference_rope_buffers(cfg: dict) -> dict[str, torch.Tensor]:
    """F-Lite's persistent RoPE buffers, written from the spec (docs/flite-format.md §2): for row
    r and column c of a 512x512 grid, angles [r·inv_freq, c·inv_freq] with dim = head_dim/2,
    inv_freq[j] = 1/base^(2j/dim) built from Python floats, all in fp32; no register rows."""
    dim = cfg["hidden_size"] // cfg["num_heads"] // 2
    base = cfg.get("rope_base", 10000)
    inv_freq = torch.tensor([1.0 / base ** (2 * j / dim) for j in range(dim // 2)],
                            dtype=torch.float32)  # [dim/2]
    pos = torch.arange(512, dtype=torch.float32)
    rows = (pos[:, None] * inv_freq[None, :])[:, None, :].repeat(1, 512, 1)  # [512, 512, dim/2]
    cols = (pos[:, None] * inv_freq[None, :])[None, :, :].repeat(512, 1, 1)  # [512, 512, dim/2]
    angles = torch.cat([rows, cols], dim=-1)  # [512, 512, dim]
    return {"rope.freqs_hw_cos": angles.cos(), "rope.freqs_hw_sin": angles.sin()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_save_pretrained_writes_rope_buffers_in_the_weights_dtype(dtype, tmp_path):
    # As the reference's `model.to(dtype)` casts its fp32 buffers before saving.
    cfg = REFERENCE_LIKE
    make_model(cfg).to(dtype).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    tables = reference_rope_buffers(cfg)
    half = cfg["hidden_size"] // cfg["num_heads"] // 2
    for name in ROPE_BUFFERS:
        assert weights[name].dtype == dtype and weights[name].shape == (512, 512, half)
        torch.testing.assert_close(weights[name], tables[name].to(dtype), rtol=0, atol=0, msg=name)
    assert weights["register_tokens"].dtype == dtype


def test_save_pretrained_without_rope_writes_no_rope_buffers(tmp_path):
    make_model(NO_ROPE).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert set(weights) == set(expected_state_dict_shapes(NO_ROPE))


def test_default_config_keys_match_flite():
    # Defaults as in F-Lite's config (checked without building the 28-block default model).
    import inspect

    params = inspect.signature(DiT.__init__).parameters
    defaults = {k: v.default for k, v in params.items() if k != "self"}
    assert defaults == {
        "in_channels": 4, "patch_size": 2, "hidden_size": 1152, "depth": 28, "num_heads": 16, "mlp_ratio": 4.0,
        "cross_attn_input_size": 128, "residual_v": False, "train_bias_and_rms": True, "use_rope": True,
        "gradient_checkpoint": False, "dynamic_softmax_temperature": False, "rope_base": 10000,
    }


@pytest.mark.parametrize("cfg", [REFERENCE_LIKE, RELEASED_LIKE], ids=["reference", "released"])
def test_bf16_autocast_close_to_fp32(cfg):
    model = randomize(make_model(cfg))
    x, context, t = inputs(cfg, h=6, w=10)
    with torch.no_grad():
        ref = model(x, context, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, context, t)
    assert torch.isfinite(out).all()
    err = (out.float() - ref).abs().max()
    assert err <= 0.05 * ref.abs().max(), (err, ref.abs().max())


def test_bf16_model_runs():
    model = randomize(make_model(RELEASED_LIKE)).to(torch.bfloat16)
    x, context, t = inputs(RELEASED_LIKE)
    with torch.no_grad():
        out = model(x.bfloat16(), context.bfloat16(), t)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_no_rope_forward_and_length_limit():
    model = randomize(make_model(NO_ROPE))
    x, context, t = inputs(NO_ROPE, h=6, w=10)
    with torch.no_grad():
        out = model(x, context, t)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # The learned positions are used.
        model.positional_embedding.add_(1.0)
        assert not torch.allclose(model(x, context, t), out)
        # 2048 positions = 16 registers + 2032 patches: a 16x127 patch grid fits ...
        x_max, context_max, t_max = inputs(NO_ROPE, b=1, h=32, w=254)
        assert model(x_max, context_max, t_max).shape == x_max.shape
        # ... one more row of patches does not.
        x_big, context_big, t_big = inputs(NO_ROPE, b=1, h=34, w=254)
        with pytest.raises(ValueError, match="use_rope=False"):
            model(x_big, context_big, t_big)


def test_rope_tables_cover_any_grid_size():
    model = make_model(REFERENCE_LIKE)
    cos, sin = model.rope(600, 3, torch.device("cpu"))  # beyond the reference's 512x512 tables
    assert cos.shape == sin.shape == (16 + 1800, 8) and cos.dtype == torch.float32
    assert torch.equal(cos[:16], torch.ones(16, 8)) and torch.equal(sin[:16], torch.zeros(16, 8))
    assert model.rope(600, 3, torch.device("cpu"))[0] is cos  # cached


def test_rope_tables_bit_identical_to_reference_buffers():
    # F-Lite precomputes [512, 512, head_dim/2] fp32 tables on the CPU; our per-grid tables must
    # equal their top-left slice exactly, so a real checkpoint gives the very same numbers.
    dim, base, n = 8, 10000, 512  # head_dim 16
    inv_freq = torch.tensor([1.0 / (base ** (i / dim)) for i in range(0, dim, 2)], dtype=torch.float32)
    ar = torch.arange(n, dtype=torch.float32)
    freqs_h = torch.outer(ar, inv_freq)[:, None, :].repeat(1, n, 1)  # [n, n, dim/2], by row
    freqs_w = torch.outer(ar, inv_freq)[None, :, :].repeat(n, 1, 1)  # [n, n, dim/2], by column
    table = torch.cat([freqs_h, freqs_w], dim=2)  # [n, n, dim]
    model = make_model(REFERENCE_LIKE)
    cos, sin = model.rope(37, 23, torch.device("cpu"))
    assert torch.equal(cos[16:], table.cos()[:37, :23].reshape(-1, dim))
    assert torch.equal(sin[16:], table.sin()[:37, :23].reshape(-1, dim))


def test_lora_targets_are_flite_names():
    from peft import LoraConfig

    cfg = RELEASED_LIKE
    model = randomize(make_model(cfg))
    x, context, t = inputs(cfg)
    with torch.no_grad():
        before = model(x, context, t)
    r = 4
    model.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=["qkv", "q", "context_kv", "proj"],
                                 init_lora_weights="gaussian"))
    H, X = cfg["hidden_size"], cfg["cross_attn_input_size"]
    per_block = r * ((H + 3 * H) + (H + H) + (H + H) + (X + 2 * H) + (H + H))  # qkv, proj, q, context_kv, proj
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == cfg["depth"] * per_block
    with torch.no_grad():  # B starts at zero: the adapter does not change the output yet
        torch.testing.assert_close(model(x, context, t), before, rtol=0, atol=0)
