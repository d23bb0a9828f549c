"""Quantized training learns, not only runs: the `--example` LoRA on the tiny base with its base
stored as fp32 (the example's default), fp8 and nf4 (and bf16 under bf16 autocast unless
--quick), each scored with the concept check the demo tests use.

    python -m bench quantized_lora [--quick]
    python -m bench.bench_quantized_lora [--quick] [--bases fp8,nf4,bf16,fp32] [--threads N]
                                         [--no-record]

    python -m bench.bench_quantized_lora --time N [--bases ...] [--threads N]

(the second form runs only the named bases, in that order, and records its block the same way;
--threads sets torch's CPU threads, recorded in the block's machine line: on a shared, loaded
machine one thread a process avoids OpenMP workers waiting on each other at every small op;
the third form records nothing: it times N training steps and the sampling of 2 images per
base, after the same preparation, and prints seconds per step and per image, wall and CPU)

Each run is `ditctl train --lora` with the example's settings (1000 steps, rank 16) from the
precomputed cache, then `ditctl.demo.concept_check.concept_scores` on the held-out colour's
prompts ("green": the colour score must reach 0.7) and on the trained prompts (kept). fp8 and
nf4 compute in fp32 here (mixed_precision 'no': the reference CPU has no bf16 matrix units),
dequantizing their stored weights layer by layer; bf16 storage needs bf16 autocast.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import offline_environment, quiet_console, reset_accelerate

BASES = {"fp8": ("fp8", "no"), "nf4": ("nf4", "no"), "fp32 (auto, default)": ("auto", "no"),
         "bf16 (bf16 autocast)": ("bf16", "bf16")}  # quantized first: they are the question


def example_run(root: Path, base_precision: str, mixed_precision: str,
                steps: int | None = None, overrides: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Train the `--example` LoRA on this base (plus `overrides`: "section.key" -> value, e.g.
    another [lora] lora_type) and score the concept it teaches."""
    from ditctl.data.ingest import run_ingest
    from ditctl.demo.concept_check import (concept_scores, held_out_prompts, sample_settings,
                                           trained_prompts)
    from ditctl.engine.loading import load_denoiser
    from ditctl.models.registry import load_family
    from ditctl.precompute import run_precompute
    from ditctl.scaffold import TINY_MODEL_SETTINGS, init_workspace
    from ditctl.train import run_training

    ws = init_workspace(root, model="tiny", example=True).workspace
    settings = {"train.use_precomputed_data": True, "train.sample_every": 0,
                "train.eval_every": 0, "train.report_to": "none", "lora.use_lora": True,
                "lora.train_only_lora": True, "lora.base_precision": base_precision,
                "train.mixed_precision": mixed_precision}
    if steps:
        settings["train.max_steps"] = steps
    config = ws.config({**settings, **(overrides or {})})
    with quiet_console():
        run_ingest(ws, config, workers=1)
        run_precompute(ws, config)
        started = time.perf_counter()
        outcome = run_training(ws, config)
        train_s = time.perf_counter() - started
    reset_accelerate()
    family = load_family(ws.model_path(config))
    tuned = load_denoiser(family, outcome.result.checkpoint)  # on its base, as trained
    vae, text_encoder = family.load_vae(), family.load_text_encoder()
    sampling = TINY_MODEL_SETTINGS["sample"]  # what `init --model tiny` configures
    settings = sample_settings(steps=sampling["steps"], guidance_scale=sampling["guidance_scale"],
                               shift=sampling["shift"], seed=0)
    held = concept_scores(family, tuned, vae, text_encoder, held_out_prompts(), settings)
    kept = concept_scores(family, tuned, vae, text_encoder, trained_prompts(), settings)
    from ditctl.engine.lora import is_adapter_param

    adapter_params = sum(p.numel() for n, p in tuned.named_parameters() if is_adapter_param(n))
    return {"steps": outcome.result.steps, "adapter_params": adapter_params,
            "final_loss": round(outcome.result.final_loss, 4),
            "train_s": round(train_s), "held_out_colour": held["colour"],
            "held_out_colour_and_shape": held["both"], "trained_kept_both": kept["both"],
            "green_ge_0.7": held["colour"] >= 0.7}


