"""JPEG photos straight to pixel arrays, the same pixels `load_image` gives, without a Pillow image between.

Pillow decodes JPEGs with libjpeg-turbo into its own image memory (4 bytes a pixel, in blocks); getting the
pixels out as an array costs another pass over them, about 10-30 ms for a 12-megapixel photo, as much as
half the decode. `simplejpeg` (optional, `pip install simplejpeg`) runs the same library, with the same
settings Pillow uses (accurate integer IDCT, smooth chroma upsampling), and decodes into a numpy array.

`decode_jpeg_pixels` takes only what it can give exactly: a 3-channel (YCbCr/RGB) JPEG whose header Pillow
reads as an "RGB" image within the pixel limits. Anything else, and any file that makes libjpeg complain
(truncated, corrupt: simplejpeg's strict mode raises where Pillow would), returns None and the caller
decodes with `load_image`, whose rules then decide. Whether the two decoders agree on this machine is
checked once per process on probe JPEGs (baseline and progressive, 4:2:0, 4:2:2 and 4:4:4, odd sizes); if
not, or without simplejpeg, the function always returns None.

`decode_preprocess_batch` is the opt-in GPU route of `embed --gpu-decode`: a batch of JPEG files decoded by
`torchvision.io.decode_jpeg` (nvJPEG on a GPU) and resized, cropped and normalised there with torch's
antialiased interpolation, which follows Pillow's filters in floating point (Pillow works in fixed point):
close to the exact preprocessing, not equal to it (nvJPEG's IDCT and upsampling differ from libjpeg-turbo's
too). It runs on the CPU as well, which is how tests check it without a GPU.
"""

from __future__ import annotations

import functools
import io
import threading

import numpy as np
from PIL import Image

from .decode import _DECODE_ERRORS, _orientation

__all__ = ["JPEG_MAGIC", "decode_jpeg_pixels", "decode_preprocess_batch", "fast_jpeg_available", "gpu_decodable",
           "resize_crop_batch"]

JPEG_MAGIC = b"\xff\xd8\xff"  # how every JPEG file starts


