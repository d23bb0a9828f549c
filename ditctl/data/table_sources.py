"""Tabular sources read with pyarrow and json: JSON Lines, Parquet, and a Hugging Face
`datasets` folder (what `Dataset.save_to_disk` writes: Arrow stream files, dataset_info.json,
state.json).

JSONL and Parquet list an image path and a caption per record (`[data] image_column`,
`caption_column`), as a CSV does: a path relative to `base_image_dir` (default: the file's
folder), an absolute path, or a member of a tar shard (`shards/000.tar#0001.jpg`).

A `datasets` folder holds the images themselves: an Image column is a struct of `bytes` and
`path`. The Arrow files are memory-mapped, never copied: each image's bytes already sit at a
fixed offset of its Arrow file, which the row records (see `images.ImageRef`), so training
reads an image with one positioned read and the `datasets` package is not needed. An image
with no bytes but a `path` is read from that file.

pyarrow is imported on use: ingest's worker processes and `ditctl status` never load it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import DataError
from .containers import ContainerCache, Contents, Entry

_COLUMNS_HINT = ("name the right columns with [data] image_column / caption_column "
                 "(--image-column, --caption-column)")


def _missing_columns(path: Path, columns: list[str], wanted: tuple[str, ...]) -> DataError:
    missing = [c for c in wanted if c not in columns]
    return DataError(f"{path}: no column {', '.join(repr(c) for c in missing)}; the columns "
                     f"are: {', '.join(repr(c) for c in columns)}", hint=_COLUMNS_HINT)


# --- JSON Lines -------------------------------------------------------------------------------

def read_jsonl(path: Path, *, image_column: str, caption_column: str,
               ) -> Iterator[tuple[str, Any, Any, tuple[str, str] | None]]:
    """(source, listed image, caption, problem) per record; blank lines are skipped."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})",
                        hint="check the file's permissions") from None
    with fh:
        for number, raw in enumerate(fh, 1):
            source = f"line {number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError:
                yield source, "", "", ("bad_record", "not valid UTF-8; save the file as UTF-8")
                continue
            except json.JSONDecodeError as exc:
                yield source, "", "", ("bad_record", f"not valid JSON ({exc.msg}, column "
                                                     f"{exc.colno}); fix the line")
                continue
            if not isinstance(record, dict):
                yield source, "", "", ("bad_record", "not a JSON object; write one object "
                                                     "per line")
                continue
            if image_column not in record:
                yield source, "", "", ("no_path", f"no field {image_column!r} (set [data] "
                                                  "image_column)")
                continue
            yield source, record[image_column], record.get(caption_column, ""), None


# --- Parquet ----------------------------------------------------------------------------------

BATCH_ROWS = 65536  # rows converted to Python at a time: memory stays flat


