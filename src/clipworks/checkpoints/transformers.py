"""Conversion between Hugging Face transformers `CLIPModel` directories and clipworks (configs and weights).

transformers is not needed at run time: its JSON files are read as JSON, its weights as a state dict. Beyond
renames, only attention differs: transformers keeps q, k and v as three Linears, we pack them into one `qkv`
(stacked on the output axis), so they are fused into a synthetic `qkv_proj` key before the key map runs.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import CLIPConfig, PreprocessConfig, TextConfig, VisionTransformerConfig
from ..models.keymap import KeyMap, Rule, block_rules
from .io import CheckpointError, load_state_dict

# transformers' `hidden_act` names and ours. gelu_new is the same tanh formula as gelu_pytorch_tanh.
_ACT_FROM = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_ACT_TO = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# PIL resampling filters as transformers stores them.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# Configs written before transformers PR #24773 carry eos_token_id 2; transformers then pools at argmax(input_ids).
_LEGACY_EOS = 2

# transformers' defaults (CLIPTextConfig, CLIPVisionConfig, CLIPConfig) for fields a config.json may omit.
_TEXT_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}  # fmt: skip
_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
_CLIP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_FILE = "model.safetensors"
PICKLE_FILE = "pytorch_model.bin"


def _tower(config: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    sub = config.get(name) or {}
    if not isinstance(sub, dict):
        raise CheckpointError(f"{name} must be a JSON object, got {type(sub).__name__}")
    # Older configs may carry overrides in `*_config_dict`; transformers applies them over `*_config`.
    overrides = config.get(f"{name}_dict") or {}
    return _with_defaults({**sub, **overrides}, defaults)


def _with_defaults(d: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in d.items() if v is not None}}


def _square(value: Any, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{field}={value!r}: clipworks supports square sizes only")
        value = value[0]
    if not isinstance(value, int):
        raise CheckpointError(f"{field}={value!r}: expected an integer")
    return value


def _act(value: Any, field: str) -> str:
    if value not in _ACT_FROM:
        raise CheckpointError(f"{field}={value!r} is not supported; expected one of {sorted(_ACT_FROM)}")
    return _ACT_FROM[value]


def _mlp_ratio(width: int, hidden: int, field: str) -> float:
    """The float our `int(width * mlp_ratio)` turns back into exactly `hidden`.

    OpenCLIP's configs (and our presets) round the ratio up to 4 decimals (ViT-g: 4.3637), so that value is
    preferred: the config then equals the preset's. The exact quotient is the fallback.
    """
    for ratio in (math.ceil(hidden / width * 1e4) / 1e4, hidden / width, math.nextafter(hidden / width, math.inf)):
        if int(width * ratio) == hidden:
            return ratio
    raise CheckpointError(f"{field}={hidden} cannot be expressed as an MLP ratio of width {width}")


def _logit_scale(value: float) -> float:
    # transformers writes CLIP's ln(1 / 0.07) rounded to 2.6592; read it back as the value our presets hold.
    return math.log(1 / 0.07) if abs(value - math.log(1 / 0.07)) < 1e-4 else value


def _text_pool(eos: Any, vocab_size: int) -> dict[str, Any]:
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise CheckpointError(f"text_config.eos_token_id={eos!r}: expected one integer token id")
    if eos == _LEGACY_EOS:
        # argmax pooling presumes the end token has the highest id in the vocabulary.
        return {"pool": "argmax", "eos_id": vocab_size - 1}
    return {"pool": "eos", "eos_id": eos}


def config_from_transformers(config: dict[str, Any]) -> CLIPConfig:
    """A clipworks config from a transformers `CLIPModel` config.json dict.

    Raises:
        CheckpointError: a model type other than "clip", or a field clipworks cannot express, named.
    """
    if config.get("model_type") != "clip":
        raise CheckpointError(
            f"model_type={config.get('model_type')!r} is not supported; expected 'clip' (a transformers CLIPModel)"
        )
    top = _with_defaults(config, _CLIP_DEFAULTS)
    t = _tower(config, "text_config", _TEXT_DEFAULTS)
    v = _tower(config, "vision_config", _VISION_DEFAULTS)
    if v["num_channels"] != 3:
        raise CheckpointError(f"vision_config.num_channels={v['num_channels']!r}: clipworks supports RGB (3) only")
    text = TextConfig(
        context_length=t["max_position_embeddings"],
        vocab_size=t["vocab_size"],
        width=t["hidden_size"],
        layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"],
        mlp_ratio=_mlp_ratio(t["hidden_size"], t["intermediate_size"], "text_config.intermediate_size"),
        act=_act(t["hidden_act"], "text_config.hidden_act"),
        norm_eps=t["layer_norm_eps"],
        **_text_pool(t["eos_token_id"], t["vocab_size"]),
    )
    vision = VisionTransformerConfig(
        image_size=_square(v["image_size"], "vision_config.image_size"),
        patch_size=_square(v["patch_size"], "vision_config.patch_size"),
        width=v["hidden_size"],
        layers=v["num_hidden_layers"],
        heads=v["num_attention_heads"],
        mlp_ratio=_mlp_ratio(v["hidden_size"], v["intermediate_size"], "vision_config.intermediate_size"),
        act=_act(v["hidden_act"], "vision_config.hidden_act"),
        norm_eps=v["layer_norm_eps"],
    )
    return CLIPConfig(
        embed_dim=top["projection_dim"],
        vision=vision,
        text=text,
        init_logit_scale=_logit_scale(float(top["logit_scale_init_value"])),
    )


def _check_expressible(cfg: CLIPConfig) -> None:
    v, t = cfg.vision, cfg.text
    if v.kind != "vit":
        raise ValueError(f"transformers' CLIPModel has a ViT image tower only; this config has a {v.kind!r} tower")
    problems = [
        name
        for name, bad in [
            ("vision.pool must be 'cls'", v.pool != "cls"),
            ("vision.class_token must be True", not v.class_token),
            ("vision.patch_bias must be False", v.patch_bias),
            ("vision.ln_pre must be True", not v.ln_pre),
            ("vision.projection must be True", not v.projection),
            ("text.causal must be True", not t.causal),
            ("text.pool must be 'argmax' or 'eos'", t.pool not in ("argmax", "eos")),
            ("text.proj_bias must be False", t.proj_bias),
            ("init_logit_bias must be None", cfg.init_logit_bias is not None),
            (f"text.eos_id must not be {_LEGACY_EOS} with pool='eos'", t.pool == "eos" and t.eos_id == _LEGACY_EOS),
            (f"vision.act must be one of {sorted(_ACT_TO)}", v.act not in _ACT_TO),
            (f"text.act must be one of {sorted(_ACT_TO)}", t.act not in _ACT_TO),
        ]
        if bad
    ]
    if problems:
        raise ValueError("config cannot be a transformers CLIPModel (SigLIP-style?): " + "; ".join(problems))


def config_to_transformers(cfg: CLIPConfig) -> dict[str, Any]:
    """The transformers `CLIPModel` config.json dict for a ViT + CLIP-text config (`CLIPConfig.from_dict` loads it).

    Raises:
        ValueError: ResNet/ConvNeXt image towers or SigLIP-style settings, which CLIPModel cannot hold.
    """
    _check_expressible(cfg)
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "text_config": {
            "model_type": "clip_text_model",
            **_encoder_to_transformers(t, cfg.embed_dim),
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.context_length,
            "eos_token_id": _LEGACY_EOS if t.pool == "argmax" else t.eos_id,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            **_encoder_to_transformers(v, cfg.embed_dim),
            "num_channels": 3,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
        },
    }


def _encoder_to_transformers(tower: TextConfig | VisionTransformerConfig, embed_dim: int) -> dict[str, Any]:
    return {
        "hidden_size": tower.width,
        "intermediate_size": int(tower.width * tower.mlp_ratio),
        "num_hidden_layers": tower.layers,
        "num_attention_heads": tower.heads,
        "hidden_act": _ACT_TO[tower.act],
        "layer_norm_eps": tower.norm_eps,
        "projection_dim": embed_dim,
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
    """A PreprocessConfig from a preprocessor_config.json dict; `image_size` is used when it names no size.

    Raises:
        CheckpointError: a resampling filter, size or crop clipworks' transforms cannot reproduce.
    """
    resample = pp.get("resample", 3)
    if resample not in _RESAMPLE:
        raise CheckpointError(f"resample={resample!r} is not supported; expected one of {_RESAMPLE} (PIL codes)")
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
        interpolation=_RESAMPLE[resample],
        resize_mode="shortest" if kind == "shortest" else "squash",
    )


_WB = ("weight", "bias")
_BLOCK_KEYS = [
    (f"{theirs}.{p}", f"{ours}.{p}")
    for theirs, ours in [
        ("self_attn.qkv_proj", "attn.qkv"),  # synthetic: q, k, v fused by _fuse_qkv
        ("self_attn.out_proj", "attn.out"),
        ("layer_norm1", "ln_1"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
        ("layer_norm2", "ln_2"),
    ]
    for p in _WB
]
_V, _T = "vision_model", "text_model"
KEYMAP = KeyMap(
    [
        Rule("visual.patch_embed.weight", f"{_V}.embeddings.patch_embedding.weight"),
        Rule("visual.class_token", f"{_V}.embeddings.class_embedding"),
        Rule("visual.pos_embed", f"{_V}.embeddings.position_embedding.weight"),
        *[Rule(f"visual.ln_pre.{p}", f"{_V}.pre_layrnorm.{p}") for p in _WB],  # sic: transformers' spelling
        *block_rules(f"{_V}.encoder.layers", "visual.transformer.blocks", _BLOCK_KEYS),
        *[Rule(f"visual.ln_post.{p}", f"{_V}.post_layernorm.{p}") for p in _WB],
        Rule("visual.proj.weight", "visual_projection.weight"),
        Rule("text.token_embed.weight", f"{_T}.embeddings.token_embedding.weight"),
        Rule("text.pos_embed", f"{_T}.embeddings.position_embedding.weight"),
        *block_rules(f"{_T}.encoder.layers", "text.transformer.blocks", _BLOCK_KEYS),
        *[Rule(f"text.ln_final.{p}", f"{_T}.final_layer_norm.{p}") for p in _WB],
        Rule("text.proj.weight", "text_projection.weight"),
        Rule("logit_scale", "logit_scale"),
    ]
)
_QKV = re.compile(r"^(?P<prefix>.+\.self_attn)\.(?P<which>[qkv])_proj\.(?P<param>weight|bias)$")
_FUSED = re.compile(r"^(?P<prefix>.+\.self_attn)\.qkv_proj\.(?P<param>weight|bias)$")
# Non-persistent buffers (arange) that older transformers versions wrote into checkpoints.
_POSITION_IDS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


def _fuse_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
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


def _split_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        m = _FUSED.match(key)
        if not m:
            out[key] = value
            continue
        for which, part in zip("qkv", value.chunk(3)):
            out[f"{m['prefix']}.{which}_proj.{m['param']}"] = part.contiguous()
    return out


def convert_from_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers `CLIPModel` state dict to clipworks' `CLIP` keys (position_ids buffers are dropped).

    Raises:
        CheckpointError: incomplete or mismatched q/k/v projections.
        ValueError: keys that no rule converts, named.
    """
    sd = {k: v for k, v in sd.items() if k not in _POSITION_IDS}
    return KEYMAP.to_ours(_fuse_qkv(sd))


