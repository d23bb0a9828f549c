"""Tiny F-Lite-layout pipelines built entirely offline.

`build_tiny_pipeline(folder)` writes a complete model folder (model_index.json, dit_model/,
text_encoder/, tokenizer/, vae/) with random weights, deterministically from a seed: a T5
encoder with 8 layers (so hidden_states[-8] exists), a tokenizer built locally from a word list,
a 16-channel 8x AutoencoderKL and a small DiT. It is loaded by the same loader as a real model,
so tests and the demo exercise the real code paths in seconds on a CPU.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from .flite import MODEL_INDEX
from .flite_dit import DiT

# The words of the example scenes plus common caption words; any other text still tokenizes,
# character by character, through the single-character pieces.
WORDS = """
a an the of on in with and at to by is are it this that one two three small large big tiny
red orange yellow green blue purple pink white black gray grey brown cyan magenta
circle square triangle star ring cross diamond heart shape shapes background plain
photo picture image drawing painting portrait landscape dog cat person woman man flower tree
sky sun mountain city night day water sea beautiful cute left right top bottom center centre
""".split()

# F-Lite's pipeline always pads prompts to 512 tokens (`flite.TEXT_TOKENS`); the tokenizer says
# the same, so the folder, ditctl and FLitePipeline agree on what the DiT attends to.
TEXT_MAX_LENGTH = 512


def build_tokenizer(folder: Path) -> None:
    """A T5 tokenizer (unigram) over WORDS plus single characters, saved like a real one."""
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"]
    vocab = [(p, 0.0) for p in pieces]
    vocab += [("▁" + w, -2.0) for w in dict.fromkeys(WORDS)]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab += [("▁", -4.0)] + [(c, -6.0) for c in chars]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=TEXT_MAX_LENGTH)
    tokenizer.save_pretrained(folder)


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
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)

        build_tokenizer(folder / "tokenizer")
        vocab_size = len(T5TokenizerFast.from_pretrained(folder / "tokenizer"))
        t5 = T5EncoderModel(T5Config(
            vocab_size=vocab_size, d_model=t5_dim, d_kv=8, d_ff=2 * t5_dim, num_layers=8,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, is_encoder_decoder=False))
        t5.save_pretrained(folder / "text_encoder")

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
