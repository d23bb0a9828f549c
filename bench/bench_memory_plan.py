"""The `--dry-run` memory plan against measurement, at F-Lite's full width.

    python -m bench memory_plan [--quick] [--threads 1]   (run only when named)
    python -m bench.bench_memory_plan [--quick] [--load-only] [--depths 1,2] [--sizes 64,128]
        [--precisions bf16,nf4] [--checkpointing on|off|both] [--no-record]

The second form runs part of the grid (or only the loads) and appends its block to
bench/RESULTS.md just the same; with a selection, every depth x size x precision x
checkpointing combination is measured (one child process each).

Load-only (`--load-only`): each point streams the DiT (family.load_denoiser with the quantizer,
exactly what build_denoiser does before injecting LoRA) in a fresh process and records the peak
RSS above the idle, fully imported baseline against the bytes of what was loaded (the base at
its target precision, quantized parts included). Target: at most 1.15x, every precision.

Builds F-Lite DiTs of the released width (hidden 3072, 12 heads of 256, text width 4096), one
and two blocks, written as sharded bf16 safetensors. Each point runs in a fresh process (see
bench.common.measure_isolated: VmHWM above the RSS of an idle process that has imported
everything): `build_denoiser` streams and quantizes the base (host RAM while loading is
measured: its peak against the bytes of what was loaded), then one LoRA training step
(rank 64, default targets, bf16 autocast, AdamW whose state exists already, batch 1, random
"cached" latents and text states) is measured and compared with
`ditctl.engine.plan.memory_estimate` for the same shapes. Target: every point within 10%.
The compared step is the second (steady state); the first step's peak is recorded beside it
(first_step_mib: it also holds one-time library costs, see train_point).

Grid (FULL): every base precision (bf16, fp8, int8, nf4) x checkpointing off/on at depth 1,
and depth 2 with checkpointing for bf16 and nf4 (the per-block slope), at the sizes in FULL.
On the reference CPU (no bf16 matrix units: ~3 GFLOP/s on one thread, shared with other jobs)
a full-width step at 256 px takes ~5 minutes, so the recorded grid is 64 px with 16 text
states; larger sizes are a matter of time (edit FULL). The released model (depth 40, 1024 px,
512 text states) is then planned from its skeleton, and the measured per-block slope at the
measured size is compared with the plan's.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (DitShape, RELEASED_FLITE, mb, measure_isolated, offline_environment,
                          peak_rss_bytes, reset_peak_rss, rss_bytes, write_sharded_dit)

PRECISIONS = ("bf16", "fp8", "int8", "nf4")
TEXT_TOKENS = 512  # F-Lite's T5 length: the DiT attends to all 512 states
LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 64, "lora_alpha": 64}
# The reference CPU has no bf16 matrix units (bf16 matmuls run at ~3 GFLOP/s on one thread; a
# full-width block step at 256 px takes 5 minutes on the shared machine): the recorded grid is
# 64 px with 16 text states at depth 1 for every precision, checkpointing off and on, and the
# slope point (depth 2, checkpointing) for bf16 and nf4. `--sizes 128,256` style runs are a
# matter of time: SIZES below. The plan's text terms are linear in the text length.
FULL = dict(width=(3072, 12, 4096), depths=(1,), sizes=(64,), slope_depth=2,
            slope_size=64, text_tokens=16, slope_precisions=("bf16", "nf4"))
QUICK = dict(width=(256, 4, 256), depths=(1,), sizes=(32, 64), slope_depth=2,
             slope_size=32, text_tokens=16, precisions=("bf16", "nf4"))
GIB = 2**30


def run_config(precision: str, checkpointing: bool) -> dict:
    return {"lora": {**LORA, "base_precision": precision},
            "train": {"mixed_precision": "bf16", "gradient_checkpointing": checkpointing,
                      "train_batch_size": 1}}


# --- measured in child processes --------------------------------------------------------------

def train_point(model_dir: str, precision: str, size: int, checkpointing: bool,
                text_tokens: int) -> dict[str, Any]:
    """Load (streamed, quantized) and run one LoRA step; peaks above the idle baseline."""
    import torch

    from ditctl.config import build_config
    from ditctl.engine.optim import build_optimizer
    from ditctl.engine.precision import quantized_storage_bytes
    from ditctl.engine.setup import build_denoiser
    from ditctl.models.flite import FLiteFamily

    baseline = rss_bytes()
    family = FLiteFamily(Path(model_dir))
    config = build_config(run_config(precision, checkpointing))
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build_denoiser(family, config)
    load_s = time.perf_counter() - started
    load_peak = peak_rss_bytes() - baseline
    loaded_bytes = quantized_storage_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, config.train)
    for p in trainable:  # AdamW's state exists from the first step on: create it now
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    latent = size // 8
    x = torch.randn(1, 16, latent, latent, generator=generator)
    text = torch.randn(1, text_tokens, model.config.cross_attn_input_size, generator=generator)
    t = torch.rand(1, generator=generator)
    def step() -> tuple[int, float]:
        """One training step: its peak RSS above the baseline, and its time."""
        reset_peak_rss()
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = model(x, text, t)
        loss = (prediction.float() - x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return peak_rss_bytes() - baseline, time.perf_counter() - started

    before = rss_bytes() - baseline
    # The first step of a process also pays one-time costs outside torch's tensor allocator
    # (kernel code paged in on first use, library buffers: ~40 MiB here, about half of it
    # anonymous memory). Where they land relative to the peak depends on the depth (during
    # the last block's backward, which comes after the peak at depth 1 and before it at depth
    # 2 and more), so one-step peaks made that constant look like a per-block cost. The plan
    # is the steady state: the second step is the one compared with it.
    first_peak, _ = step()
    step_peak, step_s = step()
    return {"load_peak_bytes": load_peak, "loaded_bytes": loaded_bytes, "load_s": load_s,
            "resident_before_step_bytes": before, "first_step_peak_bytes": first_peak,
            "step_peak_bytes": step_peak, "step_s": step_s}


def load_point(model_dir: str, precision: str) -> dict[str, Any]:
    """Stream the DiT as a frozen `precision` base (no LoRA, no step): the peak RSS above the
    idle baseline while loading, against the bytes of the loaded base."""
    from ditctl.engine.precision import quantized_storage_bytes, quantizer, storage_dtype
    from ditctl.models.flite import FLiteFamily

    import torch

    from ditctl.engine.precision import quantize_weight

    baseline = rss_bytes()
    first_use = 0
    if precision in ("fp8", "int8", "nf4"):
        # What the first quantization costs whatever the model's size (kernel code pages,
        # lookup tables): measured here so that it is visible, and still counted in the peak
        # (which stays above the baseline taken before it).
        weight = torch.zeros(64, 256, dtype=torch.bfloat16)
        quantize_weight(lambda start, stop: weight[start:stop], (64, 256), precision)
        first_use = rss_bytes() - baseline
    family = FLiteFamily(Path(model_dir))
    started = time.perf_counter()
    model = family.load_denoiser(storage_dtype(precision, "bf16"), "cpu",
                                 convert=quantizer(precision))
    load_s = time.perf_counter() - started
    return {"load_peak_bytes": peak_rss_bytes() - baseline, "first_use_bytes": first_use,
            "loaded_bytes": quantized_storage_bytes(model), "load_s": load_s}


# --- the plan ----------------------------------------------------------------------------------

def planned(model_dir: Path, precision: str, size: int, checkpointing: bool,
            text_tokens: int) -> dict[str, int]:
    from ditctl.config import build_config
    from ditctl.engine.plan import memory_estimate
    from ditctl.engine.setup import build_denoiser
    from ditctl.models.flite import FLiteFamily

    family = FLiteFamily(model_dir)
    config = build_config(run_config(precision, checkpointing))
    skeleton = build_denoiser(family, config, device="meta")
    memory, _ = memory_estimate(skeleton, family.denoiser_shape(), config, (size // 8, size // 8),
                                text_tokens)
    return {**memory, "total": sum(memory.values())}


def released_plan(precision: str, size: int, text_tokens: int = TEXT_TOKENS) -> dict[str, int]:
    import torch

    from ditctl.config import build_config
    from ditctl.engine.lora import add_lora, freeze_base, peft_config
    from ditctl.engine.plan import memory_estimate
    from ditctl.models.flite_dit import DiT

    config = build_config(run_config(precision, True))
    dit_config = RELEASED_FLITE.config()
    with torch.device("meta"):
        skeleton = DiT(**dit_config)
    add_lora(skeleton, peft_config(config.lora, ("qkv", "q", "context_kv", "proj"),
                                     ("qkv", "q", "context_kv", "proj")))
    freeze_base(skeleton)
    from ditctl.models.flite import shape_of_config

    memory, _ = memory_estimate(skeleton, shape_of_config(dit_config), config, (size // 8, size // 8),
                                text_tokens)
    return {**memory, "total": sum(memory.values())}


def build_model(folder: Path, shape: DitShape) -> Path:
    from bench.common import TINY_T5, TINY_VAE, build_bench_pipeline

    import shutil

    build_bench_pipeline(folder, DitShape(64, 1, 4, shape.text_dim), TINY_T5, TINY_VAE)
    shutil.rmtree(folder / "dit_model")
    write_sharded_dit(folder / "dit_model", shape)
    return folder


LOAD_TARGET = 1.15  # host RAM peak while loading, over the loaded bytes


def run_loads(quick: bool, depths: tuple[int, ...] = (1, 2),
              precisions: tuple[str, ...] = PRECISIONS) -> dict[str, Any]:
    """Host RAM while streaming a full-width DiT in, each precision in a fresh process."""
    offline_environment()
    hidden, heads, text_dim = (QUICK if quick else FULL)["width"]
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        for depth in depths:
            folder = build_model(Path(tmp) / f"d{depth}", DitShape(hidden, depth, heads, text_dim))
            for precision in precisions:
                point = measure_isolated({"load": ("bench.bench_memory_plan:load_point", dict(
                    model_dir=str(folder), precision=precision))})["load"]
                ratio = point["load_peak_bytes"] / point["loaded_bytes"]
                rows.append({"depth": depth, "base": precision,
                             "loaded_mib": mb(point["loaded_bytes"]),
                             "load_peak_mib": mb(point["load_peak_bytes"]),
                             "load_vs_loaded": round(ratio, 3),
                             f"within_{LOAD_TARGET}x": ratio <= LOAD_TARGET,
                             "first_use_mib": mb(point["first_use_bytes"]),
                             "load_s": round(point["load_s"], 1)})
                print(rows[-1], flush=True)
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    return {"table": rows, "model": f"hidden {hidden}, heads {heads}, text {text_dim}",
            "max_load_vs_loaded": max(r["load_vs_loaded"] for r in rows),
            f"all_loads_within_{LOAD_TARGET}x": all(r[f"within_{LOAD_TARGET}x"] for r in rows),
            "elapsed_s": round(time.perf_counter() - started)}


def run(quick: bool, *, depths: tuple[int, ...] | None = None,
        sizes: tuple[int, ...] | None = None, precisions: tuple[str, ...] | None = None,
        checkpointing: tuple[bool, ...] | None = None) -> dict[str, Any]:
    """The grid (FULL or QUICK), or with any selection given, every combination of the
    selected (else default) depths, sizes, precisions and checkpointing settings."""
    offline_environment()
    settings = QUICK if quick else FULL
    selected = any(v is not None for v in (depths, sizes, precisions, checkpointing))
    precisions = precisions or settings.get("precisions", PRECISIONS)
    hidden, heads, text_dim = settings["width"]
    if selected:
        depths = depths or tuple(settings["depths"])
        grid = {d: [(p, size, c) for size in (sizes or settings["sizes"]) for p in precisions
                    for c in (checkpointing or (False, True))] for d in depths}
    else:
        depths = sorted(set(settings["depths"]) | ({settings["slope_depth"]} - {None}))
        grid = {d: [(p, size, c) for size in settings["sizes"] for p in precisions
                    for c in (False, True)] if d in settings["depths"] else
                [(p, settings["slope_size"], True)  # the slope point: checkpointing
                 for p in settings.get("slope_precisions", precisions)] for d in depths}
    started = time.perf_counter()
    rows, results, plans = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        for depth in depths:
            folder = build_model(Path(tmp) / f"d{depth}", DitShape(hidden, depth, heads, text_dim))
            for precision, size, ckpt in grid[depth]:
                label = (depth, precision, size, ckpt)
                results[label] = measure_isolated({"point": ("bench.bench_memory_plan:train_point", dict(
                    model_dir=str(folder), precision=precision, size=size, checkpointing=ckpt,
                    text_tokens=settings["text_tokens"]))})["point"]
                plans[label] = planned(folder, precision, size, ckpt, settings["text_tokens"])
                measured = results[label]["step_peak_bytes"]
                plan = plans[label]["total"]
                rows.append({"depth": depth, "base": precision, "px": size,
                             "checkpointing": ckpt, "measured_mib": mb(measured),
                             "plan_mib": mb(plan), "plan_vs_measured": round(plan / measured, 3),
                             "within_10pct": abs(plan / measured - 1) <= 0.10,
                             "load_peak_mib": mb(results[label]["load_peak_bytes"]),
                             "loaded_mib": mb(results[label]["loaded_bytes"]),
                             "load_vs_loaded": round(results[label]["load_peak_bytes"]
                                                     / results[label]["loaded_bytes"], 3),
                             "first_step_mib": mb(results[label]["first_step_peak_bytes"]),
                             "step_s": round(results[label]["step_s"], 1)})
                print(rows[-1], flush=True)
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    extrapolated = []
    measured_sizes = sorted({size for (_, _, size, _) in results})
    depth = RELEASED_FLITE.depth
    for precision in precisions:
        real = released_plan(precision, 1024)
        entry = {"base": precision}
        for size in measured_sizes:  # the per-block slope wherever depths 1 and 2 were measured
            if (1, precision, size, True) not in results or \
                    (2, precision, size, True) not in results:
                continue
            one = results[(1, precision, size, True)]["step_peak_bytes"]
            two = results[(2, precision, size, True)]["step_peak_bytes"]
            p1 = plans[(1, precision, size, True)]["total"]
            p2 = plans[(2, precision, size, True)]["total"]
            slope, plan_slope = two - one, p2 - p1
            entry.update({
                f"measured_slope_mib_per_block_{size}px": mb(slope),
                f"plan_slope_mib_per_block_{size}px": mb(plan_slope),
                f"plan_slope_vs_measured_{size}px": round(plan_slope / slope, 3),
                f"measured_extrapolated_gib_depth{depth}_{size}px":
                    round((one + (depth - 1) * slope) / GIB, 2),
                f"plan_gib_depth{depth}_{size}px": round(released_plan(
                    precision, size, settings["text_tokens"])["total"] / GIB, 2)})
        entry.update({"plan_gib_depth40_1024px": round(real["total"] / GIB, 2),
                      "plan_1024px_by_component_gib":
                      {k: round(v / GIB, 2) for k, v in real.items()}})
        extrapolated.append(entry)
    targets = {"bf16": 28, "fp8": 16, "nf4": 12}
    return {
        "table": rows,
        "tables": {"Released F-Lite (depth 40), batch 1, checkpointing, from the cache":
                   [{k: v for k, v in e.items() if k != "plan_1024px_by_component_gib"}
                    for e in extrapolated]},
        "components_1024px": {e["base"]: e["plan_1024px_by_component_gib"] for e in extrapolated},
        "model": f"hidden {hidden}, heads {heads}, text {text_dim}, depths {depths}",
        "all_points_within_10pct": all(r["within_10pct"] for r in rows),
        "max_load_vs_loaded": max(r["load_vs_loaded"] for r in rows),
        **{f"target_{p}_1024px_le_{gb}gb": released_plan(p, 1024)["total"] / 1e9 <= gb
           for p, gb in targets.items() if not quick},
        "elapsed_s": round(time.perf_counter() - started),
    }


def main(argv: list[str] | None = None) -> int:
    """Part of the grid, or only the loads, recorded as `python -m bench` records a block."""
    import argparse

    from bench.common import report_standalone

    def listed(kind):
        return lambda text: tuple(kind(v) for v in text.split(",") if v)

    parser = argparse.ArgumentParser(prog="python -m bench.bench_memory_plan",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small width (smoke run)")
    parser.add_argument("--load-only", action="store_true",
                        help="measure host RAM while loading only (no training step)")
    parser.add_argument("--depths", type=listed(int), help="e.g. 1,2")
    parser.add_argument("--sizes", type=listed(int), help="pixels, e.g. 64,128")
    parser.add_argument("--precisions", type=listed(str), help=f"of {','.join(PRECISIONS)}")
    parser.add_argument("--checkpointing", choices=("on", "off", "both"))
    parser.add_argument("--threads", type=int, help="torch threads (children inherit them)")
    parser.add_argument("--no-record", action="store_true", help="append nothing to RESULTS.md")
    args = parser.parse_args(argv)
    bad = [p for p in args.precisions or () if p not in PRECISIONS]
    if bad:
        parser.error(f"unknown precision(s) {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.load_only:
        results = run_loads(args.quick, args.depths or (1, 2), args.precisions or PRECISIONS)
        name = "memory_plan (load only)"
    else:
        ckpt = {"on": (True,), "off": (False,), "both": (False, True), None: None}
        results = run(args.quick, depths=args.depths, sizes=args.sizes,
                      precisions=args.precisions, checkpointing=ckpt[args.checkpointing])
        name = "memory_plan"
    report_standalone(name, "bench_memory_plan", args.quick, results, started, argv,
                      record=not args.no_record)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
