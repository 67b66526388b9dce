"""What every transformers layout clipworks reads shares: JSON and weight files, field checks, fused attention.

transformers is not needed at run time: its JSON files are read as JSON, its weights as a state dict. Its encoder
layers (CLIP's, SigLIP's) keep q, k and v as three Linears; we pack them into one `qkv` (stacked on the output
axis), so they are fused into a synthetic `qkv_proj` key before a key map runs, and split again on the way out.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import PreprocessConfig
from .io import CheckpointError, load_state_dict

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_FILE = "model.safetensors"
PICKLE_FILE = "pytorch_model.bin"

# transformers' `hidden_act` names and ours. gelu_new is the same tanh formula as gelu_pytorch_tanh.
ACT_FROM = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
ACT_TO = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# PIL resampling filters as transformers' image processors store them.
RESAMPLE_FROM = {0: "nearest", 2: "bilinear", 3: "bicubic"}
RESAMPLE_TO = {name: code for code, name in RESAMPLE_FROM.items()}


def with_defaults(d: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in d.items() if v is not None}}


def sub_config(config: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The sub-config `name` ("text_config", "vision_config") of a two-tower config, over transformers' defaults."""
    sub = config.get(name) or {}
    if not isinstance(sub, dict):
        raise CheckpointError(f"{name} must be a JSON object, got {type(sub).__name__}")
    # Older configs may carry overrides in `*_config_dict`; transformers applies them over `*_config`.
    overrides = config.get(f"{name}_dict") or {}
    return with_defaults({**sub, **overrides}, defaults)


def square(value: Any, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{field}={value!r}: clipworks supports square sizes only")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{field}={value!r}: expected an integer")
    return value


def act(value: Any, field: str) -> str:
    if value not in ACT_FROM:
        raise CheckpointError(f"{field}={value!r} is not supported; expected one of {sorted(ACT_FROM)}")
    return ACT_FROM[value]


def mlp_ratio(width: int, hidden: int, field: str) -> float:
    """The float our `int(width * mlp_ratio)` turns back into exactly `hidden`.

    OpenCLIP's configs (and our presets) round the ratio up to 4 decimals (ViT-g: 4.3637), so that value is
    preferred: the config then equals the preset's. The exact quotient is the fallback.
    """
    for ratio in (math.ceil(hidden / width * 1e4) / 1e4, hidden / width, math.nextafter(hidden / width, math.inf)):
        if int(width * ratio) == hidden:
            return ratio
    raise CheckpointError(f"{field}={hidden} cannot be expressed as an MLP ratio of width {width}")


def require_rgb(channels: Any, field: str) -> None:
    if channels != 3:
        raise CheckpointError(f"{field}={channels!r}: clipworks supports RGB (3) only")


def encoder_to_transformers(tower) -> dict[str, Any]:
    """The fields transformers' CLIP and SigLIP tower configs share, for a ViT or text tower config."""
    return {
        "hidden_size": tower.width,
        "intermediate_size": int(tower.width * tower.mlp_ratio),
        "num_hidden_layers": tower.layers,
        "num_attention_heads": tower.heads,
        "hidden_act": ACT_TO[tower.act],
        "layer_norm_eps": tower.norm_eps,
    }


def _side(value: Any, field: str) -> tuple[int, str]:
    """(side, kind) of a `size`/`crop_size` entry: kind "shortest" (resize the short side) or "exact"."""
    if isinstance(value, int):
        return value, "shortest"
    if isinstance(value, dict) and "shortest_edge" in value:
        return value["shortest_edge"], "shortest"
    if isinstance(value, dict) and "height" in value and "width" in value:
        if value["height"] != value["width"]:
            raise CheckpointError(f"{field}={value!r}: clipworks supports square sizes only")
        return value["height"], "exact"
    raise CheckpointError(f"{field}={value!r}: expected an int, {{'shortest_edge': N}} or {{'height': N, 'width': N}}")


def preprocess_from_transformers(pp: dict[str, Any], image_size: int = 224) -> PreprocessConfig:
    """A PreprocessConfig from a CLIP or SigLIP preprocessor_config.json dict; `image_size` is used when it names
    no size. Missing mean/std are OpenAI's (CLIPImageProcessor's defaults).

    Raises:
        CheckpointError: a resampling filter, size or crop clipworks' transforms cannot reproduce.
    """
    resample = pp.get("resample", 3)
    if resample not in RESAMPLE_FROM:
        raise CheckpointError(f"resample={resample!r} is not supported; expected one of {RESAMPLE_FROM} (PIL codes)")
    size, kind = _side(pp.get("size", image_size), "size")
    crop = size
    if pp.get("do_center_crop", True) and "crop_size" in pp:
        crop, _ = _side(pp["crop_size"], "crop_size")
    if crop != size:
        # Our transforms resize straight to the output size (CLIP's recipe), never to a larger one and crop.
        raise CheckpointError(f"size {size} with crop_size {crop}: clipworks resizes to the crop size itself")
    return PreprocessConfig(
        image_size=crop,
        mean=tuple(pp.get("image_mean", PreprocessConfig.mean)),
        std=tuple(pp.get("image_std", PreprocessConfig.std)),
        interpolation=RESAMPLE_FROM[resample],
        resize_mode="shortest" if kind == "shortest" else "squash",
    )


