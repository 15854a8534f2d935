"""decode_upload and to_rgb on images made in memory with Pillow."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from shared.errors import ImageRejected
from shared.images import (
    CORRUPT,
    EMPTY,
    MAX_ASPECT_RATIO,
    METADATA_TOO_LARGE,
    NOT_AN_IMAGE,
    SHRINK_TO,
    TOO_MANY_PIXELS,
    centre_square,
    decode_pixels,
    decode_upload,
    encode_pixels,
    is_pixels,
    pixels_array,
    stored_image,
    stored_pixels,
    to_rgb,
    upload_pixels,
)
from shared.settings import StorageSettings

MAX_PIXELS = StorageSettings.model_fields["max_image_pixels"].default
RED = (200, 30, 30)


def encode(image: Image.Image, image_format: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def decode(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    return decode_upload(data, max_pixels=max_pixels).image


def noise(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def close(pixel: tuple[int, ...], expected: tuple[int, ...], *, tolerance: int = 2) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def rejection(data: bytes, *, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(ImageRejected) as caught:
        decode_upload(data, max_pixels=max_pixels)
    return str(caught.value)


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR is patched to declare ``width`` x ``height`` (CRC fixed)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --- accepted formats and modes ---------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_decode_accepts_format_as_rgb(image_format: str) -> None:
    data = encode(Image.new("RGB", (9, 7), RED), image_format)

    decoded = decode_upload(data, max_pixels=MAX_PIXELS)

    assert decoded.format == image_format
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == decoded.image.size == (9, 7)
    assert close(decoded.image.getpixel((4, 3)), RED, tolerance=12)


def _palette_image(*, transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 255] + [10, 200, 20] * 255)
    if transparent:
        image.info["transparency"] = 1
    return image


def _i16(value: int) -> Image.Image:
    return Image.fromarray(np.full((4, 4), value, dtype=np.uint16))


def _float(value: float) -> Image.Image:
    return Image.fromarray(np.full((4, 4), value, dtype=np.float32))


MODES = [
    pytest.param(Image.new("L", (4, 4), 100), (100, 100, 100), id="L"),
    pytest.param(Image.new("LA", (4, 4), (100, 255)), (100, 100, 100), id="LA-opaque"),
    pytest.param(Image.new("LA", (4, 4), (100, 0)), (0, 0, 0), id="LA-transparent"),
    pytest.param(_palette_image(transparent=False), (10, 200, 20), id="P"),
    pytest.param(_palette_image(transparent=True), (0, 0, 0), id="P-transparency"),
    pytest.param(Image.new("RGBA", (4, 4), (*RED, 255)), RED, id="RGBA-opaque"),
    pytest.param(Image.new("RGBA", (4, 4), (200, 100, 50, 128)), (100, 50, 25), id="RGBA-half"),
    pytest.param(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0), id="CMYK"),
    pytest.param(_i16(32768), (128, 128, 128), id="I;16-mid-grey"),
    pytest.param(_i16(65535), (255, 255, 255), id="I;16-white"),
    pytest.param(_float(0.5), (128, 128, 128), id="F-unit-range"),
    pytest.param(_float(200.0), (200, 200, 200), id="F-byte-range"),
    pytest.param(Image.new("1", (4, 4), 1), (255, 255, 255), id="1"),
]


@pytest.mark.parametrize(("image", "expected"), MODES)
def test_to_rgb_converts_mode(image: Image.Image, expected: tuple[int, int, int]) -> None:
    rgb = to_rgb(image)

    assert rgb.mode == "RGB"
    assert rgb.size == image.size
    assert close(rgb.getpixel((1, 1)), expected)


@pytest.mark.parametrize(
    ("image", "image_format", "expected"),
    [
        pytest.param(Image.new("L", (4, 4), 100), "PNG", (100, 100, 100), id="L-png"),
        pytest.param(Image.new("LA", (4, 4), (100, 0)), "PNG", (0, 0, 0), id="LA-png"),
        pytest.param(_palette_image(transparent=False), "PNG", (10, 200, 20), id="P-png"),
        pytest.param(_palette_image(transparent=True), "PNG", (0, 0, 0), id="P-transparent-png"),
        pytest.param(_palette_image(transparent=True), "GIF", (0, 0, 0), id="P-transparent-gif"),
        pytest.param(Image.new("RGBA", (4, 4), (*RED, 255)), "WEBP", RED, id="RGBA-webp"),
        pytest.param(
            Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", (255, 0, 0), id="CMYK-jpeg"
        ),
        pytest.param(
            Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF", (255, 0, 0), id="CMYK-tiff"
        ),
        pytest.param(_i16(32768), "PNG", (128, 128, 128), id="I;16-png"),
        pytest.param(_i16(32768), "TIFF", (128, 128, 128), id="I;16-tiff"),
        pytest.param(_float(0.5), "TIFF", (128, 128, 128), id="F-tiff"),
    ],
)
def test_decode_converts_stored_mode(
    image: Image.Image, image_format: str, expected: tuple[int, int, int]
) -> None:
    rgb = decode(encode(image, image_format))

    assert rgb.mode == "RGB"
    assert close(rgb.getpixel((1, 1)), expected, tolerance=6)


def test_decode_sixteen_bit_grey_png_is_not_white() -> None:
    data = encode(_i16(32768), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored on 16 bits

    pixel = decode(data).getpixel((0, 0))

    assert close(pixel, (128, 128, 128), tolerance=1)


def test_decode_applies_exif_orientation() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)

    decoded = decode_upload(data, max_pixels=MAX_PIXELS)

    assert decoded.image.size == (20, 40)
    assert close(decoded.image.getpixel((10, 5)), (255, 0, 0), tolerance=40)  # left went up
    assert close(decoded.image.getpixel((10, 35)), (0, 0, 255), tolerance=40)


def test_decode_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2

    assert close(decode(data).getpixel((4, 4)), (255, 0, 0))


def test_decode_one_pixel_image() -> None:
    rgb = decode(encode(Image.new("L", (1, 1), 77), "PNG"))

    assert rgb.size == (1, 1)
    assert rgb.getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1, 20000), (1, MAX_ASPECT_RATIO)), ((20000, 1), (MAX_ASPECT_RATIO, 1)), ((3, 100), (3, 24))],
)
def test_decode_crops_extreme_aspect_ratio(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    decoded = decode_upload(encode(Image.new("L", size, 9), "PNG"), max_pixels=MAX_PIXELS)

    assert decoded.image.size == expected
    assert max(decoded.image.size) <= MAX_ASPECT_RATIO * min(decoded.image.size)
    assert (decoded.width, decoded.height) == size  # the declared size is reported


def test_to_rgb_crops_the_centre_of_a_long_strip() -> None:
    strip = np.zeros((1, 100), dtype=np.uint8)
    strip[0, 46:54] = 255  # the centre eight pixels

    rgb = to_rgb(Image.fromarray(strip, mode="L"))

    assert rgb.size == (8, 1)
    assert all(rgb.getpixel((x, 0)) == (255, 255, 255) for x in range(8))


def test_to_rgb_keeps_moderate_aspect_ratio() -> None:
    assert to_rgb(Image.new("L", (8, 64))).size == (8, 64)


# --- refusals -----------------------------------------------------------------------------------


def test_decode_refuses_empty_upload() -> None:
    assert rejection(b"") == EMPTY


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is plain text\n",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" '
        b'height="10"><rect width="10" height="10"/></svg>',
        b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
    ],
    ids=["text", "pdf", "svg", "html"],
)
def test_decode_refuses_non_image(data: bytes) -> None:
    assert rejection(data) == NOT_AN_IMAGE


def test_decode_refuses_eps_even_when_named_png() -> None:
    try:
        data = encode(Image.new("RGB", (8, 8), RED), "EPS")
    except (OSError, KeyError) as error:  # pragma: no cover - Pillow without EPS support
        pytest.skip(f"Pillow cannot write EPS here: {error}")
    assert data.startswith(b"%!PS")
    upload_name = "holiday.png"  # the name is never trusted: decode_upload does not see it
    assert upload_name.endswith(".png")

    assert rejection(data) == NOT_AN_IMAGE


def test_decode_refuses_truncated_png() -> None:
    data = encode(noise(64, 64), "PNG")

    assert rejection(data[: len(data) // 2]) == CORRUPT


def test_decode_refuses_truncated_jpeg() -> None:
    data = encode(noise(64, 64), "JPEG")

    assert rejection(data[: len(data) // 2]) == CORRUPT


def test_decode_refuses_png_with_corrupted_crc() -> None:
    data = bytearray(encode(noise(16, 16), "PNG"))
    data[29] ^= 0xFF  # first byte of the IHDR chunk's CRC

    assert rejection(bytes(data)) in (CORRUPT, NOT_AN_IMAGE)


def test_decode_refuses_png_whose_pixels_are_missing() -> None:
    assert rejection(png_declaring(3000, 3000)) == CORRUPT


def test_decode_refuses_decompression_bomb() -> None:
    bomb = png_declaring(30000, 30000)
    assert len(bomb) < 100

    assert rejection(bomb) == TOO_MANY_PIXELS


def test_decode_refuses_decompression_bomb_even_with_huge_max_pixels() -> None:
    assert rejection(png_declaring(30000, 30000), max_pixels=10**12) == TOO_MANY_PIXELS


def test_decode_refuses_image_over_max_pixels() -> None:
    data = encode(Image.new("L", (100, 100)), "PNG")

    assert rejection(data, max_pixels=9_999) == TOO_MANY_PIXELS
    assert decode(data, max_pixels=10_000).size == (100, 100)


def _tiff_with_double_strip_offset() -> bytes:
    """A 1x1 grey TIFF whose StripOffsets tag is typed DOUBLE instead of LONG."""
    entries = [
        (256, 3, 1),  # ImageWidth
        (257, 3, 1),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # PhotometricInterpretation: black is zero
        (273, 12, None),  # StripOffsets, as a DOUBLE stored after the IFD
        (277, 3, 1),  # SamplesPerPixel
        (278, 3, 1),  # RowsPerStrip
        (279, 4, 1),  # StripByteCounts
    ]
    double_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        if value is None:
            ifd += struct.pack("<HHII", tag, kind, 1, double_at)
        elif kind == 3:
            ifd += struct.pack("<HHIHH", tag, kind, 1, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, kind, 1, value)
    ifd += struct.pack("<I", 0)
    pixel = struct.pack("<d", float(double_at + 8)) + b"\x80"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + pixel


def test_decode_refuses_tiff_with_float_strip_offset() -> None:
    assert rejection(_tiff_with_double_strip_offset()) in (CORRUPT, NOT_AN_IMAGE)


MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data"
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(prefix=st.sampled_from(MAGIC), body=st.binary(max_size=300))
def test_decode_raises_only_image_rejected_on_arbitrary_bytes(prefix: bytes, body: bytes) -> None:
    try:
        decoded = decode_upload(prefix + body, max_pixels=MAX_PIXELS)
    except ImageRejected:
        return
    assert decoded.image.mode == "RGB"


# --- large images are shrunk early ---------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["PNG", "TIFF", "BMP"])
def test_large_image_is_shrunk_keeping_twice_what_clip_sees(image_format: str) -> None:
    image = decode(encode(noise(4000, 3000), image_format))

    assert SHRINK_TO <= min(image.size) < 2 * SHRINK_TO
    assert image.size in ((4000 // 6, 3000 // 6), (-(-4000 // 6), 3000 // 6))  # 1/6


def test_large_sixteen_bit_image_is_shrunk_and_not_white() -> None:
    grey = Image.fromarray(np.full((2000, 3000), 257 * 100, dtype=np.uint16))

    image = decode(encode(grey, "PNG"))

    assert min(image.size) < 2 * SHRINK_TO
    assert close(image.getpixel((10, 10)), (100, 100, 100))


def test_large_jpeg_keeps_its_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated a quarter turn: portrait
    data = encode(noise(3000, 2000), "JPEG", exif=exif.tobytes())

    image = decode(data)

    assert image.width < image.height
    assert min(image.size) >= 224


def test_large_palette_image_with_transparency_is_shrunk_onto_black() -> None:
    palette = Image.new("P", (3000, 2000), 0)
    palette.putpalette([255, 255, 255] * 256)
    data = encode(palette, "PNG", transparency=0)

    image = decode(data)

    assert min(image.size) < 2 * SHRINK_TO
    assert image.getpixel((5, 5)) == (0, 0, 0)


# --- the pixels a job keeps -------------------------------------------------------------------


def png_with_text_chunk(inflated: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    bomb = b"comment\x00\x00" + zlib.compress(b"a" * inflated, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"zTXt", bomb)
        + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + chunk(b"IEND", b"")
    )


def test_a_png_text_chunk_bomb_is_refused_with_a_sentence_that_says_so() -> None:
    data = png_with_text_chunk(20 * 1024 * 1024)
    assert len(data) < 64 * 1024
    assert rejection(data) == METADATA_TOO_LARGE


def test_centre_square_keeps_the_middle_of_a_wide_or_tall_image() -> None:
    wide = Image.new("RGB", (30, 10), RED)
    wide.paste((0, 0, 255), (10, 0, 20, 10))
    assert centre_square(wide).size == (10, 10)
    assert centre_square(wide).getpixel((5, 5)) == (0, 0, 255)
    tall = noise(7, 21)
    assert centre_square(tall).tobytes() == tall.crop((0, 7, 7, 14)).tobytes()
    square = noise(9, 9)
    assert centre_square(square) is square


@pytest.mark.parametrize("size", [(1, 1), (28, 28), (300, 200)])
def test_pixels_round_trip(size: tuple[int, int]) -> None:
    image = noise(*size)
    data = encode_pixels(image)
    assert is_pixels(data)
    assert len(data) == 9 + size[0] * size[1] * 3
    assert decode_pixels(data).tobytes() == image.tobytes()


def test_pixels_are_read_in_place_as_an_array() -> None:
    image = noise(30, 20)
    data = encode_pixels(image)
    array = pixels_array(data)
    assert array.shape == (20, 30, 3) and array.dtype == np.uint8
    assert np.array_equal(array, np.asarray(image))
    assert not array.flags.owndata and not array.flags.writeable  # a view of ``data``
    assert encode_pixels(array) == data
    assert stored_pixels(data, max_pixels=MAX_PIXELS) is not None
    assert np.array_equal(stored_pixels(encode(image, "PNG"), max_pixels=MAX_PIXELS), array)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:5],
        lambda d: d[:-1],
        lambda d: d + b"\0",
        lambda d: b"LKPX\x02" + d[5:],
        lambda d: d[:5] + b"\0\0" + d[7:],
    ],
)
def test_damaged_pixels_are_refused_without_decoding(damage: object) -> None:
    data = encode_pixels(noise(4, 4))
    with pytest.raises(ImageRejected):
        decode_pixels(damage(data))  # type: ignore[operator]
    with pytest.raises(ImageRejected):
        stored_pixels(damage(data), max_pixels=MAX_PIXELS)  # type: ignore[operator]


def test_an_upload_keeps_the_centre_square_of_its_decoded_image() -> None:
    photo = noise(600, 400)
    kept = decode_pixels(upload_pixels(encode(photo, "PNG"), max_pixels=MAX_PIXELS))
    assert kept.size == (400, 400)
    assert kept.tobytes() == photo.crop((100, 0, 500, 400)).tobytes()


def test_stored_image_reads_pixels_and_older_raw_uploads_alike() -> None:
    image = noise(28, 28)
    assert stored_image(encode_pixels(image), max_pixels=MAX_PIXELS).tobytes() == image.tobytes()
    assert stored_image(encode(image, "PNG"), max_pixels=MAX_PIXELS).tobytes() == image.tobytes()
    with pytest.raises(ImageRejected):
        stored_image(png_declaring(50_000, 50_000), max_pixels=MAX_PIXELS)
