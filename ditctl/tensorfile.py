"""safetensors files written in one streaming pass, into any binary file object.

`safetensors.torch.save_file` needs the whole file's path and writes it itself; a checkpoint
also wants each file's sha256 for its manifest, and hashing a 40 GB weight file by reading it
back doubles the I/O. So this writes the format directly (it is small and fixed: an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte range,
space-padded to a multiple of 8, then the tensors' bytes back to back) through a file object
that hashes as it goes (`fsutil.HashingWriter`). One tensor at a time is copied to the CPU.
Files are read back with `safetensors.torch.load_file` as before.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import Any

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors(fh: Any, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (any device, any layout) to the binary file object `fh` as safetensors."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
        raise RuntimeError("safetensors files are little-endian; this machine is not")
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    fh.write(struct.pack("<Q", len(encoded)))
    fh.write(encoded)
    for name in names:
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.numel():
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy())
