"""Checkpoints of sharded (FSDP) runs: every rank writes its own shards, nobody gathers.

The trained weights and the optimiser state go through `torch.distributed.checkpoint` (DCP)
with its Hugging Face storage: each rank writes one safetensors file of its local pieces, whose
header records where each piece lies in the whole tensor. Loading reads those headers (never
DCP's default pickled `.metadata`, which is not written at all) and lets DCP copy the
overlapping pieces into whatever sharding the loading run has: resuming on another number of
processes reshards, and export reads the whole tensors into an unsharded model one piece at a
time.

The folder is built like every checkpoint (`runs.py`): rank 0 creates the temporary folder and
tells the others; every rank writes and hashes its shard file; rank 0 collects the hashes,
writes the small files, `checkpoint.json` (the manifest) last, and renames the folder into
place. A save killed at any point leaves a `.tmp-*` folder, never a checkpoint.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..errors import CheckpointError
from ..fsutil import atomic_dir, check_free_space
from ..runs import (ADAPTER_CONFIG, OPTIMIZER_GROUPS, RNG_STATE, SCHEDULER_STATE, SHARDS_DIR,
                    CheckpointWriter, checkpoint_dir, file_sha256, is_sharded, list_checkpoints,
                    remove_checkpoint, verify_checkpoint)
from .lora import adapter_config_dict, has_lora, is_adapter_param
from .optim import load_state, save_state, scheduler_state

MODEL = "model."  # key prefix of trained weights in the shards
OPTIM = "optim."  # key prefix of optimiser state in the shards
_OPTIONS = dict(flatten_optimizer_state_dict=True)


def _trained_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors for DCP, the optimiser's non-tensor entries): trained weights and optimiser
    state as this rank's DTensor shards, keyed by parameter name. Frozen weights are never
    saved (they are the base model's)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(**_OPTIONS))
    trained = _trained_names(model)
    tensors = {MODEL + k: v for k, v in model_state.items() if k in trained}
    others = {}
    for key, value in optim_state.items():
        if isinstance(value, torch.Tensor):
            tensors[OPTIM + key] = value
        else:
            others[key] = value
    return tensors, others


def _own_shard_files(shards: Path, rank: int) -> list[Path]:
    """The files DCP's Hugging Face writer wrote for `rank` (shard index rank + 1)."""
    return sorted(shards.glob(f"shard-{rank + 1:05d}-*.safetensors"))


def _hash_files(files: list[Path], folder: Path) -> dict[str, tuple[int, str]]:
    """name (relative to the checkpoint) -> (bytes, sha256) of this rank's files, each flushed
    to disk first (DCP's writer does not hash as it writes, so the writing rank reads its own
    file back once, in parallel with the other ranks)."""
    import os

    records = {}
    for path in files:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        records[path.relative_to(folder).as_posix()] = (path.stat().st_size, file_sha256(path))
    return records


