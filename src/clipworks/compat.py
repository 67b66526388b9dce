"""OpenCLIP's argument conventions, read into clipworks' terms: precision names, `force_*` architecture overrides,
preprocessing overrides, augmentation configs, and the keywords clipworks takes only at their defaults.

`clipworks.create_model` and friends accept OpenCLIP's keywords through these helpers, so that code written for
`open_clip` runs unchanged (see `clipworks.open_clip`). What an option would mean here is decided once, in this file.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn.functional as F

from .config import CLIPConfig, PreprocessConfig
from .models.precision import AMP, LOW_DTYPES, check_precision

# OpenCLIP's precision names -> the dtype of the model's matrix-product weights. "fp16"/"bf16" keep the normalisation
# layers (computing in float32) and the logit scale in float32, as OpenCLIP's `convert_weights_to_lp` and
# `LayerNormFp32` do; "pure_*" cast everything; the "amp" names keep float32 parameters (autocast is the caller's, as
# in OpenCLIP). clipworks adds "auto" (`hardware.resolve_precision`) and "int8" (`quantize_int8`): see
# `clipworks.models.precision`, which applies them.
PRECISIONS = {**dict.fromkeys(("fp32", *AMP), torch.float32), **LOW_DTYPES}

# OpenCLIP keywords that change nothing here, whatever their value: the key layout of its text towers
# (force_custom_text; clipworks converts any layout) and downloading a Hugging Face text tower's own pretrained weights
# for a model without CLIP weights (pretrained_text; clipworks never downloads what was not asked for).
IGNORED = ("force_custom_text", "pretrained_text")

# OpenCLIP keywords clipworks takes only at their default value, with why.
ONLY_DEFAULT = {
    "jit": (False, "TorchScript models are not built here; call torch.jit.script on the model if you need one"),
    "pretrained_image": (False, "image towers are not initialised from timm's ImageNet weights; pass CLIP weights"),
    "pretrained_image_path": (None, "one-tower weight files are not loaded into a built model; pass CLIP weights"),
    "pretrained_text_path": (None, "one-tower weight files are not loaded into a built model; pass CLIP weights"),
    "weights_only": (True, "clipworks never unpickles code: weights load with torch.load(weights_only=True) or safetensors"),
}  # fmt: skip


def check_options(function: str, options: dict[str, Any]) -> None:
    """Refuse keywords that are not OpenCLIP's, and OpenCLIP's that would mean something clipworks does not do.

    Raises:
        TypeError: an unknown keyword (as Python says it for any function).
        ValueError: a keyword of `ONLY_DEFAULT` away from its default, with the reason.
    """
    for key, value in options.items():
        if key in IGNORED:
            continue
        if key not in ONLY_DEFAULT:
            raise TypeError(f"{function}() got an unexpected keyword argument {key!r}")
        default, why = ONLY_DEFAULT[key]
        if value != default:
            raise ValueError(f"{function}({key}={value!r}) is not supported: {why}")


def precision_dtype(precision: str, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype that `dtype` asks for when it and `precision` agree (None when `dtype` is None): `dtype` alone casts
    the whole model (as "pure_bf16"/"pure_fp16" do); with a precision other than fp32, `dtype` must be that
    precision's dtype ("int8" takes float32; "auto" decides the dtype itself and takes none).

    Raises:
        ValueError: an unknown precision, or a dtype that disagrees with it.
    """
    check_precision(precision)
    if dtype is None:
        return None
    expected = PRECISIONS.get(precision, torch.float32)
    if precision == "auto" or (precision not in ("fp32", *AMP) and expected != dtype):
        raise ValueError(f"precision={precision!r} and dtype={dtype} disagree; pass one of them")
    return dtype


def _square(size, what: str) -> int:
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{what}={tuple(size)}: only square images are supported (one side, or (S, S))")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{what}={size!r}: expected a positive int")
    return size


def architecture_overrides(force_quick_gelu: bool = False, force_image_size=None, force_context_length=None):
    """A function that applies OpenCLIP's `force_*` options to a config, or None when none is set (patch dropout is
    a training setting of the built model: `apply_patch_dropout`)."""
    size = None if force_image_size is None else _square(force_image_size, "force_image_size")
    if force_context_length is not None and (not isinstance(force_context_length, int) or force_context_length < 2):
        raise ValueError(f"force_context_length={force_context_length!r}: expected an int of at least 2")
    if not force_quick_gelu and size is None and force_context_length is None:
        return None

    def adapt(cfg: CLIPConfig) -> CLIPConfig:
        if force_quick_gelu:
            cfg = with_quick_gelu(cfg)
        if size is not None and cfg.vision is not None:
            cfg = replace(cfg, vision=replace(cfg.vision, image_size=size))
        if force_context_length is not None and cfg.text is not None:
            cfg = replace(cfg, text=replace(cfg.text, context_length=force_context_length))
        return cfg

    return adapt


def apply_patch_dropout(model, force_patch_dropout: float | None) -> None:
    """OpenCLIP's `force_patch_dropout` on a built model: the fraction of a ViT's patch tokens dropped at random in
    training mode (`CLIP.set_patch_dropout`); None leaves the model as built.

    Raises:
        ValueError: a fraction outside [0, 1), or a non-zero one for an image tower without patches.
    """
    if force_patch_dropout is not None:
        model.set_patch_dropout(float(force_patch_dropout))


