"""Stream safetensors weights into a module built on the meta device: one tensor at a time,
straight into its final dtype and device, so a model is never held twice.

Why not `from_pretrained`: diffusers and transformers read a whole shard into host memory in
the file's dtype (its pages stay mapped while they copy), then cast it: for a bf16 target read
from an fp32 file that is a full-precision copy, and even bf16 from bf16 peaks near twice the
model. Here each tensor is read with one `readinto` into the storage it will keep (when the
file dtype is the target dtype and the target device is the CPU) or into a buffer of its own
size that is cast and moved, then dropped. Peak host memory: the loaded model plus the largest
single tensor, whatever the shard size.

A module that is complete (all of its own tensors read) is handed to `convert(name, module)`
before the next one starts. A converter may also claim a module's tensors before they are read
(`streamed_tensors`) and read them itself, a slice of rows at a time (`RowSource`,
`convert_streamed`): that is how a frozen base is quantized (ditctl.engine.precision), so
neither the target-dtype model nor even one whole layer of it in bf16 ever exists, and the
peak is the quantized model plus one slice's intermediates.

Only the safetensors container is read (an 8-byte little-endian header length, a JSON header
of name -> dtype, shape, byte range, then the raw bytes): nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import ModelError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header

# convert(module_name, module) -> a replacement module (or None: keep it)
Convert = Callable[[str, torch.nn.Module], "torch.nn.Module | None"]


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors of one .safetensors file, by name (metadata left out)."""
    file = Path(file)
    try:
        with open(file, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            raw = fh.read(8)
            length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
                raise ModelError(f"{file} is not a safetensors file (bad header length)",
                                 hint="re-download or re-export the model folder")
            header = json.loads(fh.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {file}: {exc}",
                         hint="re-download or re-export the model folder") from None
    start = 8 + length
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ModelError(f"{file}: tensor {key} has dtype {entry.get('dtype')!r}, which this "
                             f"torch cannot hold", hint="convert the weights to bf16 or fp32")
        begin, end = entry["data_offsets"]
        shape = tuple(int(s) for s in entry["shape"])
        nbytes = end - begin
        expected = dtype.itemsize * _numel(shape)
        if nbytes != expected or start + end > size:
            raise ModelError(f"{file}: tensor {key} is truncated or malformed "
                             f"({nbytes} bytes for shape {list(shape)})",
                             hint="re-download or re-export the model folder")
        tensors[key] = StoredTensor(file, key, dtype, shape, start + begin, nbytes)
    return tensors


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component folder: those its index names, else all of them."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise ModelError(f"{indexes[0]} is not a valid shard index ({exc})",
                             hint="re-download or re-export the model folder") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{folder} lacks the shard(s) {', '.join(missing)} that "
                             f"{indexes[0].name} names", hint="re-download the model folder")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + \
            sorted(p.name for p in folder.glob("*.pt"))
        raise ModelError(f"{folder} holds no .safetensors weights"
                         + (f" (only {', '.join(pickled)}, which ditctl does not unpickle)"
                            if pickled else ""),
                         hint="convert the weights to safetensors")
    return files


def stored_tensors(folder: Path) -> dict[str, StoredTensor]:
    tensors: dict[str, StoredTensor] = {}
    for file in weight_files(folder):
        tensors.update(read_header(file))
    return tensors


