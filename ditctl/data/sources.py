"""Reading a data source into rows of (image, caption). `read_source` is the one entry point;
it dispatches on what the path is:

  folder with state.json + dataset_info.json   a Hugging Face `datasets` folder (table_sources)
  folder holding .tar files (and no images)    WebDataset shards (webdataset)
  other folder                                 images, captions from names or sidecar .txt
  *.jsonl / *.ndjson, *.parquet                records of image path + caption (table_sources)
  *.tar, a glob or a brace list                WebDataset shards
  any other file                               CSV

CSV, JSONL and Parquet may name an image inside a tar shard as `shards/000.tar#0001.jpg`.

CSV: the image column holds paths relative to `base_image_dir` (default: the CSV's folder) or
absolute paths; the caption column holds the caption. The file must be UTF-8 (a BOM is fine);
quoted fields may hold commas and newlines.

Folder: every image below it (recursively, hidden files and folders skipped), in sorted order.
The caption is the file name without its extension, `_` and `-` read as spaces
(`beautiful_sunset.jpg` -> "beautiful sunset"); a sidecar `NAME.txt` beside the image wins.

Masks ([data] use_masks): a CSV may have a `mask_column` (optional; an empty cell means no mask
file), its paths read like the image paths. In folders, `NAME.mask.png` (any image suffix after
`.mask`) beside an image is that image's mask, never an image of its own (ingest also looks for
such a file beside CSV-listed images).

Problems with the whole source (missing file, not UTF-8, missing column) raise DataError;
problems with one row are attached to that row so ingest can report them all together.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .containers import ContainerCache, Entry, MemberResolver, split_member
from .images import IMAGE_SUFFIXES, ImageRef, ref_key
from .table_sources import (is_datasets_folder, read_datasets_folder, read_jsonl,
                            read_parquet)
from .webdataset import is_shard_spec, read_webdataset

DEFAULT_IMAGE_COLUMN = "image_path"


@dataclass(slots=True)  # not frozen: its __init__ would cost 6x more (a million rows per ingest)
class SourceRow:
    """One (image, caption) pair as the source lists it.

    `source` names the row in its source: "line 12" of a CSV or JSONL file, "row 12" of a
    Parquet file, the image's path relative to a folder, "shard-000.tar key 0001" of a
    WebDataset, "data-00000-of-00001.arrow row 5" of a `datasets` folder. `listed_path` is the
    image as written (for messages); `path` is the absolute, normalised path of the file that
    holds the image (a str: ingest handles millions of them). For an image inside a container
    (a tar shard, an Arrow file), `member`, `offset` and `size` say where (see ImageRef).
    `problem` is a (code, message) found while reading the source itself. Treat as read-only
    (`dataclasses.replace` makes a changed copy).
    """

    split: str
    source: str
    listed_path: str
    path: str
    caption: str
    problem: tuple[str, str] | None = None
    member: str = ""
    offset: int = -1
    size: int = -1
    mask_listed: str = ""  # the mask path as the CSV's mask column writes it ("" for none)
    mask_path: str | None = None  # its absolute, normalised path

    @property
    def ref(self) -> ImageRef:
        return ImageRef(self.path, self.member, self.offset, self.size)

    @property
    def key(self) -> str:
        return ref_key(self.path, self.member)


def read_source(data_path: Path, *, split: str, base_image_dir: Path | None = None,
                image_column: str = DEFAULT_IMAGE_COLUMN, caption_column: str = "caption",
                cache: ContainerCache | None = None,
                mask_column: str | None = None) -> list[SourceRow]:
    """The rows of a data source (see the module docstring). `cache` remembers what reading
    each tar shard / Arrow file learned, so an unchanged one is not read again;
    `mask_column`: a CSV's optional column of mask paths (None: masks are not read)."""
    return list(iter_source(data_path, split=split, base_image_dir=base_image_dir,
                            image_column=image_column, caption_column=caption_column,
                            cache=cache, mask_column=mask_column))


