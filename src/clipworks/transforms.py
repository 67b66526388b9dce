"""Image transforms: evaluation preprocessing bit-identical to OpenCLIP's, and seeded training augmentation.

Both transforms turn a PIL image into a float32 (3, S, S) tensor using Pillow, numpy and torch only (no
torchvision). The evaluation transform reproduces torchvision's `Resize` + `CenterCrop` + `ToTensor` +
`Normalize` (and OpenCLIP's "longest"/"squash" variants) exactly: the same output sizes, crop offsets,
Pillow resampling calls and float32 arithmetic. The training transform draws all of its randomness from
torch's global RNG, so a seeded run is reproducible and resumable.
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL
import torch
from PIL import Image, ImageEnhance

from .config import PreprocessConfig
from .data.decode import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, to_rgb, load_image
from .data.jpeg import JPEG_MAGIC

__all__ = ["AugmentConfig", "EvalTransform", "INTERPOLATIONS", "RESIZE_MODES", "TrainTransform", "image_transform",
           "preprocess_file"]

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
RESIZE_MODES = ("shortest", "longest", "squash")
# How the evaluation transform treats non-RGB images: OpenCLIP's order (resize in the mode, then drop alpha), or
# transparency composited on white first (as `load_image`).
ALPHA_MODES = ("open_clip", "white")

# Half-widths of Pillow's convolution filters at scale 1 (libImaging/Resample.c).
_FILTER_SUPPORT = {Image.Resampling.BICUBIC: 2.0, Image.Resampling.BILINEAR: 1.0}

# Below this horizontal downscale factor, restricting the first resize pass to the rows the crop keeps
# costs more (an extra canvas and copy) than it saves; measured on 480x640 to 3024x4032 photos.
_ROW_SKIP_MIN_SCALE = 4

_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: a random resized crop, then optional flip and colour jitter.

    The defaults are OpenCLIP's (`AugmentationCfg()`): with them and the same torch seed, the training
    transform gives the same tensors as `open_clip.image_transform(..., is_train=True)`.

    Attributes:
        scale: range of the crop's area as a fraction of the image's area.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        interpolation: "bicubic", "bilinear" or "nearest", for resizing the crop.
        hflip: probability of a horizontal flip.
        color_jitter: strength s of brightness, contrast and saturation jitter; each factor is drawn
            uniformly from [1 - s, 1 + s]. 0 disables it.
    """

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.0
    color_jitter: float = 0.0

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale={self.scale}: expected 0 < min <= max <= 1")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"ratio={self.ratio}: expected 0 < min <= max")
        _check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip={self.hflip}: expected a probability in [0, 1]")
        if not 0 <= self.color_jitter < 1:
            raise ValueError(f"color_jitter={self.color_jitter}: expected a strength in [0, 1)")


def image_transform(
    cfg: PreprocessConfig, train: bool = False, augment: AugmentConfig | None = None, *, fast: bool = False,
    alpha: str = "open_clip",
) -> Callable[[Image.Image], torch.Tensor]:
    """The transform for images going into a model trained with preprocessing `cfg`.

    Args:
        cfg: the weights' preprocessing (size, normalisation, resize mode).
        train: return the random training transform instead of the deterministic evaluation one.
        augment: training augmentation; OpenCLIP's defaults when None. Evaluation ignores it.
        fast: evaluation only: resize just the region that is kept, in one Pillow call. Faster, but not
            bit-identical to OpenCLIP (Pillow takes that region's bounds in float32); off by default.
        alpha: evaluation only: "open_clip" (OpenCLIP's tensor for every image mode: alpha is dropped after
            resizing) or "white" (transparency composited on white first, as `load_image` does); see `EvalTransform`.

    Returns:
        A picklable callable (safe to hand to DataLoader workers) mapping a PIL image of any mode and size
        to a float32 (3, S, S) tensor.
    """
    if train:
        return TrainTransform(cfg, augment or AugmentConfig())
    return EvalTransform(cfg, fast=fast, alpha=alpha)


