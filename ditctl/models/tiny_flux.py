"""A tiny FLUX.1 pipeline built entirely offline (`--model tiny-flux`).

Real classes with small configs, deterministic from a seed: a FluxTransformer2DModel with one
double and one single block (2 heads of 16 dims, RoPE axes 4 + 6 + 6 = 16) and FLUX.1-dev's
guidance input, CLIP and T5 encoders and tokenizers from `tiny_encoders`, a 16-channel 8x
AutoencoderKL with FLUX's scale/shift factors, and FLUX.1-dev's scheduler config (dynamic
shift). `schnell=True` writes the schnell variant (no guidance input, no time shift).
diffusers' `FluxPipeline.from_pretrained` loads the folder as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .flux_layout import MODEL_INDEX
from .tiny_encoders import (build_clip_tokenizer, build_t5_tokenizer, tiny_clip_encoder,
                            tiny_t5_encoder)

T5_MAX_LENGTH = 512  # FLUX.1-dev's T5 length (flux.DEV_TEXT_TOKENS)


def tiny_transformer_config(*, text_dim: int, pooled_dim: int, guidance: bool = True,
                            double_layers: int = 1, single_layers: int = 1) -> dict:
    return dict(patch_size=1, in_channels=64, num_layers=double_layers,
                num_single_layers=single_layers, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim,
                guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))


def scheduler_config(schnell: bool) -> dict:
    """FLUX.1-dev's / schnell's scheduler_config.json values."""
    return dict(num_train_timesteps=1000, shift=1.0 if schnell else 3.0,
                use_dynamic_shifting=not schnell, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)


def build_tiny_flux(folder: Path, seed: int = 0, *, schnell: bool = False, single_layers: int = 1,
                    text_dim: int = 32, vae_channels: tuple[int, ...] = (8, 16, 16, 16)) -> Path:
    """Write a tiny random FluxPipeline folder into `folder` (which must not exist yet)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        build_clip_tokenizer(folder / "tokenizer")
        clip_vocab = len(CLIPTokenizer.from_pretrained(folder / "tokenizer"))
        tiny_clip_encoder(clip_vocab, text_dim).save_pretrained(folder / "text_encoder")
        build_t5_tokenizer(folder / "tokenizer_2", T5_MAX_LENGTH)
        t5_vocab = len(T5TokenizerFast.from_pretrained(folder / "tokenizer_2"))
        tiny_t5_encoder(t5_vocab, text_dim).save_pretrained(folder / "text_encoder_2")

        AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=vae_channels, layers_per_block=1, norm_num_groups=4,
            sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False).save_pretrained(folder / "vae")

        transformer = FluxTransformer2DModel(**tiny_transformer_config(
            text_dim=text_dim, pooled_dim=text_dim, guidance=not schnell,
            single_layers=single_layers))
        transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        FlowMatchEulerDiscreteScheduler(**scheduler_config(schnell)).save_pretrained(
            folder / "scheduler")

    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return folder
