"""Cache entries carry the sha256 of their tensor bytes: `precompute --verify` checks content,
not only the header, and training stops naming the entry when a cached batch is corrupt,
non-finite or outside the range a VAE posterior can take. (Issue 14, item 2.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ditctl.data.cache import Cache, read_entry_file
from ditctl.data.cache_shards import shard_path
from ditctl.data.manifest import read_manifest
from ditctl.models.registry import load_family
from ditctl.workspace import Workspace
from tests.cache_entries import (garble_in_shard, overwrite_in_shard, read_stored, stored,
                                 to_one_file_layout)
from tests.conftest import make_workspace


@pytest.fixture()
def cached(cli, tmp_path, tiny_model_dir) -> tuple[Workspace, Cache, str]:
    """A precomputed workspace, its cache and the key of its first training row's latents."""
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=2, n_val=0,
                        data={"random_flip": False})
    result = cli("precompute", "-w", ws.root)
    assert result.exit_code == 0, result.output
    cache = Cache.open(ws, ws.config(), load_family(tiny_model_dir))
    row = read_manifest(ws, "train")[0]
    return ws, cache, cache.spec.latent_key(row, False)


def _names_entry(stderr: str, cache: Cache, key: str) -> bool:
    """The message names the entry: its shard and key."""
    flat = " ".join(stderr.split())  # the console may wrap long lines
    return f"{shard_path(cache.root, stored(cache, key).shard)} [entry {key}]" in flat


def test_entries_carry_the_sha256_of_their_tensors(cached):
    import hashlib

    _, cache, key = cached
    tensors = read_stored(cache, key)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    assert stored(cache, key).sha256 == digest.hexdigest()


def test_verify_catches_garbage_of_the_same_size_and_re_encodes_it(cli, cached):
    ws, cache, key = cached
    original = read_stored(cache, key)
    garble_in_shard(cache, key)
    assert torch.isfinite(read_stored(cache, key)["mean"]).all()  # only the hash can tell
    result = cli("precompute", "-w", ws.root, "--verify")
    assert result.exit_code == 0, result.output
    assert "do not match the content hash" in result.stderr
    again = read_stored(cache, key)
    assert all(torch.equal(again[name], original[name]) for name in original)


def test_training_stops_on_a_corrupt_entry_naming_it(cli, cached):
    ws, cache, key = cached
    garble_in_shard(cache, key)
    result = cli("train", "-w", ws.root, "--use-precomputed-data", "--max-steps", "2")
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.stderr
    assert _names_entry(result.stderr, cache, key) and "content hash" in result.stderr
    assert "precompute --verify" in result.stderr


def test_training_refuses_latents_no_vae_can_produce(cli, cached):
    """An entry whose hash matches (the encoder wrote it so) is still range-checked."""
    ws, cache, key = cached
    tensors = read_stored(cache, key)
    tensors["mean"][0, 0, 0] = 3e7
    overwrite_in_shard(cache, key, tensors, rehash=True)
    result = cli("train", "-w", ws.root, "--use-precomputed-data", "--max-steps", "2")
    assert result.exit_code == 1, result.output
    assert _names_entry(result.stderr, cache, key)
    assert "beyond any VAE posterior" in result.stderr
    verify = cli("precompute", "-w", ws.root, "--verify")
    assert "beyond any VAE posterior" in verify.stderr


def test_training_refuses_a_non_finite_cached_batch(cli, cached):
    ws, cache, key = cached
    tensors = read_stored(cache, key)
    tensors["std"][0, 0, 0] = float("inf")
    overwrite_in_shard(cache, key, tensors, rehash=True)
    result = cli("train", "-w", ws.root, "--use-precomputed-data", "--max-steps", "2")
    assert result.exit_code == 1, result.output
    assert _names_entry(result.stderr, cache, key)
    assert "std holds non-finite values" in result.stderr


def test_verify_re_encodes_entries_without_a_content_hash(cli, cached):
    """An entry of an older ditctl, written before hashes existed, cannot have its content
    checked: it stays a one-file entry (not packed into a shard) until --verify re-encodes
    it, with a hash, into a shard."""
    ws, cache, key = cached
    to_one_file_layout(cache)
    path = cache.path("latent", key)
    save_file(read_entry_file(path), path)  # same values, no metadata
    result = cli("precompute", "-w", ws.root, "--verify")
    assert result.exit_code == 0, result.output
    assert "no content hash" in result.stderr
    assert not path.exists() and stored(cache, key).sha256 is not None
