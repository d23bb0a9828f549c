"""Quantized training learns, not only runs: the `--example` LoRA on the tiny base with its base
stored as fp32 (the example's default), fp8 and nf4 (and bf16 under bf16 autocast unless
--quick), each scored with the concept check the demo tests use.

    python -m bench quantized_lora [--quick]

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
                steps: int | None = None) -> dict[str, Any]:
    from ditctl.data.ingest import run_ingest
    from ditctl.demo.concept_check import (concept_scores, held_out_prompts, sample_settings,
                                           trained_prompts)
    from ditctl.engine.loading import load_denoiser
    from ditctl.models.registry import load_family
    from ditctl.precompute import run_precompute
    from ditctl.scaffold import TINY_MODEL_SETTINGS, init_workspace
    from ditctl.train import run_training

    ws = init_workspace(root, model="tiny", example=True).workspace
    overrides = {"train.use_precomputed_data": True, "train.sample_every": 0,
                 "train.eval_every": 0, "train.report_to": "none", "lora.use_lora": True,
                 "lora.train_only_lora": True, "lora.base_precision": base_precision,
                 "train.mixed_precision": mixed_precision}
    if steps:
        overrides["train.max_steps"] = steps
    config = ws.config(overrides)
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
    return {"steps": outcome.result.steps, "final_loss": round(outcome.result.final_loss, 4),
            "train_s": round(train_s), "held_out_colour": held["colour"],
            "held_out_colour_and_shape": held["both"], "trained_kept_both": kept["both"],
            "green_ge_0.7": held["colour"] >= 0.7}


def run(quick: bool) -> dict[str, Any]:
    offline_environment()
    rows = []
    bases = {k: v for k, v in BASES.items() if not (quick and v[1] == "bf16")}
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        for i, (label, (precision, mixed)) in enumerate(bases.items()):
            result = example_run(Path(tmp) / f"ws{i}", precision, mixed, 20 if quick else None)
            rows.append({"base": label, **result})
            print(rows[-1], flush=True)
    return {"table": rows,
            "all_reach_green_0.7": all(r["green_ge_0.7"] for r in rows) if not quick else None}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
