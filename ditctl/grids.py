"""Pictures for people: image grids with captions, a small line chart, PNG text metadata.

Everything here is drawn with Pillow alone (matplotlib is not a dependency). Grids are for
looking at, so tiny images are enlarged (nearest neighbour, whole factors: pixels stay sharp)
and huge ones shrunk; the individual PNGs keep their real size.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (120, 120, 120)
FONT_SIZE = 13
PAD = 4


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (a scalable one where FreeType is available); no system fonts."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


# --- PNG metadata -------------------------------------------------------------------------------

def png_bytes(image: Image.Image, text: Mapping[str, str] | None = None) -> bytes:
    """The PNG encoding of `image` with `text` stored as iTXt chunks (UTF-8, any length)."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_text(path: Path | str | bytes) -> dict[str, str]:
    """The text chunks of a PNG file (or its bytes)."""
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    with Image.open(source) as image:
        image.load()
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}


# --- grids --------------------------------------------------------------------------------------

def _cell_size(images: Sequence[Image.Image], min_cell: int, max_cell: int) -> tuple[int, float]:
    """(largest side of the images, the display scale): a whole-number enlargement up to
    `min_cell`, or a shrink down to `max_cell`."""
    side = max(max(im.size) for im in images)
    if side < min_cell:
        return side, float(max(1, min_cell // side))
    if side > max_cell:
        return side, max_cell / side
    return side, 1.0


def _scaled(image: Image.Image, scale: float) -> Image.Image:
    if scale == 1.0:
        return image.convert("RGB")
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    method = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, method)


def _wrap(text: str, width_px: int, draw: ImageDraw.ImageDraw, face) -> list[str]:
    """Greedy word wrap to `width_px` (long words are cut rather than overflowing)."""
    char_px = max(1.0, draw.textlength("n", font=face))
    return textwrap.wrap(text, width=max(4, int(width_px / char_px)), break_long_words=True) or [""]


def image_grid(rows: Sequence[Sequence[Image.Image | None]], *,
               row_labels: Sequence[str] | None = None,
               column_labels: Sequence[str] | None = None,
               min_cell: int = 128, max_cell: int = 512) -> Image.Image:
    """A grid: one row per entry of `rows`, a caption under each row, labels over the columns.

    Missing cells (None) stay blank. Cells are as large as the largest image, scaled for
    viewing (see module doc).
    """
    images = [im for row in rows for im in row if im is not None]
    if not images:
        raise ValueError("image_grid needs at least one image")
    n_cols = max(len(row) for row in rows)
    side, scale = _cell_size(images, min_cell, max_cell)
    cell = round(side * scale)
    face = font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = FONT_SIZE + 4
    width = n_cols * cell + (n_cols + 1) * PAD

    header = [_wrap(label, cell, probe, face) for label in column_labels] if column_labels else []
    header_h = (max(len(lines) for lines in header) * line_h + PAD) if header else 0
    captions = [_wrap(label, width - 2 * PAD, probe, face) for label in row_labels] if row_labels else []
    caption_h = [len(lines) * line_h for lines in captions] or [0] * len(rows)
    height = PAD + header_h + sum(cell + PAD + h + PAD for h in caption_h)

    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    y = PAD
    for col, lines in enumerate(header):
        for i, line in enumerate(lines):
            draw.text((PAD + col * (cell + PAD), y + i * line_h), line, fill=INK, font=face)
    y += header_h
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is None:
                continue
            shown = _scaled(image, scale)
            x0 = PAD + c * (cell + PAD) + (cell - shown.width) // 2
            grid.paste(shown, (x0, y + (cell - shown.height) // 2))
        y += cell + PAD
        for i, line in enumerate(captions[r] if captions else []):
            draw.text((PAD, y + i * line_h), line, fill=MUTED, font=face)
        y += caption_h[r] + PAD
    return grid


# --- a line chart -------------------------------------------------------------------------------

SERIES_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
                  (23, 190, 207), (140, 86, 75), (227, 119, 194))


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= step * m)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _labels(ticks: Sequence[float]) -> list[str]:
    """Tick labels with just enough decimals to tell neighbouring ticks apart."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = 0
    while decimals < 10 and abs(round(step, decimals) - step) > step * 1e-6:
        decimals += 1
    if max(abs(t) for t in ticks) >= 1e7:
        return [f"{t:.3e}" for t in ticks]
    return [f"{t:.{decimals}f}" for t in ticks]


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str = "",
               x_label: str = "", y_label: str = "", size: tuple[int, int] = (640, 360)) -> Image.Image:
    """Lines through (x, y) points, one colour per series, with axes, ticks and a legend."""
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("line_chart needs at least one point")
    face = font(12)
    width, height = size
    left, right, top, bottom = 70, 20, 30 if title else 12, 46
    xs = _ticks(min(p[0] for p in points), max(p[0] for p in points))
    ys = _ticks(min(p[1] for p in points), max(p[1] for p in points))
    x_lo, x_hi, y_lo, y_hi = xs[0], xs[-1], ys[0], ys[-1]

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
        return px, py

    chart = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(chart)
    if title:
        draw.text((left, 8), title, fill=INK, font=font(14))
    for y, text in zip(ys, _labels(ys)):
        _, py = to_px(x_lo, y)
        draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
        draw.text((left - 6 - draw.textlength(text, font=face), py - 7), text, fill=INK, font=face)
    for x, text in zip(xs, _labels(xs)):
        px, _ = to_px(x, y_lo)
        draw.line([(px, height - bottom), (px, height - bottom + 4)], fill=INK)
        draw.text((px - draw.textlength(text, font=face) / 2, height - bottom + 6), text,
                  fill=INK, font=face)
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill=INK)
    if x_label:
        draw.text(((left + width - right) / 2 - draw.textlength(x_label, font=face) / 2,
                   height - 18), x_label, fill=INK, font=face)
    if y_label:
        draw.text((6, top - 4 if not title else 12), y_label, fill=MUTED, font=face)

    for i, (name, values) in enumerate(series.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        pixels = [to_px(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        if len(series) > 1 or name:
            lx, ly = width - right - 170, top + 4 + i * 16
            draw.rectangle((lx, ly + 4, lx + 10, ly + 12), fill=colour)
            draw.text((lx + 14, ly), name, fill=INK, font=face)
    return chart
