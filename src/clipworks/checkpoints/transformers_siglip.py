"""Conversion between transformers' `SiglipModel` / `Siglip2Model` directories and clipworks (configs and weights).

A SigLIP model is our CLIP with SigLIP's switches (as `presets._siglip` sets them): an attention-pool (MAP) ViT with
no class token, pre-norm or projection, and a bidirectional text tower pooled at its last position with a biased
projection. Beyond renames, three things differ: q/k/v are fused into our `qkv` (see transformers_common); the MAP
head's packed `attention.in_proj_*` (q, then k and v, as `nn.MultiheadAttention` stacks them) is split into our
query projection `q` and key-value projection `kv`; and the learned scale and bias are (1,)-shaped where ours are
scalars.

Siglip2 (NaFlex) embeds flattened patches with a Linear and resizes its position table to each image's patch grid.
clipworks takes fixed-size square images only, so a Siglip2 checkpoint is read at one fixed resolution: the Linear
becomes our patch convolution, and the position table is resized once, exactly as transformers resizes it (bilinear,
antialiased, in float32), to the largest square patch grid within the image processor's `max_num_patches` (the
vision config's `num_patches` without one) -- the grid Siglip2's own processor gives every square image. NaFlex's
variable resolution and aspect ratio are not supported; the models are written back as fixed-resolution
`SiglipModel`s.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import SIGLIP_MEAN, SIGLIP_STD, CLIPConfig, PreprocessConfig, TextConfig, VisionTransformerConfig
from ..models.keymap import KeyMap, Rule, block_rules
from .io import CheckpointError
from .transformers_common import (
    ACT_TO,
    BLOCK_KEYS,
    POSITION_IDS,
    WB,
    act,
    encoder_to_transformers,
    fuse_qkv,
    mlp_ratio,
    preprocess_from_transformers,
    preprocess_to_transformers,
    require_rgb,
    split_qkv,
    square,
    sub_config,
)

# SigLIP's initial temperature and bias (the values OpenCLIP's SigLIP presets carry); transformers keeps only the
# trained values, in the weights.
LOGIT_SCALE, LOGIT_BIAS = math.log(10.0), -10.0
# transformers' defaults (SiglipTextConfig, SiglipVisionConfig, Siglip2VisionConfig) for fields a config may omit.
_TEXT_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "pad_token_id": 1, "eos_token_id": 49407, "projection_size": None,
}  # fmt: skip
_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    "vision_use_head": True,
}  # fmt: skip
_SIGLIP2_VISION_DEFAULTS = {**{k: v for k, v in _VISION_DEFAULTS.items() if k != "image_size"}, "num_patches": 256}
_SIGLIP_PREPROCESS = {"resample": 3, "image_mean": list(SIGLIP_MEAN), "image_std": list(SIGLIP_STD),
                      "do_center_crop": False}  # fmt: skip
_SIGLIP2_PREPROCESS = {**_SIGLIP_PREPROCESS, "resample": 2}  # Siglip2ImageProcessor resamples bilinearly


def _token_ids(t: dict[str, Any], vocab_size: int) -> tuple[int, int]:
    """(end id, padding id) of the text tower: SigLIP's own for its known vocabularies (transformers' config
    defaults, 49407 and 1, are CLIP's), else what the config says."""
    from ..presets import _SIGLIP_VOCABS  # imported here: presets imports checkpoint modules

    if vocab_size in _SIGLIP_VOCABS:
        return _SIGLIP_VOCABS[vocab_size]
    eos = t["eos_token_id"]
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    for field, value in (("eos_token_id", eos), ("pad_token_id", t["pad_token_id"])):
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(f"text_config.{field}={value!r}: expected one integer token id")
    return eos, t["pad_token_id"]