def read_parquet(path: Path, *, image_column: str, caption_column: str,
                 ) -> Iterator[tuple[str, Any, Any, tuple[str, str] | None]]:
    """(source, listed image, caption, problem) per row, a batch of rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(exc)})",
                        hint="re-write the file (e.g. pandas.DataFrame.to_parquet)") from None
    if image_column not in columns or caption_column not in columns:
        raise _missing_columns(path, columns, (image_column, caption_column))
    image_type = parquet.schema_arrow.field(image_column).type
    if not (pa.types.is_string(image_type) or pa.types.is_large_string(image_type)):
        raise DataError(f"{path}: column {image_column!r} holds {image_type}, not image paths",
                        hint="list image paths (or shard.tar#member) in the column; for images "
                             "stored in the table, save the dataset with datasets' "
                             "save_to_disk and point train_data_path at that folder")
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS,
                                          columns=[image_column, caption_column]):
            images = batch.column(0).to_pylist()
            captions = batch.column(1).to_pylist()
            for listed, caption in zip(images, captions):
                number += 1
                yield f"row {number}", listed, caption, None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: row group after row {number}: unreadable ({_first_line(exc)})",
                        hint="the file is damaged; re-write it") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


# --- a Hugging Face `datasets` folder ----------------------------------------------------------

def is_datasets_folder(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def read_datasets_folder(folder: Path, *, image_column: str, caption_column: str,
                         image_column_is_default: bool, cache: ContainerCache,
                         ) -> Iterator[tuple[str, str, int, Entry]]:
    """(the Arrow file, its name for messages, row number in it, entry) per row."""
    state = _read_json(folder / "state.json")
    info = _read_json(folder / "dataset_info.json")
    try:
        files = [str(item["filename"]) for item in state["_data_files"]]
    except (KeyError, TypeError):
        raise DataError(f"{folder / 'state.json'}: no _data_files list",
                        hint="save the dataset again with Dataset.save_to_disk") from None
    features = info.get("features") or {}
    image_column = _image_column(folder, features, image_column, image_column_is_default)
    if caption_column not in features:
        raise _missing_columns(folder / "dataset_info.json", list(features), (caption_column,))
    reader = _arrow_reader(image_column, caption_column)
    for name in files:
        path = os.path.join(folder, name)
        try:
            contents = cache.contents(path, f"arrow:{image_column}:{caption_column}", reader)
        except FileNotFoundError:
            raise DataError(f"{path}: listed in state.json but missing",
                            hint="save the dataset again with Dataset.save_to_disk") from None
        for number, entry in enumerate(contents.entries):
            yield path, name, number, entry


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})",
                        hint="save the dataset again with Dataset.save_to_disk") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a JSON object",
                        hint="save the dataset again with Dataset.save_to_disk")
    return value


def _image_column(folder: Path, features: dict, wanted: str, is_default: bool) -> str:
    if wanted in features:
        return wanted
    images = [name for name, spec in features.items()
              if isinstance(spec, dict) and spec.get("_type") == "Image"]
    if is_default and len(images) == 1:
        return images[0]  # the only Image column: no need to name it
    raise _missing_columns(folder / "dataset_info.json", list(features), (wanted,))


def _arrow_reader(image_column: str, caption_column: str) -> Callable[[str], Contents]:
    def read(path: str) -> Contents:
        return read_arrow_images(path, image_column, caption_column)
    return read


def read_arrow_images(path: str, image_column: str, caption_column: str) -> Contents:
    """One entry per row: the image's byte range in the file (or its `path` when it has no
    bytes), and the caption as the entry's text."""
    import numpy as np
    import pyarrow as pa

    try:
        with pa.memory_map(path) as mapped:
            whole = mapped.read_buffer()  # zero-copy: record batches point into the mapping
        try:
            reader = pa.ipc.open_stream(whole)
            batches: Any = reader
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(whole)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        entries: list[Entry] = []
        row = 0
        for batch in batches:
            names = batch.schema.names
            if image_column not in names or caption_column not in names:
                raise _missing_columns(Path(path), names, (image_column, caption_column))
            images = batch.column(image_column)
            if not pa.types.is_struct(images.type) or images.type.get_field_index("bytes") < 0:
                raise DataError(f"{path}: column {image_column!r} is {images.type}, not an "
                                "Image (struct of bytes and path)",
                                hint="set [data] image_column to the Image column")
            fields = images.flatten()  # accounts for the struct's own nulls and offset
            data = fields[images.type.get_field_index("bytes")]
            has_path = images.type.get_field_index("path") >= 0
            paths = fields[images.type.get_field_index("path")].to_pylist() if has_path \
                else [None] * len(batch)
            captions = batch.column(caption_column).to_pylist()
            starts, sizes = _byte_ranges(data, whole, np, pa, path)
            valid = data.is_valid().to_numpy(zero_copy_only=False)
            for i in range(len(batch)):
                caption = captions[i] if isinstance(captions[i], str) else ""
                if valid[i]:
                    entries.append(Entry(str(row), int(starts[i]), int(sizes[i]), caption))
                else:
                    entries.append(Entry(paths[i] or "", -1, -1, caption))
                row += 1
        return Contents(entries)
    except pa.ArrowException as exc:
        raise DataError(f"{path}: not a readable Arrow file ({_first_line(exc)})",
                        hint="save the dataset again with Dataset.save_to_disk") from None


def _byte_ranges(data: Any, whole: Any, np: Any, pa: Any, path: str) -> tuple[Any, Any]:
    """File offsets and sizes of a binary array's values (they lie inside the mapping)."""
    wide = pa.types.is_large_binary(data.type)
    if not (wide or pa.types.is_binary(data.type)):
        raise DataError(f"{path}: image bytes stored as {data.type}",
                        hint="save the dataset again with Dataset.save_to_disk")
    _, offsets_buffer, values = data.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64 if wide else np.int32)
    offsets = offsets[data.offset:data.offset + len(data) + 1].astype(np.int64)
    if values is None:
        values_at = 0
    else:
        values_at = values.address - whole.address
        if not 0 <= values_at <= whole.size - values.size:  # decompressed: not in the file
            raise DataError(f"{path}: the Arrow file is compressed; ditctl reads images in "
                            "place", hint="save the dataset again with Dataset.save_to_disk "
                                          "(it writes uncompressed files)")
    return values_at + offsets[:-1], np.diff(offsets)
