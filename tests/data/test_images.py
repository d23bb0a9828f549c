"""Safe decoding: every colour mode becomes the right RGB pixels; every bad file a clear problem."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from ditctl.data.images import (ImageProblem, check_decodes, decode_rgb, probe_file, probe_rows,
                                to_rgb)

LIMIT = 10_000_000


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(image)[y, x])


def close(actual, expected, tolerance=6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


# --- colour modes -----------------------------------------------------------------------------

def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 0))       # fully transparent red
    image.putpixel((1, 0), (255, 0, 0, 255))                 # opaque red
    image.putpixel((2, 0), (0, 0, 0, 128))                   # half-transparent black
    out = decode_rgb(png_bytes(image), max_pixels=LIMIT)
    assert out.mode == "RGB"
    assert pixel(out, 0, 0) == (255, 255, 255)
    assert pixel(out, 1, 0) == (255, 0, 0)
    assert pixel(out, 2, 0) == (127, 127, 127)


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 0, 255])                   # index 0 black, index 1 blue
    image.putpixel((1, 0), 1)
    out = decode_rgb(png_bytes(image, transparency=0), max_pixels=LIMIT)
    assert pixel(out, 0, 0) == (255, 255, 255)               # transparent black -> white
    assert pixel(out, 1, 0) == (0, 0, 255)


def test_palette_without_transparency_keeps_its_colours():
    image = Image.new("P", (1, 1))
    image.putpalette([10, 20, 30])
    assert pixel(decode_rgb(png_bytes(image), max_pixels=LIMIT), 0, 0) == (10, 20, 30)


def test_grayscale_and_gray_alpha_are_expanded():
    gray = decode_rgb(png_bytes(Image.new("L", (1, 1), 77)), max_pixels=LIMIT)
    assert pixel(gray, 0, 0) == (77, 77, 77)
    gray_alpha = Image.new("LA", (2, 1), (0, 0))
    gray_alpha.putpixel((1, 0), (40, 255))
    out = decode_rgb(png_bytes(gray_alpha), max_pixels=LIMIT)
    assert pixel(out, 0, 0) == (255, 255, 255) and pixel(out, 1, 0) == (40, 40, 40)


def test_sixteen_bit_png_is_scaled_not_clipped():
    samples = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    data = png_bytes(Image.fromarray(samples))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_rgb(data, max_pixels=LIMIT)
    assert [pixel(out, x, 0)[0] for x in range(4)] == [0, 100, 128, 255]


def test_cmyk_jpeg_is_converted():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    out = decode_rgb(jpeg_bytes(cyan), max_pixels=LIMIT)
    assert close(pixel(out, 8, 8), (0, 255, 255))


def test_exif_orientation_is_applied():
    # Stored 32 wide x 16 tall: left half red, right half blue; orientation 6 = rotate 90° CW.
    stored = Image.new("RGB", (32, 16), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_rgb(jpeg_bytes(stored, exif=exif.tobytes()), max_pixels=LIMIT)
    assert out.size == (16, 32)
    assert close(pixel(out, 8, 4), (255, 0, 0))               # stored left is now on top
    assert close(pixel(out, 8, 28), (0, 0, 255))


def test_to_rgb_float_images_in_unit_range():
    out = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert [pixel(out, x, 0)[0] for x in range(3)] == [0, 128, 255]


# --- problems ---------------------------------------------------------------------------------

def problem_code(data: bytes, max_pixels: int = LIMIT) -> str:
    with pytest.raises(ImageProblem) as caught:
        decode_rgb(data, max_pixels=max_pixels)
    return caught.value.code


def test_bad_bytes_are_named_problems():
    good = jpeg_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    assert problem_code(b"") == "empty_file"
    assert problem_code(b"caption text, not pixels\n") == "not_image"
    assert problem_code(good[: len(good) // 2]) == "corrupt"


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    data = png_bytes(Image.new("RGB", (200, 100)))
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    with pytest.raises(ImageProblem) as caught:
        decode_rgb(data, max_pixels=19_999)
    assert caught.value.code == "too_many_pixels" and "200x100" in caught.value.message
    assert loads == []                                       # refused from the header alone


def test_limit_above_pils_default_is_honoured():
    # PIL alone refuses images above 2 x its MAX_IMAGE_PIXELS; our limit decides instead.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        out = decode_rgb(png_bytes(Image.new("L", (100, 100))), max_pixels=20_000)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert out.size == (100, 100) and Image.MAX_IMAGE_PIXELS == old


def test_probe_file_records_facts(tmp_path):
    path = tmp_path / "a.png"
    data = png_bytes(Image.new("RGB", (48, 32), (9, 9, 9)))
    path.write_bytes(data)
    facts = probe_file(str(path), max_pixels=LIMIT)
    assert (facts.width, facts.height, facts.format) == (48, 32, "PNG")
    assert facts.sha256 == hashlib.sha256(data).hexdigest()
    assert facts.size_bytes == len(data) and facts.mtime_ns == os.stat(path).st_mtime_ns


def test_probe_rows_collects_problems_without_raising(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    good = png_bytes(Image.new("RGB", (20, 10)))
    (tmp_path / "good.png").write_bytes(good)
    # a container: the good image at offset 100, then a member past its end (cut short)
    (tmp_path / "shard.tar").write_bytes(b"\0" * 100 + good)
    container = str(tmp_path / "shard.tar")
    refs = [(str(tmp_path / "missing.jpg"), "", -1, -1), (str(tmp_path / "empty.jpg"), "", -1, -1),
            (str(tmp_path / "folder.jpg"), "", -1, -1), (str(tmp_path / "good.png"), "", -1, -1),
            (container, "a.png", 100, len(good)), (container, "b.png", 100 + len(good), 50),
            (str(tmp_path / "gone.tar"), "c.png", 0, 10)]
    facts, problems = probe_rows(refs, LIMIT)
    assert [(f[0], f[7], f[4], f[5], f[8]) for f in facts] == [
        (str(tmp_path / "good.png"), "", 20, 10, -1), (container, "a.png", 20, 10, 100)]
    assert [(p[1], p[2]) for p in problems] == [
        ("", "missing"), ("", "empty_file"), ("", "not_image"), ("b.png", "truncated"),
        ("c.png", "missing")]


# --- validation (check_decodes) ---------------------------------------------------------------

def outcome(check, data: bytes):
    """The size an image decodes to, or the code of its problem."""
    try:
        result = check(data)
    except ImageProblem as problem:
        return problem.code
    return result if isinstance(result, tuple) else result.size


def photo(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth colour plus grain: compresses like a photo (long entropy-coded data)."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size)
    grain = rng.normal(0, 12, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(field, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("encoded", [
    pytest.param(lambda: jpeg_bytes(photo((96, 64))), id="jpeg"),
    pytest.param(lambda: jpeg_bytes(photo((640, 480)), progressive=True), id="progressive"),
    pytest.param(lambda: jpeg_bytes(photo((200, 120), "L")), id="grey-jpeg"),
    pytest.param(lambda: jpeg_bytes(photo((120, 80), "CMYK")), id="cmyk-jpeg"),
    pytest.param(lambda: png_bytes(photo((120, 80))), id="png"),
])
def test_validation_rejects_exactly_what_training_decode_rejects(encoded):
    # ingest checks a JPEG at 1/8 scale: every cut and every damaged byte must fail (or pass)
    # as the full decode of training does, and a good image must report the same size
    data = encoded()
    damaged = [data[:cut] for cut in np.linspace(0, len(data), 40, dtype=int)]
    for at in np.linspace(2, len(data) - 3, 40, dtype=int):
        changed = bytearray(data)
        changed[at] ^= 0xFF
        damaged.append(bytes(changed))
    for sample in [data, *damaged]:
        assert outcome(lambda d: check_decodes(d, max_pixels=LIMIT), sample) == \
            outcome(lambda d: decode_rgb(d, max_pixels=LIMIT), sample)


def test_validation_reports_the_upright_size_for_every_orientation():
    stored = photo((40, 24))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = jpeg_bytes(stored, exif=exif.tobytes())
        expected = decode_rgb(data, max_pixels=LIMIT).size
        assert check_decodes(data, max_pixels=LIMIT) == expected
        assert expected == ((24, 40) if orientation >= 5 else (40, 24))
    # an orientation given by XMP instead of EXIF (PIL honours both)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = jpeg_bytes(stored, xmp=xmp)
    assert check_decodes(data, max_pixels=LIMIT) == decode_rgb(data, max_pixels=LIMIT).size


def test_a_jpeg_is_validated_without_decoding_its_full_size_pixels(monkeypatch):
    data = jpeg_bytes(photo((512, 384)))
    loaded = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        loaded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    assert check_decodes(data, max_pixels=LIMIT) == (512, 384)
    assert loaded == [(64, 48)]                                  # decoded at 1/8 scale
