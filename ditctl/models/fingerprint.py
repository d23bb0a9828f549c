"""Fast content fingerprints of model folders.

Cache keys and checkpoints must change when a model's weights change, but hashing 10 GB of
weights on every command is too slow. A fingerprint hashes each weight file's safetensors header
(names, shapes, dtypes, offsets), its size and 16 evenly spaced 64 KiB samples of its bytes,
plus every small file (configs, tokenizer files) in full. Any retrained or edited checkpoint
changes it; copying or touching the files does not.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

SMALL_FILE = 4 * 1024 * 1024
SAMPLES = 16
SAMPLE_BYTES = 64 * 1024


def _file_digest(path: Path, h: "hashlib._Hash") -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        if size <= SMALL_FILE:
            h.update(fh.read())
            return
        if path.suffix == ".safetensors":
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header_len, SMALL_FILE)))
        step = max(1, (size - SAMPLE_BYTES) // (SAMPLES - 1))
        for i in range(SAMPLES):
            fh.seek(min(i * step, size - SAMPLE_BYTES))
            h.update(fh.read(SAMPLE_BYTES))


@lru_cache(maxsize=64)
def _folder_fingerprint(folder: str, mtimes: tuple) -> str:
    h = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name.startswith(".") or "/." in str(path.relative_to(root)):
            continue
        h.update(str(path.relative_to(root)).encode())
        _file_digest(path, h)
    return h.hexdigest()[:20]


def folder_fingerprint(folder: Path) -> str:
    """Fingerprint of every file under `folder` (memoised while the files are unchanged)."""
    folder = Path(folder).resolve()
    mtimes = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size)
                          for p in folder.rglob("*") if p.is_file()))
    return _folder_fingerprint(str(folder), mtimes)
