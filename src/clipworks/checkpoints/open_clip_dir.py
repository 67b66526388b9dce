"""OpenCLIP's directory layout (its hub format): open_clip_config.json plus open_clip_model.safetensors.

`open_clip_config.json` holds `{"model_cfg": ..., "preprocess_cfg": ...}`: the dict OpenCLIP's model_configs
JSON files hold, and the preprocessing the weights were trained with. OpenCLIP builds ConvNeXt and SigLIP image
towers through timm *by model name only*, so those towers are named here by tables of timm's sizes; a size no
timm model has cannot be written in this layout. Every other timm model OpenCLIP names (EVA-CLIP, PE-Core, ViTamin,
MobileCLIP, ...) is read as a `TimmVisionConfig`, which timm builds by that name.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import (
    CLIPConfig,
    ConvNeXtConfig,
    HFTextConfig,
    PreprocessConfig,
    ResNetConfig,
    TextConfig,
    TimmVisionConfig,
    TokenizerConfig,
    VisionTransformerConfig,
)
from . import open_clip_coca, open_clip_hf
from ..presets import CONVNEXT_SIZES
from .io import CheckpointError, atomic_directory, load_state_dict
from .open_clip import convert_from_open_clip, convert_to_open_clip, custom_text

CONFIG_FILE = "open_clip_config.json"
SAFETENSORS_FILE = "open_clip_model.safetensors"
# Weight files OpenCLIP looks for in a directory, in the order clipworks reads them: safetensors first.
WEIGHT_FILES = (SAFETENSORS_FILE, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth")  # fmt: skip

# OpenCLIP's defaults for the fields clipworks writes only when they differ.
_LOGIT_SCALE = math.log(1 / 0.07)
# Sigmoid-loss models (those with a logit bias) start at ln(10): OpenCLIP's SigLIP configs leave the scale out and
# its trainer passes ln(10) when --siglip is set, as the SigLIP paper does (Zhai et al. 2023).
_SIGLIP_LOGIT_SCALE = math.log(10)
_NORM_EPS = 1e-5
_HEAD_WIDTH = 64

# timm ConvNeXt models OpenCLIP builds by name: (stage depths, stage widths, LayerNorm eps).
TIMM_CONVNEXT: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]] = {
    f"convnext_{size}": sizes for size, sizes in CONVNEXT_SIZES.items()
}
# timm's SigLIP ViTs (attention-pool head, no class token):
# (width, layers, heads, mlp_ratio, patch, image size, activation). timm's newer variants use tanh GELU.
_SIGLIP_SIZES = {"base": (768, 12, 12, 4.0), "large": (1024, 24, 16, 4.0), "so400m": (1152, 27, 16, 3.7362),
                 "giantopt": (1536, 40, 16, 4.0)}  # fmt: skip
_SIGLIP_VARIANTS = {
    "base": [(16, 224), (16, 256), (16, 384), (16, 512), (32, 256, "gelu_tanh")],
    "large": [(16, 256), (16, 384), (16, 512, "gelu_tanh")],
    "so400m": [(14, 224), (14, 378), (14, 384), (16, 256, "gelu_tanh"), (16, 384, "gelu_tanh"), (16, 512, "gelu_tanh")],
    "giantopt": [(16, 256, "gelu_tanh"), (16, 384, "gelu_tanh")],
}
TIMM_SIGLIP: dict[str, tuple[int, int, int, float, int, int, str]] = {
    f"vit_{size}_patch{variant[0]}_siglip_{variant[1]}": (*_SIGLIP_SIZES[size], *variant[:2], (*variant[2:], "gelu")[0])
    for size, variants in _SIGLIP_VARIANTS.items()
    for variant in variants
}
# Text vocabularies by size: their end and padding ids as their tokenizers emit them (the tokenizer itself travels
# as a TokenizerConfig: see tokenizer_from_open_clip and config_to_open_clip's `tokenizer`).
_VOCABS: dict[int, dict[str, Any]] = {
    49408: {"eos_id": 49407, "pad_id": 0},  # CLIP's BPE: OpenCLIP's default tokenizer
    32000: {"eos_id": 1, "pad_id": 1},  # SigLIP's English SentencePiece vocabulary
    250000: {"eos_id": 1, "pad_id": 1},  # SigLIP's multilingual (mC4) SentencePiece vocabulary
    256000: {"eos_id": 1, "pad_id": 0},  # SigLIP 2's Gemma vocabulary
    250100: {"eos_id": 1, "pad_id": 0},  # mT5's (MetaCLIP 2 L/14)
    901629: {"eos_id": 2, "pad_id": 1},  # XLM-V's (MetaCLIP 2)
}
# Tokenizers whose ids the vocabulary size does not tell (CLIPA pads BERT's ids into a 32,000-row table, as SigLIP's).
_TOKENIZER_IDS: dict[str, dict[str, int]] = {"bert-base-uncased": {"eos_id": 102, "pad_id": 0}}
# OpenCLIP's HFTokenizer cleans with "whitespace" unless tokenizer_kwargs say otherwise.
_HF_CLEAN = "whitespace"
# OpenCLIP ViT/text options clipworks has no counterpart for, with the values (OpenCLIP's defaults) it accepts.
_BLOCK_FIXED = {"ls_init_value": (None,), "block_type": (None, "default"), "qk_norm": (False,),
                "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
                "scale_attn": (False,), "scale_fc": (False,)}  # fmt: skip
_VIT_FIXED = {**_BLOCK_FIXED, "pos_embed_type": ("learnable",)}
_TEXT_FIXED = {**_BLOCK_FIXED, "final_ln_after_pool": (False,), "proj_type": ("linear", "none"),
               "hf_model_name": (None,)}  # fmt: skip


def _require_defaults(d: dict[str, Any], fixed: dict[str, tuple], where: str) -> None:
    bad = [f"{where}.{k}={d[k]!r} (supported: {ok[0]!r})" for k, ok in fixed.items() if k in d and d[k] not in ok]
    if bad:
        raise CheckpointError("OpenCLIP options clipworks does not implement: " + "; ".join(bad))


def _eps(d: dict[str, Any], where: str) -> float:
    kwargs = d.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise CheckpointError(f"{where}.norm_kwargs={kwargs!r}: only 'eps' is supported")
    return float(kwargs.get("eps", _NORM_EPS))


def _act(d: dict[str, Any], quick_gelu: bool, where: str) -> str:
    kwargs = d.get("act_kwargs") or {}
    if not kwargs:
        return "quick_gelu" if quick_gelu else "gelu"
    if kwargs == {"approximate": "tanh"} and not quick_gelu:
        return "gelu_tanh"
    raise CheckpointError(f"{where}.act_kwargs={kwargs!r}: only {{'approximate': 'tanh'}} (with GELU) is supported")


def _text_from_open_clip(t: dict[str, Any], quick_gelu: bool) -> TextConfig | HFTextConfig:
    if t.get("hf_model_name"):  # a Hugging Face encoder, named by model (OpenCLIP's quick_gelu does not reach it)
        return open_clip_hf.text_config_from_open_clip(t)
    _require_defaults(t, _TEXT_FIXED, "text_cfg")
    vocab_size = t.get("vocab_size", 49408)
    known = _TOKENIZER_IDS.get(t.get("hf_tokenizer_name"))
    known = known or _VOCABS.get(vocab_size, {"eos_id": TextConfig.eos_id, "pad_id": TextConfig.pad_id})
    pool = "cls" if t.get("embed_cls") else t.get("pool_type", "argmax")  # CoCa's class embedding overrides pool_type
    if pool not in ("argmax", "eos", "last", "cls"):
        raise CheckpointError(f"text_cfg.pool_type={pool!r} is not supported; expected 'argmax', 'eos' or 'last'")
    return TextConfig(
        context_length=t.get("context_length", 77),
        vocab_size=vocab_size,
        width=t.get("width", 512),
        layers=t.get("layers", 12),
        heads=t.get("heads", 8),
        mlp_ratio=t.get("mlp_ratio", 4.0),
        act=_act(t, quick_gelu, "text_cfg"),
        causal=not t.get("no_causal_mask", False),
        pool=pool,
        eos_id=t.get("eos_id", 2) if pool == "eos" else known["eos_id"],  # OpenCLIP's eos_id default is 2
        pad_id=t.get("pad_id", known["pad_id"]),
        projection=t.get("proj_type", "linear") != "none",
        proj_bias=t.get("proj_bias", False),
        norm_eps=_eps(t, "text_cfg"),
    )


def _timm_from_open_clip(v: dict[str, Any]) -> VisionTransformerConfig | ConvNeXtConfig | TimmVisionConfig:
    name = v["timm_model_name"]
    head = (v.get("timm_pool", "avg"), v.get("timm_proj", "linear"), bool(v.get("timm_proj_bias", False)))
    if name in TIMM_CONVNEXT and head in (("", "linear", False), ("", "mlp", False)):
        depths, dims, eps = TIMM_CONVNEXT[name]
        drop_path = v.get("timm_drop_path") or 0.0
        return ConvNeXtConfig(v.get("image_size", 224), depths, dims, drop_path=drop_path, norm_eps=eps,
                              proj_type=head[1])  # fmt: skip
    if name in TIMM_SIGLIP and head == ("map", "none", False):
        width, layers, heads, mlp_ratio, patch, image, act = TIMM_SIGLIP[name]
        # OpenCLIP passes image_size to timm, which sizes the position table for it (SO400M/14-378 reads 384's)
        image = v.get("image_size", image)
        return VisionTransformerConfig(
            image_size=image, patch_size=patch, width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio, act=act,
            pool="map", class_token=False, patch_bias=True, ln_pre=False, projection=False, norm_eps=1e-6,
        )  # fmt: skip
    return _timm_tower_from_open_clip(v)  # any other timm model (or head): built by timm by name


# --- timm image towers by name (EVA-CLIP, PE-Core, ViTamin, MobileCLIP, ...): models/timm_tower.py ---


def _timm_tower_from_open_clip(v: dict[str, Any]) -> TimmVisionConfig:
    """OpenCLIP's TimmModel settings as a TimmVisionConfig. The name is checked when the tower is built (timm may be
    missing here); `timm_model_pretrained` is not kept: a checkpoint's weights replace timm's ImageNet ones."""
    drop = v.get("timm_drop") or 0.0
    if drop != 0.0:
        raise CheckpointError(f"vision_cfg.timm_drop={drop!r}: only 0.0 is supported (training-time dropout before "
                              "the projection)")  # fmt: skip
    size = v.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointError(f"vision_cfg.image_size={size!r}: clipworks takes square images only")
        size = size[0]
    try:
        return TimmVisionConfig(v["timm_model_name"], image_size=size, pool=v.get("timm_pool", "avg"),
                                projection=v.get("timm_proj", "linear"),
                                proj_bias=bool(v.get("timm_proj_bias", False)), drop_path=v.get("timm_drop_path"))
    except ValueError as e:  # fmt: skip
        raise CheckpointError(f"vision_cfg: {e}") from e


def _timm_tower_to_open_clip(v: TimmVisionConfig) -> dict[str, Any]:
    if v.model_kwargs:
        raise ValueError(f"OpenCLIP builds timm towers by name alone: a {v.model_name} tower with model_kwargs "
                         f"{dict(v.model_kwargs)} cannot be written for it")  # fmt: skip
    d = {"image_size": v.image_size, "timm_model_name": v.model_name, "timm_model_pretrained": False,
         "timm_pool": v.pool, "timm_proj": v.projection}  # fmt: skip
    if v.proj_bias:
        d["timm_proj_bias"] = True
    if v.drop_path is not None:
        d.update(timm_drop=0.0, timm_drop_path=v.drop_path)
    return d


# --- end of the timm image towers ---


def _vision_from_open_clip(v: dict[str, Any], quick_gelu: bool) -> VisionTransformerConfig | ResNetConfig:
    if v.get("timm_model_name"):
        return _timm_from_open_clip(v)
    width, head_width = v.get("width", 768), v.get("head_width", _HEAD_WIDTH)
    layers = v.get("layers", 12)
    if isinstance(layers, (list, tuple)):  # OpenCLIP's test for a ResNet: per-stage block counts
        if len(layers) != 4:
            raise CheckpointError(f"vision_cfg.layers={layers!r}: a ResNet has 4 stages")
        return ResNetConfig(v.get("image_size", 224), tuple(layers), width, heads=width * 32 // head_width)
    _require_defaults(v, _VIT_FIXED, "vision_cfg")
    pool = _vit_pool(v)
    attentional = {"pool_queries": v.get("attn_pooler_queries", 256), "pool_heads": v.get("attn_pooler_heads", 8)}
    return VisionTransformerConfig(
        **(attentional if pool == "attentional" else {}),
        pool=pool,
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 16),
        width=width,
        layers=layers,
        heads=width // head_width,
        mlp_ratio=v.get("mlp_ratio", 4.0),
        act=_act(v, quick_gelu, "vision_cfg"),
        ln_pre=not v.get("no_ln_pre", False),
        norm_eps=_eps(v, "vision_cfg"),
    )


def _vit_pool(v: dict[str, Any]) -> str:
    """Our pool from OpenCLIP's attentional_pool, pool_type and final_ln_after_pool: the class token ("tok": LayerNorm
    is per token, so before or after pooling is the same), the patch average normalised after pooling ("avg", CLIPA),
    or CoCa's attentional pooler."""
    pool, ln_after = v.get("pool_type", "tok"), bool(v.get("final_ln_after_pool", False))
    attentional = v.get("attentional_pool", False)
    if attentional:  # CoCa: only OpenCLIP's "original CoCa setup" (the paper's 'parallel' and 'cascade' are untested)
        if attentional is not True or pool != "tok":
            raise CheckpointError(f"vision_cfg.attentional_pool={attentional!r} with pool_type={pool!r} is not "
                                  "supported; expected true with 'tok' (OpenCLIP's original CoCa setup)")  # fmt: skip
        return "attentional"
    if pool == "tok":
        return "cls"
    if (pool, ln_after) == ("avg", True):
        return "avg"
    raise CheckpointError(f"vision_cfg.pool_type={pool!r} with final_ln_after_pool={ln_after} is not supported; "
                          "expected 'tok', or 'avg' with final_ln_after_pool true (CLIPA)")  # fmt: skip


