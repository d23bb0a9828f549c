"""Per-process memory under [distributed] strategy ddp vs fsdp, at 1 and 2 processes (CPU, gloo),
and the --dry-run plan's per-process numbers for a full fine-tune of the released 10B F-Lite.

    python -m bench fsdp_memory        (on request; ~10 min on 2 cores)

Measured on a ~95 M-parameter F-Lite DiT (SMALL_FLITE: hidden 768, depth 6, text 768), full
fine-tuning, AdamW, 2 optimiser steps at 256 px (32x32 latents), batch 1 per process. Each
process reports the bytes of the distinct storages behind its own parameters, gradients and
optimiser state (for fsdp: its local shards, and the buffers FSDP keeps them in), and its peak
resident memory (ru_maxrss, which also counts the Python/torch runtime and the activations).
ddp wraps the model in torch's DistributedDataParallel, as accelerate does; fsdp calls ditctl's
own `shard_denoiser` (FSDP2 per block).

The 10B rows are the plan (`ditctl.engine.plan.memory_estimate`) for bf16 mixed precision,
gradient checkpointing, batch 1, 512 text tokens, at 512 and 1024 px, and the fewest 80 GB
GPUs whose per-process plan fits in 80 GB (leaving 10% for the CUDA context and
fragmentation).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench.common import RELEASED_FLITE, SMALL_FLITE

GIB = 2**30
MEASURE = textwrap.dedent("""
    import json, resource, sys, torch, torch.distributed as dist
    from ditctl.config import build_config
    from ditctl.engine.sharding import local_tensor, shard_denoiser
    from ditctl.models.flite import shape_of_config
    from ditctl.models.flite_dit import DiT

    shape, strategy, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DiT(**shape)
    if strategy == "fsdp":
        shard_denoiser(model, build_config({"distributed": {"strategy": "fsdp"}}),
                       torch.device("cpu"))
        run = model
    else:
        # block 0's value-residual mix gets no gradient (there is no earlier V to mix in)
        run = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) \\
            if dist.get_world_size() > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for _ in range(2):
        x, t = torch.randn(1, 16, 32, 32), torch.rand(1)
        run(x, torch.randn(1, 32, shape["cross_attn_input_size"]), t).square().mean().backward()
        optimizer.step()
    params = list(model.parameters())

    def held(tensors):
        storages = {}
        for tensor in tensors:
            storage = local_tensor(tensor).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    sizes = {"params": held(params), "grads": held(p.grad for p in params if p.grad is not None),
             "optimizer": held(v for s in optimizer.state.values() for v in s.values()
                               if v.dim() > 0),
             "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open(f"{out}.{dist.get_rank()}", "w") as fh:
        json.dump(sizes, fh)
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(strategy: str, processes: int, shape: dict, folder: Path) -> list[dict[str, int]]:
    script = folder / "measure.py"
    script.write_text(MEASURE)
    out = folder / f"{strategy}-{processes}"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                    str(processes), "--master_port", str(_free_port()), str(script),
                    json.dumps(shape), strategy, str(out)], check=True, capture_output=True)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(processes)]


def released_fsdp_plan(size: int, processes: int) -> dict[str, int]:
    """The plan's per-process bytes for a full fine-tune of the 10B under fsdp."""
    import torch

    from ditctl.config import build_config
    from ditctl.engine.plan import device_total, memory_estimate
    from ditctl.models.flite import shape_of_config
    from ditctl.models.flite_dit import DiT

    config = build_config({"train": {"mixed_precision": "bf16", "gradient_checkpointing": True},
                           "distributed": {"strategy": "fsdp"}})
    dit_config = RELEASED_FLITE.config()
    with torch.device("meta"):
        skeleton = DiT(**dit_config)
    memory, _ = memory_estimate(skeleton, shape_of_config(dit_config), config, (size // 8, size // 8), 512,
                                shards=processes)
    return {**memory, "total": device_total(memory)}


def gpus_needed(size: int, budget: float = 0.9 * 80e9) -> int:
    for processes in range(1, 65):
        if released_fsdp_plan(size, processes)["total"] <= budget:
            return processes
    return -1


def run(quick: bool) -> dict[str, Any]:
    started = time.perf_counter()
    shape = (SMALL_FLITE if not quick else SMALL_FLITE.__class__(128, 2, 4, 128)).config()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "fsdp"):
            for processes in (1, 2):
                per_rank = measure(strategy, processes, shape, Path(tmp))
                worst = max(per_rank, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
                state = worst["params"] + worst["grads"] + worst["optimizer"]
                rows.append({"strategy": strategy, "processes": processes,
                             "params_mib": round(worst["params"] / 2**20, 1),
                             "grads_mib": round(worst["grads"] / 2**20, 1),
                             "optimizer_mib": round(worst["optimizer"] / 2**20, 1),
                             "state_mib": round(state / 2**20, 1),
                             "peak_rss_mib": round(max(r["peak_rss"] for r in per_rank)
                                                   / 2**20, 1)})
    base = next(r["state_mib"] for r in rows if r["strategy"] == "ddp" and r["processes"] == 1)
    for row in rows:
        row["state_vs_one_process"] = round(row["state_mib"] / base, 3)
    plans = []
    for size in (512, 1024):
        need = gpus_needed(size)
        for processes in sorted({1, 2, 4, 8, need}):
            plan = released_fsdp_plan(size, processes)
            plans.append({"px": size, "processes": processes,
                          **{k: round(v / GIB, 1) for k, v in plan.items()},
                          "fits_80gb": plan["total"] <= 0.9 * 80e9})
    from bench.common import dit_parameters

    return {"table": rows,
            "tables": {"Plan: full fine-tune of the released 10B, fsdp, bf16, checkpointing, "
                       "batch 1, 512 text tokens (GiB per process)": plans},
            "model_parameters": dit_parameters(SMALL_FLITE) if not quick else None,
            "gpus_80gb_needed_512px": gpus_needed(512),
            "gpus_80gb_needed_1024px": gpus_needed(1024),
            "elapsed_s": round(time.perf_counter() - started)}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
