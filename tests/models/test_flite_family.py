import json
import shutil
import sys

import pytest
import torch

from ditctl.errors import ModelError
from ditctl.models.base import Conditioning
from ditctl.models.flite import MODEL_INDEX, TEXT_LAYER, FLiteFamily, validate_folder
from ditctl.models.registry import load_family
from ditctl.models.tiny import build_tiny_pipeline


def test_tiny_pipeline_has_the_flite_layout(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index == MODEL_INDEX
    assert index["dit_model"] == ["f_lite.model", "DiT"]
    for component in ("dit_model", "text_encoder", "tokenizer", "vae"):
        assert (tiny_model_dir / component).is_dir()


def test_loads_without_the_f_lite_package(tiny_model_dir):
    assert "f_lite" not in sys.modules
    family = load_family(tiny_model_dir)
    dit = family.load_denoiser()
    assert type(dit).__module__ == "ditctl.models.flite_dit"
    assert "f_lite" not in sys.modules


def test_build_is_deterministic_from_a_seed(tmp_path):
    a = build_tiny_pipeline(tmp_path / "a", seed=3)
    b = build_tiny_pipeline(tmp_path / "b", seed=3)
    sa = FLiteFamily(a).load_denoiser().state_dict()
    sb = FLiteFamily(b).load_denoiser().state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_text_encoding_uses_layer_minus_8_and_the_final_norm(tiny_model_dir):
    family = FLiteFamily(tiny_model_dir)
    te = family.load_text_encoder()
    prompts = ["a red circle on a white background", "a cat"]
    cond = family.encode_prompts(te, prompts)
    emb = cond.sequence
    assert cond.mask is None and cond.pooled is None and not cond.extras  # F-Lite has neither
    # always 512 tokens, as FLitePipeline pads them, whatever the tokenizer's model_max_length
    assert te.max_length == family.text_tokens() == 512
    ids = te.tokenizer(prompts, padding="max_length", max_length=512, truncation=True,
                       return_tensors="pt").input_ids
    # the same computation, layer by layer, by hand
    encoder = te.model.encoder
    h = encoder.embed_tokens(ids)
    bias = None
    hidden_states = [h]
    for layer in encoder.block:
        out = layer(h, position_bias=bias, cache_position=torch.arange(ids.shape[1]))
        h = out[0]
        bias = out[1] if bias is None and len(out) > 1 else bias
        hidden_states.append(h)
    expected = encoder.final_layer_norm(hidden_states[-8])
    assert emb.shape == (2, te.max_length, te.model.config.d_model)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(emb, encoder.final_layer_norm(hidden_states[-1]))


def test_empty_embedding_is_zeros(tiny_model_dir):
    family = FLiteFamily(tiny_model_dir)
    like = Conditioning(torch.randn(2, 7, 32))
    assert torch.count_nonzero(family.empty_conditioning(3, like).sequence) == 0
    assert family.empty_conditioning(3, like).sequence.shape == (3, 7, 32)
    assert family.empty_conditioning(2).sequence.shape == (2, 512, 32)


def test_the_tokenizer_of_tiny_models_says_what_the_family_reads(tiny_model_dir):
    """The folder and ditctl agree: a tiny model's tokenizer declares F-Lite's 512 tokens."""
    config = json.loads((tiny_model_dir / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == FLiteFamily(tiny_model_dir).text_tokens() == 512


def test_vae_encode_decode_uses_scale_and_shift(tiny_model_dir):
    family = FLiteFamily(tiny_model_dir)
    vae = family.load_vae()
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    dist = family.encode_images(vae, images)
    assert dist.mean.shape == (2, 16, 4, 6)
    z = family.sample_latents(dist, torch.Generator().manual_seed(0))
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
    cfg = vae.config
    torch.testing.assert_close(z, (dist.mean + dist.std * eps - cfg.shift_factor) * cfg.scaling_factor)
    decoded = family.decode_latents(vae, z)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1


def test_resolution_shift_matches_flite():
    shift = FLiteFamily.resolution_shift
    assert shift(None, 32, 32) == 1.0 and shift(None, 64, 64) == 2.0 and shift(None, 128, 128) == 4.0


def test_save_and_load_round_trip_gives_identical_outputs(tiny_model_dir, tmp_path):
    family = FLiteFamily(tiny_model_dir)
    dit = family.load_denoiser()
    out = tmp_path / "export"
    family.save_pipeline(dit, out, copy_encoders=True, dtype=torch.float32)
    assert json.loads((out / "model_index.json").read_text())["dit_model"] == ["f_lite.model", "DiT"]
    reloaded = FLiteFamily(out).load_denoiser()
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    ctx = Conditioning(torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2)))
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        assert torch.equal(family.predict(dit, x, t, ctx), family.predict(reloaded, x, t, ctx))
    linked = tmp_path / "linked"
    family.save_pipeline(dit, linked, copy_encoders=False, dtype=torch.float32)
    assert (linked / "vae").is_symlink()
    FLiteFamily(linked).load_vae()


def test_incomplete_folders_are_explained(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="has no model_index.json"):
        validate_folder(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError, match="lacks the component"):
        load_family(broken)


def test_identities_change_with_the_weights(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    a = FLiteFamily(copy)
    before = (a.vae_identity(), a.text_encoder_identity(), a.denoiser_identity())
    vae = a.load_vae()
    with torch.no_grad():
        next(vae.parameters()).add_(1.0)
    vae.save_pretrained(copy / "vae")
    after = (a.vae_identity(), a.text_encoder_identity(), a.denoiser_identity())
    assert after[0] != before[0] and after[1:] == before[1:]