def config_from_open_clip(model_cfg: dict[str, Any]) -> CLIPConfig:
    """A clipworks config from an OpenCLIP model config (a model_configs JSON, or `model_cfg` of a hub config).

    Raises:
        CheckpointError: an architecture or option clipworks does not implement (CoCa with a Hugging Face text tower,
            Hugging Face text towers other than those of open_clip_hf.HF_TEXT_MODELS, OpenCLIP's attention-pool heads
            on timm models, layer scale, ...), named.
    """
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"model_cfg must be a JSON object, got {type(model_cfg).__name__}")
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    try:
        vision = _vision_from_open_clip(dict(model_cfg.get("vision_cfg") or {}), quick_gelu)
        text = _text_from_open_clip(dict(model_cfg.get("text_cfg") or {}), quick_gelu)
        bias = model_cfg.get("init_logit_bias")
        scale = model_cfg.get("init_logit_scale", _LOGIT_SCALE if bias is None else _SIGLIP_LOGIT_SCALE)
        decoder = None
        if "multimodal_cfg" in model_cfg:  # CoCa
            decoder = open_clip_coca.decoder_from_open_clip(model_cfg, text, quick_gelu)
        return CLIPConfig(
            embed_dim=model_cfg["embed_dim"],
            vision=vision,
            text=text,
            init_logit_scale=float(scale),
            init_logit_bias=None if bias is None else float(bias),
            decoder=decoder,
        )
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"model_cfg is not a valid OpenCLIP model config: {e!r}") from e


