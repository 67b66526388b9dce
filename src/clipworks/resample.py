"""Pillow's bicubic and bilinear resampling of 8-bit images, bit for bit, as int8 matrix products.

Pillow resizes an 8-bit image in two separable passes (libImaging/Resample.c). Each output pixel of a pass
is a fixed-point sum over a window of source pixels: 22-bit integer weights (`PRECISION_BITS`) computed in
double precision from the filter, an accumulator starting at half a unit, then a shift and a clip to
0..255, which is also what the second pass reads. Its loops are scalar C: resizing a 12-megapixel photo to
CLIP's 224 pixels takes ~50 ms on one core, as long as decoding it.

Here the same sums run as integer matrix products (`torch._int_mm`, int8 x int8 -> int32, which oneDNN runs
with VNNI instructions): pixels become `v - 128` (a byte flip), each weight is split into three signed
8-bit digits (w = d2 * 65536 + d1 * 256 + d0), a pass multiplies the pixels by each digit's banded matrix
and the three int32 sums and the `128 * sum(w)` correction are recombined in int32 (every partial sum is
bounded below 2**31 beforehand). Every product and sum is an exact integer, so the result does not depend
on summation order: it equals Pillow's integer sum.
The weights themselves are computed with Pillow's double-precision operations in Pillow's order.

`resize_crop_exact` reproduces `image.resize(size, resample).crop(box)` for RGB images, computing only the
rows and columns the crop keeps; `exact_on_this_build()` checks it against the installed Pillow on probe
images, and callers use Pillow itself when that check fails (another Pillow pass order, a build whose
compiler fused the filter's multiply-adds, no `torch._int_mm`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import PIL
import torch
from PIL import Image

__all__ = ["exact_on_this_build", "pillow_weights", "resize_crop_exact", "RESAMPLE_FILTERS"]

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
_GROUP = 16  # output pixels per matrix product: wider groups read more zeros, narrower ones run slower
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic with a = -0.5, written in Pillow's operation order so the doubles round the same way.
    a = -0.5
    x = np.abs(x)
    inner = (((a + 2.0) * x - (a + 3.0)) * x) * x + 1
    outer = ((((x - 5) * x + 8) * x) - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


# Pillow filter -> (filter function, support at scale 1)
RESAMPLE_FILTERS = {
    Image.Resampling.BICUBIC: (_bicubic, 2.0),
    Image.Resampling.BILINEAR: (_bilinear, 1.0),
}


@functools.lru_cache(maxsize=256)
def pillow_weights(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's integer weights for resampling `in_size` pixels to `out_size` along one axis (no box).

    Returns:
        (first, weights): output pixel i is `sum(weights[i, k] * src[first[i] + k])` plus `2**21`, shifted
        right by 22 bits and clipped to 0..255; `weights` is int64 (out_size, ksize), zero past each window.
    """
    function, support = RESAMPLE_FILTERS[resample]
    scale = in_size / out_size  # (double)(in1 - in0) / outSize, with in0 = 0.0f and in1 = in_size exact
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centre = 0.0 + (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)  # C's (int) truncates
    last = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size)
    count = last - first
    taps = np.arange(ksize)
    inside = taps[None, :] < count[:, None]
    w = function(((taps[None, :] + first[:, None]).astype(np.float64) - centre[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(inside, w, 0.0)
    total = np.zeros(out_size)
    for k in range(ksize):  # Pillow sums the window left to right; np.sum would pair the terms differently
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = w * (1 << PRECISION_BITS)
    weights = np.trunc(np.where(w < 0, -0.5 + fixed, 0.5 + fixed)).astype(np.int64)
    return first, np.where(inside, weights, 0)


class _Band:
    """The weights of output pixels [start, stop) of one axis as banded int8 digit matrices.

    For each group of `_GROUP` outputs: the source range [lo, hi) it reads and the weights' three signed
    base-256 digits as int8 matrices for either side of a product; and per output the int32 constant
    `2**21 + 128 * sum(weights)`, which undoes the pixels' -128 shift and rounds.
    """

    def __init__(self, first: np.ndarray, weights: np.ndarray, start: int, stop: int, offset: int, in_size: int):
        first, weights = first[start:stop] - offset, weights[start:stop]
        self.lo = int(first.min())
        self.hi = min(int(first.max()) + weights.shape[1], in_size - offset)
        self.size = stop - start
        # Digits in [-128, 127]: w = d2 * 65536 + d1 * 256 + d0 (Pillow's weights are below 2**23).
        digits, rest = [], weights
        for _ in range(3):
            d = (rest + 128) % 256 - 128
            digits.append(d)
            rest = (rest - d) // 256
        if rest.any():
            raise ValueError("weights beyond three int8 digits")
        const = (1 << (PRECISION_BITS - 1)) + 128 * weights.sum(axis=1)
        # _combine's int32 steps stay below 2**31: bound each output's partial sums by absolute values.
        bound = 128 * sum(np.abs(d).sum(axis=1) * 256**p for p, d in enumerate(digits)) + np.abs(const)
        if bound.max() >= 1 << 31:
            raise ValueError("a window too wide for int32 sums")
        self.const = torch.from_numpy(const.astype(np.int32))
        self.groups = []
        for g in range(0, self.size, _GROUP):
            sl = slice(g, min(g + _GROUP, self.size))
            lo = int(first[sl].min())
            hi = min(int(first[sl].max()) + weights.shape[1], self.hi)
            dense = np.zeros((3, hi - lo, sl.stop - sl.start), dtype=np.int8)
            for j, o in enumerate(range(sl.start, sl.stop)):
                n = min(weights.shape[1], hi - first[o])
                for p in range(3):
                    dense[p, first[o] - lo : first[o] - lo + n, j] = digits[p][o, :n]
            # Both operand layouts, built C-contiguous (a (k, 1) view can carry odd strides _int_mm misreads).
            right = np.ascontiguousarray(dense.transpose(1, 0, 2).reshape(hi - lo, -1))  # (span, 3n)
            left = np.ascontiguousarray(dense.transpose(0, 2, 1).reshape(-1, hi - lo))  # (3n, span)
            self.groups.append((sl, lo, hi, torch.from_numpy(right), torch.from_numpy(left)))

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """Resample the columns of int8 (M, N) pixels (v - 128): uint8 (M, size)."""
        out = torch.empty((x.shape[0], self.size), dtype=torch.uint8)
        for sl, lo, hi, d, _ in self.groups:
            n = sl.stop - sl.start
            s = torch._int_mm(x[:, lo:hi], d)  # (M, 3n) int32: column p * n + j is digit p of output j
            out[:, sl] = _combine(s[:, 2 * n :], s[:, n : 2 * n], s[:, :n], self.const[sl])
        return out

    def left(self, x: torch.Tensor) -> torch.Tensor:
        """Resample the rows of int8 (M, N) pixels (v - 128): uint8 (size, N)."""
        out = torch.empty((self.size, x.shape[1]), dtype=torch.uint8)
        for sl, lo, hi, _, d in self.groups:
            n = sl.stop - sl.start
            s = torch._int_mm(d, x[lo:hi])  # (3n, N) int32: row p * n + j is digit p of output j
            out[sl] = _combine(s[2 * n :], s[n : 2 * n], s[:n], self.const[sl, None])
        return out


def _combine(s2: torch.Tensor, s1: torch.Tensor, s0: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
    """Pillow's accumulator from the digit sums, shifted and clipped to uint8 as its clip8 does.

    int32 holds every step: `_Band` checks that 128 * (sum|d2| * 65536 + sum|d1| * 256 + sum|d0|) plus the
    constant stays below 2**31 for every output, which bounds every partial sum here.
    """
    total = torch.mul(s2, 65536).add_(s1, alpha=256).add_(s0).add_(const)
    return total.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=64)
def _band(in_size: int, out_size: int, resample: int, start: int, stop: int, offset: int) -> _Band:
    first, weights = pillow_weights(in_size, out_size, resample)
    return _Band(first, weights, start, stop, offset, in_size)


def _signed(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels (any strides) as int8 `v - 128` (a flip of the top bit) in a new C-contiguous tensor."""
    out = np.empty(pixels.shape, dtype=np.uint8)
    if pixels.ndim == 3 and pixels.shape[0] <= 4:  # planes out of interleaved pixels: one 2-d copy per plane
        for plane, source in zip(out, pixels):  # (numpy walks a 3-d transposed copy in source order: 1.5x slower)
            np.copyto(plane, source)
    else:
        np.copyto(out, pixels)  # a plain copy, then the flip in place, beats one strided xor by ~25%
    return torch.from_numpy(out).view(torch.int8).bitwise_xor_(-128)


def vertical_first(width: int, height: int, new_w: int, new_h: int) -> bool:
    """Pillow's pass order: from 13 on, vertical first when the height shrinks, by more than twice as many
    pixels as the width (python-pillow/Pillow#9549, read from its output); before 13, horizontal first."""
    return _PILLOW_MAJOR >= 13 and new_h < height and height - new_h > 2 * (width - new_w)


def resize_crop_exact(
    pixels: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int], resample: int
) -> torch.Tensor:
    """`Image.fromarray(pixels).resize(size, resample).crop(box)` for uint8 (H, W, C) pixels, returned as
    uint8 (C, box height, box width) planes; only the source rows and columns the crop reads are touched.

    Equal to Pillow's bytes when `exact_on_this_build()` is true; `resample` is BICUBIC or BILINEAR.

    Raises:
        ValueError: weights whose sums could leave int32 (not met by Pillow's filters in practice: a 134x
            downscale passes); use Pillow for those.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"expected uint8 (H, W, C) pixels, got {pixels.dtype} {pixels.shape}")
    height, width, channels = pixels.shape
    new_w, new_h = size
    x0, y0, x1, y1 = box
    if new_w == width:  # Pillow runs no pass along a side whose size does not change: the identity, cropped
        pixels, width, new_w, (x0, x1) = pixels[:, x0:x1], x1 - x0, x1 - x0, (0, x1 - x0)
    if new_h == height:
        pixels, height, new_h, (y0, y1) = pixels[y0:y1], y1 - y0, y1 - y0, (0, y1 - y0)
    out_w, out_h = x1 - x0, y1 - y0
    cols = _band(width, new_w, resample, x0, x1, 0) if new_w != width else None
    rows = _band(height, new_h, resample, y0, y1, 0) if new_h != height else None
    c0, c1 = (cols.lo, cols.hi) if cols else (0, width)  # the source columns and rows the kept pixels read
    r0, r1 = (rows.lo, rows.hi) if rows else (0, height)
    pixels = pixels[r0:r1, c0:c1]
    if cols and rows and vertical_first(width, height, new_w, new_h):
        # Rows first, straight on the interleaved pixels: (r1 - r0, (c1 - c0) * C) -> (out_h, (c1 - c0) * C).
        v = _band(height, new_h, resample, y0, y1, r0).left(_signed(pixels).view(r1 - r0, -1))
        planes = _signed(v.view(out_h, c1 - c0, channels).numpy().transpose(2, 0, 1))
        shifted = _band(width, new_w, resample, x0, x1, c0)
        return shifted.right(planes.view(channels * out_h, c1 - c0)).view(channels, out_h, out_w)
    if cols:
        planes = _signed(pixels.transpose(2, 0, 1)).view(channels * (r1 - r0), c1 - c0)
        h = _band(width, new_w, resample, x0, x1, c0).right(planes).view(channels, r1 - r0, out_w)
    else:
        h = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    if not rows:
        return h
    interleaved = _signed(h.numpy().transpose(1, 0, 2)).view(r1 - r0, channels * out_w)  # (rows, C * out_w)
    v = _band(height, new_h, resample, y0, y1, r0).left(interleaved)
    return v.view(out_h, channels, out_w).permute(1, 0, 2).contiguous()


@functools.cache
def exact_on_this_build() -> bool:
    """Whether `resize_crop_exact` equals this Pillow's `resize` + `crop` on probe images: both filters,
    down- and upscaling, both pass orders, odd sizes. False also when `torch._int_mm` is missing."""
    if not hasattr(torch, "_int_mm"):
        return False
    rng = np.random.default_rng(0)
    probes = [  # (source (w, h), size, box)
        ((300, 400), (224, 298), (0, 37, 224, 261)),
        ((400, 300), (298, 224), (37, 0, 261, 224)),
        ((1001, 97), (231, 22), (3, 0, 225, 22)),
        ((97, 1001), (22, 231), (0, 3, 22, 225)),
        ((61, 90), (40, 50), (3, 4, 37, 46)),
        ((61, 90), (130, 85), (10, 3, 120, 80)),
        ((60, 90), (60, 33), (0, 5, 60, 30)),
        ((50, 50), (17, 50), (1, 2, 16, 49)),
    ]
    try:
        for resample in RESAMPLE_FILTERS:
            for (w, h), size, box in probes:
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[: h // 3] = 255 * (pixels[: h // 3] > 127)  # saturated edges exercise the clipping
                want = np.asarray(Image.fromarray(pixels).resize(size, resample).crop(box)).transpose(2, 0, 1)
                if not np.array_equal(resize_crop_exact(pixels, size, box, resample).numpy(), want):
                    return False
    except (RuntimeError, ValueError):  # an _int_mm this torch build cannot run on this CPU
        return False
    return True