def _text(t: dict[str, Any], embed_dim: int) -> TextConfig:
    projection = t["projection_size"] if t["projection_size"] is not None else t["hidden_size"]
    if projection != embed_dim:
        raise CheckpointError(f"text_config.projection_size={projection!r} differs from vision_config.hidden_size="
                              f"{embed_dim!r}: both towers must meet in one embedding space")  # fmt: skip
    eos, pad = _token_ids(t, t["vocab_size"])
    return TextConfig(
        context_length=t["max_position_embeddings"],
        vocab_size=t["vocab_size"],
        width=t["hidden_size"],
        layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"],
        mlp_ratio=mlp_ratio(t["hidden_size"], t["intermediate_size"], "text_config.intermediate_size"),
        act=act(t["hidden_act"], "text_config.hidden_act"),
        causal=False,
        pool="last",
        eos_id=eos,
        pad_id=pad,
        projection=True,
        proj_bias=True,
        norm_eps=t["layer_norm_eps"],
    )


def _vision(v: dict[str, Any], image_size: int) -> VisionTransformerConfig:
    require_rgb(v["num_channels"], "vision_config.num_channels")
    if v["vision_use_head"] is not True:
        raise CheckpointError(f"vision_config.vision_use_head={v['vision_use_head']!r} is not supported: clipworks' "
                              "SigLIP image tower pools with its attention head")  # fmt: skip
    return VisionTransformerConfig(
        image_size=image_size,
        patch_size=square(v["patch_size"], "vision_config.patch_size"),
        width=v["hidden_size"],
        layers=v["num_hidden_layers"],
        heads=v["num_attention_heads"],
        mlp_ratio=mlp_ratio(v["hidden_size"], v["intermediate_size"], "vision_config.intermediate_size"),
        act=act(v["hidden_act"], "vision_config.hidden_act"),
        pool="map",
        class_token=False,
        patch_bias=True,
        ln_pre=False,
        projection=False,
        norm_eps=v["layer_norm_eps"],
    )


def _clip_config(vision: VisionTransformerConfig, t: dict[str, Any]) -> CLIPConfig:
    text = _text(t, vision.width)
    return CLIPConfig(vision.width, vision, text, init_logit_scale=LOGIT_SCALE, init_logit_bias=LOGIT_BIAS)