def _act_to_open_clip(act: str, where: str) -> dict[str, Any]:
    if act not in ("gelu", "quick_gelu", "gelu_tanh"):
        raise ValueError(f"{where}.act={act!r} cannot be written for OpenCLIP; expected gelu, quick_gelu or gelu_tanh")
    return {"act_kwargs": {"approximate": "tanh"}} if act == "gelu_tanh" else {}


def _eps_to_open_clip(eps: float) -> dict[str, Any]:
    return {} if eps == _NORM_EPS else {"norm_kwargs": {"eps": eps}}


def _text_to_open_clip(t: TextConfig | HFTextConfig) -> dict[str, Any]:
    if t.kind != TextConfig.kind:
        return open_clip_hf.text_config_to_open_clip(t)
    known = _VOCABS.get(t.vocab_size, {"pad_id": 0})
    if t.pool not in ("argmax", "eos", "last", "cls"):
        raise ValueError(f"text.pool={t.pool!r} cannot be written for OpenCLIP; expected 'argmax', 'eos', 'last' or "
                         "'cls'")  # fmt: skip
    d: dict[str, Any] = {"context_length": t.context_length, "vocab_size": t.vocab_size,
                         "width": t.width, "heads": t.heads, "layers": t.layers}  # fmt: skip
    if t.mlp_ratio != 4.0:
        d["mlp_ratio"] = t.mlp_ratio
    if not t.causal:
        d["no_causal_mask"] = True
    if t.proj_bias:
        d["proj_bias"] = True
    if not t.projection:
        d["proj_type"] = "none"
    if t.pool == "cls":  # CoCa's class embedding (OpenCLIP then ignores pool_type)
        d["embed_cls"] = True
    elif t.pool != "argmax":
        d["pool_type"] = t.pool
    if t.pool == "eos":
        d["eos_id"] = t.eos_id
    if t.pad_id != known["pad_id"]:
        d["pad_id"] = t.pad_id
    return {**d, **_eps_to_open_clip(t.norm_eps), **_act_to_open_clip(t.act, "text")}