def convert_to_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """clipworks' `CLIP` keys to the state dict transformers' `CLIPModel` loads (inverse of the above)."""
    return _split_qkv(KEYMAP.to_theirs(sd))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _load_sharded(index_path: Path) -> dict[str, Tensor]:
    index = _read_json(index_path)
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


def _load_weights(path: Path) -> dict[str, Tensor]:
    """The raw transformers state dict: safetensors (single or sharded) first, then pytorch_model.bin."""
    for name in (SAFETENSORS_FILE, PICKLE_FILE):
        if (path / name).is_file():
            return load_state_dict(path / name)
        if (path / f"{name}.index.json").is_file():
            return _load_sharded(path / f"{name}.index.json")
    raise CheckpointError(
        f"{path} has a {CONFIG_FILE} but no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_FILE}.index.json, "
        f"{PICKLE_FILE} or {PICKLE_FILE}.index.json"
    )


def load_transformers_dir(path: str | os.PathLike) -> tuple[CLIPConfig, PreprocessConfig, dict[str, Tensor]]:
    """Read a transformers `CLIPModel` directory: (model config, preprocessing config, clipworks state dict).

    Without a preprocessor_config.json the preprocessing is OpenAI's (mean/std, bicubic) at the model's size.

    Raises:
        CheckpointError: missing weights, bad JSON, an unsupported config or unconvertible keys, naming the file.
    """
    path = Path(path)
    config = _read_json(path / CONFIG_FILE)
    try:
        cfg = config_from_transformers(config)
    except CheckpointError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    pp_path = path / PREPROCESSOR_FILE
    preprocess = PreprocessConfig(image_size=cfg.vision.image_size)
    if pp_path.is_file():
        pp = _read_json(pp_path)
        try:
            preprocess = preprocess_from_transformers(pp, cfg.vision.image_size)
        except CheckpointError as e:
            raise CheckpointError(f"{pp_path}: {e}") from e
    sd = _load_weights(path)
    try:
        sd = convert_from_transformers(sd)
    except ValueError as e:  # CheckpointError included: the converters do not know the directory
        raise CheckpointError(f"weights in {path}: {e}") from e
    return cfg, preprocess, sd
