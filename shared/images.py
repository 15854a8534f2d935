"""Decoding uploads, converting every image to RGB the same way, and the pixels a job keeps.

The API decodes each upload once, to refuse bad ones before they are queued, and stores it
decoded, as raw RGB in a small self-describing frame (:func:`encode_pixels`), bounded in size
(:func:`upload_pixels`). The worker reads those pixels without decoding anything and resizes
them in batches (worker.preprocess); the result picture is drawn from them. The gallery
builder converts its 28x28 grey images with the same :func:`to_rgb`, so a gallery image sent
as an upload stays identical to itself.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
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
METADATA_TOO_LARGE = "The image's text metadata (PNG text chunks) is too large."
BAD_PIXELS = "The stored pixels of the job are damaged."

# Pillow's own guards against PNG text-chunk bombs (zTXt/iTXt inflating to megabytes).
_TEXT_CHUNK_ERRORS = ("decompressed data too large", "too much memory used in text chunks")


def _text_chunk_bomb(error: ValueError) -> bool:
    return str(error).lower().startswith(_TEXT_CHUNK_ERRORS)


# raw RGB pixels: magic, version, width, height (big-endian u16), then width*height*3 bytes
PIXELS_MAGIC = b"LKPX"
_PIXELS_HEADER = struct.Struct(">4sBHH")


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
    except ValueError as error:
        if _text_chunk_bomb(error):
            raise ImageRejected(METADATA_TOO_LARGE) from None
        raise ImageRejected(NOT_AN_IMAGE) from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError):
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
    except ValueError as error:
        if _text_chunk_bomb(error):
            raise ImageRejected(METADATA_TOO_LARGE) from None
        raise ImageRejected(CORRUPT) from None
    except Exception:  # Pillow's decoders raise many types on bad input (TypeError, struct...)
        raise ImageRejected(CORRUPT) from None
    return DecodedImage(image=rgb, format=image_format, width=width, height=height)


@dataclass(frozen=True)
class InputSpec:
    """What a CLIP checkpoint's image processor makes of an image before normalising it:
    the short side resized to ``shortest_edge`` (with ``resample``), then the centre
    ``crop_height`` x ``crop_width`` kept. Workers announce theirs (worker.heartbeat)."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    resample: int = Image.Resampling.BICUBIC

    def as_dict(self) -> dict[str, int]:
        return {
            "shortest_edge": self.shortest_edge,
            "crop_height": self.crop_height,
            "crop_width": self.crop_width,
            "resample": int(self.resample),
        }

    @classmethod
    def from_dict(cls, raw: object) -> InputSpec | None:
        """The spec a worker announced, or None if it is missing or not plausible."""
        if not isinstance(raw, dict):
            return None
        try:
            spec = cls(
                shortest_edge=int(raw["shortest_edge"]),
                crop_height=int(raw["crop_height"]),
                crop_width=int(raw["crop_width"]),
                resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
            )
        except (KeyError, TypeError, ValueError):
            return None
        sides = (spec.shortest_edge, spec.crop_height, spec.crop_width)
        if not all(16 <= side <= 1024 for side in sides) or spec.resample not in range(6):
            return None
        return spec


def model_input(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize and crop exactly as CLIP's image processor does (same sizes, same rounding, the
    same Pillow resampling), leaving only the normalisation to the model's side."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(spec.shortest_edge * long / short)
    size = (spec.shortest_edge, new_long) if width <= height else (new_long, spec.shortest_edge)
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling(spec.resample))
    if image.size == (spec.crop_width, spec.crop_height):
        return image
    top = (image.height - spec.crop_height) // 2
    left = (image.width - spec.crop_width) // 2
    if top < 0 or left < 0:  # a crop larger than the resized image: the processor pads
        canvas = Image.new(
            "RGB", (max(image.width, spec.crop_width), max(image.height, spec.crop_height))
        )
        canvas.paste(image, (max(0, -left), max(0, -top)))
        image, top, left = canvas, max(0, top), max(0, left)
    return image.crop((left, top, left + spec.crop_width, top + spec.crop_height))


def centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square: the part of an image CLIP looks at (it resizes the short
    side, then keeps the centre square)."""
    width, height = image.size
    side = min(width, height)
    if width == height:
        return image
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def encode_pixels(image: Image.Image | npt.NDArray[np.uint8]) -> bytes:
    """An RGB image (or HxWx3 uint8 pixels) as raw pixels in a small frame: what a job keeps
    of its upload."""
    if isinstance(image, np.ndarray):
        (height, width), body = image.shape[:2], image.tobytes()
    else:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        (width, height), body = rgb.size, rgb.tobytes()
    return _PIXELS_HEADER.pack(PIXELS_MAGIC, 1, width, height) + body


def is_pixels(data: bytes) -> bool:
    return data[:4] == PIXELS_MAGIC


def pixels_array(data: bytes) -> npt.NDArray[np.uint8]:
    """The HxWx3 uint8 pixels of an :func:`encode_pixels` frame, read in place (no copy; the
    array is read-only), or :class:`ImageRejected` if the frame is damaged. Nothing is
    decompressed: the size is the frame's length, checked before use."""
    if len(data) < _PIXELS_HEADER.size:
        raise ImageRejected(BAD_PIXELS)
    magic, version, width, height = _PIXELS_HEADER.unpack_from(data)
    body = len(data) - _PIXELS_HEADER.size
    if magic != PIXELS_MAGIC or version != 1 or not width or body != width * height * 3:
        raise ImageRejected(BAD_PIXELS)
    pixels = np.frombuffer(data, dtype=np.uint8, offset=_PIXELS_HEADER.size)
    return pixels.reshape(height, width, 3)


def decode_pixels(data: bytes) -> Image.Image:
    """The image of :func:`encode_pixels`; :class:`ImageRejected` if the frame is damaged."""
    return Image.fromarray(pixels_array(data))


def upload_pixels(data: bytes, *, max_pixels: int, spec: InputSpec | None = None) -> bytes:
    """Decode an upload (or refuse it) and return the pixels its job keeps. With the workers'
    ``spec``: the decoded image itself while it has at most ``(2 * shortest_edge)**2`` pixels
    (JPEG photos are decoded at a reduced scale, so nearly all of them), for the workers to
    resize in batches; a larger one resized and cropped here, as the processor does, so that
    no job keeps more than about 600 KB of pixels. Without, the centre square."""
    image = decode_upload(data, max_pixels=max_pixels).image
    if spec is None:
        return encode_pixels(centre_square(image))
    if image.width * image.height <= (2 * spec.shortest_edge) ** 2:
        return encode_pixels(image)
    return encode_pixels(model_input(image, spec))


def stored_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """A job's stored image: its pixels, or (a job of an earlier version, or a result's small
    copy) an encoded image decoded under the upload limits."""
    if is_pixels(data):
        return decode_pixels(data)
    return decode_upload(data, max_pixels=max_pixels).image


def stored_pixels(data: bytes, *, max_pixels: int) -> npt.NDArray[np.uint8]:
    """:func:`stored_image` as HxWx3 uint8 pixels: a pixel frame is read in place (a worker
    hands it to torch with no copy through Pillow, whose RGB images take 4 bytes a pixel)."""
    if is_pixels(data):
        return pixels_array(data)
    return np.asarray(decode_upload(data, max_pixels=max_pixels).image)


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
