"""Ingest throughput: first ingest and no-change re-ingest vs. a bare decode + sha256 loop.

    /work/venv/bin/python bench/bench_ingest.py [--quick]

Generates N random-content 512x512 JPEGs (1000; --quick: 100): smooth random colour fields plus
grain, so they compress like photos (~60 KB each) rather than like pure noise. Then measures,
side by side on this machine:
  bare       read + sha256 + full decode of every file, over as many processes as ingest uses
             (pool started before the clock: the floor for the work itself)
  first      `run_ingest` on a fresh workspace (includes starting its worker processes,
             reading the folder, bucket planning and writing the manifest)
  reingest   `run_ingest` again with nothing changed (stat only, no decode)
Targets: first >= 400 images/s on 2 cores; reingest <= 5% of first.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditctl.config import build_config  # noqa: E402
from ditctl.console import console  # noqa: E402
from ditctl.data.ingest import available_cpus, run_ingest  # noqa: E402
from ditctl.workspace import Workspace  # noqa: E402

SIZE = 512


def make_images(folder: Path, count: int, seed: int = 0) -> int:
    """`count` JPEGs in `folder`; returns their total size in bytes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for index in range(count):
        field = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(field).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
        grain = rng.normal(0, 6, (SIZE, SIZE, 3))
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        path = folder / f"random_image_{index:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        total += path.stat().st_size
    return total


def _bare_chunk(paths: list[str]) -> int:
    for path in paths:
        with open(path, "rb") as fh:
            data = fh.read()
        hashlib.sha256(data).hexdigest()
        Image.open(io.BytesIO(data)).load()
    return len(paths)


def _noop() -> None:
    return None


def bare_loop(paths: list[str], workers: int) -> float:
    """Seconds for read + sha256 + decode of all files over `workers` warm processes."""
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(_noop) for _ in range(workers * 2)]:
            future.result()  # workers started and importing done before the clock
        size = max(1, min(32, len(paths) // (workers * 4)))
        started = time.perf_counter()
        chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
        done = sum(pool.map(_bare_chunk, chunks))
        elapsed = time.perf_counter() - started
    assert done == len(paths)
    return elapsed


def run(quick: bool) -> dict:
    count = 100 if quick else 1000
    workers = available_cpus()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        total_bytes = make_images(root / "images", count)
        (root / "project.toml").write_text(
            '[data]\ntrain_data_path = "images"\nresolution = 512\nuse_resolution_buckets = true\n')
        ws = Workspace(root)
        config = build_config({"data": {"train_data_path": "images", "resolution": 512,
                                        "use_resolution_buckets": True}})
        paths = sorted(str(p) for p in (root / "images").iterdir())

        bare_s = bare_loop(paths, workers)
        console.quiet = True  # progress lines would only add noise to the timing
        try:
            started = time.perf_counter()
            first = run_ingest(ws, config)
            first_s = time.perf_counter() - started
            started = time.perf_counter()
            again = run_ingest(ws, config)
            again_s = time.perf_counter() - started
        finally:
            console.quiet = False
        assert first.counts["train"] == count and first.files_read == count
        assert again.files_read == 0 and again.changes.unchanged == count

    return {
        "images": count, "workers": workers, "mean_kb": round(total_bytes / count / 1024, 1),
        "bare_s": round(bare_s, 3), "bare_images_per_s": round(count / bare_s, 1),
        "first_s": round(first_s, 3), "first_images_per_s": round(count / first_s, 1),
        "reingest_s": round(again_s, 3), "reingest_images_per_s": round(count / again_s, 1),
        "first_vs_bare": round(bare_s / first_s, 3),
        "reingest_vs_first": round(again_s / first_s, 4),
        "target_first_400_per_s": count / first_s >= 400,
        "target_reingest_le_5pct": again_s / first_s <= 0.05,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
