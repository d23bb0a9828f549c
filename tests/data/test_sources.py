"""Reading CSV files and image folders into (path, caption) rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from ditctl.data.sources import caption_from_name, read_csv, read_folder, read_source
from ditctl.errors import DataError


def csv_rows(path: Path, **kwargs):
    options = dict(split="train", base_image_dir=None, image_column="image_path",
                   caption_column="caption")
    return read_csv(path, **{**options, **kwargs})


def test_bom_quoted_commas_and_newlines(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("\ufeffimage_path,caption\n"
                     'a.jpg,"a dog, brown"\n'
                     'sub/b.jpg,"first line\nsecond line"\n'
                     "\n"
                     "c.jpg,  plain  \n".encode("utf-8"))
    rows = csv_rows(path)
    assert [(r.source, r.listed_path, r.path, r.caption) for r in rows] == [
        ("line 2", "a.jpg", str(tmp_path / "a.jpg"), "a dog, brown"),
        ("line 3", "sub/b.jpg", str(tmp_path / "sub/b.jpg"), "first line\nsecond line"),
        ("line 6", "c.jpg", str(tmp_path / "c.jpg"), "plain"),
    ]


def test_custom_columns_base_dir_and_absolute_paths(tmp_path):
    path = tmp_path / "meta.csv"
    elsewhere = tmp_path / "elsewhere" / "x.png"
    path.write_text(f"text,file,extra\nhello,../up/rel.png,1\nbye,{elsewhere},2\n")
    rows = csv_rows(path, image_column="file", caption_column="text",
                    base_image_dir=tmp_path / "images")
    assert [(r.path, r.caption) for r in rows] == [(str(tmp_path / "up" / "rel.png"), "hello"),
                                                   (str(elsewhere), "bye")]


def test_empty_image_path_is_a_row_problem(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("image_path,caption\n,orphan caption\nshort\n")
    rows = csv_rows(path)
    assert [(r.source, r.problem and r.problem[0], r.caption) for r in rows] == [
        ("line 2", "no_path", "orphan caption"), ("line 3", None, "")]


def test_non_utf8_csv_names_file_and_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("image_path,caption\na.jpg,ok\nb.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError) as caught:
        csv_rows(path)
    assert str(path) in caught.value.message and "line 3" in caught.value.message
    assert "UTF-8" in caught.value.message and "iconv" in caught.value.hint


def test_missing_column_lists_existing_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("file,text\na.jpg,x\n")
    with pytest.raises(DataError) as caught:
        csv_rows(path)
    message = caught.value.message
    assert str(path) in message and "'image_path', 'caption'" in message
    assert "the columns are: 'file', 'text'" in message
    assert "--image-column" in caught.value.hint


def test_empty_csv_is_an_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        csv_rows(path)


def test_folder_subfolders_sidecars_and_name_captions(tmp_path):
    for name in ("beautiful_sunset.jpg", "sub/a-red_car.PNG", "sub/deeper/z.webp",
                 "sub/with_sidecar.jpeg", ".hidden/x.jpg", "notes.txt", "sub/.skip.png",
                 "doc.pdf"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub/with_sidecar.txt").write_text("\ufeff  the sidecar wins \n")
    rows = read_folder(tmp_path, split="val")
    assert [(r.split, r.source, r.caption) for r in rows] == [
        ("val", "beautiful_sunset.jpg", "beautiful sunset"),
        ("val", "sub/a-red_car.PNG", "a red car"),
        ("val", "sub/deeper/z.webp", "z"),
        ("val", "sub/with_sidecar.jpeg", "the sidecar wins"),
    ]
    assert rows[1].path == str(tmp_path / "sub/a-red_car.PNG")


def test_non_utf8_sidecar_is_a_row_problem(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    (row,) = read_folder(tmp_path, split="train")
    assert row.problem[0] == "bad_caption_file" and "a.txt" in row.problem[1]


def test_caption_from_name():
    assert caption_from_name("my__cat-photo_ 2") == "my cat photo 2"


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(DataError) as caught:
        read_source(tmp_path / "nope.csv", split="val")
    assert "nope.csv" in caught.value.message and "val_data_path" in caught.value.message
