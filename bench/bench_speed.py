"""Where training time goes away: the cache used by itself, and compiled blocks.

    python -m bench speed [--quick]

1. The F-Lite guide's one-shot shape of run: an F-Lite-layout model (MID_FLITE, 23.7 M
   parameters), 32 images at 256x256, batch 2, 10 epochs, bf16 autocast, nothing precomputed.
   Run three ways on the same workspace data, one after the other:
     on_the_fly   --no-use-precomputed-data: every step encodes its images and captions
     auto_cache   the default: the run repeats its images, so ditctl fills the cache once
                  (fill_s, reported apart) and then trains from it
     auto_compile the same plus --compile (compile_step_s reported apart)
   steady_step_s is the median `time/step_s` after the warm-up steps; ratio_vs_on_the_fly
   divides it by on_the_fly's (the #18 target: <= 0.8).
   plain_encoding is the plain-PyTorch floor of a trainer that encodes every step, as the
   reference trainer does: bench.bench_training's plain loop (the same DiT, noise, MSE,
   backward, clip, AdamW, bf16 autocast) plus the VAE and text encoder run on each batch
   (images decoded once beforehand, so this floor is below any real encode-every-step loop).
   It runs before the first and after the last ditctl run (their spread shows how much the
   load moved); ratio_vs_plain_encoding divides each steady step by the mean of the two
   (the #18 target for auto_cache: <= 1). Not interleaved with the ditctl runs: steps run
   inside the engine's log call would give its background data preparation free time.
2. --compile on the 94.6 M config (SMALL_FLITE) from the cache, fp32: eager vs compiled
   steady-state step and the compiling step's time.
Runs are sequential (each is a whole `ditctl train`), so on a shared machine compare ratios
from one invocation only.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_training import PlainLoop
from bench.common import (MID_FLITE, SMALL_FLITE, SMALL_T5, SMALL_VAE, TINY_FLITE, TINY_T5,
                          TINY_VAE, T5Shape, build_bench_pipeline, make_bench_workspace,
                          offline_environment, quiet_console, read_train_log, reset_accelerate)

# the one-shot model's T5 has the DiT's text width (384), at the same T5/DiT size proportion
ONESHOT_T5 = T5Shape(384, 720, heads=6)

FULL = dict(oneshot_shape=MID_FLITE, t5=ONESHOT_T5, vae=SMALL_VAE, images=32, size=256, batch=2,
            epochs=10, warmup=3, floor_steps=30, compile_shape=SMALL_FLITE, compile_t5=SMALL_T5,
            compile_steps=12)
QUICK = dict(oneshot_shape=TINY_FLITE, t5=TINY_T5, vae=TINY_VAE, images=4, size=64, batch=2,
             epochs=3, warmup=1, floor_steps=4, compile_shape=TINY_FLITE, compile_t5=TINY_T5,
             compile_steps=4)


class EncodingPlainLoop(PlainLoop):
    """The plain loop fed as a trainer without a cache feeds itself: each step runs the VAE on
    its batch's pixels and the text encoder on its captions (fp32, as ditctl's on-the-fly
    source), then the same DiT step. Pixels are decoded once, up front."""

    def load_batches(self, ws, config, batch: int) -> None:
        from ditctl.data.manifest import read_manifest
        from ditctl.data.transforms import load_training_image

        self.vae = self.family.load_vae()
        self.text_encoder = self.family.load_text_encoder()
        rows = read_manifest(ws, "train")
        self.inputs = []
        for start in range(0, len(rows) - batch + 1, batch):
            chunk = rows[start:start + batch]
            pixels = torch.stack([load_training_image(r.ref, r.bucket_w, r.bucket_h)
                                  for r in chunk])
            self.inputs.append((pixels, [r.caption for r in chunk]))

    def step(self) -> float:
        started = time.perf_counter()
        pixels, captions = self.inputs[len(self.times) % len(self.inputs)]
        with torch.no_grad():
            dist = self.family.encode_images(self.vae, pixels)
            text = self.family.encode_prompts(self.text_encoder, captions).sequence
        self.train_step(dist.mean, dist.std, text)
        elapsed = time.perf_counter() - started
        self.times.append(elapsed)
        return elapsed


def timed_run(ws, overrides: dict[str, Any], name: str, warmup: int) -> dict[str, Any]:
    """One `ditctl train` with `overrides`; steady-state and first-step timings."""
    from ditctl.train import run_training

    reset_accelerate()
    config = ws.config({**overrides, "train.run_name": name})
    started = time.perf_counter()
    with quiet_console():
        run_training(ws, config)
    wall = time.perf_counter() - started
    log = read_train_log(ws.runs_dir(config) / name)
    steady = [e["time/step_s"] for e in log[warmup:] if "time/step_s" in e]
    data = [e["time/data_s"] for e in log[warmup:]]
    first = log[0].get("time/compile_step_s", log[0].get("time/step_s"))
    train_s = sum(e.get("time/step_s", e.get("time/compile_step_s", 0.0)) for e in log)
    return {"run": name, "steps": len(log), "steady_step_s": round(statistics.median(steady), 4),
            "data_wait_pct": round(100 * statistics.median(d / s for d, s in zip(data, steady)),
                                   1),
            "first_step_s": round(first, 2), "wall_s": round(wall, 1),
            "outside_steps_s": round(wall - train_s, 1)}


def oneshot(settings: dict, tmp: Path) -> dict[str, Any]:
    model = build_bench_pipeline(tmp / "model-oneshot", settings["oneshot_shape"],
                                 settings["t5"], settings["vae"])
    common = {"train.train_batch_size": settings["batch"], "train.num_epochs": settings["epochs"],
              "train.mixed_precision": "bf16", "train.checkpoint_every": 10**6,
              "data.random_flip": False}
    def floor_run(ws, label: str) -> dict[str, Any]:
        floor = EncodingPlainLoop(ws, ws.config(common), settings["batch"])
        for _ in range(settings["warmup"] + settings["floor_steps"]):
            floor.step()
        row = {"run": label, "steps": len(floor.times),
               "steady_step_s": round(statistics.median(floor.times[settings["warmup"]:]), 4)}
        print(row, flush=True)
        return row

    rows = []
    for name, extra in (("on_the_fly", {"train.use_precomputed_data": False}),
                        ("auto_cache", {}),
                        ("auto_compile", {"train.compile": True})):
        ws = make_bench_workspace(tmp / f"ws-{name}", model, images=settings["images"],
                                  size=settings["size"])
        if name == "on_the_fly":  # the floor runs before the first and after the last run
            from ditctl.data.ingest import run_ingest

            with quiet_console():
                run_ingest(ws, ws.config())
            floor_ws = ws
            floor_rows = [floor_run(ws, "plain_encoding (before)")]
        row = timed_run(ws, {**common, **extra}, name, settings["warmup"])
        rows.append(row)
        print(row, flush=True)
    floor_rows.append(floor_run(floor_ws, "plain_encoding (after)"))
    floor_s = statistics.mean(r["steady_step_s"] for r in floor_rows)
    rows += floor_rows
    for row in rows:
        row["ratio_vs_on_the_fly"] = round(row["steady_step_s"] / rows[0]["steady_step_s"], 3)
        row["ratio_vs_plain_encoding"] = round(row["steady_step_s"] / floor_s, 3)
    # the cache fill happens before the first step: it is the wall time not spent in steps,
    # beyond what the on-the-fly run spends there (model loading and set-up)
    rows[1]["fill_s"] = round(rows[1]["outside_steps_s"] - rows[0]["outside_steps_s"], 1)
    return {"table": rows, "model": settings["oneshot_shape"].label(),
            "images": settings["images"], "size": settings["size"],
            "batch": settings["batch"], "epochs": settings["epochs"],
            "target_auto_le_0.8": rows[1]["ratio_vs_on_the_fly"] <= 0.8,
            "target_auto_le_plain_encoding": rows[1]["ratio_vs_plain_encoding"] <= 1.0}


def compile_speed(settings: dict, tmp: Path) -> dict[str, Any]:
    from ditctl.precompute import run_precompute

    model = build_bench_pipeline(tmp / "model-compile", settings["compile_shape"],
                                 settings["compile_t5"], settings["vae"])
    ws = make_bench_workspace(tmp / "ws-compile", model, images=8, size=256)
    with quiet_console():
        run_precompute(ws, ws.config())
    common = {"train.max_steps": settings["compile_steps"], "train.train_batch_size": 1,
              "train.checkpoint_every": 10**6}
    rows = [timed_run(ws, {**common, "train.compile": compiled}, f"compile-{compiled}",
                      settings["warmup"]) for compiled in (False, True)]
    return {"table": rows, "model": settings["compile_shape"].label(),
            "compiled_vs_eager": round(rows[1]["steady_step_s"] / rows[0]["steady_step_s"], 3)}


def run(quick: bool) -> dict[str, Any]:
    offline_environment()
    settings = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        first = oneshot(settings, Path(tmp))
        second = compile_speed(settings, Path(tmp))
    return {"tables": {f"one-shot guide run ({first.pop('model')})": first.pop("table"),
                       f"--compile from the cache, fp32 ({second.pop('model')})":
                           second.pop("table")},
            "oneshot": first, "compile": second}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
