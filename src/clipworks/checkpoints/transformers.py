"""Conversion between Hugging Face transformers directories and clipworks (configs and weights).

Read: `CLIPModel`, its one-tower classes (`CLIPVisionModel(WithProjection)`, `CLIPTextModel(WithProjection)`: the
other tower is None), and, through `transformers_siglip`, `SiglipModel` and `Siglip2Model`. Written: `CLIPModel`,
the one-tower CLIP classes and `SiglipModel`. Which one a directory holds is decided in one place, `_reader`, from
config.json's model_type (and, for CLIP, its architectures); which one a model is written as, in `_writes_siglip`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import CLIPConfig, PreprocessConfig, TextConfig, VisionTransformerConfig
from ..models.keymap import KeyMap, Rule, block_rules
from . import transformers_siglip as siglip
from .io import CheckpointError
from .transformers_common import ACT_TO, BLOCK_KEYS, POSITION_IDS, WB, act, encoder_to_transformers, fuse_qkv, split_qkv
from .transformers_common import load_raw_weights, mlp_ratio, read_json, require_rgb, square, sub_config, with_defaults
# Public names of this module too: the file names, and the CLIP image processor's config conversion.
from .transformers_common import CONFIG_FILE, PICKLE_FILE, PREPROCESSOR_FILE, SAFETENSORS_FILE  # noqa: F401
from .transformers_common import preprocess_from_transformers, preprocess_to_transformers

# Configs written before transformers PR #24773 carry eos_token_id 2; transformers then pools at argmax(input_ids).
_LEGACY_EOS = 2

# transformers' defaults (CLIPTextConfig, CLIPVisionConfig, CLIPConfig) for fields a config.json may omit.
_TEXT_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "eos_token_id": 49407, "projection_dim": 512,
}  # fmt: skip
_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}  # fmt: skip
_CLIP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}
# transformers' one-tower CLIP classes: (tower, whether it has its projection).
_ONE_TOWER = {
    "CLIPVisionModelWithProjection": ("vision", True),
    "CLIPVisionModel": ("vision", False),
    "CLIPTextModelWithProjection": ("text", True),
    "CLIPTextModel": ("text", False),
}
_ONE_TOWER_TYPES = {"clip_vision_model": "vision", "clip_text_model": "text"}


def _logit_scale(value: float) -> float:
    # transformers writes CLIP's ln(1 / 0.07) rounded to 2.6592; read it back as the value our presets hold.
    return math.log(1 / 0.07) if abs(value - math.log(1 / 0.07)) < 1e-4 else value


def _text_pool(eos: Any, vocab_size: int, where: str) -> dict[str, Any]:
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise CheckpointError(f"{where}eos_token_id={eos!r}: expected one integer token id")
    if eos == _LEGACY_EOS:
        # argmax pooling presumes the end token has the highest id in the vocabulary.
        return {"pool": "argmax", "eos_id": vocab_size - 1}
    return {"pool": "eos", "eos_id": eos}


def _text(t: dict[str, Any], where: str, projection: bool = True) -> TextConfig:
    """A CLIP text tower from its transformers config dict; `where` prefixes field names in errors."""
    return TextConfig(
        context_length=t["max_position_embeddings"],
        vocab_size=t["vocab_size"],
        width=t["hidden_size"],
        layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"],
        mlp_ratio=mlp_ratio(t["hidden_size"], t["intermediate_size"], f"{where}intermediate_size"),
        act=act(t["hidden_act"], f"{where}hidden_act"),
        norm_eps=t["layer_norm_eps"],
        projection=projection,
        **_text_pool(t["eos_token_id"], t["vocab_size"], where),
    )


def _vision(v: dict[str, Any], where: str, projection: bool = True) -> VisionTransformerConfig:
    require_rgb(v["num_channels"], f"{where}num_channels")
    return VisionTransformerConfig(
        image_size=square(v["image_size"], f"{where}image_size"),
        patch_size=square(v["patch_size"], f"{where}patch_size"),
        width=v["hidden_size"],
        layers=v["num_hidden_layers"],
        heads=v["num_attention_heads"],
        mlp_ratio=mlp_ratio(v["hidden_size"], v["intermediate_size"], f"{where}intermediate_size"),
        act=act(v["hidden_act"], f"{where}hidden_act"),
        norm_eps=v["layer_norm_eps"],
        projection=projection,
    )


def _config_from_clip(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> CLIPConfig:
    top = with_defaults(config, _CLIP_DEFAULTS)
    return CLIPConfig(
        embed_dim=top["projection_dim"],
        vision=_vision(sub_config(config, "vision_config", _VISION_DEFAULTS), "vision_config."),
        text=_text(sub_config(config, "text_config", _TEXT_DEFAULTS), "text_config."),
        init_logit_scale=_logit_scale(float(top["logit_scale_init_value"])),
    )


def _one_tower(config: dict[str, Any]) -> tuple[str, bool] | None:
    """(tower, projection) of a one-tower CLIP config; None for a CLIPModel's."""
    named = [_ONE_TOWER[a] for a in config.get("architectures") or [] if a in _ONE_TOWER]
    tower = _ONE_TOWER_TYPES.get(config.get("model_type"))
    if tower is None:  # a "clip" config: one tower only if its architectures say so
        return named[0] if named else None
    return next((n for n in named if n[0] == tower), (tower, True))


