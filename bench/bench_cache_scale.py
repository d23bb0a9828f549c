"""The precompute cache at 200,000 entries: files on disk, `precompute --verify`, training start-up.

    python -m bench cache_scale [--quick] --threads 1

A workspace of 100,000 distinct 32x32 noise images (random_flip: 200,000 latent entries) and
1,000 distinct captions, on the bench's tiny F-Lite-layout pipeline (TINY_* shapes). The
latent entries are synthetic (posterior-shaped random tensors, each with its own content
hash) written through the cache's own writer (`ShardWriter`, what precompute uses), keyed
exactly as training asks for them: encoding 200,000 images with a VAE would measure the VAE,
not the cache. The captions are encoded by `run_precompute` itself, which then finds the
cache complete. Measured, each command in a fresh process as a user runs it:

  files           every file under the cache folder (shards, index and its WAL) vs. entries
  verify          `ditctl precompute --verify`: re-reads and re-hashes every entry (in the
                  default 2 worker processes); its peak RSS (the main process's VmHWM:
                  the plan, the checks' results and the imports)
  first step      `ditctl train --use-precomputed-data --max-steps 1`: from the process start
                  to its first line in train_log.jsonl (manifest, plan, cache check, model
                  load, the first batch read from the shards, one step); the whole process too

Targets (issue 20): files <= 1% of entries; verify and first step each under 60 s. The
machine is shared: the load average before and after is recorded with the numbers.
--quick: 1,000 images (2,000 latent entries), to prove the benchmark works.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGES, QUICK_IMAGES = 100_000, 1_000
CAPTIONS = 1_000
SIZE = 32
FIRST_STEP_LIMIT_S = 900  # only a hung run stops here; the time is what is measured


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _ditctl() -> list[str]:
    script = Path(sys.executable).with_name("ditctl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ditctl"]


def write_noise_dataset(folder: Path, images: int, captions: int, seed: int = 0) -> None:
    """`images` distinct SIZE x SIZE noise PNGs (distinct content: no two share a latent
    entry) and a CSV giving them `captions` distinct captions in turn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("image_path", "caption"))
    for i in range(images):
        name = f"images/{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / name)
        writer.writerow((name, f"noise picture number {i % captions}"))
    (folder / "train.csv").write_text(text.getvalue())


def fill_latents(ws, config) -> tuple[int, float]:
    """Write every latent entry training needs, synthetic, through the cache's writer.
    Returns (entries written, seconds)."""
    import torch

    from ditctl.data.cache import Cache, CacheIndex, entry_to_store, latent_tensors
    from ditctl.data.cache_plan import PrecomputePlan
    from ditctl.data.cache_shards import ShardWriter
    from ditctl.data.datasets import per_dataset
    from ditctl.data.sample_table import SampleTable
    from ditctl.models.registry import load_family

    family = load_family(ws.model_path(config))
    cache = Cache.open(ws, config, family)
    table = SampleTable.read(ws.manifest_db, "train")
    generator = torch.Generator().manual_seed(0)
    with CacheIndex(cache.index_path) as index, PrecomputePlan.build(
            cache.spec, [table], random_flip=per_dataset(config, "random_flip")) as plan:
        missing, _ = plan.find_missing(cache, index)
        started = time.perf_counter()
        writer = ShardWriter(cache.root, index, "latent")
        for batch in plan.latent_batches(256):
            rows = table.reader.rows([sample for _, sample, _ in batch])
            for key, sample, flip in batch:
                row = rows[sample]
                shape = family.latent.latent_shape(row.bucket_w, row.bucket_h)
                mean = torch.randn(shape, generator=generator)
                std = torch.rand(shape, generator=generator) * 0.5 + 0.05
                writer.add(*entry_to_store("latent", key,
                                           latent_tensors(mean, std, torch.float32), shape,
                                           "fp32", flip, row.image_name))
        writer.flush()
    return missing, time.perf_counter() - started


