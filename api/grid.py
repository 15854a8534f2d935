"""The result picture: the query beside its matches, each labelled with rank, class and score.

Pure Pillow, no torch: the API renders it for ``GET /jobs/<id>/grid.png``.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

TILE = 160
PAD = 12
CAPTION = 40
PER_ROW = 5
BACKGROUND = (255, 255, 255)
INK = (30, 30, 36)
MUTED = (110, 110, 120)
QUERY_FRAME = (37, 99, 235)
WARNING = (185, 28, 28)


@dataclass(frozen=True)
class Tile:
    image: Image.Image
    title: str
    subtitle: str


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def fit(image: Image.Image, size: int) -> Image.Image:
    """``image`` scaled to fit a ``size`` square: crisp pixels when enlarged 2x or more."""
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(new_size, resample)


def blank_tile() -> Image.Image:
    """An item whose image is gone (deleted since the search): an empty grey tile."""
    return Image.new("RGB", (TILE, TILE), (226, 232, 240))


def text_tile(text: str) -> Image.Image:
    """A text query drawn as a tile."""
    tile = Image.new("RGB", (TILE, TILE), (241, 245, 249))
    draw = ImageDraw.Draw(tile)
    lines = textwrap.wrap(f"\u201c{text}\u201d", width=18)[:7]
    font = _font(15)
    y = max(8, (TILE - 20 * len(lines)) // 2)
    for line in lines:
        draw.text((10, y), line, fill=INK, font=font)
        y += 20
    return tile


def render_grid(
    query: Tile, matches: Sequence[Tile], *, footer: str, warning: str | None = None
) -> bytes:
    """PNG bytes: the query tile (framed) then the match tiles, ``PER_ROW`` per row."""
    columns = 1 + min(PER_ROW, max(1, len(matches)))
    rows = max(1, -(-len(matches) // PER_ROW))
    cell_w, cell_h = TILE + PAD, TILE + CAPTION + PAD
    footer_h = 24 + (22 if warning else 0)
    width = PAD + columns * cell_w
    height = PAD + rows * cell_h + footer_h
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    title_font, small_font = _font(14), _font(12)

    def place(tile: Tile, column: int, row: int, *, framed: bool = False) -> None:
        x, y = PAD + column * cell_w, PAD + row * cell_h
        picture = fit(tile.image, TILE)
        offset = ((TILE - picture.width) // 2, (TILE - picture.height) // 2)
        draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), fill=(0, 0, 0))
        canvas.paste(picture, (x + offset[0], y + offset[1]))
        if framed:
            draw.rectangle((x - 3, y - 3, x + TILE + 2, y + TILE + 2), outline=QUERY_FRAME, width=3)
        draw.text((x, y + TILE + 5), tile.title, fill=INK, font=title_font)
        draw.text((x, y + TILE + 22), tile.subtitle, fill=MUTED, font=small_font)

    place(query, 0, 0, framed=True)
    for i, tile in enumerate(matches):
        place(tile, 1 + i % PER_ROW, i // PER_ROW)
    y = PAD + rows * cell_h
    draw.text((PAD, y), footer, fill=MUTED, font=small_font)
    if warning:
        draw.text((PAD, y + 20), warning, fill=WARNING, font=title_font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
