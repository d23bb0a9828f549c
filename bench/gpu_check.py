"""One short GPU check at F-Lite's real width: step time, MFU and peak memory.

    python bench/gpu_check.py [--depth 4] [--batch 4] [--latent 128] [--budget-s 280]
    python bench/gpu_check.py --cpu-smoke        # the same code paths, tiny, on the CPU

F-Lite's width (hidden 3072, 12 heads of 256, text 4096) with reduced depth (4 blocks: 1.06 B
parameters), bf16 autocast with fp32 trainable weights (as `ditctl train --mixed-precision
bf16`), batch 4 at 1024x1024 (128x128 latents: 4096 patches + 16 registers), random inputs,
AdamW. Configurations, most important first (the rest is skipped when --budget-s runs out):

  full fine-tuning       eager / eager + gradient checkpointing / torch.compile / compile + ckpt
  LoRA r64 (base bf16)   eager / eager + gradient checkpointing
Per configuration: median step time over the measured steps after warm-up (CUDA-synchronised),
MFU = model FLOPs per step (bench.common.training_flops: 6 x params-per-token x tokens +
attention; recomputation not counted) / step time / the measured bf16 peak of a large matmul,
and torch.cuda.max_memory_allocated. Prints a markdown table; writes JSON to $OUT/gpu_check.json
when $OUT is set (or to --json). Needs only torch, diffusers and peft besides this repository
(added to sys.path: ditctl need not be installed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import DitShape, dit_parameters, image_tokens, training_flops  # noqa: E402
from ditctl.models.flite_dit import DiT  # noqa: E402

FLITE_WIDTH = dict(hidden=3072, heads=12, text_dim=4096)
TEXT_TOKENS = 512  # F-Lite's T5 length
LORA_TARGETS = ["qkv", "q", "context_kv", "proj"]  # ditctl's defaults
CONFIGS = [  # (name, lora, checkpointing, compile), most important first
    ("full", False, False, False),
    ("full + ckpt", False, True, False),
    ("LoRA r64", True, False, False),
    ("LoRA r64 + ckpt", True, True, False),
    ("full, compiled", False, False, True),
    ("full + ckpt, compiled", False, True, True),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU: checks the code paths, not the numbers")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=128, help="latent side (image px / 8)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps (compiled: +1)")
    parser.add_argument("--budget-s", type=float, default=280.0,
                        help="skip configurations that would start after this many seconds")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled ones")
    parser.add_argument("--json", type=Path, help="where to write the JSON results")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    if args.cpu_smoke:
        return dict(device=torch.device("cpu"), shape=DitShape(64, 2, 4, 64), batch=1, latent=8,
                    text_tokens=8, rank=4, steps=2, warmup=1, peak_size=512)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; use --cpu-smoke to check the script on a CPU")
    shape = DitShape(FLITE_WIDTH["hidden"], args.depth, FLITE_WIDTH["heads"],
                     FLITE_WIDTH["text_dim"])
    return dict(device=torch.device("cuda"), shape=shape, batch=args.batch, latent=args.latent,
                text_tokens=TEXT_TOKENS, rank=64, steps=args.steps, warmup=args.warmup,
                peak_size=8192)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bf16_matmul_peak(device: torch.device, size: int, repeats: int = 10) -> float:
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


class CheckpointedBlock(torch.nn.Module):
    """A block recomputed in backward, as the DiT's own gradient checkpointing does; as a module
    of its own so that torch.compile traces the checkpoint (compiling inside a checkpoint is
    not supported as well as a checkpoint inside the compiled region)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False)