def with_quick_gelu(cfg: CLIPConfig) -> CLIPConfig:
    """`cfg` with QuickGELU wherever OpenCLIP's `quick_gelu` reaches: its own ViT and text transformer (and CoCa's
    decoder). ResNets have no GELU; timm towers and Hugging Face text towers keep their own activation, as there."""
    vision, text, decoder = cfg.vision, cfg.text, cfg.decoder
    if vision is not None and vision.kind == "vit":
        vision = replace(vision, act="quick_gelu")
    if text is not None and text.kind == "transformer":
        text = replace(text, act="quick_gelu")
    if decoder is not None:
        decoder = replace(decoder, act="quick_gelu")
    return replace(cfg, vision=vision, text=text, decoder=decoder)


def resize_position_tables(sd: dict, cfg: CLIPConfig) -> dict:
    """`sd` (clipworks' keys) with its ViT and text position tables interpolated to `cfg`'s sizes, the way OpenCLIP
    resizes them on load (`resize_pos_embed`: bicubic with antialiasing over the patch grid, the class token kept;
    `resize_text_pos_embed`: linear over positions)."""
    sd = dict(sd)
    v = cfg.vision
    old = sd.get("visual.pos_embed")
    if old is not None and v is not None and v.kind == "vit":
        grid = v.image_size // v.patch_size
        extra = int(v.class_token)
        if old.shape[0] != grid * grid + extra:
            tokens, patches = old[:extra], old[extra:]
            side = math.isqrt(patches.shape[0])
            x = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            x = F.interpolate(x, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
            sd["visual.pos_embed"] = torch.cat([tokens, x.permute(0, 2, 3, 1).reshape(grid * grid, -1)])
    t = cfg.text
    old = sd.get("text.pos_embed")
    if old is not None and t is not None and t.kind == "transformer":
        length = t.context_length + int(t.pool == "cls")
        if old.shape[0] != length:
            x = F.interpolate(old.t()[None], size=length, mode="linear", antialias=False, align_corners=False)
            sd["text.pos_embed"] = x[0].t().contiguous()
    return sd


# OpenCLIP's preprocessing keys (`force_preprocess_cfg`, `model.visual.preprocess_cfg`) -> PreprocessConfig fields
_PREPROCESS_KEYS = {"size": "image_size", "mean": "mean", "std": "std", "interpolation": "interpolation",
                    "resize_mode": "resize_mode", "fill_color": "fill_color"}  # fmt: skip


def preprocess_overrides(cfg: PreprocessConfig, overrides: dict[str, Any] | None) -> PreprocessConfig:
    """`cfg` with OpenCLIP's preprocessing keys (`size`, `mean`, `std`, `interpolation`, `resize_mode`,
    `fill_color`) replaced where `overrides` gives a value other than None."""
    if not overrides:
        return cfg
    unknown = sorted(set(overrides) - set(_PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f"unknown preprocessing keys {unknown}; expected some of {', '.join(_PREPROCESS_KEYS)}")
    changes = {_PREPROCESS_KEYS[k]: v for k, v in overrides.items() if v is not None}
    if "image_size" in changes:
        changes["image_size"] = _square(changes["image_size"], "size")
    for key in ("mean", "std"):
        if key in changes:
            changes[key] = tuple(changes[key]) if isinstance(changes[key], (tuple, list)) else (changes[key],) * 3
    return replace(cfg, **changes)


def preprocess_dict(cfg: PreprocessConfig) -> dict[str, Any]:
    """OpenCLIP's `model.visual.preprocess_cfg` for `cfg`: its config file's keys, the size as (H, W)."""
    from .checkpoints.open_clip_dir import preprocess_to_open_clip

    return {**preprocess_to_open_clip(cfg), "size": (cfg.image_size, cfg.image_size)}


def augment_config(aug_cfg):
    """clipworks' `AugmentConfig` for OpenCLIP's `aug_cfg` (an `AugmentationCfg` or a dict of its fields); None
    stays None. OpenCLIP's own (non-timm) training transform uses only `scale`; every other field must be unset."""
    from .transforms import AugmentConfig

    if aug_cfg is None or isinstance(aug_cfg, AugmentConfig):
        return aug_cfg
    if not isinstance(aug_cfg, dict):
        aug_cfg = {f.name: getattr(aug_cfg, f.name) for f in fields(aug_cfg)}
    unsupported = {k: v for k, v in aug_cfg.items() if k != "scale" and v not in (None, False)}
    if unsupported:
        raise ValueError(f"aug_cfg {unsupported}: only scale is supported (OpenCLIP's RandomResizedCrop); use "
                         "clipworks.transforms.AugmentConfig for flips and colour jitter")  # fmt: skip
    return AugmentConfig() if aug_cfg.get("scale") is None else AugmentConfig(scale=tuple(aug_cfg["scale"]))


def get_model_config(model_name: str) -> dict[str, Any] | None:
    """OpenCLIP's `get_model_config`: a preset's architecture as OpenCLIP's `model_cfg` dict (what its JSON configs
    hold), or None for a name that is not a preset."""
    from .checkpoints.open_clip_dir import config_to_open_clip
    from .presets import PRESETS, get_preset_tokenizer

    if model_name not in PRESETS:
        return None
    return config_to_open_clip(PRESETS[model_name], get_preset_tokenizer(model_name))
