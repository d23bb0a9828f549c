"""The offline tokenizers every tiny model uses behave like the real ones they stand in for."""

from __future__ import annotations

import pytest

from ditctl.models.tiny_encoders import CLIP_MAX_LENGTH, WORDS, build_clip_tokenizer


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    build_clip_tokenizer(folder / "end")
    build_clip_tokenizer(folder / "bang", pad_token="!")
    return folder


def test_clip_tokenizer_wraps_pads_and_lowercases_like_clip(clip_folder):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(clip_folder / "end")
    assert tokenizer.model_max_length == CLIP_MAX_LENGTH
    ids = tokenizer("A GREEN Circle", padding="max_length", max_length=CLIP_MAX_LENGTH,
                    truncation=True).input_ids
    assert len(ids) == CLIP_MAX_LENGTH
    assert ids[0] == tokenizer.bos_token_id
    words = tokenizer.convert_ids_to_tokens(ids)
    assert "circle</w>" in words and "a</w>" in words  # listed words merge whole, lower-cased
    end = ids.index(tokenizer.eos_token_id)  # CLIP pools at the first end token
    assert ids[end:] == [tokenizer.eos_token_id] * (CLIP_MAX_LENGTH - end)  # pads with it


def test_clip_tokenizer_splits_unknown_words_and_keeps_a_distinct_pad(clip_folder):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(clip_folder / "bang")
    ids = tokenizer("zebra 42", padding="max_length", max_length=10).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.unk_token_id not in ids[1:ids.index(tokenizer.eos_token_id)]
    assert tokens[-1] == "!" and tokenizer.pad_token_id != tokenizer.eos_token_id
    # CLIP splits numbers into single digits (its pre-tokenizer), so they decode spaced
    assert tokenizer.decode(ids, skip_special_tokens=True).replace("!", "").strip() == "zebra 4 2"
    assert set(WORDS) >= {"green", "circle", "background"}
