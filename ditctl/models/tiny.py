"""Tiny F-Lite-layout pipelines built entirely offline.

`build_tiny_pipeline(folder)` writes a complete model folder (model_index.json, dit_model/,
text_encoder/, tokenizer/, vae/) with random weights, deterministically from a seed: a T5
encoder with 8 layers (so hidden_states[-8] exists), a tokenizer built locally from a word list,
a 16-channel 8x AutoencoderKL and a small DiT (encoders and tokenizers: `tiny_encoders`). It
is loaded by the same loader as a real model, so tests and the demo exercise the real code
paths in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .flite import MODEL_INDEX
from .flite_dit import DiT
from .tiny_encoders import build_t5_tokenizer, tiny_t5_encoder

# F-Lite's pipeline always pads prompts to 512 tokens (`flite.TEXT_TOKENS`); the tokenizer says
# the same, so the folder, ditctl and FLitePipeline agree on what the DiT attends to.
TEXT_MAX_LENGTH = 512


def tiny_dit_config(text_dim: int, hidden: int = 64, depth: int = 2, heads: int = 4,
                    patch_size: int = 2) -> dict:
    """A small DiT with the released model's choices (residual V, no biases/RMS weights)."""
    return dict(in_channels=16, patch_size=patch_size, hidden_size=hidden, depth=depth,
                num_heads=heads, mlp_ratio=4.0, cross_attn_input_size=text_dim, residual_v=True,
                train_bias_and_rms=False, use_rope=True)


def build_tiny_pipeline(folder: Path, seed: int = 0, *, dit_hidden: int = 64, dit_depth: int = 2,
                        t5_dim: int = 32, vae_channels: tuple[int, ...] = (8, 16, 16, 16)) -> Path:
    """Write a tiny random F-Lite-layout pipeline into `folder` (which must not exist yet)."""
    from diffusers import AutoencoderKL
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)

        build_t5_tokenizer(folder / "tokenizer", TEXT_MAX_LENGTH)
        vocab_size = len(T5TokenizerFast.from_pretrained(folder / "tokenizer"))
        tiny_t5_encoder(vocab_size, t5_dim).save_pretrained(folder / "text_encoder")

        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=vae_channels, layers_per_block=1, norm_num_groups=4,
            sample_size=64, scaling_factor=0.3611, shift_factor=0.1159)
        vae.save_pretrained(folder / "vae")

        dit = DiT(**tiny_dit_config(t5_dim, hidden=dit_hidden, depth=dit_depth))
        # F-Lite zero-initialises the output and modulation layers, which makes a random model
        # predict exactly zero; small random values there give tests non-trivial outputs.
        with torch.no_grad():
            for name, param in dit.named_parameters():
                if "adaLN_modulation" in name or "final_modulation" in name or "final_proj" in name:
                    param.normal_(0.0, 0.02)
        dit.save_pretrained(folder / "dit_model", safe_serialization=True)

    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return folder
