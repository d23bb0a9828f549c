"""Precompute throughput vs. a bare VAE-encode loop, and cache size vs. the source images.

    python bench/bench_precompute.py [--quick]

A tiny F-Lite-layout pipeline with a wider VAE (so that encoding dominates, as it does with a
real model) and generated 128x128 images. For each storage precision:

- bare loop: the images already decoded into tensors, `family.encode_images` over them in
  chunks of the size precompute's encoder sees, nothing else (the floor);
- precompute: `run_precompute` into a fresh cache folder: decoding in DataLoader workers,
  encoding, safetensors files, index commits. Its rate is measured over the encoding loop
  (what the progress bar shows); the whole run, model loading included, is reported too.

fp32 ("no", the exact mode) encodes one image per forward pass, so its fair floor is the bare
loop at chunk 1; the batch-8 bare loop is reported beside it to show what exactness costs.
bf16 encodes whole batches of `batch_size`. Target: precompute >= 85% of its floor.
Compare ratios from one run only (the machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from ditctl.console import console, quiet_libraries  # noqa: E402

quiet_libraries()

from ditctl.data.batches import crop_for, load_row_pixels  # noqa: E402
from ditctl.data.ingest import run_ingest  # noqa: E402
from ditctl.data.manifest import read_manifest  # noqa: E402
from ditctl.demo.scenes import random_scenes, write_dataset  # noqa: E402
from ditctl.models.registry import load_family  # noqa: E402
from ditctl.models.tiny import build_tiny_pipeline  # noqa: E402
from ditctl.precompute import run_precompute  # noqa: E402
from ditctl.workspace import Workspace  # noqa: E402

VAE_CHANNELS = (32, 64, 64, 64)
SIZE = 128
BATCH_SIZE = 8
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16}


def _workspace(root: Path, n: int) -> Workspace:
    model = build_tiny_pipeline(root / "model", seed=0, vae_channels=VAE_CHANNELS)
    write_dataset(root / "data", random_scenes(n, 0, sizes=((SIZE, SIZE),)), csv_name="train.csv")
    (root / "project.toml").write_text(
        f'[model]\npretrained_model_path = "{model}"\n'
        f'[data]\ntrain_data_path = "data/train.csv"\nresolution = {SIZE}\n'
        f'[precompute]\nbatch_size = {BATCH_SIZE}\nnum_workers = 2\n')
    (root / "prompts.txt").write_text("")
    ws = Workspace(root)
    run_ingest(ws, ws.config())
    return ws


def _bare_rate(family, vae, images: torch.Tensor, chunk: int) -> float:
    """Images/s of encode_images alone over pre-decoded images."""
    started = time.perf_counter()
    for start in range(0, len(images), chunk):
        family.encode_images(vae, images[start:start + chunk])
    return len(images) / (time.perf_counter() - started)


def run(quick: bool) -> dict:
    n = 32 if quick else 200
    repeats = 2 if quick else 3
    console.quiet = True
    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as tmp:
        ws = _workspace(Path(tmp), n)
        rows = read_manifest(ws, "train")
        family = load_family(ws.model_path(ws.config()))
        data = ws.config().data
        images = torch.stack([load_row_pixels(r, crop_for(r, data.center_crop), False,
                                              data.max_image_pixels) for r in rows])
        results: dict = {"images": n, "size": f"{SIZE}x{SIZE}", "batch_size": BATCH_SIZE,
                         "vae_channels": list(VAE_CHANNELS), "repeats": repeats,
                         "torch_threads": torch.get_num_threads(), "machine": platform.node(),
                         "cpu": platform.processor() or platform.machine(), "modes": {}}
        for precision, dtype in DTYPES.items():
            vae = family.load_vae(dtype)
            chunks = (1, BATCH_SIZE) if precision == "no" else (BATCH_SIZE,)
            _bare_rate(family, vae, images[:BATCH_SIZE], BATCH_SIZE)  # warm-up
            bare: dict[int, list[float]] = {c: [] for c in chunks}
            pre, wall = [], []
            summary = None
            for rep in range(repeats):  # interleaved, so that load changes hit both alike
                for chunk in chunks:
                    bare[chunk].append(_bare_rate(family, vae, images, chunk))
                config = ws.config({"precompute.mixed_precision": precision,
                                    "precompute.output_dir": f"cache-{precision}-{rep}"})
                started = time.perf_counter()
                summary = run_precompute(ws, config)
                wall.append(n / (time.perf_counter() - started))
                pre.append(summary.images_per_s)
            floor_chunk = 1 if precision == "no" else BATCH_SIZE
            floor = statistics.median(bare[floor_chunk])
            mode = {
                "encoder_chunk": floor_chunk,
                "bare_images_per_s": {str(c): round(statistics.median(v), 1)
                                      for c, v in bare.items()},
                "precompute_images_per_s": round(statistics.median(pre), 1),
                "precompute_wall_images_per_s": round(statistics.median(wall), 1),
                "ratio_vs_floor": round(statistics.median(pre) / floor, 3),
                "latent_bytes_per_image": round(summary.latent_bytes_per_image),
                "source_bytes_per_image": round(summary.source_bytes_per_image),
                "latent_vs_source": round(summary.latent_bytes / summary.source_bytes, 2),
                "text_bytes": summary.text_bytes,
            }
            if precision == "no":
                mode["ratio_vs_bare_batch"] = round(
                    statistics.median(pre) / statistics.median(bare[BATCH_SIZE]), 3)
            results["modes"][precision] = mode
            del vae
    console.quiet = False
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 images instead of 200")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    sys.exit(main())
