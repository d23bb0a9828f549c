"""`ingest` end to end on a generated corpus: every bad-input case, every colour mode, the
manifest, incremental re-ingest, atomic replacement, --strict and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ditctl.cli.app import app
from ditctl.config import build_config
from ditctl.data import images, ingest, ingest_stage, manifest
from ditctl.data.ingest import StrictIngestError, run_ingest
from ditctl.data.manifest import (compute_fingerprint, manifest_fingerprint, manifest_meta,
                                  read_manifest)
from ditctl.errors import DataError, WorkspaceError
from ditctl.workspace import Workspace

DATA = {"train_data_path": "data/train.csv", "resolution": 64, "max_upscale": 2.0,
        "max_image_pixels": 10_000}

# (file, caption, expected problem code or None)
GOOD = {
    "rgb.jpg": "a plain rgb photo",
    "rgba.png": "transparent, with commas",
    "palette.png": "palette with a transparent index",
    "gray.png": "grayscale",
    "gray_alpha.png": "gray with alpha",
    "deep.png": "sixteen bit",
    "cmyk.jpg": "print colours",
    "rotated.jpg": "camera held upright",
}
BAD = {
    "missing.jpg": ("missing", "file not found"),
    "truncated.jpg": ("corrupt", "truncated"),
    "text.jpg": ("not_image", "not an image"),
    "empty.jpg": ("empty_file", "0 bytes"),
    "tiny.png": ("too_small", "needs 4.00x upscaling"),
    "bomb.png": ("too_many_pixels", "max_image_pixels"),
    "uncaptioned.png": ("empty_caption", "caption is empty"),
}


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_corpus(root: Path) -> Path:
    """data/train.csv (UTF-8 BOM, quoted commas and newlines) and data/img/* for every case."""
    img = root / "data" / "img"
    img.mkdir(parents=True)
    noise(64, 64, 1).save(img / "rgb.jpg", quality=90)
    rgba = Image.new("RGBA", (80, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 40, 64))
    rgba.save(img / "rgba.png")
    palette = Image.new("P", (64, 64))
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.paste(1, (0, 0, 32, 64))
    palette.save(img / "palette.png", transparency=0)
    Image.new("L", (64, 64), 100).save(img / "gray.png")
    Image.new("LA", (64, 64), (50, 0)).save(img / "gray_alpha.png")
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(img / "deep.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(img / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    noise(96, 64, 2).save(img / "rotated.jpg", quality=90, exif=exif.tobytes())
    whole = (img / "rgb.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (img / "text.jpg").write_text("this is a caption, not an image\n")
    (img / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (16, 16)).save(img / "tiny.png")
    Image.new("RGB", (120, 120)).save(img / "bomb.png")      # 14,400 > max_image_pixels
    noise(64, 64, 3).save(img / "uncaptioned.png")
    lines = ["image_path,caption"]
    for name in [*GOOD, *BAD]:
        caption = GOOD.get(name, "" if name == "uncaptioned.png" else f"caption of {name}")
        lines.append(f'img/{name},"{caption}"')
    lines.append('img/rgb.jpg,"the same file again,\nwith a two-line caption"')
    csv = root / "data" / "train.csv"
    csv.write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode("utf-8"))
    return csv


def make_workspace(root: Path, **data) -> Workspace:
    settings = {**DATA, **data}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    (root / "project.toml").write_text(f"[data]\n{body}\n")
    return Workspace(root)


def ingest_config(ws: Workspace, **overrides):
    return ws.config({f"data.{k}": v for k, v in overrides.items()})


@pytest.fixture()
def corpus(tmp_path):
    make_corpus(tmp_path)
    return make_workspace(tmp_path)


def count_decodes(monkeypatch) -> list[int]:
    calls = []
    real = images.check_decodes

    def counting(data, *, max_pixels):
        calls.append(len(data))
        return real(data, max_pixels=max_pixels)

    monkeypatch.setattr(images, "check_decodes", counting)
    return calls


# --- the corpus -------------------------------------------------------------------------------

def test_every_bad_row_is_reported_and_every_good_row_kept(corpus):
    summary = run_ingest(corpus, corpus.config())
    bad = {Path(b.listed_path).name: b for b in summary.bad}
    assert {name: b.code for name, b in bad.items()} == {n: code for n, (code, _) in BAD.items()}
    for name, (_, words) in BAD.items():
        assert words in bad[name].reason, (name, bad[name].reason)
    assert bad["missing.jpg"].source == f"line {2 + len(GOOD)}"
    assert bad["missing.jpg"].where == f"train.csv:{2 + len(GOOD)}"

    rows = read_manifest(corpus, "train")
    assert [Path(r.path).name for r in rows] == [*GOOD, "rgb.jpg"]
    assert [r.caption for r in rows] == [*GOOD.values(),
                                         "the same file again,\nwith a two-line caption"]
    assert summary.counts == {"train": 9}
    # duplicates: rgb.jpg is listed twice
    assert [[r.source for r in group] for group in summary.duplicates] == [["line 2", "line 17"]]


def test_manifest_rows_hold_the_facts(corpus):
    run_ingest(corpus, corpus.config())
    rows = {Path(r.path).name: r for r in read_manifest(corpus)}
    rotated = rows["rotated.jpg"]
    assert (rotated.width, rotated.height, rotated.format) == (64, 96, "JPEG")
    data = Path(rotated.path).read_bytes()
    assert rotated.sha256 == hashlib.sha256(data).hexdigest()
    assert rotated.size_bytes == len(data)
    assert rotated.mtime_ns == os.stat(rotated.path).st_mtime_ns
    assert rotated.bucket == (64, 64) and rows["rgba.png"].bucket == (64, 64)
    assert rotated.source == "line 9" and rotated.split == "train"
    assert manifest_meta(corpus)["data_config"]["resolution"] == 64


def test_manifest_rows_load_as_the_right_pixels(corpus):
    from ditctl.data.transforms import load_training_image

    run_ingest(corpus, corpus.config())
    tensors = {r.path.name: load_training_image(r.path, *r.bucket) for r in read_manifest(corpus)}
    assert all(t.shape == (3, 64, 64) for t in tensors.values())

    def rgb(name, x, y):
        return [round(float(v)) for v in (tensors[name][:, y, x] + 1) * 127.5]

    # rgba.png: 80x64, left 40 columns opaque blue, the rest transparent red -> white;
    # centre-cropped to 64 columns starting at column 8
    assert rgb("rgba.png", 2, 32) == [0, 0, 255] and rgb("rgba.png", 60, 32) == [255, 255, 255]
    assert rgb("palette.png", 5, 5) == [0, 255, 0] and rgb("palette.png", 60, 5) == [255, 255, 255]
    assert rgb("gray_alpha.png", 10, 10) == [255, 255, 255]
    assert rgb("deep.png", 10, 10) == [128, 128, 128]
    assert rgb("gray.png", 10, 10) == [100, 100, 100]
    assert max(abs(a - b) for a, b in zip(rgb("cmyk.jpg", 32, 32), [255, 0, 0])) <= 6


def test_state_and_report(corpus):
    summary = run_ingest(corpus, corpus.config())
    state = corpus.read_state()["ingest"]
    assert (state["train_count"], state["val_count"], state["bad_count"]) == (9, 0, 7)
    assert state["fingerprint"] == manifest_fingerprint(corpus) == summary.fingerprint
    report = json.loads((corpus.data_dir / "ingest-report.json").read_text())
    assert report["manifest_written"] is True
    assert sorted(b["code"] for b in report["bad"]) == sorted(c for c, _ in BAD.values())
    assert report["buckets"]["train"]["buckets"][0]["count"] == 9
    # where the time went, phase by phase, within the whole run's time
    phases = report["phases_s"]
    assert set(phases) == {"list", "validate", "plan", "manifest"}
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) <= report["elapsed_s"] + 0.01


def test_empty_captions_can_be_kept(corpus):
    summary = run_ingest(corpus, ingest_config(corpus, keep_empty_captions=True))
    assert "empty_caption" not in {b.code for b in summary.bad}
    assert [Path(r.path).name for r in summary.empty_captions_kept] == ["uncaptioned.png"]
    assert "" in [r.caption for r in read_manifest(corpus)]


def test_validation_split_from_a_folder(corpus, tmp_path):
    val = tmp_path / "val"
    (val / "sub").mkdir(parents=True)
    noise(64, 64, 7).save(val / "sub" / "red_barn.png")
    noise(64, 64, 8).save(val / "blue-sky.png")
    (val / "blue-sky.txt").write_text("sidecar caption")
    run_ingest(corpus, ingest_config(corpus, val_data_path="val"))
    rows = read_manifest(corpus, "val")
    assert [(r.source, r.caption) for r in rows] == [("blue-sky.png", "sidecar caption"),
                                                    ("sub/red_barn.png", "red barn")]
    assert len(read_manifest(corpus, "train")) == 9
    # the fingerprint ingest writes by SQL is the one of the rows as read back
    assert manifest_fingerprint(corpus) == compute_fingerprint(
        read_manifest(corpus, "train") + rows)


def test_pool_and_in_process_validation_agree(corpus, monkeypatch):
    first = run_ingest(corpus, corpus.config(), workers=1)
    expected = [(r.path, r.sha256, r.width, r.height) for r in read_manifest(corpus)]
    corpus.manifest_db.unlink()
    monkeypatch.setattr(ingest, "POOL_MIN_FILES", 0)
    second = run_ingest(corpus, corpus.config(), workers=2)
    assert [(r.path, r.sha256, r.width, r.height) for r in read_manifest(corpus)] == expected
    assert [(b.source, b.code) for b in second.bad] == [(b.source, b.code) for b in first.bad]


# --- incremental re-ingest --------------------------------------------------------------------

def test_reingest_reads_only_changed_files(corpus, monkeypatch):
    run_ingest(corpus, corpus.config())
    fingerprint = manifest_fingerprint(corpus)
    decodes = count_decodes(monkeypatch)

    again = run_ingest(corpus, corpus.config())
    # the four files that never decode (truncated, text, empty, bomb) are re-checked; no others
    good_files = len(GOOD) + 1                               # + the uncaptioned image
    assert again.files_reused == good_files + 1              # + tiny.png (decoded, too small)
    assert len(decodes) == 4 and again.files_read == 4
    assert (again.changes.added, again.changes.changed, again.changes.removed,
            again.changes.unchanged) == (0, 0, 0, 9)
    assert manifest_fingerprint(corpus) == fingerprint

    decodes.clear()
    changed = corpus.root / "data" / "img" / "gray.png"
    Image.new("L", (64, 64), 200).save(changed)
    os.utime(changed, ns=(1, 1))                             # a new mtime, whatever the clock
    third = run_ingest(corpus, corpus.config())
    assert len(decodes) == 4 + 1 and third.files_read == 5
    assert (third.changes.changed, third.changes.unchanged) == (1, 8)
    assert manifest_fingerprint(corpus) != fingerprint
    row = next(r for r in read_manifest(corpus) if r.path.name == "gray.png")
    assert row.sha256 == hashlib.sha256(changed.read_bytes()).hexdigest()


def test_removed_and_recaptioned_rows(corpus):
    run_ingest(corpus, corpus.config())
    before = manifest_fingerprint(corpus)
    csv = corpus.root / "data" / "train.csv"
    text = csv.read_text(encoding="utf-8-sig")
    text = text.replace('img/gray.png,"grayscale"\n', "")
    text = text.replace('"sixteen bit"', '"sixteen-bit grayscale"')
    csv.write_text(text, encoding="utf-8")
    summary = run_ingest(corpus, corpus.config())
    assert (summary.changes.removed, summary.changes.changed, summary.changes.added) == (1, 1, 0)
    assert "gray.png" not in [r.path.name for r in read_manifest(corpus)]
    assert manifest_fingerprint(corpus) != before


def test_changed_bucket_changes_the_fingerprint(corpus):
    run_ingest(corpus, corpus.config())
    before = manifest_fingerprint(corpus)
    summary = run_ingest(corpus, ingest_config(corpus, resolution=48))
    assert summary.changes.changed == 9 and manifest_fingerprint(corpus) != before


# --- atomicity and strictness -----------------------------------------------------------------

def test_a_crash_mid_write_keeps_the_old_manifest(corpus, monkeypatch):
    run_ingest(corpus, corpus.config())
    old_rows = read_manifest(corpus)
    old_bytes = corpus.manifest_db.read_bytes()

    fill = ingest_stage.Stage.fill_manifest

    def crash(stage, name, extra_files=()):
        fill(stage, name, extra_files)
        stage.db.execute(f"INSERT INTO {name}.samples (split, source, path, caption, sha256, "
                         "size_bytes, mtime_ns, width, height, format, bucket_w, bucket_h) "
                         "VALUES ('train', 'x', 'x', 'x', 'x', 0, 0, 1, 1, 'x', 16, 16)")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(ingest_stage.Stage, "fill_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(corpus, ingest_config(corpus, resolution=48))
    assert corpus.manifest_db.read_bytes() == old_bytes
    assert read_manifest(corpus) == old_rows
    assert [p.name for p in corpus.state_dir.iterdir() if p.name.startswith(".tmp-")] == []


def test_strict_refuses_bad_rows_and_keeps_the_manifest(corpus):
    run_ingest(corpus, corpus.config())
    old_bytes = corpus.manifest_db.read_bytes()
    (corpus.root / "data" / "img" / "rgb.jpg").write_bytes(b"broken")
    with pytest.raises(StrictIngestError) as caught:
        run_ingest(corpus, corpus.config(), strict=True)
    assert len(caught.value.summary.bad) == 9                # 7 + both rows of rgb.jpg
    assert corpus.manifest_db.read_bytes() == old_bytes
    report = json.loads((corpus.data_dir / "ingest-report.json").read_text())
    assert report["manifest_written"] is False and len(report["bad"]) == 9


def test_no_usable_image_is_an_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("image_path,caption\nnope.jpg,x\n")
    ws = make_workspace(tmp_path)
    with pytest.raises(DataError, match="no usable training images"):
        run_ingest(ws, ws.config())
    assert not ws.manifest_db.exists()


def test_unset_data_path_and_missing_manifest_are_clear(tmp_path):
    ws = Workspace(tmp_path)
    with pytest.raises(DataError, match="train_data_path is not set"):
        run_ingest(ws, build_config({}))
    with pytest.raises(WorkspaceError, match="not been ingested") as caught:
        read_manifest(ws)
    assert caught.value.hint == "run `ditctl ingest`"


def test_an_unreadable_old_manifest_is_rebuilt(corpus):
    corpus.state_dir.mkdir(parents=True)
    corpus.manifest_db.write_bytes(b"not a database at all" * 100)
    summary = run_ingest(corpus, corpus.config())
    assert summary.files_reused == 0 and "unreadable" in summary.notes[0]
    with sqlite3.connect(corpus.manifest_db) as db:
        assert db.execute("SELECT count(*) FROM samples").fetchone() == (9,)


# --- the command ------------------------------------------------------------------------------

def test_cli_ingest_reports_and_exits_zero(corpus):
    result = CliRunner().invoke(app, ["ingest", "--workspace", str(corpus.root)])
    assert result.exit_code == 0, result.output
    for name in BAD:
        assert f"img/{name}" in result.output
    assert "7 bad row(s) skipped" in result.output
    assert "ingested 9 train + 0 val images" in result.output
    assert "64x64" in result.output                          # the bucket table
    assert corpus.read_state()["ingest"]["train_count"] == 9


def test_cli_flags_override_project_toml(corpus):
    result = CliRunner().invoke(app, ["ingest", "-w", str(corpus.root), "--resolution", "32",
                                      "--keep_empty_captions"])
    assert result.exit_code == 0, result.output
    rows = read_manifest(corpus)
    assert {r.bucket for r in rows} == {(32, 32)} and len(rows) == 11  # + tiny, + uncaptioned


def test_cli_strict_exits_one_with_the_manifest_unchanged(corpus):
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", "-w", str(corpus.root)]).exit_code == 0
    old_bytes = corpus.manifest_db.read_bytes()
    result = runner.invoke(app, ["ingest", "-w", str(corpus.root), "--strict"])
    assert result.exit_code == 1
    assert "7 bad row(s) with --strict" in result.output and "img/truncated.jpg" in result.output
    assert corpus.manifest_db.read_bytes() == old_bytes


def test_cli_bad_csv_is_one_clear_error(corpus):
    (corpus.root / "data" / "train.csv").write_text("file,text\nx.jpg,y\n")
    result = CliRunner().invoke(app, ["ingest", "-w", str(corpus.root)])
    assert result.exit_code == 1
    assert "no column 'image_path', 'caption'" in result.output
    assert "'file', 'text'" in result.output


@pytest.mark.parametrize("caption", ["", "plain", 'quotes " and \\ backslash', "tab\tnew\nline",
                                     "ünïcödé 猫 🐈", "\x00\x1f control", "lone \udc80 surrogate"])
def test_fingerprint_lines_are_json_dumps(caption):
    """The fingerprint is hashed from json.dumps of each sample's fields; the fast line
    writer must give the same text, or every manifest's fingerprint would change."""
    for mask, dataset in ((None, 0), ("file:" + "ab" * 32, 0), ("alpha", 3)):
        fields = ["train", f"row {caption}", caption, "cd" * 32, 640, 480, 512, 384]
        fields += [mask] if mask is not None else []
        fields += [dataset] if dataset else []
        expected = json.dumps(fields) + "\n"
        assert manifest.Fingerprint.line("train", f"row {caption}", caption, "cd" * 32, 640,
                                         480, 512, 384, mask, dataset) == expected


def test_fingerprint_of_captions_that_need_escaping(tmp_path):
    """Captions JSON must escape (non-ASCII, quotes, backslashes, control characters, NUL)
    give the fingerprint of the rows as read back."""
    captions = ["plain caption", "ünïcödé 猫 🐈", 'a "quoted" word', "back\\slash",
                "tab\there", "nul \u0000 inside", "del \x7f char", "a / slash <tag>"]
    (tmp_path / "img").mkdir()
    lines = []
    for n, caption in enumerate(captions):
        noise(48, 48, 40 + n).save(tmp_path / "img" / f"{n}.png")
        lines.append(json.dumps({"file_name": f"img/{n}.png", "text": caption}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    ws = make_workspace(tmp_path, train_data_path="data.jsonl", image_column="file_name",
                        caption_column="text")
    run_ingest(ws, ws.config(), workers=1)
    rows = read_manifest(ws)
    assert sorted(r.caption for r in rows) == sorted(c.strip() for c in captions)
    assert manifest_fingerprint(ws) == compute_fingerprint(rows)


def test_duplicates_are_whole_hashes_not_prefixes(tmp_path):
    """Duplicate candidates are found by the first 15 hex digits of each hash; samples whose
    hashes only share those digits are not duplicates."""
    shared = "f" * 15
    hashes = [shared + "0" * 49, shared + "1" * 49, "a" * 64, shared + "0" * 49, "b" * 64]
    rows = [manifest.ManifestRow(split="train", source=f"row {n}", path=tmp_path / f"{n}.png",
                                 caption="c", sha256=sha, size_bytes=1, mtime_ns=1, width=32,
                                 height=32, format="PNG", bucket_w=32, bucket_h=32)
            for n, sha in enumerate(hashes)]
    path = tmp_path / "manifest.sqlite"
    manifest.write_manifest(path, rows, [], {})
    db = sqlite3.connect("", isolation_level=None)
    db.execute("ATTACH DATABASE ? AS m", (str(path),))
    scan = manifest.scan_samples(db, "m")
    assert scan.repeated_prefixes == [shared]
    assert scan.fingerprint == manifest.compute_fingerprint(rows)
    groups = manifest.duplicate_groups(db, "m", scan)
    assert [[r.source for r in group] for group in groups] == [["row 0", "row 3"]]


def test_pool_tasks_group_files_and_shard_members():
    """Image files go to the workers sixteen at a time; a shard's members up to 256 at a time,
    never mixed with another shard's."""
    files = [(f"/data/{n:03d}.png", "", -1, -1) for n in range(40)]
    members = [("/data/a.tar", f"{n:04d}.jpg", 512 * n, 100) for n in range(300)]
    members += [("/data/b.tar", f"{n:04d}.jpg", 512 * n, 100) for n in range(10)]
    chunks = ingest._chunks(sorted(files + members, key=lambda r: (r[0], r[2])))
    assert sorted(len(c) for c in chunks) == sorted([16, 16, 8, 256, 44, 10])
    assert all(len({ref[0] for ref in c}) == 1 for c in chunks if c[0][1])
    assert sum(len(c) for c in chunks) == 350