def _config_from_one_tower(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> CLIPConfig:
    """A one-tower CLIP config, from the tower's own config (model_type "clip_vision_model"/"clip_text_model") or
    from the tower's part of a "clip" config (as transformers' tower classes read one)."""
    tower, projection = _one_tower(config)
    defaults = _VISION_DEFAULTS if tower == "vision" else _TEXT_DEFAULTS
    nested = config.get("model_type") == "clip"
    where = f"{tower}_config." if nested else ""
    sub = sub_config(config, f"{tower}_config", defaults) if nested else with_defaults(config, defaults)
    if tower == "vision":
        vision = _vision(sub, where, projection)
        return CLIPConfig(sub["projection_dim"] if projection else vision.width, vision, None)
    text = _text(sub, where, projection)
    return CLIPConfig(sub["projection_dim"] if projection else text.width, None, text)


def _check_expressible(cfg: CLIPConfig) -> None:
    v, t = cfg.vision, cfg.text
    if v is not None and v.kind != "vit":
        raise ValueError(f"transformers' CLIPModel has a ViT image tower only; this config has a {v.kind!r} tower")
    if t is not None and t.kind != "transformer":
        raise ValueError(f"transformers' CLIPModel has CLIP's text tower only; this config has a {t.kind!r} tower")
    both = v is not None and t is not None
    checks = [("init_logit_bias must be None", cfg.init_logit_bias is not None)]
    if v is not None:
        checks += [
            ("vision.pool must be 'cls'", v.pool != "cls"),
            ("vision.class_token must be True", not v.class_token),
            ("vision.patch_bias must be False", v.patch_bias),
            ("vision.ln_pre must be True", not v.ln_pre),
            ("vision.projection must be True", both and not v.projection),
            (f"vision.act must be one of {sorted(ACT_TO)}", v.act not in ACT_TO),
        ]
    if t is not None:
        checks += [
            ("text.causal must be True", not t.causal),
            ("text.pool must be 'argmax' or 'eos'", t.pool not in ("argmax", "eos")),
            ("text.projection must be True", both and not t.projection),
            ("text.proj_bias must be False", t.proj_bias),
            (f"text.eos_id must not be {_LEGACY_EOS} with pool='eos'", t.pool == "eos" and t.eos_id == _LEGACY_EOS),
            (f"text.act must be one of {sorted(ACT_TO)}", t.act not in ACT_TO),
        ]
    problems = [name for name, bad in checks if bad]
    if problems:
        raise ValueError("config cannot be a transformers CLIPModel (SigLIP-style?): " + "; ".join(problems))


def _text_to_transformers(t: TextConfig, embed_dim: int) -> dict[str, Any]:
    return {
        "model_type": "clip_text_model",
        **encoder_to_transformers(t),
        "projection_dim": embed_dim,
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.context_length,
        "eos_token_id": _LEGACY_EOS if t.pool == "argmax" else t.eos_id,
    }


def _vision_to_transformers(v: VisionTransformerConfig, embed_dim: int) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model",
        **encoder_to_transformers(v),
        "projection_dim": embed_dim,
        "num_channels": 3,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
    }


def _writes_siglip(cfg: CLIPConfig) -> bool:
    """Whether a two-tower config is written as a SiglipModel (else as a CLIPModel): its image tower pools with an
    attention head, or its text tower is bidirectional."""
    if cfg.vision is None or cfg.text is None:
        return False
    return (cfg.vision.kind == "vit" and cfg.vision.pool == "map") or not getattr(cfg.text, "causal", True)


