"""Decoding uploads and converting every image to RGB the same way.

Both sides use these functions: the API to refuse bad uploads before they are queued, the
worker to decode the stored bytes, and the gallery builder to convert its 28x28 grey images.
One conversion for all keeps a gallery image sent as an upload identical to itself.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from shared.errors import ImageRejected

# Pillow's own detection decides the format; the filename and content type are never trusted.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"

# CLIP resizes the short side to 224 and keeps the centre square. Beyond this aspect ratio the
# long side is cropped first, so a 1x20000 strip cannot become a 224x4,480,000 array.
MAX_ASPECT_RATIO = 8
# Large JPEGs are decoded at a reduced scale (by the DCT: 1/2, 1/4 or 1/8, and the cheaper the
# smaller) that keeps both sides at least 224 pixels: CLIP resizes the short side to 224 anyway.
JPEG_DRAFT_SIZE = (224, 224)
# Other large images are shrunk after decoding, keeping twice what CLIP looks at.
SHRINK_TO = 448

ImageFile.LOAD_TRUNCATED_IMAGES = False

EMPTY = "The upload is empty."
NOT_AN_IMAGE = f"The upload is not a {ACCEPTED_NAMES} image."
CORRUPT = "The image is corrupt or truncated."
TOO_MANY_PIXELS = "The image has too many pixels."


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    format: str
    width: int
    height: int


def decode_upload(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Decode ``data`` fully and return it as RGB, or raise :class:`ImageRejected`.

    ``max_pixels`` is checked on the declared size, before anything is decompressed, which is
    what stops decompression bombs.
    """
    if not data:
        raise ImageRejected(EMPTY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageRejected(TOO_MANY_PIXELS) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ImageRejected(NOT_AN_IMAGE) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected(CORRUPT)
    if width * height > max_pixels:
        raise ImageRejected(TOO_MANY_PIXELS)
    image_format = str(image.format)
    try:
        if image_format == "JPEG":
            image.draft("RGB", JPEG_DRAFT_SIZE)
        image.load()
        rgb = to_rgb(image)
    except ImageRejected:
        raise
    except (
        Exception
    ):  # Pillow's decoders raise many types on bad input (TypeError, struct.error...)
        raise ImageRejected(CORRUPT) from None
    return DecodedImage(image=rgb, format=image_format, width=width, height=height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB, the one conversion used everywhere.

    EXIF orientation is applied; 16-bit and float images are rescaled to 8 bits (a plain
    ``convert`` clips them to white); transparency is flattened onto black, the background
    of Fashion-MNIST; extreme aspect ratios are centre-cropped to ``MAX_ASPECT_RATIO``.
    """
    orientation = _orientation(image)
    image = _shrink(_crop_extreme_aspect(image))  # before any copy of the full-size image
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _to_8bit(image)
        mode = image.mode
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_REDUCIBLE = ("L", "LA", "PA", "RGB", "RGBA", "CMYK", "I", "F", "YCbCr")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except (ValueError, TypeError, OSError):  # a broken EXIF block: shown as stored
        return 1


def _shrink(image: Image.Image) -> Image.Image:
    """Large images shrunk by a whole factor (box filter) while the short side stays at least
    ``SHRINK_TO``: CLIP sees 224 pixels, and every later copy and conversion gets cheaper."""
    factor = min(image.size) // SHRINK_TO
    if factor < 2:
        return image
    if image.mode in _REDUCIBLE:
        return image.reduce(factor)
    size = (image.width // factor, image.height // factor)
    return image.resize(size, Image.Resampling.BOX)  # 1 and P are resized by nearest


def _to_8bit(image: Image.Image) -> Image.Image:
    array = np.asarray(image)
    if image.mode == "F":
        values = array.astype(np.float64)
        top = float(values.max()) if values.size else 1.0
        scale = 255.0 if top <= 1.0 else 1.0
        eight = np.clip(values * scale, 0, 255)
    else:
        eight = np.clip(array.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(eight).astype(np.uint8), mode="L")


def _crop_extreme_aspect(image: Image.Image) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= short * MAX_ASPECT_RATIO:
        return image
    keep = short * MAX_ASPECT_RATIO
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))