def config_from_siglip(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> CLIPConfig:
    """A clipworks config from a transformers `SiglipModel` config.json dict (`preprocessor` is not needed)."""
    v = sub_config(config, "vision_config", _VISION_DEFAULTS)
    vision = _vision(v, square(v["image_size"], "vision_config.image_size"))
    return _clip_config(vision, sub_config(config, "text_config", _TEXT_DEFAULTS))


def _positive_int(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{field}={value!r}: expected a positive integer")
    return value


def siglip2_grid(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> int:
    """The side of the square patch grid a Siglip2 model is read at: the largest within the processor's
    `max_num_patches` (the vision config's `num_patches` when there is no preprocessor_config.json)."""
    v = sub_config(config, "vision_config", _SIGLIP2_VISION_DEFAULTS)
    if preprocessor is not None and "max_num_patches" in preprocessor:
        patches = _positive_int(preprocessor["max_num_patches"], "preprocessor_config.json max_num_patches")
    else:
        patches = _positive_int(v["num_patches"], "vision_config.num_patches")
    return math.isqrt(patches)


def config_from_siglip2(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> CLIPConfig:
    """A clipworks config from a transformers `Siglip2Model` config.json dict and its preprocessor_config.json dict:
    a fixed-resolution square model, at the grid `siglip2_grid` chooses (NaFlex input is not supported)."""
    v = sub_config(config, "vision_config", _SIGLIP2_VISION_DEFAULTS)
    table = _positive_int(v["num_patches"], "vision_config.num_patches")
    if math.isqrt(table) ** 2 != table:
        raise CheckpointError(f"vision_config.num_patches={table}: the position table must be a square grid")
    patch = square(v["patch_size"], "vision_config.patch_size")
    vision = _vision(v, siglip2_grid(config, preprocessor) * patch)
    return _clip_config(vision, sub_config(config, "text_config", _TEXT_DEFAULTS))


def _check_processing_flags(pp: dict[str, Any]) -> None:
    for field in ("do_rescale", "do_normalize"):
        if pp.get(field, True) is not True:
            raise CheckpointError(f"{field}={pp[field]!r} is not supported: clipworks' transforms always do it")
    factor = pp.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or abs(factor - 1 / 255) > 1e-9:
        raise CheckpointError(f"rescale_factor={factor!r} is not supported; expected 1/255")


def preprocess_from_siglip(pp: dict[str, Any] | None, cfg: CLIPConfig) -> PreprocessConfig:
    """A PreprocessConfig from a `SiglipImageProcessor` preprocessor_config.json dict (or None, for its defaults:
    both sides resized to the model's size, bicubic, mean and std 0.5)."""
    pp = {k: v for k, v in (pp or {}).items() if v is not None}
    _check_processing_flags(pp)
    side = cfg.vision.image_size
    return preprocess_from_transformers({"size": {"height": side, "width": side}, **_SIGLIP_PREPROCESS, **pp}, side)


def preprocess_from_siglip2(pp: dict[str, Any] | None, cfg: CLIPConfig) -> PreprocessConfig:
    """A PreprocessConfig from a `Siglip2ImageProcessor` preprocessor_config.json dict: both sides resized to the
    model's fixed resolution, which is what the processor does to a square image.

    Raises:
        CheckpointError: `do_resize` False (each image patchified at its own size: NaFlex) or a patch size other than
            the model's.
    """
    pp = {k: v for k, v in (pp or {}).items() if v is not None}
    _check_processing_flags(pp)
    if pp.get("do_resize", True) is not True:
        raise CheckpointError("do_resize=False asks for each image at its own resolution and aspect ratio (NaFlex), "
                              "which clipworks does not support: it takes fixed-size square images")  # fmt: skip
    if pp.get("patch_size", cfg.vision.patch_size) != cfg.vision.patch_size:
        raise CheckpointError(f"patch_size={pp['patch_size']!r} differs from the model's {cfg.vision.patch_size}")
    side = cfg.vision.image_size
    return preprocess_from_transformers({**_SIGLIP2_PREPROCESS, **pp, "size": {"height": side, "width": side},
                                         "do_center_crop": False}, side)  # fmt: skip


def preprocess_to_siglip(pp: PreprocessConfig) -> dict[str, Any]:
    """The `SiglipImageProcessor` preprocessor_config.json dict for `pp` (`preprocess_from_siglip` inverts it).

    Raises:
        ValueError: a resize mode or interpolation the image processor cannot express.
    """
    d = preprocess_to_transformers(pp)
    d.pop("processor_class")  # SiglipProcessor would need the tokenizer's files, which may not be there
    return {**d, "image_processor_type": "SiglipImageProcessor"}


def _check_expressible(cfg: CLIPConfig) -> None:
    v, t = cfg.vision, cfg.text
    if v is None or t is None:
        missing = "text" if t is None else "image"
        raise ValueError(f"transformers' SiglipModel has both towers; this model has no {missing} tower")
    if v.kind != "vit" or t.kind != "transformer":
        raise ValueError(f"transformers' SiglipModel has a ViT image tower and a transformer text tower; this config "
                         f"has {v.kind!r} and {t.kind!r} towers")  # fmt: skip
    problems = [
        name
        for name, bad in [
            ("vision.pool must be 'map'", v.pool != "map"),
            ("vision.class_token must be False", v.class_token),
            ("vision.patch_bias must be True", not v.patch_bias),
            ("vision.ln_pre must be False", v.ln_pre),
            ("vision.projection must be False", v.projection),
            ("text.causal must be False", t.causal),
            ("text.pool must be 'last'", t.pool != "last"),
            ("init_logit_bias must be set (a sigmoid-loss model)", cfg.init_logit_bias is None),
            (f"vision.act must be one of {sorted(ACT_TO)}", v.act not in ACT_TO),
            (f"text.act must be one of {sorted(ACT_TO)}", t.act not in ACT_TO),
        ]
        if bad
    ]
    if problems:
        raise ValueError("config cannot be a transformers SiglipModel: " + "; ".join(problems))


def config_to_siglip(cfg: CLIPConfig) -> dict[str, Any]:
    """The transformers `SiglipModel` config.json dict for a SigLIP-style config (`config_from_siglip` reads it).

    A text tower without projection is written with an identity head (`convert_to_siglip`), so it reads back with one.

    Raises:
        ValueError: a config SiglipModel cannot hold, naming every setting that stands in the way.
    """
    _check_expressible(cfg)
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": {
            "model_type": "siglip_text_model",
            **encoder_to_transformers(t),
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.context_length,
            "projection_size": cfg.embed_dim,
            "pad_token_id": t.pad_id,
            "eos_token_id": t.eos_id,
            "bos_token_id": None,  # SigLIP's tokenizers add no start token (transformers' default is CLIP's 49406)
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            **encoder_to_transformers(v),
            "num_channels": 3,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "vision_use_head": True,
        },
    }


def _scalar(t: Tensor) -> Tensor:
    if t.numel() != 1:
        raise CheckpointError(f"expected a one-element tensor for the logit scale or bias, got shape {tuple(t.shape)}")
    return t.reshape(())


def _vector(t: Tensor) -> Tensor:
    return t.reshape(1)


_V, _T = "vision_model", "text_model"
_HEAD = f"{_V}.head"
_HEAD_KEYS = [
    ("attention.q_in_proj", "q"),  # synthetic, as the next: split from the packed in_proj by _split_head
    ("attention.kv_in_proj", "kv"),
    ("attention.out_proj", "proj"),
    ("layernorm", "norm"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
]
KEYMAP = KeyMap(
    [
        *[Rule(f"visual.patch_embed.{p}", f"{_V}.embeddings.patch_embedding.{p}") for p in WB],
        Rule("visual.pos_embed", f"{_V}.embeddings.position_embedding.weight"),
        *block_rules(f"{_V}.encoder.layers", "visual.transformer.blocks", BLOCK_KEYS),
        *[Rule(f"visual.ln_post.{p}", f"{_V}.post_layernorm.{p}") for p in WB],
        Rule("visual.attn_pool.latent", f"{_HEAD}.probe"),
        *[Rule(f"visual.attn_pool.{ours}.{p}", f"{_HEAD}.{theirs}.{p}") for theirs, ours in _HEAD_KEYS for p in WB],
        Rule("text.token_embed.weight", f"{_T}.embeddings.token_embedding.weight"),
        Rule("text.pos_embed", f"{_T}.embeddings.position_embedding.weight"),
        *block_rules(f"{_T}.encoder.layers", "text.transformer.blocks", BLOCK_KEYS),
        *[Rule(f"text.ln_final.{p}", f"{_T}.final_layer_norm.{p}") for p in WB],
        *[Rule(f"text.proj.{p}", f"{_T}.head.{p}") for p in WB],
        Rule("logit_scale", "logit_scale", _scalar, _vector),
        Rule("logit_bias", "logit_bias", _scalar, _vector),
    ]
)


def _split_head(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The MAP head's packed (3D, ...) `in_proj` as a query part (D, ...) and a key-value part (2D, ...)."""
    out = {}
    for key, value in sd.items():
        param = key.removeprefix(f"{_HEAD}.attention.in_proj_")
        if key == param or param not in WB:
            out[key] = value
            continue
        if value.shape[0] % 3:
            raise CheckpointError(f"{key}: shape {tuple(value.shape)} does not stack q, k and v")
        d = value.shape[0] // 3
        out[f"{_HEAD}.attention.q_in_proj.{param}"] = value[:d]
        out[f"{_HEAD}.attention.kv_in_proj.{param}"] = value[d:]
    return out


def _join_head(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = dict(sd)
    for param in WB:
        q, kv = out.pop(f"{_HEAD}.attention.q_in_proj.{param}"), out.pop(f"{_HEAD}.attention.kv_in_proj.{param}")
        out[f"{_HEAD}.attention.in_proj_{param}"] = torch.cat([q, kv])  # (3D, D) or (3D,)
    return out


def convert_from_siglip(sd: dict[str, Tensor], cfg: CLIPConfig | None = None) -> dict[str, Tensor]:
    """A transformers `SiglipModel` state dict to clipworks' `CLIP` keys (position_ids buffers are dropped).

    Raises:
        CheckpointError: incomplete or mismatched attention projections.
        ValueError: keys that no rule converts, named.
    """
    sd = {k: v for k, v in sd.items() if k not in POSITION_IDS}
    return KEYMAP.to_ours(_split_head(fuse_qkv(sd)))


def convert_to_siglip(sd: dict[str, Tensor], cfg: CLIPConfig) -> dict[str, Tensor]:
    """clipworks' `CLIP` keys to the state dict transformers' `SiglipModel` loads (inverse of the above).

    SiglipModel's text head always exists: a tower without projection gets an identity head (exact: each output is
    one input times one), one without bias a zero bias.
    """
    sd = dict(sd)
    ref = sd["text.token_embed.weight"]
    if "text.proj.weight" not in sd:
        sd["text.proj.weight"] = torch.eye(cfg.text.width, dtype=ref.dtype)
    if "text.proj.bias" not in sd:
        sd["text.proj.bias"] = torch.zeros(cfg.embed_dim, dtype=ref.dtype)
    return split_qkv(_join_head(KEYMAP.to_theirs(sd)))


def resize_position_table(table: Tensor, grid: int) -> Tensor:
    """Siglip2's (n*n, D) position table resized to a (grid*grid, D) one, as `Siglip2VisionEmbeddings` resizes it
    for a grid x grid image (bilinear, antialiased, in float32, row-major)."""
    n = math.isqrt(table.shape[0])
    if n * n != table.shape[0]:
        raise CheckpointError(f"position table of {table.shape[0]} rows: expected a square grid")
    D = table.shape[1]
    x = table.reshape(n, n, D).permute(2, 0, 1)[None].float()  # (1, D, n, n)
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
    return x.reshape(D, grid * grid).t().to(table.dtype).contiguous()  # (grid * grid, D)


def convert_from_siglip2(sd: dict[str, Tensor], cfg: CLIPConfig) -> dict[str, Tensor]:
    """A transformers `Siglip2Model` state dict to clipworks' `CLIP` keys, for the fixed square grid of `cfg`.

    The patch Linear sees each patch flattened as (row, column, channel) -- Siglip2's processor permutes
    (C, h, p, w, p) to (h, w, p, p, C) -- so its (D, p*p*3) weight is our convolution's (D, 3, p, p) permuted.
    """
    sd = dict(sd)
    p = cfg.vision.patch_size
    patch = f"{_V}.embeddings.patch_embedding.weight"
    if patch in sd:
        w = sd[patch]
        if w.ndim != 2 or w.shape[1] != 3 * p * p:
            raise CheckpointError(f"{patch}: shape {tuple(w.shape)}, expected (D, {3 * p * p}) for {p}px RGB patches")
        sd[patch] = w.reshape(w.shape[0], p, p, 3).permute(0, 3, 1, 2).contiguous()  # (D, 3, p, p)
    positions = f"{_V}.embeddings.position_embedding.weight"
    if positions in sd:
        sd[positions] = resize_position_table(sd[positions], cfg.vision.image_size // p)
    return convert_from_siglip(sd)