def _peak_rss_mb(pid: int) -> float | None:
    """The process's own high-water mark so far (VmHWM), in MB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def timed_command(args: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds, the process's peak RSS in MB: its VmHWM, read until it exits) of one
    ditctl command."""
    started = time.perf_counter()
    process = subprocess.Popen([*_ditctl(), *args], cwd=cwd, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _peak_rss_mb(process.pid) or 0.0)
        time.sleep(0.05)
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"ditctl {' '.join(args)} failed: {stderr[-3000:]}")
    return time.perf_counter() - started, peak


def time_to_first_step(ws_root: Path) -> tuple[float, float, float]:
    """(seconds to the first train_log.jsonl line, seconds of the whole process, the training
    process's peak RSS in MB: its VmHWM, read until it exits)."""
    log = ws_root / "runs" / "bench" / "train_log.jsonl"
    started = time.perf_counter()
    process = subprocess.Popen([*_ditctl(), "train", "--use-precomputed-data", "--max-steps", "1",
                                "--run-name", "bench"], cwd=ws_root, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first, peak = None, 0.0
    while process.poll() is None and time.perf_counter() - started < FIRST_STEP_LIMIT_S:
        if first is None and log.is_file() and log.read_text().strip():
            first = time.perf_counter() - started
        peak = max(peak, _peak_rss_mb(process.pid) or 0.0)
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    _, stderr = process.communicate()
    total = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"ditctl train failed ({process.returncode}): {stderr[-3000:]}")
    if first is None:  # the process ended between two polls
        first = total
    return first, total, peak


def run(quick: bool) -> dict:
    from bench.common import TINY_FLITE, TINY_T5, TINY_VAE, build_bench_pipeline, \
        make_bench_workspace, quiet_console
    from ditctl.data.cache import CacheIndex
    from ditctl.data.ingest import run_ingest
    from ditctl.precompute import run_precompute

    images = QUICK_IMAGES if quick else IMAGES
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench-cache-scale-") as tmp, quiet_console():
        model = build_bench_pipeline(Path(tmp) / "model", TINY_FLITE, TINY_T5, TINY_VAE)
        ws = make_bench_workspace(Path(tmp) / "ws", model, images=0, size=SIZE,
                                  data={"random_flip": True, "center_crop": True},
                                  precompute={"num_workers": 2},  # the default
                                  train={"train_batch_size": 4})
        write_noise_dataset(ws.root / "data", images, CAPTIONS)
        config = ws.config()
        started = time.perf_counter()
        run_ingest(ws, config)
        ingest_s = time.perf_counter() - started
        latents, fill_s = fill_latents(ws, config)
        started = time.perf_counter()
        summary = run_precompute(ws, config, device="cpu")  # the captions, for real
        captions_s = time.perf_counter() - started
        assert summary.latents.added == 0 and summary.latents.total == latents
        cache_dir = summary.cache_dir
        with CacheIndex(cache_dir / "index.sqlite") as index:
            entries = len(index.keys())
            shards = len(index.shard_names())
        files = sum(1 for p in cache_dir.rglob("*") if p.is_file())
        verify_s, verify_peak_mb = timed_command(["precompute", "--verify"], ws.root)
        state = json.loads((ws.root / ".ditctl" / "state.json").read_text())["precompute"]
        assert state["verified"] == entries and not state["bad"], state
        first_step_s, train_s, train_peak_mb = time_to_first_step(ws.root)
    return {
        "entries": entries, "latent_entries": latents, "text_entries": entries - latents,
        "images": images, "cache_files": files, "shards": shards,
        "files_per_entry_pct": round(100 * files / entries, 3),
        "precompute_verify_s": round(verify_s, 1),
        "verify_peak_rss_mb": round(verify_peak_mb, 1),
        "train_first_step_s": round(first_step_s, 1), "train_process_s": round(train_s, 1),
        "train_peak_rss_mb": round(train_peak_mb, 1),
        "setup_ingest_s": round(ingest_s, 1), "setup_fill_latents_s": round(fill_s, 1),
        "setup_encode_captions_s": round(captions_s, 1),
        "load_avg_1m_before": load_before, "load_avg_1m_after": _load(),
        "target_files_le_1pct": files <= entries / 100,
        "target_verify_lt_60s": verify_s < 60, "target_first_step_lt_60s": first_step_s < 60,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
