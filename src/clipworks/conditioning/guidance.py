"""CLIP guidance: image features as a differentiable function of pixels, and a loss toward a text embedding.

The preprocessing (resize, crop or pad, normalise) runs inside the autograd graph on tensors, so gradients reach
the pixels; a diffusion sampler or a plain optimiser can then push an image toward a prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PreprocessConfig
from ..models.clip import CLIP

_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


def _resize(pixels: Tensor, size: tuple[int, int], interpolation: str) -> Tensor:
    mode = _MODES[interpolation]
    if mode == "nearest":
        return F.interpolate(pixels, size=size, mode=mode)
    # antialias: a large image shrunk without it aliases, and its gradients are as sparse as its samples.
    return F.interpolate(pixels, size=size, mode=mode, antialias=True, align_corners=False)


def preprocess_pixels(pixels: Tensor, cfg: PreprocessConfig) -> Tensor:
    """Pixels (B, 3, H, W) in [0, 1] to the model's input (B, 3, S, S), differentiably, as `cfg` says:
    "shortest" resizes the short side to S and centre-crops, "squash" resizes to S x S, "longest" resizes the
    long side to S and pads with `fill_color`; then the mean is subtracted and the std divided out.

    Raises:
        ValueError: not (B, 3, H, W), or an interpolation/resize mode that is not supported, named.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got shape {tuple(pixels.shape)}")
    if cfg.interpolation not in _MODES:
        raise ValueError(f"interpolation {cfg.interpolation!r} is not supported; expected one of {sorted(_MODES)}")
    S, (H, W) = cfg.image_size, pixels.shape[-2:]
    if cfg.resize_mode == "squash":
        x = _resize(pixels, (S, S), cfg.interpolation)
    elif cfg.resize_mode == "shortest":
        scale = S / min(H, W)
        h, w = max(S, int(H * scale)), max(S, int(W * scale))
        x = _resize(pixels, (h, w), cfg.interpolation) if (h, w) != (H, W) else pixels
        top, left = int(round((h - S) / 2.0)), int(round((w - S) / 2.0))
        x = x[..., top : top + S, left : left + S]  # (B, 3, S, S)
    elif cfg.resize_mode == "longest":
        scale = S / max(H, W)
        h, w = min(S, max(1, int(H * scale))), min(S, max(1, int(W * scale)))
        x = _resize(pixels, (h, w), cfg.interpolation) if (h, w) != (H, W) else pixels
        top, left = (S - h) // 2, (S - w) // 2
        x = F.pad(x, (left, S - w - left, top, S - h - top), value=cfg.fill_color / 255)
    else:
        raise ValueError(
            f"resize_mode {cfg.resize_mode!r} is not supported; expected 'shortest', 'squash' or 'longest'"
        )
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def image_features(model: CLIP, pixels: Tensor, cfg: PreprocessConfig | None = None) -> Tensor:
    """Unit-norm image features (B, E) of pixels (B, 3, H, W) in [0, 1], differentiable with respect to them.

    Args:
        cfg: the preprocessing; default the model's own (`model.preprocess_config`), else OpenAI's at its size.
    """
    cfg = cfg or getattr(model, "preprocess_config", None) or PreprocessConfig(image_size=model.image_size)
    return model.encode_image(preprocess_pixels(pixels, cfg), normalize=True)


def spherical_distance(a: Tensor, b: Tensor) -> Tensor:
    """Half the squared great-circle distance between the directions of `a` and `b` (..., E), per row.

    The chord between unit vectors is 2 sin(theta / 2); unlike 1 - cosine its gradient does not vanish as
    the angle approaches pi. (Katherine Crowson's CLIP-guided diffusion loss.)
    """
    chord = (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).norm(dim=-1)
    return 2 * (chord / 2).clamp(max=1).arcsin().pow(2)


class CLIPGuidance:
    """A guidance loss toward a text embedding: `guidance(pixels)` is the mean spherical distance of each image's
    features to the target (a scalar, differentiable with respect to the pixels).

    Args:
        model: the CLIP model (its parameters are not changed).
        text_features: the target (E,) or (B, E), e.g. `model.encode_text(tokenizer(prompt))`.
        cfg: preprocessing; default the model's own.
    """

    def __init__(self, model: CLIP, text_features: Tensor, cfg: PreprocessConfig | None = None):
        self.model = model
        self.target = F.normalize(text_features.detach(), dim=-1)
        self.cfg = cfg

    def __call__(self, pixels: Tensor) -> Tensor:
        return spherical_distance(image_features(self.model, pixels, self.cfg), self.target).mean()