def preprocess_to_transformers(pp: PreprocessConfig) -> dict[str, Any]:
    """The `CLIPImageProcessor` preprocessor_config.json dict for `pp` (`preprocess_from_transformers` inverts it).

    Raises:
        ValueError: a resize mode or interpolation the image processor cannot express ("longest" pads to a
            square, which CLIPImageProcessor does not do).
    """
    if pp.resize_mode not in ("shortest", "squash"):
        raise ValueError(
            f"resize_mode={pp.resize_mode!r} cannot be expressed by transformers' CLIPImageProcessor; expected "
            "'shortest' (resize the short side, centre crop) or 'squash' (resize both sides)"
        )
    if pp.interpolation not in RESAMPLE_TO:
        raise ValueError(f"interpolation={pp.interpolation!r}; expected one of {sorted(RESAMPLE_TO)}")
    side = pp.image_size
    shortest = pp.resize_mode == "shortest"
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": side} if shortest else {"height": side, "width": side},
        "resample": RESAMPLE_TO[pp.interpolation],
        "do_center_crop": shortest,
        "crop_size": {"height": side, "width": side},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pp.mean),
        "image_std": list(pp.std),
    }


WB = ("weight", "bias")
# An encoder layer's parameters, transformers' CLIP and SigLIP names and ours: (their suffix, our suffix).
BLOCK_KEYS = [
    (f"{theirs}.{p}", f"{ours}.{p}")
    for theirs, ours in [
        ("self_attn.qkv_proj", "attn.qkv"),  # synthetic: q, k, v fused by fuse_qkv
        ("self_attn.out_proj", "attn.out"),
        ("layer_norm1", "ln_1"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
        ("layer_norm2", "ln_2"),
    ]
    for p in WB
]
_QKV = re.compile(r"^(?P<prefix>.+\.self_attn)\.(?P<which>[qkv])_proj\.(?P<param>weight|bias)$")
_FUSED = re.compile(r"^(?P<prefix>.+\.self_attn)\.qkv_proj\.(?P<param>weight|bias)$")
# Non-persistent buffers (arange) that older transformers versions wrote into checkpoints.
POSITION_IDS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


def fuse_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every layer's `{q,k,v}_proj` as one synthetic `qkv_proj` (q, k, v stacked on the output axis)."""
    out, parts = {}, {}
    for key, value in sd.items():
        m = _QKV.match(key)
        if m:
            parts.setdefault((m["prefix"], m["param"]), {})[m["which"]] = (key, value)
        else:
            out[key] = value
    for (prefix, param), found in parts.items():
        missing = [f"{prefix}.{w}_proj.{param}" for w in "qkv" if w not in found]
        if missing:
            raise CheckpointError(f"attention projections are incomplete: missing {missing}")
        shapes = {key: tuple(t.shape) for key, t in found.values()}
        if len(set(shapes.values())) != 1:
            raise CheckpointError(f"q/k/v projections differ in shape: {shapes}")
        out[f"{prefix}.qkv_proj.{param}"] = torch.cat([found[w][1] for w in "qkv"])  # (3D, D) or (3D,)
    return out


def split_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `fuse_qkv`."""
    out = {}
    for key, value in sd.items():
        m = _FUSED.match(key)
        if not m:
            out[key] = value
            continue
        for which, part in zip("qkv", value.chunk(3)):
            out[f"{m['prefix']}.{which}_proj.{m['param']}"] = part.contiguous()
    return out


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _load_sharded(index_path: Path) -> dict[str, Tensor]:
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' naming the shard of each tensor")
    sd = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:  # an index must not send us reading files outside the directory
            raise CheckpointError(f"{index_path}: shard name {shard!r} is not a plain file name")
        try:
            sd.update(load_state_dict(index_path.parent / shard))
        except FileNotFoundError as e:
            raise CheckpointError(f"{index_path} names shard {shard!r}, which is missing") from e
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but absent from their shards: {missing[:12]}")
    return sd


def load_raw_weights(path: Path) -> dict[str, Tensor]:
    """A transformers directory's state dict, unconverted: safetensors (single or sharded) first, then
    pytorch_model.bin (single or sharded)."""
    for name in (SAFETENSORS_FILE, PICKLE_FILE):
        if (path / name).is_file():
            return load_state_dict(path / name)
        if (path / f"{name}.index.json").is_file():
            return _load_sharded(path / f"{name}.index.json")
    raise CheckpointError(
        f"{path} has a {CONFIG_FILE} but no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_FILE}.index.json, "
        f"{PICKLE_FILE} or {PICKLE_FILE}.index.json"
    )