def _timm_name(table: dict[str, tuple], key: tuple, what: str) -> str:
    for name, value in table.items():
        if value == key:
            return name
    raise ValueError(f"no timm {what} has this size {key}, so OpenCLIP cannot build it by name; timm's sizes: "
                     + ", ".join(f"{n} {v}" for n, v in table.items()))  # fmt: skip


def _siglip_to_open_clip(v: VisionTransformerConfig) -> dict[str, Any]:
    timm_like = (not v.class_token, v.patch_bias, not v.ln_pre, not v.projection, v.norm_eps == 1e-6)
    if not all(timm_like):
        raise ValueError(
            "an attention-pool ViT can be written for OpenCLIP only as timm's SigLIP ViT (class_token=False, "
            "patch_bias=True, ln_pre=False, projection=False, norm_eps=1e-6)"
        )
    key = (v.width, v.layers, v.heads, v.mlp_ratio, v.patch_size, v.image_size, v.act)
    name = _timm_name(TIMM_SIGLIP, key, "SigLIP ViT (width, layers, heads, mlp_ratio, patch_size, image_size, act)")
    return {"image_size": v.image_size, "timm_model_name": name, "timm_model_pretrained": False, "timm_pool": "map",
            "timm_proj": "none"}  # fmt: skip


def _vit_to_open_clip(v: VisionTransformerConfig) -> dict[str, Any]:
    if v.pool == "map":
        return _siglip_to_open_clip(v)
    if v.patch_bias or not v.projection:
        raise ValueError("OpenCLIP's class-token ViT has no patch bias and a projection: patch_bias must be False "
                         "and projection True")  # fmt: skip
    d: dict[str, Any] = {"image_size": v.image_size, "layers": v.layers, "width": v.width}
    if v.width // v.heads != _HEAD_WIDTH:
        d["head_width"] = v.width // v.heads
    if v.mlp_ratio != 4.0:
        d["mlp_ratio"] = v.mlp_ratio
    d["patch_size"] = v.patch_size
    if not v.ln_pre:
        d["no_ln_pre"] = True
    if v.pool in ("avg", "attentional") and not v.class_token:
        raise ValueError(f"OpenCLIP's ViT always has a class token: an {v.pool!r} pool without one cannot be written")
    if v.pool == "avg":
        d.update(pool_type="avg", final_ln_after_pool=True)
    if v.pool == "attentional":  # CoCa's
        d.update(attentional_pool=True, attn_pooler_heads=v.pool_heads)
        if v.pool_queries != 256:
            d["attn_pooler_queries"] = v.pool_queries
    return {**d, **_eps_to_open_clip(v.norm_eps), **_act_to_open_clip(v.act, "vision")}


