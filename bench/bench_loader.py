"""Data-loading workers: how much of a training step waits for its data, 0 vs 2 workers.

    python -m bench loader [--quick] --threads 1

A workspace of 512x512 JPEG images (drawn scenes with photo-like noise, so that decoding costs
what a photo's does) trained at 256x256 (decode, Lanczos resize, crop) with an F-Lite-layout
model (MID_FLITE, 23.7 M parameters, fully fine-tuned; the speed bench's T5 of its text width
and SMALL_VAE, encoding on the fly in the training process), batch 4, fp32. Each configuration
is one `ditctl train` with `[data] num_workers` 0 (images read in the training process's
prefetch thread) and 2 (worker processes):

  on_the_fly   --no-use-precomputed-data: workers decode and transform, the VAE and T5 encode
  cached       from a filled precompute cache: workers read the entries

Per run: the median `time/step_s` and `time/data_s` (the loop's wait for the micro-batch,
after warm-up) and their ratio, data_wait_pct = 100 x sum(data_s) / sum(step_s) over the
steady steps (target: <= 5 % with 2 workers on the fly). decode_ms_per_step is the bare cost of
reading a step's images in one process (the transform only, no encoder): the work the workers
take off the training process, here cheaper than a step. The machine stamp holds the load.
"""

from __future__ import annotations

import csv
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_speed import ONESHOT_T5
from bench.common import (MID_FLITE, SMALL_VAE, TINY_FLITE, TINY_T5, TINY_VAE,
                          build_bench_pipeline, make_bench_workspace, offline_environment,
                          quiet_console, read_train_log, reset_accelerate)

FULL = dict(shape=MID_FLITE, t5=ONESHOT_T5, vae=SMALL_VAE, images=32, image_size=512,
            resolution=256, batch=4, steps=14, warmup=4)
QUICK = dict(shape=TINY_FLITE, t5=TINY_T5, vae=TINY_VAE, images=8, image_size=128,
             resolution=64, batch=2, steps=4, warmup=1)
WORKERS = (0, 2)


def write_jpeg_dataset(folder: Path, images: int, size: int, seed: int = 0) -> None:
    """`images` scenes of size x size as JPEG (quality 92) with noise, and data/train.csv."""
    import numpy as np
    from PIL import Image

    from ditctl.demo.scenes import random_scenes, render
    from ditctl.fsutil import atomic_write_bytes, atomic_write_text

    rng = np.random.default_rng(seed)
    rows = []
    for index, scene in enumerate(random_scenes(images, seed, sizes=((size, size),))):
        pixels = np.asarray(render(scene), dtype=np.int16)
        pixels = pixels + rng.normal(0, 12, pixels.shape).astype(np.int16)  # photo-like detail
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG",
                                                                  quality=92)
        relative = f"images/{index:05d}.jpg"
        atomic_write_bytes(folder / relative, buffer.getvalue())
        rows.append((relative, scene.caption))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerows([("image_path", "caption"), *rows])
    atomic_write_text(folder / "train.csv", text.getvalue())


def jpeg_workspace(root: Path, model: Path, settings: dict):
    ws = make_bench_workspace(root, model, images=0, size=settings["resolution"])
    write_jpeg_dataset(root / "data", settings["images"], settings["image_size"])
    return ws


def decode_ms_per_step(ws, batch: int) -> float:
    """The median time to read one image on the fly (file check, decode, resize, crop), in one
    process without encoders, times the batch."""
    from ditctl.data.batches import PixelReader
    from ditctl.train import ensure_manifest

    config = ws.config()
    with quiet_console():
        rows = ensure_manifest(ws, config)
    reader = PixelReader((True,), config.data.max_image_pixels, 8)
    times = []
    for row in rows:
        started = time.perf_counter()
        reader.read_image(row, False, False)
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times) * batch, 1)


def timed_run(ws, overrides: dict[str, Any], name: str, warmup: int) -> dict[str, Any]:
    from ditctl.train import run_training

    reset_accelerate()
    config = ws.config({**overrides, "train.run_name": name})
    with quiet_console():
        run_training(ws, config)
    log = read_train_log(ws.runs_dir(config) / name)[warmup:]
    step = [e["time/step_s"] for e in log]
    data = [e["time/data_s"] for e in log]
    return {"steps_timed": len(log), "median_step_s": round(statistics.median(step), 3),
            "median_data_s": round(statistics.median(data), 4),
            "data_wait_pct": round(100 * sum(data) / sum(step), 3)}


def run(quick: bool) -> dict[str, Any]:
    offline_environment()
    from ditctl.precompute import run_precompute

    settings = QUICK if quick else FULL
    common = {"train.train_batch_size": settings["batch"], "train.max_steps": settings["steps"],
              "train.checkpoint_every": 10**6, "data.random_flip": False}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        model = build_bench_pipeline(Path(tmp) / "model", settings["shape"], settings["t5"],
                                     settings["vae"])
        fly = jpeg_workspace(Path(tmp) / "fly", model, settings)
        decode_ms = decode_ms_per_step(fly, settings["batch"])
        cached = jpeg_workspace(Path(tmp) / "cached", model, settings)
        with quiet_console():
            run_precompute(cached, cached.config())
        for source, ws, extra in (("on_the_fly", fly, {"train.use_precomputed_data": False}),
                                  ("cached", cached, {"train.use_precomputed_data": True})):
            for workers in WORKERS:
                row = {"source": source, "num_workers": workers,
                       **timed_run(ws, {**common, **extra, "data.num_workers": workers},
                                   f"{source}-{workers}", settings["warmup"])}
                rows.append(row)
                print(row, flush=True)
    on_the_fly_2 = next(r for r in rows if r["source"] == "on_the_fly" and r["num_workers"] == 2)
    return {"table": rows, "model": settings["shape"].label(), "images": settings["images"],
            "image_size": f"{settings['image_size']} px JPEG -> {settings['resolution']} px",
            "batch": settings["batch"], "decode_ms_per_step": decode_ms,
            "target_on_the_fly_2_workers_le_5pct": on_the_fly_2["data_wait_pct"] <= 5.0}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
