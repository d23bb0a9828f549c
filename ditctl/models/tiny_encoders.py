"""Tiny text encoders and tokenizers built offline, for every family's tiny model.

Real tokenizer files cannot be downloaded here, so each tokenizer is built from a small word
list (the example scenes' words and common caption words) plus single characters, and saved
in the library's own format: any text still tokenizes (unknown words split into characters).

- T5 (F-Lite, FLUX, SD3): a unigram `T5TokenizerFast`.
- CLIP (FLUX, SD3): a byte-level BPE `CLIPTokenizer` (saved as vocab.json + merges.txt and
  tokenizer.json, as OpenAI's), whose merges build each listed word from its characters.
"""

from __future__ import annotations

import string
from pathlib import Path

# The words of the example scenes plus common caption words.
WORDS = tuple(dict.fromkeys("""
a an the of on in with and at to by is are it this that one two three small large big tiny
red orange yellow green blue purple pink white black gray grey brown cyan magenta
circle square triangle star ring cross diamond heart shape shapes background plain
photo picture image drawing painting portrait landscape dog cat person woman man flower tree
sky sun mountain city night day water sea beautiful cute left right top bottom center centre
""".split()))

CLIP_MAX_LENGTH = 77  # CLIP's position embeddings: every CLIP text encoder reads 77 tokens


def build_t5_tokenizer(folder: Path, max_length: int) -> None:
    """A T5 tokenizer (unigram) over WORDS plus single characters, saved like a real one."""
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"]
    vocab = [(p, 0.0) for p in pieces]
    vocab += [("▁" + w, -2.0) for w in WORDS]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab += [("▁", -4.0)] + [(c, -6.0) for c in chars]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(folder)


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) maps the bytes 0-255 to."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def build_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """A CLIP BPE tokenizer over WORDS (lower-case, as CLIP's), saved as vocab.json and
    merges.txt. `pad_token`: CLIP-L pads with its end token, SD3's CLIP-G with "!"."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            if (merged, part) not in merges:
                merges.append((merged, part))
            merged += part
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token,
                              model_max_length=CLIP_MAX_LENGTH)
    tokenizer.save_pretrained(folder)


def tiny_t5_encoder(vocab_size: int, width: int, layers: int = 8):
    """A small `T5EncoderModel` (random weights; the caller seeds torch)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=2 * width, num_layers=layers,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, is_encoder_decoder=False))


def tiny_clip_encoder(vocab_size: int, width: int, projection_dim: int | None = None,
                      layers: int = 3):
    """A small CLIP text encoder: `CLIPTextModel`, or with `projection_dim`
    `CLIPTextModelWithProjection` (SD3's two CLIPs). The caller seeds torch. Its eos token
    is the tokenizer's last id (`<|endoftext|>`), which is how CLIP pools."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim or width, hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    if projection_dim:
        return CLIPTextModelWithProjection(config)
    return CLIPTextModel(config)
