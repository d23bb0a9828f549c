"""[distributed] strategy: how the training processes share the denoiser.

`ddp` (the default): every process holds the whole denoiser; accelerate wraps it in
DistributedDataParallel and gradients are all-reduced. Checkpoints are written by rank 0
(engine/checkpoint.py).

`fsdp`: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`), called directly: each transformer
block (`ditctl.models.blocks.repeated_blocks`) is one unit, then the root. Parameters, gradients
and optimiser state live sharded across the processes (1/N each); a block's full weights exist
only while it runs (all-gathered before, freed after). Mixed precision: with
mixed_precision = bf16 the gathered weights compute in bf16, gradients are reduced in fp32 and
the sharded masters stay fp32. `cpu_offload` keeps the shards (and so the optimiser step) in
host memory. Checkpoints are written by every rank, its own shards
(engine/sharded_checkpoint.py).

Why not accelerate's FSDP plugin: it decides the wrapping from environment/config files and
its own auto-wrap policy, patches the optimizer and `save_state`, and would have to be kept in
step with the checkpoint format; calling `fully_shard` here states the units, the precision
and the offload in a dozen lines, and the rest of the loop stays accelerate's (autocast,
gather, logging).
"""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import ConfigError
from ..models.blocks import repeated_blocks


def transformer_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's repeated blocks (the FSDP units; `ditctl.models.blocks`)."""
    blocks = repeated_blocks(denoiser)
    if not blocks:
        raise ConfigError(f"{type(denoiser).__name__} does not declare its repeated blocks "
                          "(_repeated_blocks / _no_split_modules), so it cannot be sharded",
                          hint="train it with --strategy ddp")
    return blocks


def check_fsdp_config(config: Config) -> None:
    """One-line errors for settings FSDP cannot combine with."""
    if config.distributed.strategy != "fsdp":
        return
    lora, train = config.lora, config.train
    if lora.base_precision in ("fp8", "int8", "nf4"):
        raise ConfigError(f"[lora] base_precision = '{lora.base_precision}' stores the base as "
                          "quantized tensors, which FSDP cannot shard",
                          hint="use --strategy ddp for a quantized base, or --base-precision auto")
    if lora.offload_base_blocks:
        raise ConfigError("[lora] offload_base_blocks streams whole blocks; under fsdp the "
                          "blocks are sharded", hint="use [distributed] cpu_offload instead")
    if train.use_8bit_adam:
        raise ConfigError("[train] use_8bit_adam (bitsandbytes) cannot step sharded parameters",
                          hint="drop --use-8bit-adam under --strategy fsdp")
    if train.mixed_precision == "fp16":
        raise ConfigError("[train] mixed_precision = 'fp16' is not supported with fsdp",
                          hint="use --mixed-precision bf16")


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process: start a one-rank one when the run was
    not launched by torch.distributed.run."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)


def shard_denoiser(denoiser: torch.nn.Module, config: Config, device: torch.device) -> None:
    """fully_shard each transformer block, then the root (in place; FQNs are unchanged)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                        fully_shard)
    import torch.distributed as dist

    import warnings

    # the blocks hand back V (a view of their qkv projection) for the value residual; the DiT
    # only reads block outputs out of place, which is what FSDP's warning asks for
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = config.train.mixed_precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if config.distributed.cpu_offload else OffloadPolicy()
    for block in transformer_blocks(denoiser):
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(denoiser, mesh=mesh, mp_policy=policy, offload_policy=offload)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """FSDP2's no_sync: gradients of non-final micro-batches stay unsharded and local. FSDP
    reads the flag in the backward pass, so it is set before the forward and stays in effect;
    the step's last micro-batch sets it back on."""
    model.set_requires_gradient_sync(sync)


def clip_sharded_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over sharded (DTensor) gradients: the norm of the whole gradient."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (DTensor) parameter, gradient or state; the tensor itself
    otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def is_fsdp(config: Config) -> bool:
    return config.distributed.strategy == "fsdp"