def _vision_to_open_clip(v) -> dict[str, Any]:
    if v.kind == "timm":
        return _timm_tower_to_open_clip(v)
    if v.kind == "vit":
        return _vit_to_open_clip(v)
    if v.kind == "resnet":
        head_width = v.width * 32 // v.heads
        if v.width * 32 // head_width != v.heads:
            raise ValueError(f"ResNet heads={v.heads} is width * 32 // head_width for no head_width (width {v.width})")
        d = {"image_size": v.image_size, "layers": list(v.layers), "width": v.width, "patch_size": None}
        return d if head_width == _HEAD_WIDTH else {**d, "head_width": head_width}
    if v.layer_scale_init != 1e-6:
        raise ValueError(f"layer_scale_init={v.layer_scale_init}: timm's ConvNeXt starts its layer scale at 1e-6")
    name = _timm_name(TIMM_CONVNEXT, (tuple(v.depths), tuple(v.dims), v.norm_eps), "ConvNeXt (depths, dims, norm_eps)")
    return {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": "", "timm_proj": v.proj_type,
            "timm_drop": 0.0, "timm_drop_path": v.drop_path, "image_size": v.image_size}  # fmt: skip


def _quick_gelu(cfg: CLIPConfig) -> bool:
    """OpenCLIP's quick_gelu flag: both towers' activation, or the image tower's beside a Hugging Face text tower
    (which has its own activations)."""
    if cfg.text.kind == TextConfig.kind:
        return cfg.text.act == "quick_gelu"
    return cfg.vision.kind == "vit" and cfg.vision.act == "quick_gelu"


