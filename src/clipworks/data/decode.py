"""Safe image decoding: any file Pillow reads, as a fully loaded RGB image, or an `ImageDecodeError`."""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import TYPE_CHECKING, BinaryIO, Callable, Optional, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_FORMATS", "DEFAULT_MAX_PIXELS", "Sample", "Transform", "load_sample", "ImageDecodeError", "ImageSource", "load_image"]

# 2**26 pixels (8192 x 8192) holds any camera photo in common datasets (a 48 MP phone photo has 48.8M) and
# stays below Pillow's own warning threshold (~89.5M), so by default we refuse before Pillow warns.
DEFAULT_MAX_PIXELS = 2**26

# Formats decoded by default: what photo collections and datasets hold. Pillow can open more (EPS among
# them, which hands the file to Ghostscript); pass formats=None to accept everything Pillow reads.
# (JPEG covers MPO, the multi-picture JPEG of phone cameras.) A default this Pillow build lacks is skipped.
DEFAULT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]
Sample = Optional[tuple["torch.Tensor", str]]  # None: a broken image or empty caption, skipped and counted
Transform = Callable[..., "torch.Tensor"]

_ORIENTATION = 0x0112  # the EXIF Orientation tag
# Orientation -> the transpose that displays the stored pixels upright (EXIF 2.32, section 4.6.4).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# What Pillow raises on files it cannot identify or decode (plugins raise more than OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class ImageDecodeError(ValueError):
    """An image that could not be read or decoded, or that was refused (too many pixels)."""


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    draft_size: int | None = None,
    formats: tuple[str, ...] | None = DEFAULT_FORMATS,
) -> Image.Image:
    """Decode an image file into a fully loaded RGB image, upright.

    - EXIF orientation (all 8 values) is applied; the EXIF and XMP metadata are then dropped so nothing
      downstream can rotate the pixels a second time.
    - Transparency (RGBA, LA, PA, and palette or colour-key transparency such as PNG tRNS) is composited
      onto `background`: round((c * a + background * (255 - a)) / 255).
    - 16-bit images (modes "I;16", "I;16B", "I;16L", and "I", read as 16-bit values clipped to 0-65535)
      are scaled to 8 bits as round(v / 257), keeping their full range instead of saturating.
      Pillow itself reduces 16-bit RGB(A) PNGs to 8 bits by keeping the high byte.
    - "F" (32-bit float) images are read on the 0-255 scale, rounded and clipped; NaN becomes 0.
    - Palette, CMYK (JPEG and TIFF), YCbCr, grayscale "L" and bilevel "1" images are converted to RGB
      with Pillow's conversions (CMYK without colour management).
    - Animated GIF, WebP and PNG (APNG) files give their first frame.
    - An image whose header claims more than `max_pixels` pixels is refused before any pixel is decoded.
      Pillow's own limit (`PIL.Image.MAX_IMAGE_PIXELS`) applies as well, whatever `max_pixels` is.
    - Only `formats` are decoded (default: JPEG, PNG, GIF, WebP, BMP, TIFF, PPM, AVIF); anything else is
      refused unopened, like data that is not an image.
    - Truncated, corrupt and non-image data raise `ImageDecodeError` (unless some code has set Pillow's
      global `ImageFile.LOAD_TRUNCATED_IMAGES`, which makes Pillow fill truncated images with grey).

    Args:
        source: a path, the file's bytes, or a binary file object (Pillow reads it from the start).
        max_pixels: refuse images with more pixels (width * height) than this; None disables the check.
        background: RGB colour (0-255 each) under transparent pixels.
        draft_size: opt-in speed-up for JPEGs: let the decoder downscale by 1/2, 1/4 or 1/8 while both
            sides stay at least this many pixels. Much faster for large photos, but the pixels are not
            those of a full decode (nor OpenCLIP's). Pass the model's image size; None (default) is off.
        formats: Pillow format names to accept; None accepts every format Pillow can read.

    Returns:
        An RGB image with its pixels in memory and no open file.

    Raises:
        ImageDecodeError: the source cannot be read or decoded, or the image has too many pixels.
        ValueError: invalid arguments.
    """
    _check_arguments(max_pixels, background, draft_size)
    formats = _known_formats(formats)
    name, fp = _open_argument(source)
    try:
        with Image.open(fp, formats=formats) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    f"{name}: {width}x{height} image has {width * height} pixels, more than "
                    f"max_pixels={max_pixels}; refused before decoding (pass a larger max_pixels, or None)"
                )
            if draft_size is not None:
                image.draft(None, (draft_size, draft_size))  # only JPEG decoders act on it
            image.load()
            orientation = _orientation(image)
            rgb = to_rgb(image, background)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: refused by Pillow's pixel limit (PIL.Image.MAX_IMAGE_PIXELS): {e}") from e
    except _DECODE_ERRORS as e:
        accepted = "" if formats is None else f" (accepted formats: {', '.join(formats)})"
        raise ImageDecodeError(f"cannot read image {name}: {type(e).__name__}: {e}{accepted}") from e
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
        for key in ("exif", "xmp", "XML:com.adobe.xmp"):
            rgb.info.pop(key, None)
    return rgb


