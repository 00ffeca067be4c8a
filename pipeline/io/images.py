"""Decode untrusted image bytes into the square RGB image the model sees, within limits.

Runs on CPU workers, so that vLLM's single front-end process receives an image already at the model's
size (896 x 896 for Gemma 3) and only has to normalise it. Every failure is a RecordError with a kind
that says what was wrong with the bytes; nothing here raises anything else for bad input.
"""
from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import ImageSection
from pipeline.io.records import ErrorKind, RecordError, Stage

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ImageTarget:
    """The size and resampling filter of the model's image processor."""

    size_px: int = 896
    resample: int = Image.Resampling.BILINEAR


def image_target(preprocessor_config: Optional[dict], override_px: Optional[int] = None) -> ImageTarget:
    """The square size and filter of the checkpoint's image processor (its preprocessor_config.json).

    Resizing with the processor's own size and filter makes our resize the one the processor would
    have done, so its own becomes a no-op and the model sees the same pixels as with plain vLLM.
    """
    target = ImageTarget()
    if preprocessor_config:
        size = preprocessor_config.get("size") or {}
        height, width = size.get("height"), size.get("width")
        if height and width and height != width:
            raise ValueError(f"expected a square image size in preprocessor_config.json, got {width}x{height}")
        target = ImageTarget(size_px=int(height or target.size_px),
                             resample=int(preprocessor_config.get("resample", target.resample)))
    if override_px is not None:
        target = ImageTarget(size_px=override_px, resample=target.resample)
    return target


def prepare_image(data: bytes, limits: ImageSection, target: ImageTarget) -> Image.Image:
    """Decode, check, orient, convert to RGB and resize one image. Raises RecordError on bad input."""
    if not data:
        raise RecordError(ErrorKind.EMPTY_IMAGE, "image is empty (0 bytes)", Stage.IMAGE)
    if len(data) > limits.max_bytes:
        raise RecordError(ErrorKind.IMAGE_TOO_LARGE,
                          f"image is {len(data)} bytes, over the limit of {limits.max_bytes}", Stage.IMAGE)
    image = _open(data, limits)
    if image.format in ("JPEG", "MPO"):
        # Decode at a reduced scale in the DCT domain (still >= the target on both sides): on a 12 MP
        # photo this halves decode time (docs/notes.md: GPU baseline).
        image.draft("RGB", (target.size_px, target.size_px))
    try:
        image.load()
        # In place: without a rotation to apply, the default returns a copy of the decoded image (8% of
        # the online ingress's CPU on camera photos).
        ImageOps.exif_transpose(image, in_place=True)
        image = _to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RecordError(ErrorKind.CORRUPT_IMAGE, f"{image.format} data is damaged: {_without_bytes(exc)}",
                          Stage.IMAGE) from None
    if image.size != (target.size_px, target.size_px):
        image = image.resize((target.size_px, target.size_px), resample=target.resample)
    return image


def thumbnail_jpeg(image: Image.Image, side_px: int, quality: int = 70) -> bytes:
    """A small JPEG of a prepared image (already decoded, RGB and at the model's size) for the report's
    gallery: the picture as the model saw it. A box filter is enough at this reduction and costs
    ~1 ms for 896 px -> 128 px; quality 70 keeps a photo at about 3-5 KB."""
    small = image.resize((side_px, side_px), resample=Image.Resampling.BOX)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


# EXIF fields worth telling a model about (IFD0 and the Exif sub-IFD), by Pillow's tag name.
_EXIF_FIELDS = ("Make", "Model", "DateTime", "DateTimeOriginal", "Orientation", "Software", "Artist",
                "Copyright", "ExposureTime", "FNumber", "ISOSpeedRatings", "FocalLength", "LensModel")


def describe_image(data: bytes) -> dict:
    """Size, format, mode, byte count and selected EXIF fields of encoded image bytes, from the header.

    For the image_metadata tool: the model sees the prepared 896 x 896 pixels, never the stored file's
    size, format or camera. Call it on bytes that prepare_image accepted; it decodes no pixels.
    """
    from PIL import ExifTags

    with Image.open(io.BytesIO(data)) as image:
        info = {"width": image.width, "height": image.height, "format": image.format, "mode": image.mode,
                "size_bytes": len(data)}
        try:
            exif = image.getexif()
            fields = {**{ExifTags.TAGS.get(k, str(k)): v for k, v in exif.items()},
                      **{ExifTags.TAGS.get(k, str(k)): v for k, v in exif.get_ifd(ExifTags.IFD.Exif).items()}}
        except Exception as exc:  # damaged EXIF in an image that decoded fine: describe it without
            logger.debug("unreadable EXIF: %s", exc)
            fields = {}
    selected = {name: _exif_value(fields[name]) for name in _EXIF_FIELDS if name in fields}
    if selected:
        info["exif"] = selected
    return info


def _exif_value(value) -> object:
    if isinstance(value, bytes):
        value = value[:64].decode("ascii", "replace")
    if isinstance(value, str):
        return value.strip("\x00 ")
    if isinstance(value, int):
        return value
    try:
        return float(value)  # IFDRational and friends
    except (TypeError, ValueError, ZeroDivisionError):
        return str(value)[:64]


def _open(data: bytes, limits: ImageSection) -> Image.Image:
    """Identify the format and size from the header only; refuse before decoding any pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise RecordError(ErrorKind.TOO_MANY_PIXELS, str(exc), Stage.IMAGE) from None
    except UnidentifiedImageError:
        # No byte of the data in the message: it may be a file the record had no business naming.
        raise RecordError(ErrorKind.NOT_AN_IMAGE,
                          f"{len(data)} bytes that are not an image in any format Pillow recognises",
                          Stage.IMAGE) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RecordError(ErrorKind.CORRUPT_IMAGE, f"image header is damaged: {_without_bytes(exc)}",
                          Stage.IMAGE) from None
    if image.format not in limits.allowed_formats:
        raise RecordError(ErrorKind.UNSUPPORTED_FORMAT,
                          f"format {image.format} is not allowed (allowed: {', '.join(limits.allowed_formats)})",
                          Stage.IMAGE)
    width, height = image.size
    if width < 1 or height < 1:
        raise RecordError(ErrorKind.CORRUPT_IMAGE, f"image has size {width}x{height}", Stage.IMAGE)
    if width * height > limits.max_pixels:
        raise RecordError(ErrorKind.TOO_MANY_PIXELS,
                          f"image is {width}x{height} = {width * height} pixels, over the limit of "
                          f"{limits.max_pixels}", Stage.IMAGE)
    return image


# A Python bytes literal inside an exception message: some Pillow errors quote a few bytes of the file
# (a PNG chunk id, a TIFF header). Error rows and reports carry no byte of what was read.
_BYTES_LITERAL = re.compile(r"\bb'(?:[^'\\]|\\.)*'" + r'|\bb"(?:[^"\\]|\\.)*"')


def _without_bytes(exc: BaseException) -> str:
    return _BYTES_LITERAL.sub("<bytes>", str(exc))[:300]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB. Transparency is composited on white rather than dropped to black."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16/32-bit grayscale: scale to 8 bits rather than let convert() clip at 255.
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        gray = np.clip(pixels * (255.0 / peak), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")