def config_to_open_clip(cfg: CLIPConfig, tokenizer: TokenizerConfig | None = None) -> dict[str, Any]:
    """The OpenCLIP model config for `cfg` (as in OpenCLIP's model_configs JSON files; defaults left out).

    Args:
        cfg: the architecture.
        tokenizer: the text tower's tokenizer; a kind="hf" one is written as text_cfg's `hf_tokenizer_name` and
            `tokenizer_kwargs` (None, or CLIP's BPE, writes no tokenizer keys: OpenCLIP's default).

    Raises:
        ValueError: a config OpenCLIP cannot build: sizes no timm model has (ConvNeXt, SigLIP), towers whose
            activations differ in a way its single `quick_gelu` flag cannot say, ...
    """
    quick = _quick_gelu(cfg)
    own_act = cfg.vision.kind == "vit" and cfg.vision.pool in ("cls", "attentional")  # OpenCLIP's ViT, not timm's
    if own_act and (cfg.vision.act == "quick_gelu") != quick:
        raise ValueError(f"vision.act={cfg.vision.act!r} with text.act={cfg.text.act!r}: OpenCLIP's quick_gelu flag "
                         "applies to both towers")  # fmt: skip
    d: dict[str, Any] = {"embed_dim": cfg.embed_dim}
    if quick:
        d["quick_gelu"] = True
    if cfg.init_logit_scale != (_LOGIT_SCALE if cfg.init_logit_bias is None else _SIGLIP_LOGIT_SCALE):
        d["init_logit_scale"] = cfg.init_logit_scale
    if cfg.init_logit_bias is not None:
        d["init_logit_bias"] = cfg.init_logit_bias
    if custom_text(cfg) and (cfg.text.kind == TextConfig.kind or cfg.init_logit_bias is not None):
        # OpenCLIP builds every Hugging Face text tower as a CustomTextCLIP whatever the flag says; its configs set
        # the flag for those only in SigLIP-style (logit bias) models, so the flag is written as they write it
        d["custom_text"] = True
    text = {**_text_to_open_clip(cfg.text), **_tokenizer_to_open_clip(tokenizer)}
    d = {**d, "vision_cfg": _vision_to_open_clip(cfg.vision), "text_cfg": text}
    return d if cfg.decoder is None else open_clip_coca.coca_to_open_clip(cfg, d)


