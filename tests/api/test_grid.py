"""The result picture: layout, text tiles and the scaling of tiles, on images made in memory."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from api.grid import (
    CAPTION,
    PAD,
    PER_ROW,
    QUERY_FRAME,
    TILE,
    Tile,
    fit,
    render_grid,
    text_tile,
)

CELL_W, CELL_H = TILE + PAD, TILE + CAPTION + PAD
FOOTER = 24
RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (28, 28)) -> Image.Image:
    return Image.new("RGB", size, color)


def tiles(count: int, color: tuple[int, int, int] = GREEN) -> list[Tile]:
    return [Tile(solid(color), f"#{i + 1}", "Sneaker 0.91") for i in range(count)]


def grid(count: int, *, warning: str | None = None) -> Image.Image:
    data = render_grid(
        Tile(solid(RED), "query", "upload"), tiles(count), footer="f", warning=warning
    )
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


def tile_centre(column: int, row: int) -> tuple[int, int]:
    return PAD + column * CELL_W + TILE // 2, PAD + row * CELL_H + TILE // 2


@pytest.mark.parametrize(
    ("matches", "columns", "rows"),
    [(0, 2, 1), (1, 2, 1), (3, 4, 1), (5, 6, 1), (6, 6, 2), (10, 6, 2), (11, 6, 3)],
)
def test_render_grid_size_follows_the_layout(matches: int, columns: int, rows: int) -> None:
    image = grid(matches)

    assert image.size == (PAD + columns * CELL_W, PAD + rows * CELL_H + FOOTER)


def test_render_grid_wraps_after_five_matches() -> None:
    image = grid(PER_ROW + 2)

    assert image.getpixel(tile_centre(0, 0)) == RED  # the query, first column
    for column in range(1, PER_ROW + 1):
        assert image.getpixel(tile_centre(column, 0)) == GREEN
    assert image.getpixel(tile_centre(1, 1)) == GREEN  # match 6
    assert image.getpixel(tile_centre(2, 1)) == GREEN  # match 7
    assert image.getpixel(tile_centre(3, 1)) == (255, 255, 255)  # nothing after it
    assert image.getpixel(tile_centre(0, 1)) == (255, 255, 255)  # the query is not repeated


def test_render_grid_frames_the_query() -> None:
    image = grid(2)

    assert image.getpixel((PAD - 2, PAD + TILE // 2)) == QUERY_FRAME
    assert image.getpixel((PAD + CELL_W - 2, PAD + TILE // 2)) != QUERY_FRAME


def test_render_grid_warning_adds_a_line_below() -> None:
    plain, warned = grid(3), grid(3, warning="The model is random: matches are meaningless.")

    assert warned.width == plain.width
    assert warned.height == plain.height + 22
    band = np.asarray(warned)[plain.height - 2 :, :, :]
    assert (band != 255).any()  # the warning is drawn in the added band


def test_render_grid_letterboxes_a_wide_image_on_black() -> None:
    query = Tile(solid(BLUE, (400, 100)), "query", "upload")

    data = render_grid(query, [], footer="f")

    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.getpixel((PAD + TILE // 2, PAD + TILE // 2)) == BLUE
    assert image.getpixel((PAD + TILE // 2, PAD + 5)) == (0, 0, 0)


def test_text_tile_draws_the_text() -> None:
    tile = text_tile("a red shoe with white laces")

    assert tile.size == (TILE, TILE)
    assert tile.mode == "RGB"
    pixels = np.asarray(tile)
    assert tuple(pixels[0, 0]) == (241, 245, 249)  # the tile's background
    assert (pixels.max(axis=2) < 128).sum() > 50  # dark ink: the letters


def test_text_tile_of_a_long_text_stays_a_tile() -> None:
    short, long = text_tile("shoe"), text_tile("word " * 200)

    assert long.size == (TILE, TILE)
    assert np.count_nonzero(np.asarray(long) != np.asarray(long)[0, 0]) > np.count_nonzero(
        np.asarray(short) != np.asarray(short)[0, 0]
    )


def test_fit_upscales_small_images_with_nearest_neighbour() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)

    scaled = fit(Image.fromarray(pixels, mode="L"), 224)

    assert scaled.size == (224, 224)
    assert scaled.mode == "RGB"
    array = np.asarray(scaled)
    expected = np.kron(pixels, np.ones((8, 8), dtype=np.uint8))
    for channel in range(3):
        np.testing.assert_array_equal(array[:, :, channel], expected)


def test_fit_downscales_large_images_to_fit_keeping_the_aspect_ratio() -> None:
    scaled = fit(solid(BLUE, (1000, 500)), TILE)

    assert scaled.size == (TILE, TILE // 2)
    assert scaled.getpixel((TILE // 2, TILE // 4)) == BLUE


def test_fit_scales_a_tall_image_by_its_height() -> None:
    assert fit(solid(BLUE, (30, 600)), TILE).size == (8, TILE)


def test_fit_never_makes_an_empty_image() -> None:
    assert fit(solid(BLUE, (4000, 1)), TILE).size == (TILE, 1)
