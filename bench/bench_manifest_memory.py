"""RSS of what `precompute` and `train` build at start-up from an N-row manifest (issue #20).

    .venv/bin/python bench/bench_manifest_memory.py N FOLDER make        # a synthetic manifest
    .venv/bin/python bench/bench_manifest_memory.py N FOLDER train       # table + epoch plan
    .venv/bin/python bench/bench_manifest_memory.py N FOLDER train-rows  # rows + epoch plan
    .venv/bin/python bench/bench_manifest_memory.py N FOLDER precompute  # table + cache plan

`train` reads the split as training does (a `SampleTable`: arrays, rows read on demand);
`train-rows` as it did before (`read_manifest`: a ManifestRow per sample). `precompute` reads
the table and plans as `ditctl precompute` does (`PrecomputePlan`: the entries in a temporary
SQLite file), then does what precompute does with the plan before encoding: its fingerprint,
the gap against an empty cache index, and one pass over the batches to encode (and reports
the size of the plan's file on disk).

The manifest is WebDataset-like (container path, member, 64-hex hash, short caption). Prints
MB of RSS above a process that imported everything; run each measurement in its own process
(numbers: RESULTS.md, block *startup memory*).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditctl.data import batches  # noqa: E402
from ditctl.data.cache import Cache, CacheIndex, KeySpec  # noqa: E402
from ditctl.data.cache_plan import PrecomputePlan  # noqa: E402
from ditctl.data.manifest import ManifestRow, read_manifest, write_manifest  # noqa: E402
from ditctl.data.sample_table import SampleTable  # noqa: E402
from ditctl.workspace import Workspace  # noqa: E402

PER_SHARD = 10_000


def rss_mb() -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) / 1024


def plan_file_bytes() -> int:
    """Size of the plan's temporary file (deleted when opened, still open: found by fd)."""
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if ".tmp-plan-" in os.readlink(fd):
                return os.stat(fd).st_size
    return 0


def make(ws: Workspace, rows: int) -> None:
    ws.root.mkdir(parents=True, exist_ok=True)
    (ws.root / "project.toml").write_text('[data]\ntrain_data_path = "captions.parquet"\n')
    samples = (ManifestRow(split="train", source=f"row {i}",
                           path=ws.root / "shards" / f"shard-{i // PER_SHARD:05d}.tar",
                           caption=f"random pixels number {i}", sha256=f"{i:064x}",
                           size_bytes=2000, mtime_ns=1, width=48, height=40, format="JPEG",
                           bucket_w=48, bucket_h=32, member=f"{i:09d}.jpg", offset=512 * i)
               for i in range(rows))
    write_manifest(ws.manifest_db, samples, [], {"counts": {"train": rows}})


def measure(ws: Workspace, what: str) -> dict:
    gc.collect()
    base = rss_mb()
    started = time.perf_counter()
    rows = (read_manifest(ws, "train") if what == "train-rows"
            else SampleTable.read(ws.manifest_db, "train"))
    after_rows = rss_mb()
    out = {"rows": len(rows), "read_manifest_mb": round(after_rows - base, 1),
           "read_s": round(time.perf_counter() - started, 2)}
    started = time.perf_counter()
    if what in ("train", "train-rows"):
        plan = batches.epoch_batches(rows, 8, 0, 0)
    else:
        spec = KeySpec(vae_identity="v" * 16, text_identity="t" * 16, text_max_length=77,
                       dtype="bf16", center_crop=False)
        folder = ws.root / "bench-cache"
        folder.mkdir(exist_ok=True)
        plan = PrecomputePlan.build(spec, [rows], random_flip=True, folder=folder)
        out["build_s"] = round(time.perf_counter() - started, 2)
        out["fingerprint"] = plan.fingerprint
        with CacheIndex(folder / "index.sqlite") as index:
            out["missing"] = plan.find_missing(Cache(folder, spec), index)
        out["batches"] = sum(1 for _ in plan.latent_batches(8))
        out["plan_file_mb"] = round(plan_file_bytes() / 1e6, 1)
    out[f"{what.split('-')[0]}_plan_mb"] = round(rss_mb() - after_rows, 1)
    out["plan_s"] = round(time.perf_counter() - started, 2)
    out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, 1)
    del plan
    return out


if __name__ == "__main__":
    count, folder, what = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    workspace = Workspace(folder)
    if what == "make":
        make(workspace, count)
    else:
        print(json.dumps(measure(workspace, what)))