def iter_source(data_path: Path, *, split: str, base_image_dir: Path | None = None,
                image_column: str = DEFAULT_IMAGE_COLUMN, caption_column: str = "caption",
                cache: ContainerCache | None = None,
                mask_column: str | None = None) -> Iterator[SourceRow]:
    """`read_source` one row at a time: WebDataset shards, Arrow files, JSONL and Parquet
    records are read as the rows are consumed, so ingest never holds a source's rows in a list
    (CSV files and folders are read whole first). Problems with the whole source raise when
    the iteration starts or reaches them."""
    cache = cache if cache is not None else ContainerCache(None)
    spec = os.path.abspath(os.path.expanduser(str(data_path)))
    data_path = Path(spec)
    columns = {"image_column": image_column, "caption_column": caption_column}
    if data_path.is_dir():
        if is_datasets_folder(data_path):
            yield from _datasets_rows(data_path, split, image_column, caption_column, cache)
        elif holds_shards(data_path):
            yield from _webdataset_rows(data_path, split, caption_column, cache)
        else:
            yield from read_folder(data_path, split=split)
        return
    if data_path.is_file() and not spec.endswith(".tar"):
        suffix = data_path.suffix.lower()
        base = os.path.abspath(base_image_dir if base_image_dir is not None else data_path.parent)
        resolver = MemberResolver(cache)
        if suffix in (".jsonl", ".ndjson"):
            records = read_jsonl(data_path, **columns)
        elif suffix == ".parquet":
            records = read_parquet(data_path, **columns)
        else:
            yield from read_csv(data_path, split=split, base_image_dir=base_image_dir,
                                **columns, resolver=resolver, mask_column=mask_column)
            return
        for source, listed, caption, problem in records:
            yield listed_row(split, source, listed, caption, base, resolver, problem)
        return
    if is_shard_spec(spec):
        yield from _webdataset_rows(spec, split, caption_column, cache)
        return
    key = "train_data_path" if split == "train" else "val_data_path"
    raise DataError(f"{data_path}: no such file or folder ([data] {key})",
                    hint=f"point [data] {key} (--{key.replace('_', '-')}) at a CSV, JSONL or "
                         "Parquet file, a folder of images, tar shards or a datasets folder")


def holds_shards(folder: Path) -> bool:
    """A folder of WebDataset shards: .tar files and no images at its top level."""
    with os.scandir(folder) as listing:
        names = [entry.name.lower() for entry in listing if not entry.name.startswith(".")]
    return any(n.endswith(".tar") for n in names) and not any(
        n.endswith(IMAGE_SUFFIXES) for n in names)


def listed_row(split: str, source: str, listed: object, caption: object, base: str,
               resolver: MemberResolver, problem: tuple[str, str] | None = None) -> SourceRow:
    """A row from a listed image path (relative to `base`, absolute, or `shard.tar#member`)
    and caption, as a CSV, JSONL or Parquet record gives them."""
    caption = caption.strip() if isinstance(caption, str) else "" if caption is None else None
    if problem is not None:
        return SourceRow(split, source, "", base, caption or "", problem)
    if caption is None:
        return SourceRow(split, source, str(listed), base, "",
                         ("bad_caption", "the caption is not text"))
    listed = listed.strip() if isinstance(listed, str) else listed
    if not listed:
        return SourceRow(split, source, "", base, caption, ("no_path", "the image path is empty"))
    if not isinstance(listed, str):
        return SourceRow(split, source, str(listed), base, caption,
                         ("no_path", "the image path is not text"))
    in_shard = split_member(listed)
    if in_shard is None:
        # join() keeps an absolute listed path as it is
        path = os.path.normpath(os.path.join(base, os.path.expanduser(listed)))
        return SourceRow(split, source, listed, path, caption)
    shard = resolver.shard_path(base, in_shard[0])
    entry = resolver.entry(shard, in_shard[1])
    if not isinstance(entry, Entry):
        return SourceRow(split, source, listed, shard, caption, entry, in_shard[1])
    # listed_path left empty: the shard and member say the same, and a million listed strings
    # would be kept for nothing (BadRow shows `shard.tar#member` instead)
    return SourceRow(split, source, "", shard, caption, None, entry.name, entry.offset,
                     entry.size)


def _webdataset_rows(spec: Path | str, split: str, caption_column: str, cache: ContainerCache):
    for shard, shown, key, image, caption, problem in read_webdataset(
            spec, caption_column=caption_column, cache=cache):
        source = f"{shown} key {key}"
        if image is None:
            yield SourceRow(split, source, key, shard, caption, problem)
        else:
            yield SourceRow(split, source, image.name, shard, caption, problem, image.name,
                            image.offset, image.size)


def _datasets_rows(folder: Path, split: str, image_column: str, caption_column: str,
                   cache: ContainerCache):
    for path, name, number, entry in read_datasets_folder(
            folder, image_column=image_column, caption_column=caption_column,
            image_column_is_default=image_column == DEFAULT_IMAGE_COLUMN, cache=cache):
        caption, source = (entry.text or "").strip(), f"{name} row {number}"
        if entry.offset >= 0:
            yield SourceRow(split, source, f"{name}#{entry.name}", path, caption, None,
                            entry.name, entry.offset, entry.size)
        elif entry.name:  # no bytes, a path: an image file beside the dataset or absolute
            file = os.path.normpath(os.path.join(folder, entry.name))
            yield SourceRow(split, source, entry.name, file, caption)
        else:
            yield SourceRow(split, source, "", path, caption,
                            ("no_path", "the image has neither bytes nor a path"))


# --- CSV --------------------------------------------------------------------------------------