def step_times(root: Path, bases: dict[str, tuple[str, str]], steps: int) -> list[dict]:
    """Seconds per training step (the difference of a 2-step run and a (2 + steps)-step run, so
    start-up and the final checkpoint cancel out) and per sampled image, wall and CPU, for each
    base, on one prepared workspace (a 1-step run first warms every one-time cost)."""
    from ditctl.data.ingest import run_ingest
    from ditctl.demo.concept_check import held_out_prompts, sample_settings
    from ditctl.engine.loading import load_denoiser
    from ditctl.models.registry import load_family
    from ditctl.precompute import run_precompute
    from ditctl.sampling import generate
    from ditctl.scaffold import TINY_MODEL_SETTINGS, init_workspace
    from ditctl.train import run_training

    ws = init_workspace(root, model="tiny", example=True).workspace

    def config(precision: str, mixed: str, max_steps: int, name: str = ""):
        return ws.config({"train.use_precomputed_data": True, "train.sample_every": 0,
                          "train.eval_every": 0, "train.report_to": "none",
                          "train.checkpoint_every": 10**6, "train.max_steps": max_steps,
                          "train.run_name": name or f"{precision}-{mixed}-{max_steps}",
                          "lora.use_lora": True, "lora.train_only_lora": True,
                          "lora.base_precision": precision, "train.mixed_precision": mixed})

    def timed(action):
        wall, cpu = time.perf_counter(), time.process_time()
        result = action()
        return result, time.perf_counter() - wall, time.process_time() - cpu

    with quiet_console():
        run_ingest(ws, config("auto", "no", 1), workers=1)
        run_precompute(ws, config("auto", "no", 1))
        run_training(ws, config("auto", "no", 1, "warm-up"))
    reset_accelerate()
    family = load_family(ws.model_path(config("auto", "no", 1)))
    vae, text_encoder = family.load_vae(), family.load_text_encoder()
    sampling = TINY_MODEL_SETTINGS["sample"]
    settings = sample_settings(steps=sampling["steps"], guidance_scale=sampling["guidance_scale"],
                               shift=sampling["shift"], seed=0)
    captions = [p.caption for p in held_out_prompts()[:2]]
    rows = []
    for label, (precision, mixed) in bases.items():
        runs = {}
        for n in (2, 2 + steps):
            with quiet_console():
                runs[n] = timed(lambda: run_training(ws, config(precision, mixed, n)))
            reset_accelerate()
        tuned = load_denoiser(family, runs[2 + steps][0].result.checkpoint)
        _, sample_wall, sample_cpu = timed(lambda: generate(
            family, tuned, vae, captions, settings, width=64, height=64,
            text_encoder=text_encoder, show_progress=False))
        rows.append({"base": label,
                     "train_s_per_step": round((runs[2 + steps][1] - runs[2][1]) / steps, 3),
                     "train_cpu_s_per_step": round((runs[2 + steps][2] - runs[2][2]) / steps, 3),
                     "sample_s_per_image": round(sample_wall / len(captions), 2),
                     "sample_cpu_s_per_image": round(sample_cpu / len(captions), 2),
                     "final_loss": round(runs[2 + steps][0].result.final_loss, 4)})
        print(rows[-1], flush=True)
    return rows


SHORT_NAMES = {"fp8": "fp8", "nf4": "nf4", "fp32": "fp32 (auto, default)",
               "bf16": "bf16 (bf16 autocast)"}


def run(quick: bool, bases: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every base of BASES (quick: all but bf16), or only `bases` (short names), in order."""
    offline_environment()
    rows = []
    if bases:
        bases = {SHORT_NAMES[b]: BASES[SHORT_NAMES[b]] for b in bases}
    else:
        bases = {k: v for k, v in BASES.items() if not (quick and v[1] == "bf16")}
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        for i, (label, (precision, mixed)) in enumerate(bases.items()):
            result = example_run(Path(tmp) / f"ws{i}", precision, mixed, 20 if quick else None)
            rows.append({"base": label, **result})
            print(rows[-1], flush=True)
    return {"table": rows,
            "all_reach_green_0.7": all(r["green_ge_0.7"] for r in rows) if not quick else None}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench.common import report_standalone

    parser = argparse.ArgumentParser(prog="python -m bench.bench_quantized_lora",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 steps a base (smoke run)")
    parser.add_argument("--bases", type=lambda text: tuple(b for b in text.split(",") if b),
                        help=f"of {','.join(SHORT_NAMES)} (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-record", action="store_true", help="append nothing to RESULTS.md")
    parser.add_argument("--time", type=int, default=0, metavar="N",
                        help="only time N training steps and 2 sampled images per base "
                             "(default bases: fp32,fp8,nf4); records nothing")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    bad = [b for b in args.bases or () if b not in SHORT_NAMES]
    if bad:
        parser.error(f"unknown base(s) {', '.join(bad)}; choose from {', '.join(SHORT_NAMES)}")
    if args.time:
        offline_environment()
        names = args.bases or ("fp32", "fp8", "nf4")
        with tempfile.TemporaryDirectory(prefix="bench-qlora-time-") as tmp:
            step_times(Path(tmp), {SHORT_NAMES[b]: BASES[SHORT_NAMES[b]] for b in names},
                       args.time)
        return 0
    started = time.perf_counter()
    results = run(args.quick, args.bases)
    report_standalone("quantized_lora", "bench_quantized_lora", args.quick, results, started, argv,
                      record=not args.no_record)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
