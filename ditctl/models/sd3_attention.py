"""SD3's joint attention through diffusers' attention dispatcher.

diffusers' `JointAttnProcessor2_0` (what `SD3Transformer2DModel` installs, for its joint and
SD3.5-medium's dual attention) calls torch's scaled_dot_product_attention directly, so the one
backend switch (`[train] attention_backend`, `engine/attention.py`) would not reach it. This
processor is the same computation, step for step (projections, RMS qk norm, image then text
tokens, split, output projections), with the attention itself through `dispatch_attention_fn`
on [B, L, heads, head_dim], as diffusers' FLUX processor does. With the default backend it
draws what `StableDiffusion3Pipeline` draws (tests/models/test_sd3_family.py).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn


class DispatchedJointAttnProcessor:
    """`JointAttnProcessor2_0` with its attention call through the dispatcher."""

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("SD3's joint attention takes no attention mask")
        batch, image_tokens = hidden_states.shape[:2]

        def heads(states: torch.Tensor) -> torch.Tensor:  # [B, L, H*D] -> [B, L, H, D]
            return states.unflatten(-1, (attn.heads, -1))

        query = heads(attn.to_q(hidden_states))
        key = heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_query = heads(attn.add_q_proj(encoder_hidden_states))
            text_key = heads(attn.add_k_proj(encoder_hidden_states))
            text_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)

        out = dispatch_attention_fn(query, key, value)
        out = out.reshape(batch, -1, out.shape[-2] * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :image_tokens], out[:, image_tokens:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if encoder_hidden_states is not None:
            return out, encoder_hidden_states
        return out


def use_dispatched_attention(transformer: torch.nn.Module) -> torch.nn.Module:
    """Install the dispatching processor on every attention layer of an SD3 transformer."""
    transformer.set_attn_processor(DispatchedJointAttnProcessor())
    return transformer
