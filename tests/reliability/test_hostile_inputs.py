"""Ingest reads only regular files, with a size bound from the decompression-bomb guard: a CSV
row pointing at /dev/zero, a FIFO or a huge sparse file is a bad row naming its line, never an
exhausted memory or a hang. Each run is capped (`ulimit -v`) and timed out. (Issue 14, item 5.)"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ditctl.data.images import max_file_bytes
from tests.conftest import make_workspace

MEMORY_CAP_KB = 3 * 2**20  # 3 GiB of address space: ingest needs far less


def _hostile_workspace(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    ws = make_workspace(tmp_path / "w", tmp_path / "model",  # ingest loads no model
                        n_train=3, n_val=0,
                        data={"max_image_pixels": 1_000_000})
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as fh:
        fh.truncate(max_file_bytes(1_000_000) + 1)  # no disk used, larger than any image
    train_csv = ws.root / "data" / "train.csv"
    with open(train_csv, "a", newline="") as fh:
        writer = csv.writer(fh)
        for path in ("/dev/zero", str(fifo), str(sparse)):
            writer.writerow([path, "hostile"])
    lines = train_csv.read_text().splitlines()
    where = {name: f"line {i + 1}" for i, line in enumerate(lines)
             for name in ("/dev/zero", "pipe.png", "huge.png") if name in line}
    return ws.root, where


def _ingest(root: Path, *flags: str) -> subprocess.CompletedProcess:
    command = (f"ulimit -v {MEMORY_CAP_KB}; exec {sys.executable} -m ditctl ingest "
               f"-w {root} {' '.join(flags)}")
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=90,
                          env={**os.environ, "COLUMNS": "250"})


def test_dev_zero_fifo_and_huge_files_are_bad_rows_not_a_hang(tmp_path):
    root, where = _hostile_workspace(tmp_path)
    result = _ingest(root)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "internal error" not in output
    assert "3 bad row(s) skipped" in output
    report = json.loads((root / "data" / "ingest-report.json").read_text())
    reasons = {row["source"]: (row["code"], row["reason"]) for row in report["bad"]}
    assert reasons[where["/dev/zero"]] == ("not_regular_file", "is a device file, not a "
                                           "regular image file; ditctl reads only regular files")
    assert reasons[where["pipe.png"]][1].startswith("is a FIFO file")
    assert reasons[where["huge.png"]][0] == "too_large"
    for line in where.values():  # the table names each row by file and line
        assert f"train.csv:{line[5:]}" in output, output


def test_strict_ingest_refuses_them_in_one_error(tmp_path):
    root, _ = _hostile_workspace(tmp_path)
    result = _ingest(root, "--strict")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 bad row(s) with --strict" in result.stderr
    assert "internal error" not in result.stderr


def test_image_reads_refuse_special_and_oversized_files(tmp_path):
    from ditctl.data.images import ImageProblem, read_image_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ImageProblem, match="FIFO"):
        read_image_file(fifo, 1000)  # returns at once: the open does not wait for a writer
    with pytest.raises(ImageProblem, match="device"):
        read_image_file("/dev/zero", 1000)
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (max_file_bytes(1) + 1))
    with pytest.raises(ImageProblem, match="bomb guard"):
        read_image_file(big, 1)