def _tokenizer_to_open_clip(tok: TokenizerConfig | None) -> dict[str, Any]:
    if tok is None or tok.kind != "hf":
        return {}
    if tok.source is None:
        raise ValueError("a Hugging Face tokenizer with no source cannot be named in OpenCLIP's hf_tokenizer_name")
    kwargs = {"clean": tok.clean} if tok.clean != _HF_CLEAN else {}
    if tok.language is not None:
        kwargs["language"] = tok.language
    if tok.strip_sep_token:
        kwargs["strip_sep_token"] = True
    return {"hf_tokenizer_name": tok.source, **({"tokenizer_kwargs": kwargs} if kwargs else {})}


def tokenizer_from_open_clip(model_cfg: dict[str, Any]) -> TokenizerConfig:
    """The tokenizer an OpenCLIP model config names: text_cfg's hf_tokenizer_name with its tokenizer_kwargs
    (OpenCLIP cleans with "whitespace" by default), else CLIP's BPE; at text_cfg's context_length (default 77).

    Raises:
        CheckpointError: tokenizer options clipworks does not implement (tokenizer_mode), named.
    """
    text = dict(model_cfg.get("text_cfg") or {})
    context = text.get("context_length", 77)
    name = text.get("hf_tokenizer_name")
    if not name:
        return TokenizerConfig(context_length=context)
    kwargs = dict(text.get("tokenizer_kwargs") or {})
    unknown = sorted(set(kwargs) - {"clean", "language", "strip_sep_token"})
    unknown += ["tokenizer_mode"] if text.get("tokenizer_mode") else []
    if unknown:
        raise CheckpointError(f"text_cfg tokenizer options clipworks does not implement: {unknown}")
    try:
        return TokenizerConfig(kind="hf", source=name, clean=kwargs.get("clean", _HF_CLEAN), context_length=context,
                               language=kwargs.get("language"),
                               strip_sep_token=bool(kwargs.get("strip_sep_token", False)))  # fmt: skip
    except ValueError as e:
        raise CheckpointError(f"text_cfg.tokenizer_kwargs: {e}") from e


def preprocess_from_open_clip(pp: dict[str, Any], image_size: int) -> PreprocessConfig:
    """A PreprocessConfig from a `preprocess_cfg` dict; missing keys take OpenCLIP's defaults.

    As in OpenCLIP, the output size is the model's `image_size`, whatever `size` says.

    Raises:
        CheckpointError: an interpolation or resize mode clipworks' transforms do not implement, or a non-RGB mode.
    """
    from ..transforms import INTERPOLATIONS, RESIZE_MODES

    if not isinstance(pp, dict):
        raise CheckpointError(f"preprocess_cfg must be a JSON object, got {type(pp).__name__}")
    defaults = PreprocessConfig()
    interpolation = pp.get("interpolation") or defaults.interpolation
    resize_mode = pp.get("resize_mode") or defaults.resize_mode
    if interpolation not in INTERPOLATIONS:
        raise CheckpointError(f"preprocess_cfg.interpolation={interpolation!r}; expected {sorted(INTERPOLATIONS)}")
    if resize_mode not in RESIZE_MODES:
        raise CheckpointError(f"preprocess_cfg.resize_mode={resize_mode!r}; expected one of {list(RESIZE_MODES)}")
    if pp.get("mode", "RGB") != "RGB":
        raise CheckpointError(f"preprocess_cfg.mode={pp['mode']!r}; OpenCLIP and clipworks take 'RGB' only")
    return PreprocessConfig(
        image_size=image_size,
        mean=tuple(pp.get("mean") or defaults.mean),
        std=tuple(pp.get("std") or defaults.std),
        interpolation=interpolation,
        resize_mode=resize_mode,
        fill_color=pp.get("fill_color", defaults.fill_color),
    )


