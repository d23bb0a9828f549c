"""WebDataset sources: tar shards whose members are grouped into samples by key.

`[data] train_data_path` names the shards as a folder (every `*.tar` in it), a glob
(`shards/*.tar`) or a brace list as WebDataset writes it (`shards/train-{000000..000099}.tar`,
`{a,b}.tar`). A sample is every member sharing a key: the member name up to the first dot of
its file name (`cats/0001.jpg` and `cats/0001.txt` are key `cats/0001`). Its image is the
member with an image extension (jpg, png, webp, ...), its caption the `.txt` member, else the
`[data] caption_column` field of the `.json` member.

Images stay inside the shards: each row names the shard, the member and the byte range of its
data (see `images.ImageRef`). A shard is read once per change of its size or mtime (see
`containers.ContainerCache`); the `webdataset` package is not needed.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

from ..errors import DataError
from .containers import ContainerCache, Contents, Entry, read_tar
from .images import IMAGE_SUFFIXES

_IMAGE_EXTENSIONS = tuple(suffix[1:] for suffix in IMAGE_SUFFIXES)
_BRACE = re.compile(r"\{([^{}]*)\}")


def is_shard_spec(spec: str) -> bool:
    """Whether a data path names tar shards by glob or brace list (or is one `.tar`)."""
    return spec.endswith(".tar") or any(ch in spec for ch in "*?[") or bool(_BRACE.search(spec))


def expand_braces(spec: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{x,y}` -> x, y (nested, in
    order). Numeric ranges keep the zero padding of their first bound."""
    match = _BRACE.search(spec)
    if match is None:
        return [spec]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    head, tail = spec[:match.start()], spec[match.end():]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def list_shards(spec: Path | str) -> tuple[list[str], str]:
    """(the shard paths, the folder their names are shown relative to)."""
    spec = str(spec)
    if os.path.isdir(spec):
        shards = sorted(entry.path for entry in os.scandir(spec)
                        if entry.name.endswith(".tar") and not entry.name.startswith(".")
                        and entry.is_file())
        return shards, spec
    found: list[str] = []
    for pattern in expand_braces(spec):
        if any(ch in pattern for ch in "*?["):
            found += sorted(glob.glob(pattern))
        else:
            found.append(pattern)  # a missing listed shard is reported, not skipped
    shards = [os.path.abspath(p) for p in dict.fromkeys(found)]
    if not shards:
        raise DataError(f"{spec}: no tar shards match", hint="check the path of [data] "
                        "train_data_path (a folder of .tar shards, a glob or a brace list)")
    base = os.path.commonpath([os.path.dirname(p) for p in shards])
    return shards, base


def sample_key(name: str) -> tuple[str, str]:
    """`cats/0001.seg.png` -> (`cats/0001`, `seg.png`): WebDataset's key and extension."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (folder + "/" + stem if folder else stem), extension.lower()


def read_webdataset(spec: Path | str, *, caption_column: str, cache: ContainerCache):
    """(shard, its name for messages, key, image entry or None, caption, problem) per sample,
    shard by shard (a generator; `sources.read_source` makes the rows)."""
    shards, base = list_shards(spec)
    for shard in shards:
        shown = os.path.relpath(shard, base)
        try:
            contents = cache.contents(shard, "tar", read_tar)
        except FileNotFoundError:
            raise DataError(f"{shard}: shard not found", hint="fix the shard list in [data] "
                            "train_data_path, or restore the shard") from None
        except OSError as exc:
            raise DataError(f"{shard}: cannot read the shard ({exc.strerror or exc})",
                            hint="check the file's permissions") from None
        for key, image, caption, problem in _samples(contents, caption_column):
            yield shard, shown, key, image, caption, problem


def _samples(contents: Contents, caption_column: str):
    """(key, image entry or None, caption, problem) per sample key, in shard order."""
    groups: dict[str, dict[str, Entry]] = {}
    for entry in contents.entries:
        key, extension = sample_key(entry.name)
        groups.setdefault(key, {})[extension] = entry
    cut = contents.problem
    cut_key = sample_key(cut[1])[0] if cut and cut[1] else None
    for key, members in groups.items():
        image = next((members[ext] for ext in members if ext in _IMAGE_EXTENSIONS), None)
        caption, problem = _caption(members, caption_column)
        if key == cut_key:
            image, problem = None, (cut[0], f"{cut[2]}; re-create or re-copy the shard")
        elif image is None:
            problem = problem or ("no_image", "no image member (.jpg, .png, .webp, ...) for "
                                              "this key; add one or remove the key's members")
        yield key, image, caption, problem
    if cut is not None and cut_key not in groups:
        yield (cut_key or "(end of shard)", None, "",
               (cut[0], f"{cut[2]}; re-create or re-copy the shard"))


def _caption(members: dict[str, Entry], caption_column: str) -> tuple[str, tuple | None]:
    if "txt" in members:
        text = members["txt"].text
        if text is None:
            return "", ("bad_caption_file", "the .txt member is too large to be a caption")
        return text.strip(), None
    if "json" in members:
        text = members["json"].text
        try:
            value = json.loads(text) if text is not None else None
        except json.JSONDecodeError as exc:
            return "", ("bad_caption_file", f"the .json member is not valid JSON ({exc.msg}, "
                                            f"line {exc.lineno}); fix or re-write it")
        if not isinstance(value, dict) or not isinstance(value.get(caption_column), str):
            return "", ("bad_caption_file", f"the .json member has no string field "
                                            f"{caption_column!r}; set [data] caption_column")
        return value[caption_column].strip(), None
    return "", None