def _check_arguments(max_pixels, background, draft_size) -> None:
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels={max_pixels!r}: expected a positive int, or None to disable the check")
    if (
        not isinstance(background, (tuple, list))
        or len(background) != 3
        or not all(isinstance(c, int) and 0 <= c <= 255 for c in background)
    ):
        raise ValueError(f"background={background!r}: expected an RGB tuple of three ints in [0, 255]")
    if draft_size is not None and (not isinstance(draft_size, int) or draft_size < 1):
        raise ValueError(f"draft_size={draft_size!r}: expected a positive int, or None for a full decode")


def _known_formats(formats: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if formats is None:
        return None
    Image.init()  # registers every plugin, so Image.OPEN lists all formats this Pillow reads
    formats = tuple(f.upper() for f in formats)
    if formats == DEFAULT_FORMATS:
        return tuple(f for f in formats if f in Image.OPEN)
    unknown = [f for f in formats if f not in Image.OPEN]
    if unknown:
        raise ValueError(f"formats {unknown} are not readable by this Pillow; choose from {sorted(Image.OPEN)}")
    return formats


def _open_argument(source) -> tuple[str, str | BinaryIO]:
    """(name for messages, what Image.open takes)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        return repr(path), path
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>", io.BytesIO(source)
    if hasattr(source, "read"):
        return repr(getattr(source, "name", "<file object>")), source
    raise ValueError(f"source must be a path, bytes or a binary file object; got {type(source).__name__}")


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(_ORIENTATION)
    except _DECODE_ERRORS:
        return None  # a corrupt EXIF block should not cost us the pixels; they are shown as stored


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    if mode == "RGB" and not has_alpha:
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.clip(np.asarray(image).astype(np.int32), 0, 65535)  # (H, W)
        gray = ((values + 128) // 257).astype(np.uint8)  # round(v / 257): 257 is odd, so no ties
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        gray = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if not has_alpha:
        return image.convert("RGB")
    rgba = np.asarray(image.convert("RGBA")).astype(np.uint16)  # (H, W, 4); products fit: 255 * 255 < 2**16
    alpha = rgba[:, :, 3:]
    mixed = rgba[:, :, :3] * alpha + np.array(background, dtype=np.uint16) * (255 - alpha)
    return Image.fromarray(((mixed + 127) // 255).astype(np.uint8))  # round(mixed / 255), no ties


def load_sample(source: ImageSource, caption: str, transform: Transform) -> Sample:
    """A training sample (transformed image, stripped caption), or None for a broken image or empty caption:
    datasets return None so the batch can skip and count it instead of crashing the run."""
    caption = caption.strip()
    if not caption:
        return None
    try:
        image = load_image(source)
    except ImageDecodeError:
        return None
    return transform(image), caption