def save_sharded_checkpoint(run_dir: Path, position, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, scheduler, meta: dict,
                            rng: dict, keep: int | None = None) -> Path | None:
    """Write the checkpoint of `position.step` from every rank (a collective: all ranks call
    it); returns its folder on rank 0, None elsewhere."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    tensors, others = _state(model, optimizer)
    folder = checkpoint_dir(run_dir, position.step)

    def write_shards(tmp: Path | None) -> dict[str, tuple[int, str]]:
        shared = [str(tmp) if tmp is not None else None]
        dist.broadcast_object_list(shared, src=0)
        tmp = Path(shared[0])
        shards = tmp / SHARDS_DIR
        if rank == 0:
            shards.mkdir()
        dist.barrier()
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(
            str(shards), save_distributed=True))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, _hash_files(_own_shard_files(shards, rank), tmp))
        return {name: record for part in gathered for name, record in part.items()}

    if rank != 0:
        write_shards(None)
        dist.barrier()  # rank 0 finished the folder
        return None
    local = sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local")
                else t.numel() * t.element_size() for t in tensors.values())
    check_free_space(folder.parent, local * world * 2, f"checkpoint {folder.name}")
    try:
        with atomic_dir(folder, replace=True) as tmp:
            files = CheckpointWriter(tmp)
            for name, (size, sha) in write_shards(tmp).items():
                files.record(name, size, sha)
            files.write_json(OPTIMIZER_GROUPS, others)
            if has_lora(model):
                files.write_json(ADAPTER_CONFIG, adapter_config_dict(model), indent=2)
            files.write_json(SCHEDULER_STATE, scheduler_state(scheduler))
            save_state(rng, files, RNG_STATE)
            trains_base = any(not is_adapter_param(k) for k in tensors if k.startswith(MODEL))
            files.finish({**meta, **asdict(position), "ditctl_version": __version__,
                          "sharded": {"world_size": world, "trains_base": trains_base}})
    finally:
        dist.barrier()
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            remove_checkpoint(old)  # vanishes whole, as every pruned checkpoint
    return folder


def _reader(checkpoint: Path):
    import torch.distributed.checkpoint as dcp

    return dcp.HuggingFaceStorageReader(str(Path(checkpoint) / SHARDS_DIR))


def load_sharded_checkpoint(folder: Path, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, scheduler) -> tuple[dict, dict]:
    """Restore trained weights and optimiser state into a sharded run (any world size: DCP
    reshards), and the schedule; returns (meta, the RNG state to restore)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    meta = verify_checkpoint(folder)
    if not is_sharded(meta):
        raise CheckpointError(f"{folder} was written by a [distributed] strategy = 'ddp' run; "
                              "this run shards the model (fsdp)",
                              hint="resume it with --strategy ddp")
    tensors, _ = _state(model, optimizer)
    try:
        stored = set(_reader(folder).read_metadata().state_dict_metadata)
        missing = [k[len(MODEL):] for k in tensors if k.startswith(MODEL) and k not in stored]
        if missing:
            raise CheckpointError(f"{folder} holds no trained values for {missing[:3]} "
                                  f"({len(missing)} weights)",
                                  hint="resume with the settings the run was trained with "
                                       "(--lora / --train-only-lora as before)")
        # a parameter that never had a gradient (block 0's value-residual mix) has no saved
        # optimiser state: it keeps the empty state the fresh optimiser gave it
        dcp.load({k: v for k, v in tensors.items() if k in stored},
                 storage_reader=_reader(folder))
        groups = json.loads((folder / OPTIMIZER_GROUPS).read_text())
        model_state = {k[len(MODEL):]: v for k, v in tensors.items() if k.startswith(MODEL)}
        optim_state = {**{k[len(OPTIM):]: v for k, v in tensors.items() if k.startswith(OPTIM)},
                       **groups}
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optim_state,
                       options=StateDictOptions(strict=False, **_OPTIONS))
        state = json.loads((folder / SCHEDULER_STATE).read_text())
        scheduler.load_state_dict({**scheduler.state_dict(), **state})
        rng = load_state(folder, RNG_STATE)
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot resume from {folder}: {str(exc).splitlines()[0]}",
                              hint="resume from another checkpoint, or start a new run") from exc
    return meta, rng


def trained_weight_names(checkpoint: Path) -> list[str]:
    """The parameter names whose trained values a sharded checkpoint holds (read from the
    shard headers)."""
    metadata = _reader(checkpoint).read_metadata()
    return sorted(k[len(MODEL):] for k in metadata.state_dict_metadata if k.startswith(MODEL))


def load_trained_weights(checkpoint: Path, denoiser: torch.nn.Module) -> None:
    """Copy a sharded checkpoint's trained weights into an unsharded `denoiser` (any dtype and
    device), without a process group: DCP reads each stored piece and copies it into its slice
    of the parameter, so no whole fp32 copy of the model is ever held."""
    import torch.distributed.checkpoint as dcp

    own = dict(denoiser.named_parameters())
    names = trained_weight_names(checkpoint)
    unknown = [n for n in names if n not in own]
    if unknown:
        raise CheckpointError(f"{checkpoint} has weights this model lacks: {unknown[:3]}",
                              hint="it was trained on another model configuration")
    with torch.no_grad(), warnings.catch_warnings():
        # no process group here on purpose (one process reads every shard): DCP's note on it
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        # one block's worth at a time keeps DCP's planning (and any staging) small
        for group in _by_block(names):
            targets = {MODEL + n: own[n].data for n in group}
            dcp.load(targets, storage_reader=_reader(checkpoint), no_dist=True)


def _by_block(names: list[str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        groups.setdefault(key, []).append(name)
    return list(groups.values())
