"""A tiny StableDiffusion3Pipeline folder built entirely offline (`--model tiny-sd3`).

Real classes with small configs and random weights, deterministic from a seed: CLIP-L and
CLIP-G (`CLIPTextModelWithProjection`, different widths so the zero padding to T5's width is
exercised; CLIP-G's tokenizer pads with "!" as SD3's does), a T5 encoder, a 16-channel 8x
AutoencoderKL with SD3's scale/shift factors, the scheduler with shift 3.0, and an
`SD3Transformer2DModel` of 2 joint blocks with head dim 16 that uses SD3.5-medium's dual
attention (block 0) and SD3.5's RMS qk norm. diffusers' `StableDiffusion3Pipeline` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .sd3 import T5_TOKENS
from .sd3_layout import MODEL_INDEX
from .tiny_encoders import (build_clip_tokenizer, build_t5_tokenizer, tiny_clip_encoder,
                            tiny_t5_encoder)

CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 16, 32, 64  # CLIP states 48 wide, padded to 64


def tiny_transformer_config() -> dict:
    return dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
                pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, out_channels=16,
                pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")


def build_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random StableDiffusion3Pipeline folder into `folder` (must not exist yet)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for suffix, width, pad in (("", CLIP_L_WIDTH, "<|endoftext|>"), ("_2", CLIP_G_WIDTH, "!")):
            build_clip_tokenizer(folder / f"tokenizer{suffix}", pad_token=pad)
            vocab = len(CLIPTokenizer.from_pretrained(folder / f"tokenizer{suffix}"))
            tiny_clip_encoder(vocab, width, projection_dim=width, layers=2).save_pretrained(
                folder / f"text_encoder{suffix}")
        build_t5_tokenizer(folder / "tokenizer_3", T5_TOKENS)
        vocab = len(T5TokenizerFast.from_pretrained(folder / "tokenizer_3"))
        tiny_t5_encoder(vocab, T5_WIDTH, layers=2).save_pretrained(folder / "text_encoder_3")

        channels = (8, 16, 16, 16)  # four levels: 8x, as SD3's VAE
        AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=channels, layers_per_block=1, norm_num_groups=4, sample_size=64,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
            use_post_quant_conv=False).save_pretrained(folder / "vae")
        FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
        SD3Transformer2DModel(**tiny_transformer_config()).save_pretrained(
            folder / "transformer", safe_serialization=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return folder