def config_to_transformers(cfg: CLIPConfig) -> dict[str, Any]:
    """The transformers config.json dict for `cfg` (`config_from_transformers` reads it back): a `SiglipModel`'s for
    SigLIP-style models, a `CLIPModel`'s for CLIP ones, a one-tower CLIP class's for one-tower models.

    Raises:
        ValueError: ResNet/ConvNeXt image towers, CoCa, or settings neither CLIPModel nor SiglipModel can hold, named.
    """
    if cfg.decoder is not None:
        raise ValueError("CoCa (a model with a caption decoder) has no transformers class to hold it")
    if _writes_siglip(cfg):
        return siglip.config_to_siglip(cfg)
    _check_expressible(cfg)
    v, t = cfg.vision, cfg.text
    if v is not None and t is not None:
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": cfg.init_logit_scale,
            "text_config": _text_to_transformers(t, cfg.embed_dim),
            "vision_config": _vision_to_transformers(v, cfg.embed_dim),
        }
    tower = v if v is not None else t
    name = "CLIPVisionModel" if v is not None else "CLIPTextModel"
    config = _vision_to_transformers(v, cfg.embed_dim) if v is not None else _text_to_transformers(t, cfg.embed_dim)
    return {"architectures": [name + ("WithProjection" if tower.projection else "")], **config}


_V, _T = "vision_model", "text_model"
KEYMAP = KeyMap(
    [
        Rule("visual.patch_embed.weight", f"{_V}.embeddings.patch_embedding.weight"),
        Rule("visual.class_token", f"{_V}.embeddings.class_embedding"),
        Rule("visual.pos_embed", f"{_V}.embeddings.position_embedding.weight"),
        *[Rule(f"visual.ln_pre.{p}", f"{_V}.pre_layrnorm.{p}") for p in WB],  # sic: transformers' spelling
        *block_rules(f"{_V}.encoder.layers", "visual.transformer.blocks", BLOCK_KEYS),
        *[Rule(f"visual.ln_post.{p}", f"{_V}.post_layernorm.{p}") for p in WB],
        Rule("visual.proj.weight", "visual_projection.weight"),
        Rule("text.token_embed.weight", f"{_T}.embeddings.token_embedding.weight"),
        Rule("text.pos_embed", f"{_T}.embeddings.position_embedding.weight"),
        *block_rules(f"{_T}.encoder.layers", "text.transformer.blocks", BLOCK_KEYS),
        *[Rule(f"text.ln_final.{p}", f"{_T}.final_layer_norm.{p}") for p in WB],
        Rule("text.proj.weight", "text_projection.weight"),
        Rule("logit_scale", "logit_scale"),
    ]
)
# The top-level names under which transformers 5 stores CLIPVisionModel's and CLIPTextModel's keys (no prefix).
_UNPREFIXED = {"vision": ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."),
               "text": ("embeddings.", "encoder.", "final_layer_norm.")}  # fmt: skip


