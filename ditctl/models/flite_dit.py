"""The F-Lite Diffusion Transformer, state-dict compatible and numerically identical with F-Lite.

F-Lite (Freepik / fal, `fal-ai/f-lite`) is a DiT with cross-attention to T5 text states. This is
an independent implementation of the architecture described in docs/flite-format.md §2: real
F-Lite checkpoints (`dit_model/`) load into `DiT`, and what `DiT.save_pretrained` writes loads
back into F-Lite's own pipeline (the class is named `DiT` and the config keys are F-Lite's, as
`model_index.json` names `["f_lite.model", "DiT"]`).

One forward pass, top to bottom:

    x [B, C, h, w] --patchify--> tokens [B, T, H] (row-major), T = (h/p)·(w/p)
    prepend 16 learned register tokens                  -> [B, 16 + T, H]
    t_emb = time_embed(sinusoid(t·1000))                -> [B, H]   (t = 1 is pure noise)
    depth × DiTBlock: adaLN-modulated self-attention (2-D RoPE, QK-RMSNorm, optional value
                      residual), cross-attention to the text, MLP; 9 modulation vectors each
    drop the registers, final adaLN (shift, scale), final_proj, unpatchify -> [B, C, h, w]

Differences from the reference code, none of which changes the numbers of a real checkpoint:
- RoPE tables are computed for the actual patch grid (cached per grid and device) instead of
  being persistent 512x512 buffers held in memory (2 x 128 MiB on the accelerator for the 10B
  model); `rope.freqs_hw_cos` / `rope.freqs_hw_sin` in a checkpoint are accepted and ignored.
  They are computed on the CPU in fp32 exactly as the reference computes its buffers, then
  moved, so the values are bit-identical. `save_pretrained` still writes the two buffers, in
  F-Lite's layout and the weights' dtype, because F-Lite's own DiT registers them as persistent:
  without them its pipeline reports the model as partly untrained.
- `use_rope=False` works (the reference passes a `(None, None)` RoPE pair on and crashes).
- `dynamic_softmax_temperature` is accepted and does nothing: the reference multiplies the keys
  by a constant right before a weightless RMSNorm, which divides that constant out again.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

NUM_REGISTERS = 16  # learned tokens prepended to the image tokens, dropped before the output
MAX_POSITIONS = 2048  # length of the learned positional_embedding (use_rope=False only)
ROPE_TABLE_KEYS = ("freqs_hw_cos", "freqs_hw_sin")  # the reference's persistent RoPE buffers
ROPE_TABLE_SIDE = 512  # the reference's buffers cover a 512x512 patch grid (8192 px at p=2)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of (already scaled) timesteps t [B], cos half first.

    The frequencies are built on the CPU in fp32, then moved, as in the reference.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)  # [half]
    args = t[:, None].float() * freqs.to(t.device)[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2·half]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (bf16 squares lose too much), cast back.

    `learnable=False` gives a norm without a weight, so no state-dict entry: F-Lite's QK norms
    never have one, and its block norms have one only if `train_bias_and_rms`.
    """

    def __init__(self, dim: int, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if learnable else None

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x = x * self.weight  # still fp32: the product promotes a bf16 weight
        return x.to(dtype)


class QKNorm(nn.Module):
    """Independent weightless RMSNorms for queries and keys over head_dim (as in Flux)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, learnable=False)
        self.key_norm = RMSNorm(head_dim, learnable=False)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


class RoPE2D(nn.Module):
    """2-D rotary position tables for a grid of patches, with the registers first and unrotated.

    Half of each head's rotation angles follow the patch row, half the column:
    `angles(r, c) = [r·inv_freq, c·inv_freq]`, length head_dim/2, with
    `inv_freq[j] = 1 / base^(2j/dim)`, `dim = head_dim/2`, `j < dim/2`.
    No parameters and no buffers in memory: tables are computed on demand and cached. While
    `save_tables_dtype` is set (by `DiT.save_pretrained`), the state dict also holds the
    reference's persistent buffers, computed for the occasion.
    """

    def __init__(self, head_dim: int, base: float = 10000):
        super().__init__()
        self.dim = head_dim // 2  # rotation angles per token; pairs (x[i], x[i + dim]) rotate
        self.base = base
        self.save_tables_dtype: torch.dtype | None = None
        self._cache: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}

    def forward(self, grid_h: int, grid_w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin, each [16 + grid_h·grid_w, head_dim/2] fp32."""
        key = (grid_h, grid_w, torch.device(device))
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device) for t in self._tables(grid_h, grid_w))
        return self._cache[key]

    def _grid_angles(self, grid_h: int, grid_w: int) -> Tensor:
        """Rotation angles [gh, gw, dim] of each patch: same arithmetic, on the CPU in fp32, as
        the reference's precomputed buffers."""
        inv_freq = torch.tensor([1.0 / (self.base ** (i / self.dim)) for i in range(0, self.dim, 2)],
                                dtype=torch.float32)  # [dim/2]
        rows = torch.outer(torch.arange(grid_h, dtype=torch.float32), inv_freq)  # [gh, dim/2]
        cols = torch.outer(torch.arange(grid_w, dtype=torch.float32), inv_freq)  # [gw, dim/2]
        return torch.cat([rows[:, None, :].expand(grid_h, grid_w, -1),
                          cols[None, :, :].expand(grid_h, grid_w, -1)], dim=-1)  # [gh, gw, dim]

    def _tables(self, grid_h: int, grid_w: int) -> tuple[Tensor, Tensor]:
        angles = self._grid_angles(grid_h, grid_w).reshape(grid_h * grid_w, -1)  # [T, dim]
        # Registers: angle 0, i.e. cos=1, sin=0, so attention to and from them is position-free.
        cos = torch.cat([torch.ones(NUM_REGISTERS, self.dim), angles.cos()])  # [16 + T, dim]
        sin = torch.cat([torch.zeros(NUM_REGISTERS, self.dim), angles.sin()])  # [16 + T, dim]
        return cos, sin

    def reference_tables(self) -> dict[str, Tensor]:
        """F-Lite's persistent buffers: cos and sin of the angles of a 512x512 grid, each
        [512, 512, head_dim/2] fp32, without register rows (the reference adds those per call)."""
        angles = self._grid_angles(ROPE_TABLE_SIDE, ROPE_TABLE_SIDE)  # [512, 512, dim]
        return {"freqs_hw_cos": angles.cos(), "freqs_hw_sin": angles.sin()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.save_tables_dtype is not None:
            # Cast from fp32 as the reference's `model.to(dtype)` casts its buffers.
            for name, table in self.reference_tables().items():
                destination[prefix + name] = table.to(self.save_tables_dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # F-Lite checkpoints (and ditctl's exports) carry the reference's 512x512 tables; we
        # recompute them, so drop them here and a strict load_state_dict still succeeds.
        for name in ROPE_TABLE_KEYS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, L, head_dim] in fp32, half-split (not interleaved); same dtype out."""
    dtype = x.dtype
    x = x.float()
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]  # [B, heads, L, head_dim/2] each
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, row-major."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_proj(x)  # [B, H, h/p, w/p]
        return x.flatten(2).transpose(1, 2)  # [B, T, H], T in b (h w) c order


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional value residual, 2-D RoPE and QK-RMSNorm."""

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool, residual_v: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.residual_v = residual_v
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if residual_v:
            # Value residual learning: mix this block's V with block 0's raw V.
            self.lambda_param = nn.Parameter(torch.full((1,), 0.5))
        self.qk_norm = QKNorm(self.head_dim)

    def forward(self, x: Tensor, v_0: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Returns the attention output [B, L, H] and the V used [B, heads, L, head_dim]."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)  # [B, L, (k h d)] split
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]
        if self.residual_v and v_0 is not None:
            v = self.lambda_param * v + (1 - self.lambda_param) * v_0
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k = self.qk_norm(q, k)  # after RoPE: RoPE is a rotation, the norm is unchanged by it
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, L, h, d]
        out = out.reshape(b, n, -1)  # [B, L, H]
        return self.proj(out), v


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention, scale 1/sqrt(head_dim), no mask: q [B, L, heads, d], k/v
    [B, Lk, heads, d] -> [B, L, heads, d]. Through diffusers' attention dispatcher, so the
    backend ditctl selects (`[train] attention_backend`) applies here as in diffusers' own
    models; the default (native) is torch's scaled_dot_product_attention on the same tensors."""
    return dispatch_attention_fn(q, k, v)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to text states; no RoPE and no padding mask."""

    def __init__(self, hidden_size: int, num_heads: int, cross_attn_input_size: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.context_kv = nn.Linear(cross_attn_input_size, 2 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.qk_norm = QKNorm(self.head_dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim)  # [B, L, heads, head_dim]
        kv = self.context_kv(context).view(b, context.shape[1], 2, self.num_heads, self.head_dim)
        k, v = kv.unbind(2)  # each [B, Lc, heads, head_dim], split as (k h d)
        q, k = self.qk_norm(q, k)
        # F-Lite attends to every text position, T5 padding included: no mask, on purpose.
        out = attention(q, k, v).reshape(b, n, -1)  # [B, L, H]
        return self.proj(out)


class DiTBlock(nn.Module):
    """Self-attention, cross-attention and MLP, each pre-normed, adaLN-modulated and gated by t."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross_attn_input_size: int,
                 residual_v: bool, train_bias_and_rms: bool):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, learnable=train_bias_and_rms)
        self.self_attn = SelfAttention(hidden_size, num_heads, train_bias_and_rms, residual_v)
        self.norm2 = RMSNorm(hidden_size, learnable=train_bias_and_rms)
        self.cross_attn = CrossAttention(hidden_size, num_heads, cross_attn_input_size, train_bias_and_rms)
        self.norm3 = RMSNorm(hidden_size, learnable=train_bias_and_rms)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size))

    def forward(self, x: Tensor, context: Tensor, t_emb: Tensor, v_0: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        mod = self.adaLN_modulation(t_emb)[:, None, :]  # [B, 1, 9H], broadcast over tokens
        (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca,
         shift_mlp, scale_mlp, gate_mlp) = mod.chunk(9, dim=-1)  # each [B, 1, H]

        attn, v = self.self_attn(self.norm1(x) * (1 + scale_sa) + shift_sa, v_0=v_0, rope=rope)
        x = x + attn * gate_sa
        x = x + self.cross_attn(self.norm2(x) * (1 + scale_ca) + shift_ca, context) * gate_ca
        x = x + self.mlp(self.norm3(x) * (1 + scale_mlp) + shift_mlp) * gate_mlp
        return x, v  # [B, L, H], and V for the value residual


def _checkpoint_block(block: nn.Module, *args):
    """Recompute a block's activations in the backward pass instead of keeping them."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


class DiT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """F-Lite's text-to-image DiT. `forward(x, context, timesteps) -> velocity [B, C, h, w]`.

    x: latents [B, C, h, w] (h, w multiples of patch_size); context: text states
    [B, L, cross_attn_input_size]; timesteps: [B] in [0, 1], where 1 is pure noise.
    The released 10B model: in_channels=16, hidden_size=3072, depth=40, num_heads=12,
    cross_attn_input_size=4096, residual_v=True, train_bias_and_rms=False.
    """

    _supports_gradient_checkpointing = True
    # The repeated block, as diffusers models declare theirs: the engine finds the units it
    # shards, streams, quantizes and plans per block through this (ditctl.models.blocks).
    _no_split_modules = ["DiTBlock"]
    # Checkpoints written by the reference (and by save_pretrained) carry its RoPE tables; we
    # recompute them.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)rope\.freqs_hw_(cos|sin)$"]

    @register_to_config
    def __init__(
        self,
        in_channels=4,
        patch_size=2,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        cross_attn_input_size=128,
        residual_v=False,
        train_bias_and_rms=True,
        use_rope=True,
        gradient_checkpoint=False,
        dynamic_softmax_temperature=False,  # accepted for compatibility; no effect (see module doc)
        rope_base=10000,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        head_dim = hidden_size // num_heads
        if use_rope and head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim (hidden_size/num_heads = {head_dim}) to be a multiple of 4")
        if hidden_size % 2:
            raise ValueError(f"hidden_size {hidden_size} must be even (sinusoidal timestep embedding)")

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        if use_rope:
            self.rope = RoPE2D(head_dim, base=rope_base)
        else:
            self.positional_embedding = nn.Parameter(torch.zeros(1, MAX_POSITIONS, hidden_size))
        self.register_tokens = nn.Parameter(torch.zeros(1, NUM_REGISTERS, hidden_size))
        self.time_embed = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(), nn.Linear(4 * hidden_size, hidden_size)
        )
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, cross_attn_input_size, residual_v, train_bias_and_rms)
            for _ in range(depth)
        ])
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_norm = RMSNorm(hidden_size, learnable=train_bias_and_rms)
        self.final_proj = nn.Linear(hidden_size, patch_size * patch_size * in_channels)

        # diffusers' enable_/disable_gradient_checkpointing() flip these; the config key sets them.
        self.gradient_checkpointing = bool(gradient_checkpoint)
        self._gradient_checkpointing_func = _checkpoint_block if gradient_checkpoint else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT-style init (deterministic given torch's RNG); the output starts at exactly zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # The patch conv is a linear map of each flattened patch: init it like one.
        w = self.patch_embed.patch_proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.patch_proj.bias)
        nn.init.normal_(self.register_tokens, std=1.0)  # the reference's randn init
        if hasattr(self, "positional_embedding"):
            nn.init.normal_(self.positional_embedding, std=0.02)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        # Zero modulation and output: every block starts as the identity (gates 0) and the model
        # predicts 0, so fine-tuning starts from a stable point.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_modulation[-1].weight)
        nn.init.zeros_(self.final_modulation[-1].bias)
        nn.init.zeros_(self.final_proj.weight)
        nn.init.zeros_(self.final_proj.bias)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save_pretrained, plus F-Lite's RoPE buffers (`rope.freqs_hw_cos/sin`,
        [512, 512, head_dim/2] each, in the weights' dtype): F-Lite's DiT registers them as
        persistent, so its loader reports a folder without them as not fully initialised.
        Only the saved file holds them (256 MiB in fp32 at head_dim 256), never the model."""
        rope = getattr(self, "rope", None)
        if rope is None:  # use_rope=False: the reference has no RoPE buffers either
            return super().save_pretrained(save_directory, *args, **kwargs)
        rope.save_tables_dtype = self.dtype
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            rope.save_tables_dtype = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A use_rope=False model has no `rope` submodule to drop stray RoPE tables; do it here.
        if not hasattr(self, "rope"):
            for name in ROPE_TABLE_KEYS:
                state_dict.pop(f"{prefix}rope.{name}", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, context: Tensor, timesteps: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size {p}")
        gh, gw = h // p, w // p  # patch grid

        x = self.patch_embed(x)  # [B, T, H]
        x = torch.cat([self.register_tokens.repeat(b, 1, 1), x], dim=1)  # [B, 16 + T, H]

        if self.config.use_rope:
            rope = self.rope(gh, gw, x.device)  # cos, sin: [16 + T, head_dim/2] each
        else:
            if x.shape[1] > MAX_POSITIONS:
                raise ValueError(
                    f"use_rope=False supports at most {MAX_POSITIONS - NUM_REGISTERS} patches "
                    f"({MAX_POSITIONS} positions incl. {NUM_REGISTERS} registers); a {h}x{w} latent "
                    f"with patch_size {p} gives {gh * gw}"
                )
            # As in the reference: positions cover the whole sequence, registers included.
            x = x + self.positional_embedding[:, : x.shape[1]]  # [B, 16 + T, H]
            rope = None

        t_emb = timestep_embedding(timesteps * 1000, self.config.hidden_size).to(x.device, x.dtype)  # [B, H]
        t_emb = self.time_embed(t_emb)  # [B, H]

        ckpt = None
        if self.gradient_checkpointing and torch.is_grad_enabled():
            ckpt = self._gradient_checkpointing_func or _checkpoint_block
        v_0 = None  # block 0's raw V, for the value residual of the later blocks
        for block in self.blocks:
            if ckpt is not None:
                x, v = ckpt(block, x, context, t_emb, v_0, rope)
            else:
                x, v = block(x, context, t_emb, v_0, rope)
            if v_0 is None:
                v_0 = v

        x = x[:, NUM_REGISTERS:]  # [B, T, H]
        shift, scale = self.final_modulation(t_emb)[:, None, :].chunk(2, dim=-1)  # [B, 1, H] each
        x = self.final_norm(x) * (1 + scale) + shift
        x = self.final_proj(x)  # [B, T, p·p·C]
        # b (h w) (p1 p2 c) -> b c (h p1) (w p2)
        x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, gh, p, gw, p]
        return x.reshape(b, c, gh * p, gw * p)
