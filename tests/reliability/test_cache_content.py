"""Cache entries carry the sha256 of their tensor bytes: `precompute --verify` checks content,
not only the header, and training stops naming the entry when a cached batch is corrupt,
non-finite or outside the range a VAE posterior can take. (Issue 14, item 2.)"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ditctl.data.cache import Cache, read_entry, read_entry_file
from ditctl.data.manifest import read_manifest
from ditctl.models.registry import load_family
from ditctl.workspace import Workspace
from tests.conftest import make_workspace


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture()
def cached(cli, tmp_path, tiny_model_dir) -> tuple[Workspace, Path]:
    """A precomputed workspace and the latent entry file of its first training row."""
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=2, n_val=0,
                        data={"random_flip": False})
    result = cli("precompute", "-w", ws.root)
    assert result.exit_code == 0, result.output
    cache = Cache.open(ws, ws.config(), load_family(tiny_model_dir))
    row = read_manifest(ws, "train")[0]
    return ws, cache.path("latent", cache.spec.latent_key(row, False))


def _overwrite_tensor_bytes(path: Path) -> None:
    """Same-size garbage over the tensor data, header intact: every value becomes a plausible
    0.25, so nothing but the content hash can tell."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    start = 8 + length
    dtype = next(iter(read_entry_file(path).values())).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    fill = torch.full(((len(data) - start) // itemsize,), 0.25, dtype=dtype)
    path.write_bytes(data[:start] + fill.view(torch.uint8).numpy().tobytes())


def test_entries_carry_the_sha256_of_their_tensors(cached):
    import hashlib

    _, entry = cached
    tensors, metadata = read_entry(entry)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    assert metadata["sha256"] == digest.hexdigest()


def test_verify_catches_garbage_of_the_same_size_and_re_encodes_it(cli, cached):
    ws, entry = cached
    original = read_entry_file(entry)
    _overwrite_tensor_bytes(entry)
    assert torch.isfinite(read_entry_file(entry)["mean"]).all()  # only the hash can tell
    result = cli("precompute", "-w", ws.root, "--verify")
    assert result.exit_code == 0, result.output
    assert "do not match the content hash" in result.stderr
    again = read_entry_file(entry)
    assert all(torch.equal(again[name], original[name]) for name in original)


def test_training_stops_on_a_corrupt_entry_naming_it(cli, cached):
    ws, entry = cached
    _overwrite_tensor_bytes(entry)
    result = cli("train", "-w", ws.root, "--use-precomputed-data", "--max-steps", "2")
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.stderr
    assert str(entry) in result.stderr and "content hash" in result.stderr
    assert "precompute --verify" in result.stderr


def test_training_refuses_latents_no_vae_can_produce(cli, cached):
    """An entry without a hash (written before hashes existed) is still range-checked."""
    ws, entry = cached
    tensors = read_entry_file(entry)
    tensors["mean"] = tensors["mean"].clone()
    tensors["mean"][0, 0, 0] = 3e7
    save_file(tensors, entry)
    result = cli("train", "-w", ws.root, "--use-precomputed-data", "--max-steps", "2")
    assert result.exit_code == 1, result.output
    assert str(entry) in result.stderr and "beyond any VAE posterior" in result.stderr
    verify = cli("precompute", "-w", ws.root, "--verify")
    assert "beyond any VAE posterior" in verify.stderr


def test_training_refuses_a_non_finite_cached_batch(cli, cached):
    ws, entry = cached
    tensors = read_entry_file(entry)
    tensors["std"] = tensors["std"].clone()
    tensors["std"][0, 0, 0] = float("inf")
    save_file(tensors, entry)
    result = cli("train", "-w", ws.root, "--use-precomputed-data", "--max-steps", "2")
    assert result.exit_code == 1, result.output
    assert str(entry) in result.stderr and "std holds non-finite values" in result.stderr


def test_verify_re_encodes_entries_without_a_content_hash(cli, cached):
    """An entry written before hashes existed cannot have its content checked: --verify
    re-encodes it once, with a hash."""
    ws, entry = cached
    tensors = read_entry_file(entry)
    save_file(tensors, entry)  # same values, no metadata
    result = cli("precompute", "-w", ws.root, "--verify")
    assert result.exit_code == 0, result.output
    assert "no content hash" in result.stderr
    assert "sha256" in read_entry(entry)[1]