def preprocess_to_open_clip(pp: PreprocessConfig) -> dict[str, Any]:
    """The `preprocess_cfg` dict OpenCLIP reads (the keys of its `PreprocessCfg`)."""
    return {"size": pp.image_size, "mode": "RGB", "mean": list(pp.mean), "std": list(pp.std),
            "interpolation": pp.interpolation, "resize_mode": pp.resize_mode, "fill_color": pp.fill_color}  # fmt: skip


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: not readable JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise CheckpointError(f"{path / CONFIG_FILE}: expected a JSON object with a 'model_cfg' object")
    return data


def is_open_clip_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory in OpenCLIP's layout (has an open_clip_config.json with a model_cfg)."""
    try:
        _read_config(Path(path))
    except CheckpointError:
        return False
    return True


def load_open_clip_dir(path: str | os.PathLike) -> tuple[CLIPConfig, PreprocessConfig, dict[str, Tensor]]:
    """Read a directory in OpenCLIP's layout: (model config, preprocessing config, clipworks state dict).

    The weights come from the first of `WEIGHT_FILES` present (safetensors before pickles, which are read with
    `torch.load(weights_only=True)` only).

    Raises:
        CheckpointError: a missing or unreadable config or weights file, an unsupported architecture, or weights
            that do not convert, naming the file.
    """
    path = Path(path)
    config = _read_config(path)
    try:
        cfg = config_from_open_clip(config["model_cfg"])
        preprocess = preprocess_from_open_clip(config.get("preprocess_cfg") or {}, cfg.vision.image_size)
    except CheckpointError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has an {CONFIG_FILE} but no weights: expected one of {list(WEIGHT_FILES)}")
    sd = load_state_dict(weights)
    # OpenCLIP's nonscalar_logit_scale models keep the temperature (and bias) as a 1-element vector.
    sd = {k: v.reshape(()) if k in ("logit_scale", "logit_bias") and v.numel() == 1 else v for k, v in sd.items()}
    try:
        return cfg, preprocess, convert_from_open_clip(sd, cfg)
    except ValueError as e:
        raise CheckpointError(f"weights in {weights}: {e}") from e


def _named_tokenizer(tok: TokenizerConfig | None) -> TokenizerConfig | None:
    """`tok` with a source OpenCLIP's hf_tokenizer_name can hold: a tokenizer read from a local directory is named
    as that directory's own OpenCLIP config names it (the hub repository it came from), else by the directory's
    path. (OpenCLIP's local-dir: loads read the files in the directory whatever the name says.)"""
    if tok is None or tok.kind != "hf" or tok.source is None or not Path(tok.source).expanduser().is_dir():
        return tok
    source = Path(tok.source).expanduser()
    named = tokenizer_from_open_clip(_read_config(source)["model_cfg"]).source if is_open_clip_dir(source) else None
    return replace(tok, source=named or str(source.resolve()))


def save_open_clip_dir(model, path: str | os.PathLike, preprocess: PreprocessConfig) -> Path:
    """Write `model` in OpenCLIP's layout, which `open_clip.create_model_and_transforms("local-dir:" + path)` loads.

    The directory appears complete or not at all (see `atomic_directory`).

    Raises:
        ValueError: a model OpenCLIP cannot build (see `config_to_open_clip`), checked before anything is written.
    """
    from safetensors.torch import save_file

    from ..hf_tokenizer import copy_tokenizer_files

    tokenizer = getattr(model, "tokenizer_config", None)
    config = {"model_cfg": config_to_open_clip(model.config, _named_tokenizer(tokenizer)),
              "preprocess_cfg": preprocess_to_open_clip(preprocess)}  # fmt: skip
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd = convert_to_open_clip(sd, model.config)
    with atomic_directory(path) as tmp:
        if tokenizer is not None:  # OpenCLIP's local-dir: loads read a Hugging Face tokenizer's files from here
            copy_tokenizer_files(tokenizer, tmp)
        save_file(sd, str(tmp / SAFETENSORS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return Path(path)