def _decode_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:offset].count(b"\n") + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise DataError(
            f"{path}: line {line}, column {column}: not valid UTF-8 "
            f"(byte 0x{data[offset]:02x})",
            hint=f"save the CSV as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > "
                 f"{path.stem}-utf8.csv`") from None


def read_csv(path: Path, *, split: str, base_image_dir: Path | None, image_column: str,
             caption_column: str, resolver: MemberResolver | None = None,
             mask_column: str | None = None) -> list[SourceRow]:
    text = _decode_utf8(path)
    base = os.path.abspath(base_image_dir if base_image_dir is not None else path.parent)
    resolver = resolver if resolver is not None else MemberResolver(ContainerCache(None))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: the CSV is empty (no header line)",
                            hint=f"write a header line: {image_column},{caption_column}")
        header = [name.strip() for name in header]
        missing = [c for c in (image_column, caption_column) if c not in header]
        if missing:
            raise DataError(
                f"{path}: no column {', '.join(repr(c) for c in missing)}; "
                f"the columns are: {', '.join(repr(c) for c in header)}",
                hint="name the right columns with [data] image_column / caption_column "
                     "(--image-column, --caption-column)")
        image_at, caption_at = header.index(image_column), header.index(caption_column)
        mask_at = header.index(mask_column) if mask_column in header else None
        rows: list[SourceRow] = []
        line = reader.line_num + 1  # first physical line of the next record
        for record in reader:
            start, line = line, reader.line_num + 1
            if not any(field.strip() for field in record):
                continue  # blank lines
            row = listed_row(split, f"line {start}",
                             record[image_at] if image_at < len(record) else "",
                             record[caption_at] if caption_at < len(record) else "",
                             base, resolver)
            listed = record[mask_at].strip() if mask_at is not None and mask_at < len(record) \
                else ""
            if listed:
                row = dataclasses.replace(row, mask_listed=listed, mask_path=os.path.normpath(
                    os.path.join(base, os.path.expanduser(listed))))
            rows.append(row)
        return rows
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({exc})",
                        hint="fix the quoting on that line") from None


# --- folder -----------------------------------------------------------------------------------

def caption_from_name(stem: str) -> str:
    """`beautiful_sunset-2` -> "beautiful sunset 2"."""
    return re.sub(r"\s+", " ", stem.replace("_", " ").replace("-", " ")).strip()


def _images_below(folder: Path) -> list[tuple[str, str, bool]]:
    """(relative posix path, path, has a sidecar .txt) of every image below `folder`, sorted.

    os.scandir rather than Path.rglob: re-ingest of an unchanged folder is dominated by this
    walk, and the directory listing already answers whether each sidecar exists.
    """
    found = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of visited folders: symlink loops
    pending = [("", os.path.abspath(folder))]
    while pending:
        prefix, directory = pending.pop()
        info = os.stat(directory)
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(directory) as listing:
            # hidden entries are skipped: .ditctl, .git, editor temp files, ...
            entries = [entry for entry in listing if not entry.name.startswith(".")]
        names = {entry.name for entry in entries}
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if entry.is_dir():
                pending.append((prefix + entry.name + "/", entry.path))
            elif suffix.lower() in IMAGE_SUFFIXES and entry.is_file() \
                    and not is_mask_name(entry.name):
                found.append((prefix + entry.name, entry.path, stem + ".txt" in names))
    found.sort()
    return found


MASK_INFIX = ".mask"  # NAME.mask.png is the mask of NAME.<image suffix>


def is_mask_name(name: str) -> bool:
    """Whether a file name is a mask's (`NAME.mask.<image suffix>`), not an image's."""
    stem, suffix = os.path.splitext(name)
    return suffix.lower() in IMAGE_SUFFIXES and stem.lower().endswith(MASK_INFIX) \
        and len(stem) > len(MASK_INFIX)


def sidecar_mask(image_path: str) -> str | None:
    """The `NAME.mask.<suffix>` file beside an image (.png first), or None."""
    stem = os.path.splitext(image_path)[0]
    for suffix in (".png",) + tuple(s for s in IMAGE_SUFFIXES if s != ".png"):
        candidate = stem + MASK_INFIX + suffix
        if os.path.isfile(candidate):
            return candidate
    return None


def read_folder(folder: Path, *, split: str) -> list[SourceRow]:
    rows = []
    for relative, path, has_sidecar in _images_below(folder):
        stem = os.path.splitext(os.path.basename(relative))[0]
        caption, problem = caption_from_name(stem), None
        if has_sidecar:
            sidecar = os.path.splitext(path)[0] + ".txt"
            try:
                with open(sidecar, encoding="utf-8-sig") as fh:
                    caption = fh.read().strip()
            except (UnicodeDecodeError, OSError) as exc:
                reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
                problem = ("bad_caption_file", f"caption file {stem}.txt: {reason}")
        rows.append(SourceRow(split, relative, relative, path, caption, problem))
    return rows