def read_tensor(stored: StoredTensor, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """One stored tensor as `dtype` on `device`; read straight into its final storage when no
    cast or move is needed."""
    dtype = dtype or stored.dtype
    device = torch.device(device)
    buffer = torch.empty(stored.shape, dtype=stored.dtype)
    if stored.nbytes:
        with open(stored.file, "rb") as fh:
            fh.seek(stored.offset)
            view = memoryview(buffer.view(-1).view(torch.uint8).numpy())
            if fh.readinto(view) != stored.nbytes:
                raise ModelError(f"{stored.file}: tensor {stored.key} is truncated",
                                 hint="re-download or re-export the model folder")
    if dtype == buffer.dtype and device.type == "cpu":
        return buffer
    return buffer.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class RowSource:
    """A stored tensor not read yet, handed to a streaming converter that reads it a slice of
    rows at a time (a quantizer: see `load_streaming`). `rows(start, stop)` returns rows
    [start, stop) as `dtype` on `device`, read with one `readinto` of just those bytes."""

    stored: StoredTensor
    dtype: torch.dtype
    device: torch.device

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return read_rows(self.stored, start, stop, self.dtype, self.device)


def read_rows(stored: StoredTensor, start: int, stop: int, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows [start, stop) of a stored tensor (along its first dimension) as `dtype` on
    `device`: a row-major tensor's rows are one contiguous byte range, read on their own."""
    if not stored.shape or not 0 <= start <= stop <= stored.shape[0]:
        raise ValueError(f"rows {start}:{stop} of {stored.key} {list(stored.shape)}")
    row_bytes = stored.nbytes // stored.shape[0] if stored.shape[0] else 0
    part = StoredTensor(stored.file, stored.key, stored.dtype,
                        (stop - start, *stored.shape[1:]), stored.offset + start * row_bytes,
                        (stop - start) * row_bytes)
    return read_tensor(part, dtype, device)


def load_streaming(module: torch.nn.Module, folder: Path, *, dtype: torch.dtype,
                   device: torch.device | str = "cpu", convert: Convert | None = None,
                   ignore: Iterable[str] = (), tied: dict[str, str] | None = None,
                   keep_dtype: Callable[[str], bool] | None = None) -> torch.nn.Module:
    """Fill `module` (built on the meta device) from the safetensors in `folder`; returns it
    (the module itself, or what `convert` replaced it with when it converts the root).

    Floating-point tensors become `dtype` (unless `keep_dtype(name)`); others keep theirs.
    `ignore`: regexes of stored names to skip (e.g. recomputed tables). `tied`: names that are
    the same tensor as another (target -> source), restored after loading. Stored names the
    module lacks and module tensors nothing was stored for are errors.

    A `convert` with a `bind(module)` method sees the whole meta model first (a quantizer
    learns which modules are the repeated blocks). One with a `streamed_tensors(name, module)` method may claim tensors of a module
    before they are read (a quantizer claims a Linear's weight): those are not read here but
    handed as `RowSource`s to `convert.convert_streamed(name, module, {tensor_name: source})`
    once the module's other tensors are in, and its result replaces the module. The claimed
    tensor is then never whole in memory in any dtype: the converter reads it a slice of rows
    at a time.
    """
    folder = Path(folder)
    stored = stored_tensors(folder)
    patterns = [re.compile(p) for p in ignore]
    stored = {k: v for k, v in stored.items() if not any(p.search(k) for p in patterns)}
    tied = dict(tied or {})
    own = dict(module.named_parameters(remove_duplicate=False))
    own.update(dict(module.named_buffers(remove_duplicate=False)))
    unknown = sorted(k for k in stored if k not in own)
    if unknown:
        raise ModelError(f"{folder} holds weights this model does not have: {unknown[:3]}"
                         + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""),
                         hint="check that config.json belongs to these weights")
    missing = sorted(k for k in own if k not in stored and k not in tied)
    if missing:
        raise ModelError(f"{folder} lacks weights for {missing[:3]}"
                         + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
                         hint="the weights are incomplete or belong to another model")

    by_module: "OrderedDict[str, list[str]]" = OrderedDict()
    for key in sorted(stored, key=lambda k: (stored[k].file.name, stored[k].offset)):
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    # modules that own tensors but have nothing stored (tied targets) still get converted
    for key in tied:
        by_module.setdefault(key.rpartition(".")[0], [])
    root = module
    if hasattr(convert, "bind"):
        convert.bind(module)  # a converter may need the whole (meta) model's structure first
    streamed = getattr(convert, "streamed_tensors", None)
    with torch.no_grad():
        for module_name, keys in by_module.items():
            owner = root.get_submodule(module_name) if module_name else root
            is_tied = any(key in tied for key in _own_keys(owner, module_name))
            claimed = set() if is_tied or streamed is None else set(streamed(module_name, owner))
            sources = {}
            for key in keys:
                name = key.rpartition(".")[2]
                item = stored[key]
                target = dtype if item.dtype.is_floating_point and not (
                    keep_dtype and keep_dtype(key)) else item.dtype
                if name in claimed and item.shape:
                    sources[name] = RowSource(item, target, torch.device(device))
                    continue
                tensor = read_tensor(item, target, device)
                _assign(owner, name, tensor)
            if is_tied:
                continue  # tied tensors are restored (and converted) after everything is read
            if sources:
                root = _replace(root, module_name, owner,
                                convert.convert_streamed(module_name, owner, sources))
            else:
                root = _convert(root, module_name, owner, convert)
        for target_key, source_key in tied.items():
            source = _lookup(root, source_key)
            parent_name, _, name = target_key.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            if name in parent._parameters:
                parent._parameters[name] = source
            else:
                parent._buffers[name] = source
            root = _convert(root, parent_name, parent, convert)
    left = [n for n, t in list(root.named_parameters()) + list(root.named_buffers())
            if t.is_meta]
    if left:
        raise ModelError(f"{folder}: {left[:3]} were not loaded",
                         hint="the weights are incomplete or belong to another model")
    return root


def _own_keys(owner: torch.nn.Module, prefix: str) -> list[str]:
    dot = prefix + "." if prefix else ""
    return [dot + n for n in list(owner._parameters) + list(owner._buffers)]


def _lookup(root: torch.nn.Module, key: str) -> torch.Tensor:
    parent_name, _, name = key.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    return parent._parameters.get(name) if name in parent._parameters else parent._buffers[name]


def _assign(owner: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    if name in owner._parameters:
        old = owner._parameters[name]
        owner._parameters[name] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        owner._buffers[name] = tensor


def _convert(root: torch.nn.Module, module_name: str, owner: torch.nn.Module,
             convert: Convert | None) -> torch.nn.Module:
    if convert is None:
        return root
    return _replace(root, module_name, owner, convert(module_name, owner))


def _replace(root: torch.nn.Module, module_name: str, owner: torch.nn.Module,
             replacement: "torch.nn.Module | None") -> torch.nn.Module:
    if replacement is None or replacement is owner:
        return root
    if not module_name:
        return replacement
    parent_name, _, child = module_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, replacement)
    return root
