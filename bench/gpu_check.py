"""One short, unattended GPU check at F-Lite's real width: the memory plan per base precision,
then step time, MFU and peak memory of full and LoRA training.

    python bench/gpu_check.py [--depth 4] [--batch 4] [--latent 128] [--budget-s 420]
    python bench/gpu_check.py --cpu-smoke        # the same code paths, tiny, on the CPU

Part 1, the plan against the GPU (first: it is what the 24 GB recipe rests on): LoRA r64 on
the default targets, bf16 autocast, batch 1, 512 text states, gradient checkpointing, AdamW
state present, base stored as bf16 / fp8 / int8 / nf4 (ditctl's own quantized layers), at
512 and 1024 px, depth 1 and 2 (plus 512 px without checkpointing at depth 1): peak
torch.cuda.max_memory_allocated and median step time per point, next to
ditctl.engine.plan.memory_estimate for the same shapes; the per-block slope (depth 2 - depth 1)
extrapolates each precision to the released depth 40 at 1024 px. The results are appended to
bench/RESULTS.md as one block (--no-record: print only). Without CUDA the script stops at once
with one line and exit status 1.

Part 2, speed: F-Lite's width (hidden 3072, 12 heads of 256, text 4096) with reduced depth
(4 blocks: 1.06 B parameters), bf16 autocast with fp32 trainable weights (as `ditctl train
--mixed-precision bf16`), batch 4 at 1024x1024 (128x128 latents: 4096 patches + 16 registers)
and at half that side (512x512), random inputs, AdamW. Configurations, most important first (the
rest is skipped when --budget-s runs out):

  full fine-tuning       eager / + gradient checkpointing / compiled / compiled + checkpointing
  LoRA r64 (base bf16)   the same four
  512 px                 LoRA and full, eager and compiled
  attention backends     flash, flash3, sage, xformers, flex (LoRA, 1024 px; flash also 512 px)
                         against the sdpa rows; a backend whose package is missing is reported
                         "unavailable", not measured
Compilation and checkpointing are ditctl's own (`--compile`: each block compiled once;
`--gradient-checkpointing`), attention goes through ditctl's switch (`--attention-backend`).
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
from ditctl.errors import ConfigError  # noqa: E402
from ditctl.models.flite_dit import DiT  # noqa: E402

FLITE_WIDTH = dict(hidden=3072, heads=12, text_dim=4096)
TEXT_TOKENS = 512  # F-Lite's T5 length
LORA_TARGETS = ["qkv", "q", "context_kv", "proj"]  # ditctl's defaults
CONFIGS = [  # (name, lora, checkpointing, compile, attention backend, size), most important first
    ("full", False, False, False, "sdpa", "large"),
    ("full + ckpt", False, True, False, "sdpa", "large"),
    ("LoRA r64", True, False, False, "sdpa", "large"),
    ("LoRA r64 + ckpt", True, True, False, "sdpa", "large"),
    ("full, compiled", False, False, True, "sdpa", "large"),
    ("full + ckpt, compiled", False, True, True, "sdpa", "large"),
    ("LoRA r64, compiled", True, False, True, "sdpa", "large"),
    ("LoRA r64 + ckpt, compiled", True, True, True, "sdpa", "large"),
    *[(f"LoRA r64, attention {name}", True, False, False, name, "large")
      for name in ("flash", "flash3", "sage", "xformers", "flex")],
    ("LoRA r64, half size", True, False, False, "sdpa", "small"),
    ("LoRA r64, half size, compiled", True, False, True, "sdpa", "small"),
    ("LoRA r64, attention flash, half size", True, False, False, "flash", "small"),
    ("full, half size", False, False, False, "sdpa", "small"),
    ("full, half size, compiled", False, False, True, "sdpa", "small"),
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
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip configurations that would start after this many seconds")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled ones")
    parser.add_argument("--json", type=Path, help="where to write the JSON results")
    parser.add_argument("--no-record", action="store_true",
                        help="do not append the results to bench/RESULTS.md")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "RESULTS.md",
                        help="markdown file to append the block to")
    parser.add_argument("--skip-training-configs", action="store_true",
                        help="run only part 1 (the plan per base precision)")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    if args.cpu_smoke:
        return dict(device=torch.device("cpu"), shape=DitShape(64, 2, 4, 64), batch=1, latent=8,
                    text_tokens=8, rank=4, steps=2, warmup=1, peak_size=512,
                    plan_width=(64, 4, 64), plan_sizes=(16, 32), plan_text_tokens=8,
                    smoke=True)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); "
                         "use --cpu-smoke to check the script on a CPU")
    shape = DitShape(FLITE_WIDTH["hidden"], args.depth, FLITE_WIDTH["heads"],
                     FLITE_WIDTH["text_dim"])
    return dict(device=torch.device("cuda"), shape=shape, batch=args.batch, latent=args.latent,
                text_tokens=TEXT_TOKENS, rank=64, steps=args.steps, warmup=args.warmup,
                peak_size=8192, plan_width=(3072, 12, 4096), plan_sizes=(512, 1024),
                plan_text_tokens=TEXT_TOKENS)


# --- part 1: the memory plan per base precision ---------------------------------------------------

PRECISIONS = ("bf16", "fp8", "int8", "nf4")
RELEASED_DEPTH = 40


def plan_points(s: dict) -> list[tuple[int, str, int, bool]]:
    """(depth, precision, image px, checkpointing), most telling first."""
    small, large = s["plan_sizes"]
    if s.get("smoke"):  # each precision once, and the slope pair for one: the code paths only
        return [(1, p, large, True) for p in PRECISIONS] + [(2, "nf4", large, True)]
    points = [(d, p, px, True) for px in (large, small) for p in PRECISIONS for d in (1, 2)]
    return points + [(1, p, small, False) for p in PRECISIONS]


def lora_config(precision: str, checkpointing: bool):
    from ditctl.config import build_config

    return build_config({"lora": {"use_lora": True, "train_only_lora": True, "lora_rank": 64,
                                  "lora_alpha": 64, "base_precision": precision},
                         "train": {"mixed_precision": "bf16", "train_batch_size": 1,
                                   "gradient_checkpointing": checkpointing}})


def build_quantized(shape: DitShape, precision: str, device: torch.device, config):
    """A random full-width DiT with the base stored as `precision` on `device`, built layer
    by layer as ditctl's loader builds it (ditctl.engine.precision.quantizer), LoRA added."""
    from ditctl.engine.lora import add_lora, freeze_base, peft_config
    from ditctl.engine.precision import quantizer, storage_dtype

    with torch.device("meta"):
        model = DiT(**shape.config())
    convert = quantizer(precision)
    if convert:
        convert.bind(model)
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = storage_dtype(precision)
    for name, module in list(model.named_modules()):
        for key, param in list(module._parameters.items()):  # this module's own tensors
            if param is not None and param.is_meta:
                value = torch.empty(param.shape, device=device, dtype=torch.float32)
                value.normal_(0.0, 0.02, generator=generator)
                module._parameters[key] = torch.nn.Parameter(value.to(dtype),
                                                             requires_grad=False)
        replacement = convert(name, module) if convert else None
        if replacement is not None and replacement is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, replacement)
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            raise RuntimeError(f"{name} was not materialised")
    add_lora(model, peft_config(config.lora, tuple(LORA_TARGETS), tuple(LORA_TARGETS)))
    freeze_base(model)
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def plan_point(point: tuple, s: dict) -> dict:
    from ditctl.engine.plan import memory_estimate

    depth, precision, px, ckpt = point
    hidden, heads, text_dim = s["plan_width"]
    shape = DitShape(hidden, depth, heads, text_dim)
    device = s["device"]
    config = lora_config(precision, ckpt)
    model = build_quantized(shape, precision, device, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95))
    for p in trainable:  # the optimiser state exists from the first step on: create it now
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator(device=device).manual_seed(0)
    latent = px // 8
    x = torch.randn(1, 16, latent, latent, device=device, generator=generator)
    text = torch.randn(1, s["plan_text_tokens"], text_dim, device=device, generator=generator)
    t = torch.rand(1, device=device, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):  # the first is a warm-up (kernel choices, allocator growth)
        synchronize(device)
        begun = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            prediction = model(x, text, t)
        (prediction.float() - x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - begun)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    from ditctl.models.flite import shape_of_config

    plan, _ = memory_estimate(model, shape_of_config(shape.config()), config, (latent, latent),
                              s["plan_text_tokens"])
    del model, optimizer, trainable
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    planned = sum(plan.values())
    row = {"depth": depth, "base": precision, "px": px, "checkpointing": ckpt,
           "step_s": statistics.median(times[1:]), "plan_gib": planned / 2**30}
    if peak is not None:
        row.update(peak_gib=peak / 2**30, plan_vs_measured=planned / peak)
    return row