def build_model(shape: DitShape, device: torch.device, lora: bool, rank: int, ckpt: bool,
                compile_: bool) -> torch.nn.Module:
    """The DiT as `ditctl train` holds it under bf16: fp32 trainable weights; with LoRA the
    frozen base in bf16 (ditctl.engine.setup.build_denoiser). Compiled: each block on its own
    (regional compilation: the blocks share one compiled graph, so it compiles in seconds
    instead of tracing the whole unrolled model)."""
    from ditctl.engine.lora import add_lora, freeze_base

    with torch.device(device):
        model = DiT(**shape.config())
    if lora:
        from peft import LoraConfig

        add_lora(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
                                   init_lora_weights="gaussian"))
        freeze_base(model)
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    model.train()
    if compile_:
        for index, block in enumerate(model.blocks):
            wrapped = CheckpointedBlock(block) if ckpt else block
            wrapped.compile()
            model.blocks[index] = wrapped
    elif ckpt:
        model.enable_gradient_checkpointing()  # ditctl's own path (--gradient-checkpointing)
    return model


def measure(config: tuple, s: dict) -> dict:
    name, lora, ckpt, compile_ = config
    device, shape, batch, latent = s["device"], s["shape"], s["batch"], s["latent"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = build_model(shape, device, lora, s["rank"], ckpt, compile_)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 16, latent, latent, device=device, generator=generator)
    text = torch.randn(batch, s["text_tokens"], shape.text_dim, device=device, generator=generator)
    t = torch.rand(batch, device=device, generator=generator)

    def step() -> float:
        synchronize(device)
        begun = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            prediction = model(x, text, t)
        loss = (prediction.float() - x).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - begun

    warmup_s = [step() for _ in range(s["warmup"] + (1 if compile_ else 0))]
    times = [step() for _ in range(s["steps"])]
    result = {"config": name, "step_s": statistics.median(times),
              "first_step_s": warmup_s[0], "setup_and_warmup_s": time.perf_counter() - started
              - sum(times), "trainable_params": sum(p.numel() for p in trainable)}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["after_step_gib"] = torch.cuda.memory_allocated() / 2**30
    del model, optimizer, trainable
    gc.collect()
    if compile_:
        torch._dynamo.reset()
    return result


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    s = settings(args)
    begun = time.perf_counter()
    device, shape = s["device"], s["shape"]
    tokens = image_tokens(s["latent"], s["latent"])
    flops = training_flops(shape, (s["latent"], s["latent"]), s["batch"], s["text_tokens"])
    peak = bf16_matmul_peak(device, s["peak_size"])
    header = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "model": shape.label(), "parameters": dit_parameters(shape),
        "batch": s["batch"], "latent": s["latent"], "tokens_per_image": tokens,
        "text_tokens": s["text_tokens"], "model_tflop_per_step": flops / 1e12,
        "bf16_matmul_peak_tflops": peak / 1e12, "precision": "bf16 autocast, fp32 trainable",
    }
    print(json.dumps(header, indent=2), flush=True)
    rows = []
    configs = [c for c in CONFIGS if not (c[3] and args.no_compile)]
    for config in configs:
        elapsed = time.perf_counter() - begun
        if elapsed > args.budget_s:
            rows.append({"config": config[0], "status": f"skipped (budget, {elapsed:.0f} s)"})
            continue
        try:
            row = measure(config, s)
            row["status"] = "ok"
            row["mfu_pct"] = 100 * flops / row["step_s"] / peak
            row["images_per_s"] = s["batch"] / row["step_s"]
        except torch.OutOfMemoryError as exc:
            row = {"config": config[0], "status": "OOM: " + str(exc).splitlines()[0][:120]}
        except Exception as exc:  # report and go on: the other configurations still count
            traceback.print_exc()
            row = {"config": config[0], "status": f"error: {type(exc).__name__}: {exc}"[:200]}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    columns = ["config", "status", "step_s", "mfu_pct", "images_per_s", "peak_gib",
               "after_step_gib", "trainable_params", "first_step_s"]
    print()
    print(markdown(rows, columns))
    report = {**header, "results": rows, "total_s": time.perf_counter() - begun}
    target = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                           else None)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {target}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