def convert_from_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers `CLIPModel` state dict (or a one-tower CLIP class's, prefixed) to clipworks' `CLIP` keys
    (position_ids buffers are dropped).

    Raises:
        CheckpointError: incomplete or mismatched q/k/v projections.
        ValueError: keys that no rule converts, named.
    """
    sd = {k: v for k, v in sd.items() if k not in POSITION_IDS}
    return KEYMAP.to_ours(fuse_qkv(sd))


def convert_to_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """clipworks' `CLIP` keys to the state dict transformers' `CLIPModel` loads (inverse of the above)."""
    return split_qkv(KEYMAP.to_theirs(sd))


def _convert_from_one_tower(sd: dict[str, Tensor], cfg: CLIPConfig) -> dict[str, Tensor]:
    tower = "vision" if cfg.vision is not None else "text"
    prefix = f"{_V if tower == 'vision' else _T}."
    sd = {prefix + k if k.startswith(_UNPREFIXED[tower]) else k: v for k, v in sd.items()}
    out = convert_from_transformers(sd)
    # transformers' tower classes have no temperature; our CLIP keeps its initial one.
    out["logit_scale"] = torch.tensor(cfg.init_logit_scale)
    return out


class TransformersCheckpoint(NamedTuple):
    """What a transformers directory holds for one model: config.json, the state dict and, for a model with an
    image tower, preprocessor_config.json."""

    config: dict[str, Any]
    state_dict: dict[str, Tensor]
    image_processor: dict[str, Any] | None


def convert_checkpoint_to_transformers(
    cfg: CLIPConfig, sd: dict[str, Tensor], preprocess: PreprocessConfig | None
) -> TransformersCheckpoint:
    """A clipworks model's config, state dict and preprocessing in transformers' layout (the class
    `config_to_transformers` picks).

    Raises:
        ValueError: a model no class clipworks writes can hold, or preprocessing its image processor cannot express.
    """
    config = config_to_transformers(cfg)
    if config["model_type"] == "siglip":
        sd, image_processor = siglip.convert_to_siglip(sd, cfg), siglip.preprocess_to_siglip(preprocess)
        return TransformersCheckpoint(config, sd, image_processor)
    if cfg.vision is None or cfg.text is None:
        sd = {k: v for k, v in sd.items() if k != "logit_scale"}  # the tower classes have no temperature
    image_processor = None if cfg.vision is None else preprocess_to_transformers(preprocess)
    return TransformersCheckpoint(config, convert_to_transformers(sd), image_processor)


def _preprocess_from_clip(pp: dict[str, Any] | None, cfg: CLIPConfig) -> PreprocessConfig | None:
    if cfg.vision is None:
        return None
    return preprocess_from_transformers(pp or {}, cfg.vision.image_size)


class _Reader(NamedTuple):
    """How one transformers architecture is read: its config (from config.json and preprocessor_config.json, or
    None), its preprocessing (from preprocessor_config.json, or None) and its weights."""

    config: Callable[[dict[str, Any], dict[str, Any] | None], CLIPConfig]
    preprocess: Callable[[dict[str, Any] | None, CLIPConfig], PreprocessConfig | None]
    weights: Callable[[dict[str, Tensor], CLIPConfig], dict[str, Tensor]]


_CLIP = _Reader(_config_from_clip, _preprocess_from_clip, lambda sd, cfg: convert_from_transformers(sd))
_CLIP_ONE_TOWER = _Reader(_config_from_one_tower, _preprocess_from_clip, _convert_from_one_tower)
_SIGLIP = _Reader(siglip.config_from_siglip, siglip.preprocess_from_siglip, siglip.convert_from_siglip)
_SIGLIP2 = _Reader(siglip.config_from_siglip2, siglip.preprocess_from_siglip2, siglip.convert_from_siglip2)
MODEL_TYPES = ("clip", "clip_text_model", "clip_vision_model", "siglip", "siglip2")


def _reader(config: dict[str, Any]) -> _Reader:
    """The one place a transformers config.json is dispatched on: its model_type and, for CLIP, its architectures."""
    model_type = config.get("model_type")
    if model_type == "siglip":
        return _SIGLIP
    if model_type == "siglip2":
        return _SIGLIP2
    if model_type in ("clip", *_ONE_TOWER_TYPES):
        return _CLIP if _one_tower(config) is None else _CLIP_ONE_TOWER
    raise CheckpointError(f"model_type={model_type!r} is not supported; expected one of {list(MODEL_TYPES)} "
                          "(transformers' CLIPModel and its one-tower classes, SiglipModel, Siglip2Model)")  # fmt: skip


def config_from_transformers(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> CLIPConfig:
    """A clipworks config from a transformers config.json dict (and, for Siglip2, whose fixed resolution comes from
    its image processor's `max_num_patches`, the preprocessor_config.json dict).

    Raises:
        CheckpointError: a model type clipworks does not read, or a field clipworks cannot express, named.
    """
    return _reader(config).config(config, preprocessor)


def _read_configs(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    pp_path = path / PREPROCESSOR_FILE
    return read_json(path / CONFIG_FILE), read_json(pp_path) if pp_path.is_file() else None


def load_transformers_config(path: str | os.PathLike) -> CLIPConfig:
    """The architecture a transformers directory declares, without reading its weights."""
    path = Path(path)
    config, pp = _read_configs(path)
    try:
        return config_from_transformers(config, pp)
    except CheckpointError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e


def load_transformers_dir(
    path: str | os.PathLike,
) -> tuple[CLIPConfig, PreprocessConfig | None, dict[str, Tensor]]:
    """Read a transformers directory: (model config, preprocessing config, clipworks state dict).

    The preprocessing is None for a text-only model. Without a preprocessor_config.json it is the image processor's
    defaults at the model's size (CLIP: OpenAI's mean/std, bicubic; SigLIP: 0.5/0.5, both sides resized).
    Siglip2 models are read at one fixed square resolution (see `transformers_siglip`): NaFlex's variable
    resolution and aspect ratio are not supported.

    Raises:
        CheckpointError: missing weights, bad JSON, an unsupported config or unconvertible keys, naming the file.
    """
    path = Path(path)
    config, pp = _read_configs(path)
    try:
        reader = _reader(config)
        cfg = reader.config(config, pp)
    except CheckpointError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    try:
        preprocess = reader.preprocess(pp, cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{path / PREPROCESSOR_FILE}: {e}") from e
    sd = load_raw_weights(path)
    try:
        sd = reader.weights(sd, cfg)
    except ValueError as e:  # CheckpointError included: the converters do not know the directory
        raise CheckpointError(f"weights in {path}: {e}") from e
    return cfg, preprocess, sd