def _upright(pixels: np.ndarray, orientation: int | None) -> np.ndarray:
    """The EXIF orientation applied as a numpy view, the same pixels Pillow's transposes give."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:  # Pillow's ROTATE_270: a quarter turn clockwise
        return pixels.transpose(1, 0, 2)[:, ::-1]
    if orientation == 7:
        return pixels.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:  # ROTATE_90: a quarter turn counter-clockwise
        return pixels.transpose(1, 0, 2)[::-1]
    return pixels


def decode_jpeg_pixels(data: bytes, max_pixels: int | None, formats: tuple[str, ...] | None,
                       scratch: bool = False) -> np.ndarray | None:  # fmt: skip
    """uint8 (H, W, 3) RGB pixels of a JPEG, upright, equal to `np.asarray(load_image(data))`; or None when
    this route does not apply (not a plain 3-channel JPEG, refused, damaged, or simplejpeg unavailable).

    The array may be a strided view (EXIF orientation is applied as one). With `scratch`, photos up to
    `SCRATCH_BYTES` are decoded into a buffer this thread reuses, which saves the page faults of a fresh
    allocation (~5 ms of a 12-megapixel photo's ~60 ms): the array is then valid only until this thread's next
    `scratch` call.
    """
    if not data.startswith(JPEG_MAGIC) or (formats is not None and "JPEG" not in formats):
        return None
    if not fast_jpeg_available():
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:  # the header only: no pixels decoded
            width, height = image.size
            if image.mode != "RGB" or (max_pixels is not None and width * height > max_pixels):
                return None
            orientation = _orientation(image)
    except (Image.DecompressionBombError, *_DECODE_ERRORS):
        return None
    pixels = _decode(data, _scratch(height * width * 3) if scratch else None)
    if pixels is None or pixels.shape != (height, width, 3):
        return None
    return _upright(pixels, orientation)


def _decode(data: bytes, buffer: np.ndarray | None = None) -> np.ndarray | None:
    """simplejpeg's decode with Pillow's settings (accurate IDCT, smooth upsampling), strict: None where
    libjpeg complains."""
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True,
                                      buffer=buffer)  # fmt: skip
    except (ValueError, OSError):
        return None


# Largest decode a thread keeps a buffer for (a 16-megapixel photo); larger ones get a fresh array.
SCRATCH_BYTES = 48 * 2**20
_local = threading.local()


def _scratch(nbytes: int) -> np.ndarray | None:
    if nbytes > SCRATCH_BYTES:
        return None
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.size < nbytes:
        buffer = _local.buffer = np.empty(max(nbytes, 8 * 2**20), dtype=np.uint8)
    return buffer[:nbytes]


@functools.cache
def fast_jpeg_available() -> bool:
    """Whether simplejpeg is installed and decodes probe JPEGs to exactly Pillow's pixels on this machine."""
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return False
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:61, 0:83]
    base = np.stack([(3 * x + y) % 256, (x * y) % 256, (5 * y) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    options = [
        {"quality": 90},
        {"quality": 75, "subsampling": 1},
        {"quality": 95, "subsampling": 0},
        {"quality": 85, "progressive": True},
        {"quality": 60, "optimize": True},
    ]
    for kwargs in options:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", **kwargs)
        data = buffer.getvalue()
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        got = _decode(data)
        if got is None or not np.array_equal(got, want):
            return False
    return True


# Largest JPEG sent to the GPU route (more pixels take the exact route, which refuses what load_image refuses).
GPU_MAX_PIXELS = 2**26


def gpu_decodable(data: bytes, max_pixels: int = GPU_MAX_PIXELS) -> bool:
    """Whether `decode_preprocess_batch` takes this file: a JPEG whose header Pillow reads as RGB or grayscale,
    within `max_pixels`, with no EXIF rotation (nvJPEG does not apply it). Others take the exact route."""
    if not data.startswith(JPEG_MAGIC):
        return False
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:  # the header only
            width, height = image.size
            return image.mode in ("RGB", "L") and width * height <= max_pixels and _orientation(image) in (None, 1)
    except (Image.DecompressionBombError, *_DECODE_ERRORS):
        return False


def resize_crop_batch(images: list, cfg) -> "torch.Tensor":
    """(B, 3, S, S) float32 normalised pixels of uint8 (3, H, W) images (any device, sizes may differ), as
    `EvalTransform(cfg)` prepares them: the same resize plan (`_plan`), the resize in floating point with
    antialiasing (Pillow's filter shapes), rounded to uint8 as Pillow stores it, then cropped or padded and
    normalised. Images of one size are resized together. Nothing here waits for the device (no blocking copy),
    so a GPU can still be busy with the previous batch."""
    import torch
    import torch.nn.functional as F

    from ..transforms import EvalTransform

    plan = EvalTransform(cfg)._plan
    size, device = cfg.image_size, images[0].device
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[1:]), []).append(i)
    mode = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(cfg.interpolation, "nearest-exact")
    for (height, width), rows in groups.items():
        (new_w, new_h), (x0, y0, x1, y1), (dx, dy) = plan(width, height)
        x = torch.stack([images[i] for i in rows]).float()  # (G, 3, H, W)
        if (new_h, new_w) != (height, width):
            smooth = {"antialias": True, "align_corners": False} if mode != "nearest-exact" else {}
            x = F.interpolate(x, size=(new_h, new_w), mode=mode, **smooth).round_().clamp_(0, 255)
        x = x[:, :, y0:y1, x0:x1]
        if x.shape[2:] != (size, size):  # only "longest" pads
            canvas = torch.full((len(rows), 3, size, size), float(cfg.fill_color), device=device)
            canvas[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]] = x
            x = canvas
        if len(rows) == len(images):  # one size (a WebDataset of resized images): no scatter
            out = x.contiguous()
        else:
            out[torch.tensor(rows).to(device, non_blocking=True)] = x
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device, non_blocking=True)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1).to(device, non_blocking=True)
    return out.div_(255).sub_(mean).div_(std)  # the order of ToTensor + Normalize


def decode_preprocess_batch(jpegs: list, cfg, device) -> tuple["torch.Tensor", list[int]]:
    """(pixels (B', 3, S, S) on `device`, the indices of `jpegs` that failed to decode) for JPEG files (bytes,
    bytearrays, or uint8 CPU tensors of their bytes): decoded together by `torchvision.io.decode_jpeg` on
    `device` (nvJPEG on a GPU), then `resize_crop_batch`. B' = B minus the failures, in order."""
    import warnings

    import torch

    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:
        raise ImportError("decoding JPEGs on the device (--gpu-decode) needs torchvision: pip install torchvision") from e

    jpegs = [j if isinstance(j, torch.Tensor) else torch.frombuffer(bytearray(j) if isinstance(j, bytes) else j,
                                                                     dtype=torch.uint8) for j in jpegs]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice (TorchCodec), once per batch otherwise
        try:
            decoded, failed = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device), []
        except RuntimeError:  # one bad file fails the batch: decode one by one to find it
            decoded, failed = [], []
            for i, data in enumerate(jpegs):
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    failed.append(i)
    if not decoded:
        size = cfg.image_size
        return torch.empty(0, 3, size, size, device=device), failed
    return resize_crop_batch(decoded, cfg), failed