class _Transform:
    """Shared parts: config checks, RGB conversion and the fused to-tensor + normalise step."""

    def __init__(self, cfg: PreprocessConfig):
        if not isinstance(cfg.image_size, int) or cfg.image_size < 1:
            raise ValueError(f"image_size={cfg.image_size!r}: expected a positive int")
        _check_choice("interpolation", cfg.interpolation, INTERPOLATIONS)
        _check_choice("resize_mode", cfg.resize_mode, RESIZE_MODES)
        if not 0 <= cfg.fill_color <= 255:
            raise ValueError(f"fill_color={cfg.fill_color}: expected an int in [0, 255]")
        for name in ("mean", "std"):
            if len(getattr(cfg, name)) != 3:
                raise ValueError(f"{name}={getattr(cfg, name)}: expected 3 values, one per RGB channel")
        if any(s == 0 for s in cfg.std):
            raise ValueError(f"std={cfg.std}: values must be non-zero")
        self.cfg = cfg
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    @staticmethod
    def _rgb(image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL.Image.Image, got {type(image).__name__}; load files with load_image")
        return image if image.mode == "RGB" else image.convert("RGB")

    def _to_tensor(self, array: np.ndarray) -> torch.Tensor:
        chw = np.array(array.transpose(2, 0, 1), order="C")  # (3, S, S) uint8, a writable copy for torch
        return self._planes_to_tensor(torch.from_numpy(chw))

    def _planes_to_tensor(self, planes: torch.Tensor) -> torch.Tensor:
        # The same float32 operations in the same order as torchvision's ToTensor + Normalize
        # (x / 255, then (x - mean) / std), done in place on one buffer.
        return planes.to(torch.float32).div_(255).sub_(self._mean).div_(self._std)


# Source images of fewer pixels than this are resized by Pillow itself, which is then the faster of the two exact
# routes (one thread, RGB to 224 px, bicubic: Pillow 0.86 ms against 1.46 for `clipworks.resample` at 256x256, equal
# at 512x512, 2.28 against 2.05 at 640x480, 12.0 against 6.6 at 1600x1200): its per-call set-up is smaller.
PILLOW_FASTER_BELOW = 300_000


class EvalTransform(_Transform):
    """Deterministic evaluation preprocessing, identical to OpenCLIP's for `cfg.resize_mode`.

    - "shortest": resize the short side to S (long side `int(S * long / short)`), centre crop S x S.
    - "longest": resize the long side to S (short side rounded, at least 1 pixel), pad to S x S with
      `cfg.fill_color` centred as OpenCLIP's `CenterCropOrPad`.
    - "squash": resize to S x S regardless of aspect ratio.

    The output equals OpenCLIP's bit for bit for every image mode with the default `alpha="open_clip"`: RGB and
    "L" images take the fast path below; other modes (RGBA, LA, palette, 16-bit, CMYK...) are resized in their own
    mode, as OpenCLIP's transform does (Pillow resizes alpha premultiplied, palettes nearest-neighbour), and only
    then converted to RGB, which drops any alpha. `alpha="white"` composites transparency on white first (what
    `load_image` does to files; `load()` gives that), then takes the RGB path: what a transparent logo looks like
    on a page, not OpenCLIP's tensor. Images with extreme aspect ratios cost what they cost in OpenCLIP (a 1x5000
    image is resized to 224x1120000 before cropping); `fast=True` avoids that.
    """

    def __init__(self, cfg: PreprocessConfig, *, fast: bool = False, alpha: str = "open_clip"):
        super().__init__(cfg)
        _check_choice("alpha", alpha, ALPHA_MODES)
        self.fast = fast
        self.alpha = alpha
        self._resample = INTERPOLATIONS[cfg.interpolation]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if isinstance(image, Image.Image) and image.mode not in ("RGB", "L"):
            if self.alpha == "white":
                image = to_rgb(image, (255, 255, 255))
            else:
                return self._in_own_mode(image)
        image = self._rgb(image)
        size = self.cfg.image_size
        (new_w, new_h), (x0, y0, x1, y1), (dx, dy) = self._plan(*image.size)
        if self.fast:
            sx, sy = image.width / new_w, image.height / new_h
            box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
            kept = image.resize((x1 - x0, y1 - y0), self._resample, box=box)
        else:
            kept = _resize_region(image, (new_w, new_h), (x0, y0, x1, y1), self._resample)
        if kept.size == (size, size):
            return self._to_tensor(np.asarray(kept))
        canvas = np.full((size, size, 3), self.cfg.fill_color, dtype=np.uint8)  # only "longest" pads
        canvas[dy : dy + kept.height, dx : dx + kept.width] = np.asarray(kept)
        return self._to_tensor(canvas)

    def _in_own_mode(self, image: Image.Image) -> torch.Tensor:
        """OpenCLIP's order for a non-RGB image: resize, crop (or pad with `fill_color`) in its mode, then RGB."""
        size = self.cfg.image_size
        (new_w, new_h), box, (dx, dy) = self._plan(*image.size)
        kept = image.resize((new_w, new_h), self._resample).crop(box)
        if kept.size != (size, size):  # "longest" pads: the fill is a palette index for "P", as torchvision's pad
            canvas = Image.new(kept.mode, (size, size), self.cfg.fill_color)
            if kept.mode == "P":
                canvas.putpalette(kept.getpalette())
            canvas.paste(kept, (dx, dy))
            kept = canvas
        return self._to_tensor(np.asarray(kept.convert("RGB")))

    def load(self, source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             formats: tuple[str, ...] | None = DEFAULT_FORMATS) -> torch.Tensor:  # fmt: skip
        """`self(load_image(source, max_pixels=..., formats=...))`: the same tensor, sooner for JPEG photos.

        A plain 3-channel JPEG is decoded by `clipworks.data.jpeg` (simplejpeg, when installed and verified
        equal to Pillow here) and resized by `clipworks.resample` (Pillow's arithmetic as integer matrix
        products, verified here too): 1.44x the images per second of OpenCLIP's preprocessing on one thread,
        on a mix of 0.3-12 megapixel photos. Everything else takes `load_image` and `__call__`.

        Raises:
            ImageDecodeError: as `load_image`.
        """
        from .data.jpeg import decode_jpeg_pixels

        if not self.fast:
            data = _jpeg_bytes(source)
            pixels = None if data is None else decode_jpeg_pixels(data, max_pixels, formats, scratch=True)
            if pixels is not None:
                return self.from_pixels(pixels)
            if data is not None and hasattr(source, "read"):  # the stream is consumed: decode what was read
                source = _NamedBytes(data, getattr(source, "name", "<file object>"))
        return self(load_image(source, max_pixels=max_pixels, formats=formats))

    def from_pixels(self, pixels: np.ndarray) -> torch.Tensor:
        """`self(Image.fromarray(pixels))` for uint8 (H, W, 3) RGB pixels (any strides), bit for bit."""
        from . import resample

        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected uint8 (H, W, 3) RGB pixels, got {pixels.dtype} {pixels.shape}")
        small = pixels.shape[0] * pixels.shape[1] < PILLOW_FASTER_BELOW
        if small or self.fast or self._resample not in resample.RESAMPLE_FILTERS or not resample.exact_on_this_build():
            return self(Image.fromarray(np.ascontiguousarray(pixels)))
        size = self.cfg.image_size
        new_size, box, (dx, dy) = self._plan(pixels.shape[1], pixels.shape[0])
        try:
            kept = resample.resize_crop_exact(pixels, new_size, box, self._resample)
        except ValueError:  # weights whose sums could leave int32
            return self(Image.fromarray(np.ascontiguousarray(pixels)))
        if kept.shape[1:] != (size, size):
            canvas = torch.full((3, size, size), self.cfg.fill_color, dtype=torch.uint8)  # only "longest" pads
            canvas[:, dy : dy + kept.shape[1], dx : dx + kept.shape[2]] = kept
            kept = canvas
        return self._planes_to_tensor(kept)

    def _plan(self, width: int, height: int):
        """((new_w, new_h), crop box, (dx, dy)) for a width x height image: the resize, the part of the resized
        image that survives the centre crop, and where that part lands in the output."""
        size = self.cfg.image_size
        new_w, new_h = _resized_size(width, height, size, self.cfg.resize_mode)
        x0, x1, dx = _centre_span(new_w, size)
        y0, y1, dy = _centre_span(new_h, size)
        return (new_w, new_h), (x0, y0, x1, y1), (dx, dy)

    def __repr__(self) -> str:
        return f"EvalTransform({self.cfg}, fast={self.fast})"


class TrainTransform(_Transform):
    """Random resized crop (torchvision's `RandomResizedCrop` sampling), flip and colour jitter.

    Every random number comes from torch's global RNG (`torch.manual_seed` makes it reproducible;
    DataLoader seeds each worker's torch RNG). The crop is drawn exactly as torchvision draws it, so with
    the default `AugmentConfig` the output equals OpenCLIP's training transform under the same seed.
    `cfg.resize_mode` does not apply to training.
    """

    def __init__(self, cfg: PreprocessConfig, augment: AugmentConfig):
        super().__init__(cfg)
        if not isinstance(augment, AugmentConfig):
            raise ValueError(f"augment must be an AugmentConfig, got {type(augment).__name__}")
        self.augment = augment
        self._resample = INTERPOLATIONS[augment.interpolation]

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Draw a crop (left, top, width, height) for a width x height image, as torchvision does."""
        area = height * width
        lo, hi = self.augment.scale
        # torchvision draws float32 log-ratio bounds from a tensor; keep them float32 to draw the same values.
        log_ratio = torch.log(torch.tensor(self.augment.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(lo, hi).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                return left, top, w, h
        # No sample fitted in 10 tries: the largest centred crop whose aspect ratio is in range.
        in_ratio = width / height
        if in_ratio < min(self.augment.ratio):
            w, h = width, int(round(width / min(self.augment.ratio)))
        elif in_ratio > max(self.augment.ratio):
            w, h = int(round(height * max(self.augment.ratio))), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self._rgb(image)
        size = self.cfg.image_size
        left, top, w, h = self.crop_box(*image.size)
        image = image.crop((left, top, left + w, top + h))
        if image.size != (size, size):
            image = image.resize((size, size), self._resample)
        if self.augment.hflip > 0 and torch.rand(1).item() < self.augment.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.augment.color_jitter > 0:
            image = self._jitter(image)
        return self._to_tensor(np.asarray(image))

    def _jitter(self, image: Image.Image) -> Image.Image:
        s = self.augment.color_jitter
        factors = torch.empty(3).uniform_(1 - s, 1 + s).tolist()
        for enhance, factor in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors):
            image = enhance(image).enhance(factor)
        return image

    def __repr__(self) -> str:
        return f"TrainTransform({self.cfg}, {self.augment})"


def preprocess_file(transform: Callable, source, **load_options) -> torch.Tensor:
    """`transform(load_image(source, **load_options))`: through `EvalTransform.load` when the transform is
    one (the same tensor, sooner for JPEG photos), else decoded by `load_image`.

    Raises:
        ImageDecodeError: as `load_image`.
    """
    if isinstance(transform, EvalTransform):
        return transform.load(source, **load_options)
    return transform(load_image(source, **load_options))


class _NamedBytes(io.BytesIO):
    """Bytes read from a stream, with its name for `load_image`'s messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name


def _jpeg_bytes(source) -> bytes | None:
    """A path's or a buffer's bytes if they start like a JPEG (for a path the first bytes decide before the
    rest is read), else None; a stream's bytes whatever they are (it cannot be read twice). Unreadable
    sources give None: `load_image` then reports them."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            return data if data.startswith(JPEG_MAGIC) else None
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                head = f.read(len(JPEG_MAGIC))
                return head + f.read() if head == JPEG_MAGIC else None
        if hasattr(source, "read"):
            return source.read()
    except OSError:
        return None
    return None


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {sorted(choices)}")


def _resized_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """(width, height) after the resize step, with torchvision's / OpenCLIP's rounding."""
    if mode == "shortest":
        # torchvision's Resize(int): the long side is truncated, not rounded.
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size
    if mode == "longest":
        # OpenCLIP's ResizeKeepRatio(longest=1): both sides divided by the larger ratio, then round().
        # OpenCLIP fails when a side rounds to 0 (e.g. 1x5000); we keep one pixel instead.
        ratio = max(height / size, width / size)
        return max(round(width / ratio), 1), max(round(height / ratio), 1)
    return size, size


def _centre_span(length: int, size: int) -> tuple[int, int, int]:
    """(start, stop, offset): the centred part of a side of `length` kept in a side of `size`, and where
    it lands. Crops as torchvision's CenterCrop (`int(round(...))`: ties go to even); pads as its padding
    (the odd pixel on the right/bottom)."""
    if length >= size:
        start = int(round((length - size) / 2.0))
        return start, start + size, 0
    return 0, length, (size - length) // 2


def _resize_region(image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int], resample) -> Image.Image:
    """`image.resize(size, resample).crop(box)`, bit for bit, computing less of what the crop drops."""
    if size == image.size:
        return image if box == (0, 0, *size) else image.crop(box)
    if box == (0, 0, *size) or resample not in _FILTER_SUPPORT or size[0] == image.width or size[1] == image.height:
        resized = image.resize(size, resample)  # nothing to skip (or one pass, or nearest-neighbour)
        return resized if box == (0, 0, *size) else resized.crop(box)
    if not _split_passes_exact():
        return image.resize(size, resample).crop(box)
    return _resize_region_split(image, size, box, resample)


def _resize_region_split(image, size, box, resample, row_skip_scale: float = _ROW_SKIP_MIN_SCALE) -> Image.Image:
    """`_resize_region` by running Pillow's two passes as two calls.

    Pillow resizes in two passes through a uint8 intermediate (libImaging/Resample.c). A call that changes
    only one side runs only that pass, with the coefficients the two-sided call uses, so doing the passes
    in Pillow's order gives the same bytes while letting us crop between them and, for the horizontal
    pass, skip the source rows that no kept output row reads.
    """
    width, height = image.size
    new_w, new_h = size
    x0, y0, x1, y1 = box
    if _vertical_first(width, height, new_w, new_h):
        tmp = image.resize((width, new_h), resample)
        if (y0, y1) != (0, new_h):
            tmp = tmp.crop((0, y0, width, y1))
        out = tmp.resize((new_w, tmp.height), resample)
        return out if (x0, x1) == (0, new_w) else out.crop((x0, 0, x1, out.height))

    # With a box of whole source rows r0..r1 and as many output rows, the vertical pass has scale 1 and
    # integer offsets, where the filters weigh 1, 0, 0...: the rows come out horizontally resized only.
    r0, r1 = _rows_read(height, new_h, y0, y1, _FILTER_SUPPORT[resample])
    skip_rows = (r0, r1) != (0, height) and width >= row_skip_scale * new_w
    if skip_rows:
        tmp = image.resize((new_w, r1 - r0), resample, box=(0, r0, width, r1))
    else:
        tmp = image.resize((new_w, height), resample)
    if (x0, x1) != (0, new_w):
        tmp = tmp.crop((x0, 0, x1, tmp.height))
    if skip_rows:
        # Back at their source rows; the rows left black are read by no kept output row.
        canvas = Image.new(tmp.mode, (tmp.width, height))
        canvas.paste(tmp, (0, r0))
        tmp = canvas
    out = tmp.resize((tmp.width, new_h), resample)
    return out if (y0, y1) == (0, new_h) else out.crop((0, y0, out.width, y1))


def _vertical_first(width: int, height: int, new_w: int, new_h: int) -> bool:
    """Pillow's pass order: from 13 on, vertical first when the height shrinks, by more than twice as many
    pixels as the width (python-pillow/Pillow#9549, read from its output); before 13, horizontal first."""
    return _PILLOW_MAJOR >= 13 and new_h < height and height - new_h > 2 * (width - new_w)


@functools.cache
def _split_passes_exact() -> bool:
    """Whether `_resize_region_split` reproduces this Pillow's `resize` on probe images, both pass orders,
    row skipping and each filter included. Pillow's pass order is an implementation detail that has changed
    once; should it change again, this turns the split off and the plain (slower) path keeps outputs exact."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 60, 3), dtype=np.uint8))  # 60x90
    probes = [  # (size, box); around the order boundary height - new_h == 2 * (width - new_w) and beyond it
        ((14, 40), (0, 5, 14, 35)),
        ((40, 49), (3, 4, 37, 45)),
        ((40, 50), (3, 4, 37, 46)),
        ((40, 51), (3, 4, 37, 47)),
        ((50, 20), (5, 2, 45, 18)),
        ((100, 200), (10, 20, 90, 180)),
        ((130, 200), (10, 20, 120, 180)),
        ((130, 85), (10, 3, 120, 80)),
        ((20, 100), (2, 10, 18, 90)),
    ]
    for resample in _FILTER_SUPPORT:
        for size, box in probes:
            split = _resize_region_split(image, size, box, resample, row_skip_scale=1)
            if not np.array_equal(np.asarray(split), np.asarray(image.resize(size, resample).crop(box))):
                return False
    return True


def _rows_read(height: int, new_h: int, y0: int, y1: int, support: float) -> tuple[int, int]:
    """Source rows [r0, r1) that output rows [y0, y1) of a height -> new_h resize read, as Pillow's
    precompute_coeffs bounds them, widened by a row each side against rounding."""
    scale = height / new_h
    support *= max(scale, 1.0)
    r0 = int((y0 + 0.5) * scale - support + 0.5) - 1
    r1 = int((y1 - 0.5) * scale + support + 0.5) + 1
    return max(r0, 0), min(r1, height)
