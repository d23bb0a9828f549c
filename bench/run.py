"""The one entry point of the benchmarks.

    python -m bench [NAMES...] [--quick] [--threads N] [--results PATH | --no-record] [--json PATH]

Runs the named benchmarks (default: all, in the order below), prints each one's table, and
appends a dated, machine-stamped block per benchmark to bench/RESULTS.md. `--quick` runs
CI-sized smoke versions: they prove the benchmarks still work; their timings mean little.
Every benchmark starts with the same torch thread count (`--threads`, default torch's own),
which its child processes inherit; on a shared machine one thread per benchmark avoids
OpenMP oversubscription and gives far steadier timings.
A benchmark that fails (or does not exist yet) is reported and the others still run; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from bench.common import RESULTS_FILE, append_results, machine_stamp, offline_environment, \
    results_block

BENCHMARKS = {
    "startup": ("bench.bench_startup", "start-up of status, --help, ingest with nothing to do"),
    "ingest": ("bench.bench_ingest", "ingest images/s vs a bare decode + sha256 loop"),
    "precompute": ("bench.bench_precompute", "precompute images/s vs a bare VAE loop"),
    "sampling": ("bench.bench_sampling", "sampling s/image vs a bare DiT loop"),
    "training": ("bench.bench_training", "engine step vs a plain PyTorch loop; MFU"),
    "memory": ("bench.bench_memory", "peak memory: LoRA, 8-bit AdamW, checkpointing, cache"),
    "scaling": ("bench.bench_scaling", "step time and memory vs resolution and LoRA rank"),
}
# Run only when named (each takes an hour or more on a 2-core CPU; not part of `--quick`)
ON_REQUEST = {
    "memory_plan": ("bench.bench_memory_plan", "the --dry-run memory plan vs measured peaks, "
                    "full width, every base precision"),
    "fsdp_memory": ("bench.bench_fsdp_memory", "per-process memory ddp vs fsdp at 1 and 2 "
                    "processes (~95 M DiT), and the plan's GPUs for a 10B full fine-tune"),
    "speed": ("bench.bench_speed", "the guide's one-shot run on the fly vs with the cache used "
              "by itself (and --compile); --compile vs eager on the 94.6 M config"),
    "quantized_lora": ("bench.bench_quantized_lora", "the --example LoRA's concept score on "
                       "fp8, nf4, fp32 and bf16 bases"),
    "lora_variants": ("bench.bench_lora_variants", "the --example LoRA's concept score trained "
                      "as DoRA, LoKr and LoHa"),
    "cache_scale": ("bench.bench_cache_scale", "a 200,000-entry precompute cache: files on "
                    "disk, `precompute --verify`, training start-up to the first step"),
    "loader": ("bench.bench_loader", "data-wait share of the training step with 0 vs 2 "
               "data-loading workers, on the fly (512 px JPEGs) and cached"),
    "cpu_precision": ("bench.bench_cpu_precision", "fp32 vs bf16 autocast on a CPU, step time "
                      "by operation (matmul, attention, casts, optimiser, other)"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[1])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)}; "
                        f"on request: {', '.join(ON_REQUEST)})")
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke runs")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE,
                        help=f"markdown file to append to (default: {RESULTS_FILE})")
    parser.add_argument("--no-record", action="store_true", help="append nothing anywhere")
    parser.add_argument("--json", type=Path, help="also write every result as JSON here")
    parser.add_argument("--threads", type=int, help="torch threads for every benchmark "
                        "(default: torch's default, usually one per core)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS and n not in ON_REQUEST]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from "
                     f"{', '.join([*BENCHMARKS, *ON_REQUEST])}")
    return args


def run_one(name: str, quick: bool) -> dict:
    """{"status": "ok", "results": ..., "elapsed_s": ...} or a failed/missing status."""
    module_name = {**BENCHMARKS, **ON_REQUEST}[name][0]
    started = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return {"status": "missing", "error": f"{module_name} does not exist yet"}
        raise
    if not callable(getattr(module, "run", None)):
        return {"status": "missing", "error": f"{module_name} has no run(quick) function yet"}
    try:
        results = module.run(quick)
    except Exception:  # one broken benchmark must not hide the others' numbers
        return {"status": "failed", "error": traceback.format_exc(),
                "elapsed_s": round(time.perf_counter() - started, 1)}
    return {"status": "ok", "results": results,
            "elapsed_s": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, (module, what) in {**BENCHMARKS, **ON_REQUEST}.items():
            print(f"{name:<14} {what}  ({module})")
        return 0
    offline_environment()
    import torch

    threads = args.threads or torch.get_num_threads()
    names = args.names or list(BENCHMARKS)
    report = {"quick": args.quick, "stamp": machine_stamp(), "benchmarks": {}}
    for name in names:
        what = {**BENCHMARKS, **ON_REQUEST}[name][1]
        print(f"== {name}: {what}{' (quick)' if args.quick else ''}",
              file=sys.stderr, flush=True)
        torch.set_num_threads(threads)  # a benchmark may change it; the next starts afresh
        outcome = run_one(name, args.quick)
        report["benchmarks"][name] = outcome
        if outcome["status"] != "ok":
            print(f"{name}: {outcome['status']}: {outcome['error']}", file=sys.stderr, flush=True)
            continue
        block = results_block(name, args.quick, machine_stamp(), outcome["results"],
                              outcome["elapsed_s"])
        print(block, flush=True)
        if not args.no_record:
            append_results(args.results, block)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [n for n, o in report["benchmarks"].items() if o["status"] != "ok"]
    if failed:
        print(f"not completed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
