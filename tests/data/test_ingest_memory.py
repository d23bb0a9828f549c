"""Ingest's memory does not grow with the dataset: its main process holds nothing per record
(rows, facts and plans are staged in SQLite, the manifest is filled from there by SQL; issue
#20).

Peak RSS is measured in a fresh child process per size (its own VmHWM), with the SQLite page
caches made small so that what is left is what Python holds. Before staging,
ingest held ~1.4 KB per record in its main process."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PER_SHARD = 5_000
# Bytes per record the main process may grow by: what stays per record on purpose (each bucket
# plan's compact size arrays and targets, ~40 B) plus allocator noise; 1/7 of the old cost.
MAX_BYTES_PER_RECORD = 200

_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from ditctl.config import build_config
    from ditctl.console import console
    from ditctl.data import ingest_stage, manifest
    from ditctl.data.ingest import run_ingest
    from ditctl.workspace import Workspace
    console.quiet = True
    # the page caches are bounded anyway; keep them out of sight
    ingest_stage.CACHE_KIB = manifest.WRITE_CACHE_KIB = 1024
    ws = Workspace(Path(sys.argv[1]))
    config = build_config({"data": {"train_data_path": "shards"}})
    summary = run_ingest(ws, config, workers=1)
    # VmHWM, this process's own peak: ru_maxrss would count the test process it was forked
    # from (often larger than ingest), and two runs would then "use" the same memory
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith("VmHWM:"))
    print(json.dumps({"train": summary.counts.get("train", 0), "bad": len(summary.bad),
                      "rss": peak}))
""")


def write_shards(root: Path, records: int) -> None:
    """`records` distinct 32x32 PNGs with captions, in tar shards."""
    folder = root / "shards"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for first in range(0, records, PER_SHARD):
        with tarfile.open(folder / f"part-{first // PER_SHARD:04d}.tar", "w") as tf:
            for n in range(first, min(records, first + PER_SHARD)):
                pixels = base.copy()
                pixels[0, :3, 0] = (n & 255, (n >> 8) & 255, (n >> 16) & 255)  # distinct
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
                for name, data in ((f"{n:07d}.png", buffer.getvalue()),
                                   (f"{n:07d}.txt", f"record {n}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def ingest_peak_rss(root: Path, records: int) -> int:
    write_shards(root, records)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["train"] == records and found["bad"] == 0, found
    return found["rss"]


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_records(tmp_path):
    small, large = 10_000, 40_000
    grown = ingest_peak_rss(tmp_path / "large", large) - ingest_peak_rss(tmp_path / "small",
                                                                          small)
    per_record = grown / (large - small)
    assert per_record < MAX_BYTES_PER_RECORD, f"{per_record:.0f} B/record"


_KILLED_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from ditctl.config import build_config
    from ditctl.console import console
    from ditctl.data import ingest
    from ditctl.workspace import Workspace
    console.quiet = True
    real = ingest._plan

    def plan_then_hang(*args, **kwargs):  # everything is staged: stop here until killed
        found = real(*args, **kwargs)
        # where the (already unlinked) staging file is: the workspace's state folder
        staging = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # the listing's own descriptor, closed by now
                continue
            if ".tmp-ingest-" in link:
                staging.append(link)
        print("staged", os.path.dirname(staging[0]) if staging else "nowhere", flush=True)
        time.sleep(60)
        return found

    ingest._plan = plan_then_hang
    ws = Workspace(Path(sys.argv[1]))
    ingest.run_ingest(ws, build_config({"data": {"train_data_path": "shards"}}), workers=1)
""")


def test_a_killed_ingest_leaves_the_manifest_and_a_rerun_continues(tmp_path):
    """SIGKILL after every record is staged (in a file in the workspace's state folder, not a
    RAM-backed /tmp): the previous manifest stays as it was, nothing of the staging file is
    left behind, and the next ingest runs to the end and reuses what the
    previous manifest learned about each image."""
    from ditctl.config import build_config
    from ditctl.data.ingest import run_ingest
    from ditctl.data.manifest import manifest_fingerprint, read_manifest
    from ditctl.workspace import Workspace

    write_shards(tmp_path, 120)
    ws = Workspace(tmp_path)
    config = build_config({"data": {"train_data_path": "shards"}})
    first = run_ingest(ws, config, workers=1)
    fingerprint, rows = manifest_fingerprint(ws), read_manifest(ws)
    # one more record in a new shard: the next ingest must write a new manifest
    more = tmp_path / "more"
    write_shards(more, 1)
    (more / "shards" / "part-0000.tar").rename(tmp_path / "shards" / "part-0001.tar")
    before = sorted(p.name for p in ws.state_dir.iterdir())

    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().strip()
        assert line == f"staged {ws.state_dir}", (line, child.stderr.read()[-2000:])
    finally:
        child.kill()
        child.wait()
    assert (manifest_fingerprint(ws), read_manifest(ws)) == (fingerprint, rows)
    assert sorted(p.name for p in ws.state_dir.iterdir()) == before  # no leftovers

    # killed in the instant between creating the staging file and unlinking it
    leftover = ws.state_dir / ".tmp-ingest-abc123.sqlite"
    leftover.write_bytes(b"x" * 1000)
    again = run_ingest(ws, config, workers=1)
    assert not leftover.exists()
    assert again.counts == {"train": 121} and first.counts == {"train": 120}
    assert (again.files_read, again.files_reused) == (1, 120)
    assert (again.changes.added, again.changes.unchanged) == (1, 120)