def extrapolate(rows: list[dict], s: dict) -> list[dict]:
    """Per precision: depth 40 at the large size from the measured per-block slope, next to
    the plan for the released model."""
    import sys as _sys

    _sys.path.insert(0, str(REPO_ROOT))
    from bench.bench_memory_plan import released_plan

    large = s["plan_sizes"][1]
    out = []
    for precision in PRECISIONS:
        at = {r["depth"]: r for r in rows if r["base"] == precision and r["px"] == large
              and r["checkpointing"] and r.get("status") == "ok"}
        if 1 not in at or 2 not in at:
            continue
        entry = {"base": precision, "px": large,
                 "plan_gib_depth40": released_plan(precision, large)["total"] / 2**30,
                 "step_s_depth40": at[1]["step_s"] + (RELEASED_DEPTH - 1)
                 * (at[2]["step_s"] - at[1]["step_s"])}
        if "peak_gib" in at[1]:
            slope = at[2]["peak_gib"] - at[1]["peak_gib"]
            entry.update(measured_slope_gib_per_block=slope,
                         measured_gib_depth40=at[1]["peak_gib"] + (RELEASED_DEPTH - 1) * slope)
        out.append(entry)
    return out


def run_plan_points(s: dict, budget_s: float, begun: float) -> tuple[list[dict], list[dict]]:
    rows = []
    for point in plan_points(s):
        elapsed = time.perf_counter() - begun
        if elapsed > budget_s:
            rows.append({"depth": point[0], "base": point[1], "px": point[2],
                         "checkpointing": point[3], "status": f"skipped (budget, {elapsed:.0f} s)"})
            continue
        try:
            row = {**plan_point(point, s), "status": "ok"}
        except ConfigError as exc:  # e.g. an attention backend whose package is missing
            row = {"depth": point[0], "base": point[1], "px": point[2],
                   "checkpointing": point[3], "status": f"unavailable: {exc}"[:160]}
        except torch.OutOfMemoryError as exc:
            row = {"depth": point[0], "base": point[1], "px": point[2],
                   "checkpointing": point[3], "status": "OOM: " + str(exc).splitlines()[0][:100]}
        except Exception as exc:  # report and go on: the other points still count
            traceback.print_exc()
            row = {"depth": point[0], "base": point[1], "px": point[2],
                   "checkpointing": point[3], "status": f"error: {type(exc).__name__}: {exc}"[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, extrapolate(rows, s)


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


def build_model(shape: DitShape, device: torch.device, lora: bool, rank: int, ckpt: bool,
                compile_: bool) -> torch.nn.Module:
    """The DiT as `ditctl train` holds it under bf16: fp32 trainable weights; with LoRA the
    frozen base in bf16 (ditctl.engine.setup.build_denoiser). Checkpointing and compilation are
    ditctl's own (`--gradient-checkpointing`; `--compile`: engine/compile.py compiles each block
    once, regional compilation)."""
    from ditctl.engine.compile import compile_blocks
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
    if ckpt:
        model.enable_gradient_checkpointing()
    if compile_:
        compile_blocks(model)
    return model


def config_latent(size: str, s: dict) -> int:
    return s["latent"] if size == "large" else max(2, s["latent"] // 2)


def measure(config: tuple, s: dict) -> dict:
    from ditctl.engine.attention import attention_context

    name, lora, ckpt, compile_, attention, size = config
    device, shape, batch = s["device"], s["shape"], s["batch"]
    latent = config_latent(size, s)
    attention_context(attention, device)  # unusable here: ConfigError before anything is built
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
        with attention_context(attention, device):
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
    result = {"config": name, "attention": attention, "px": latent * 8,
              "step_s": statistics.median(times),
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
    from ditctl.console import quiet_libraries

    quiet_libraries()
    plan_rows, extrapolated = run_plan_points(s, args.budget_s, begun)
    plan_columns = ["depth", "base", "px", "checkpointing", "status", "peak_gib", "plan_gib",
                    "plan_vs_measured", "step_s"]
    print()
    print(markdown(plan_rows, plan_columns))
    print()
    print(markdown(extrapolated, ["base", "px", "measured_slope_gib_per_block",
                                  "measured_gib_depth40", "plan_gib_depth40", "step_s_depth40"]))
    tokens = image_tokens(s["latent"], s["latent"])
    flops = {size: training_flops(shape, (config_latent(size, s),) * 2, s["batch"],
                                  s["text_tokens"]) for size in ("large", "small")}
    peak = bf16_matmul_peak(device, s["peak_size"])
    header = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "model": shape.label(), "parameters": dit_parameters(shape),
        "batch": s["batch"], "latent": s["latent"], "tokens_per_image": tokens,
        "text_tokens": s["text_tokens"], "model_tflop_per_step": flops["large"] / 1e12,
        "model_tflop_per_step_half_size": flops["small"] / 1e12,
        "bf16_matmul_peak_tflops": peak / 1e12, "precision": "bf16 autocast, fp32 trainable",
    }
    print(json.dumps(header, indent=2), flush=True)
    rows = []
    configs = [c for c in CONFIGS if not (c[3] and args.no_compile)]
    for config in configs if not args.skip_training_configs else []:
        elapsed = time.perf_counter() - begun
        if elapsed > args.budget_s:
            rows.append({"config": config[0], "status": f"skipped (budget, {elapsed:.0f} s)"})
            continue
        try:
            row = measure(config, s)
            row["status"] = "ok"
            row["mfu_pct"] = 100 * flops[config[5]] / row["step_s"] / peak
            row["images_per_s"] = s["batch"] / row["step_s"]
        except ConfigError as exc:  # e.g. an attention backend whose package is missing
            row = {"config": config[0], "status": f"unavailable: {exc}"[:160]}
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
    columns = ["config", "attention", "px", "status", "step_s", "mfu_pct", "images_per_s", "peak_gib",
               "after_step_gib", "trainable_params", "first_step_s"]
    print()
    print(markdown(rows, columns))
    total = time.perf_counter() - begun
    report = {**header, "plan_points": plan_rows, "extrapolated": extrapolated,
              "results": rows, "total_s": total}
    target = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                           else None)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {target}")
    if not args.no_record and not args.cpu_smoke:
        record(args.results, header, plan_rows, plan_columns, extrapolated, rows, columns, total)
        print(f"appended a block to {args.results}")
    ok = all(r["status"] == "ok" or r["status"].startswith(("unavailable", "skipped"))
             for r in plan_rows + rows)
    return 0 if ok else 1


def record(path: Path, header: dict, plan_rows: list[dict], plan_columns: list[str],
           extrapolated: list[dict], rows: list[dict], columns: list[str], total: float) -> None:
    from bench.common import append_results, machine_stamp, stamp_line

    stamp = machine_stamp()
    block = "\n\n".join([
        f"## gpu_check · {stamp['date']} · {header['device']}",
        f"Machine: {stamp_line(stamp)} · took {total:.0f} s",
        "Memory plan per base precision (LoRA r64, bf16 autocast, batch 1, 512 text states; "
        "peak = torch.cuda.max_memory_allocated):",
        markdown(plan_rows, plan_columns),
        f"Extrapolated to the released depth {RELEASED_DEPTH} (measured per-block slope):",
        markdown(extrapolated, ["base", "px", "measured_slope_gib_per_block",
                                "measured_gib_depth40", "plan_gib_depth40", "step_s_depth40"]),
        f"Training configurations ({header['model']}, batch {header['batch']}, latent "
        f"{header['latent']}):",
        markdown(rows, columns)]) + "\n"
    append_results(path, block)


if __name__ == "__main__":
    sys.exit(main())
