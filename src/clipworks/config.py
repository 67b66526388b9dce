"""Typed architecture and preprocessing configs: one frozen dataclass per tower kind."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Union

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class VisionTransformerConfig:
    """A ViT image tower: OpenAI's CLIP ViT by default, SigLIP's with `pool="map"`.

    Attributes:
        image_size: input side in pixels (square).
        patch_size: side of each patch; the image is cut into (image_size // patch_size)**2 tokens (a remainder is
            not seen, as in OpenCLIP and timm: SigLIP SO400M/14 at 384px has a 27x27 grid).
        width: hidden size D.
        layers: number of transformer blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden size is int(width * mlp_ratio).
        act: "quick_gelu" (OpenAI weights) or "gelu".
        pool: "cls" takes the class token after `ln_post`; "map" is SigLIP's attention pool over all tokens; "avg"
            averages the patch tokens (the class token, if any, left out), then `ln_post` (CLIPA: OpenCLIP's
            `pool_type="avg"` with `final_ln_after_pool`); "attentional" is CoCa's attentional pooler (OpenCLIP's
            `attentional_pool`): `pool_queries` learned queries of size embed_dim attend over all tokens, then
            `ln_post`; the first query's output, projected, is the feature, the others are the tokens a caption
            decoder attends to.
        class_token: prepend a learned class token.
        patch_bias: the patch embedding convolution has a bias (SigLIP) or not (OpenAI).
        ln_pre: apply a LayerNorm to the tokens before the first block (OpenAI).
        projection: project pooled features to embed_dim (OpenAI) or pass them through (SigLIP).
        norm_eps: LayerNorm epsilon.
        pool_queries: learned queries of the "attentional" pool (OpenCLIP's `attn_pooler_queries`).
        pool_heads: attention heads of the "attentional" pool (OpenCLIP's `attn_pooler_heads`); the "map" pool uses
            `heads`.
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    pool: str = "cls"
    class_token: bool = True
    patch_bias: bool = False
    ln_pre: bool = True
    projection: bool = True
    norm_eps: float = 1e-5
    pool_queries: int = 256
    pool_heads: int = 8

    kind = "vit"


@dataclass(frozen=True)
class ResNetConfig:
    """OpenAI's modified ResNet image tower (3-conv stem, anti-aliased downsampling, attention pool).

    Attributes:
        image_size: input side in pixels (square).
        layers: bottleneck blocks in each of the four stages.
        width: channels of the stem; stage i has width * 2**i bottleneck channels (x4 out).
        heads: attention-pool heads; OpenAI uses width * 32 // 64.
    """

    image_size: int = 224
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    heads: int = 32

    kind = "resnet"


@dataclass(frozen=True)
class ConvNeXtConfig:
    """A ConvNeXt image tower as OpenCLIP builds it through timm, with a projection head.

    Attributes:
        image_size: input side in pixels (square).
        depths: blocks per stage.
        dims: channels per stage.
        drop_path: stochastic depth rate at the last block (linearly increasing), training only.
        norm_eps: LayerNorm epsilon.
        layer_scale_init: initial value of the per-channel block gains.
        proj_type: the head after pooling, as OpenCLIP's `timm_proj` names it: "linear" (one bias-free Linear to
            embed_dim) or "mlp" (Linear to 2 * embed_dim with bias, GELU, bias-free Linear to embed_dim:
            convnext_large_d).
    """

    image_size: int = 256
    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (128, 256, 512, 1024)
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    layer_scale_init: float = 1e-6
    proj_type: str = "linear"

    kind = "convnext"


# --- timm image towers (OpenCLIP's `timm_model_name` towers other than ConvNeXt and SigLIP): models/timm_tower.py ---

# OpenCLIP's `timm_proj`: None makes timm's own classifier, sized embed_dim, the projection; "linear" (one Linear) and
# "mlp" (Linear to 2 * embed_dim, GELU, Linear) add a head after timm's pooled features; "none" passes them through.
TIMM_PROJECTIONS = (None, "linear", "mlp", "none")
# Arguments of timm.create_model the tower sets from the config's own fields: model_kwargs may not name them.
_TIMM_RESERVED = ("pretrained", "num_classes", "global_pool", "drop_path_rate")
_TIMM_VALUE_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class TimmVisionConfig:
    """An image tower timm builds by model name, with OpenCLIP's `TimmModel` head: EVA-CLIP, PE-Core, ViTamin and
    MobileCLIP in OpenCLIP's configs.

    Attributes:
        model_name: timm's name of the model (`timm.list_models()`), e.g. "eva02_base_patch16_clip_224".
        image_size: the side the weights were trained at, which preprocessing produces. As in OpenCLIP, it is not
            passed to timm, which sizes the model from its own config for `model_name` (`model_kwargs` may say
            `img_size`).
        pool: timm's global pooling ("token", "avg", "map", ...); "" keeps the model's own (OpenCLIP's `timm_pool`).
        projection: one of TIMM_PROJECTIONS (OpenCLIP's `timm_proj`).
        proj_bias: the last layer of a "linear" or "mlp" head has a bias (OpenCLIP's `timm_proj_bias`).
        drop_path: stochastic depth rate given to timm (training only); None keeps timm's default.
        model_kwargs: further (name, value) pairs (or a dict) for `timm.create_model`, values JSON-like (numbers,
            strings, booleans, None and tuples of these): how a test builds a tiny tower of a named family. OpenCLIP
            builds timm towers by name alone, so a config with any cannot be written in its layout.
    """

    model_name: str
    image_size: int = 224
    pool: str = "avg"
    projection: str | None = "linear"
    proj_bias: bool = False
    drop_path: float | None = None
    model_kwargs: tuple[tuple[str, Any], ...] = ()

    kind = "timm"

    def __post_init__(self):
        if self.projection not in TIMM_PROJECTIONS:
            raise ValueError(f"unknown timm projection {self.projection!r}; expected one of {TIMM_PROJECTIONS}")
        if self.pool in ("abs_attn", "rot_attn"):
            raise ValueError(f"timm pool {self.pool!r} (OpenCLIP's attention-pool heads) is not supported; expected "
                             "one of timm's own poolings ('token', 'avg', 'map', ...) or ''")  # fmt: skip
        given = self.model_kwargs.items() if isinstance(self.model_kwargs, dict) else self.model_kwargs
        if any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in given):
            raise ValueError(f"model_kwargs must be (name, value) pairs or a dict, got {self.model_kwargs!r}")
        pairs = tuple((name, _frozen(value)) for name, value in given)
        names = [name for name, _ in pairs]
        bad = sorted({n for n in names if not isinstance(n, str) or n in _TIMM_RESERVED or names.count(n) > 1})
        if bad:
            raise ValueError(f"model_kwargs names {bad} are not strings, are repeated, or are set by the config's own "
                             f"fields ({', '.join(_TIMM_RESERVED)})")  # fmt: skip
        object.__setattr__(self, "model_kwargs", pairs)  # JSON's lists back to tuples: hashable, comparable


def _frozen(value: Any) -> Any:
    """A model_kwargs value with lists turned into tuples; anything not JSON-like is refused."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if not isinstance(value, _TIMM_VALUE_TYPES):
        raise ValueError(f"model_kwargs value {value!r} is not a number, string, boolean, None or tuple of these")
    return value


# --- end of the timm image towers ---


VisionConfig = Union[VisionTransformerConfig, ResNetConfig, ConvNeXtConfig, TimmVisionConfig]
VISION_CONFIGS: dict[str, type] = {
    c.kind: c for c in (VisionTransformerConfig, ResNetConfig, ConvNeXtConfig, TimmVisionConfig)
}


@dataclass(frozen=True)
class TextConfig:
    """The text transformer.

    Attributes:
        context_length: token positions L.
        vocab_size: tokenizer vocabulary size.
        width: hidden size D.
        layers: number of transformer blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden size is int(width * mlp_ratio).
        act: "quick_gelu" (OpenAI weights) or "gelu".
        causal: causal attention mask (CLIP) or bidirectional (SigLIP).
        pool: "argmax" pools at the highest token id (CLIP's end token), "eos" at the first `eos_id`,
            "last" at the final position (SigLIP), "cls" at a learned class embedding appended after the
            `context_length` token positions (CoCa: OpenCLIP's `embed_cls`; the position table has one row more, and
            attention skips padding as OpenCLIP's CoCa weights were trained: see `TextTransformer.key_mask`).
        eos_id: the end-of-text token id.
        pad_id: the padding token id (the "cls" pool's attention skips it).
        projection: project pooled features to embed_dim; False passes them through (SigLIP i18n SO400M,
            OpenCLIP's `proj_type='none'`), which needs embed_dim == width.
        proj_bias: the output projection has a bias (SigLIP).
        norm_eps: LayerNorm epsilon.
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"
    causal: bool = True
    pool: str = "argmax"
    eos_id: int = 49407
    pad_id: int = 0
    projection: bool = True
    proj_bias: bool = False
    norm_eps: float = 1e-5

    kind = "transformer"


# Text tower configs by kind. Further kinds (the Hugging Face text-encoder families) register below.
TEXT_CONFIGS: dict[str, type] = {TextConfig.kind: TextConfig}


# --- Hugging Face text-encoder families (OpenCLIP's `hf_model_name` towers), run natively: models/hf_text.py ---

# How a Hugging Face text tower turns its last hidden states (B, L, D) into one vector (B, D), by OpenCLIP's
# `hf_pooler_type` names: "mean" (mean_pooler: the mean over real tokens), "cls" (cls_pooler: the model's own pooler,
# dense + tanh on the first token, where the family has one (BERT); the first token's state where it has none),
# "first" (cls_last_hidden_state_pooler: the first token's state).
HF_TEXT_POOLS = ("mean", "cls", "first")
# How pooled features reach embed_dim (OpenCLIP's `hf_proj_type`): "mlp" is Linear(D, (D+E)//2) - GELU - Linear(E),
# "linear" one Linear, "none" the identity (needs width == embed_dim); none of them has a bias.
HF_TEXT_PROJECTIONS = ("mlp", "linear", "none")


@dataclass(frozen=True)
class BertTextConfig:
    """A BERT-family encoder as RoBERTa and XLM-RoBERTa build it: post-LN blocks, learned absolute positions numbered
    from `pad_id + 1` over real tokens only (padding keeps position `pad_id`), a token-type embedding (type 0 only)
    and a LayerNorm over the summed embeddings.

    Attributes:
        context_length: token positions L the tokenizer emits (OpenCLIP's text_cfg context_length).
        vocab_size: tokenizer vocabulary size.
        width: hidden size D.
        layers: number of encoder blocks.
        heads: attention heads per block.
        mlp_width: hidden size of each block's feed-forward layer.
        max_positions: rows of the position table (transformers' max_position_embeddings, 514 for RoBERTa: 512
            positions after the padding offset).
        type_vocab_size: rows of the token-type table.
        act: feed-forward activation ("gelu" is the exact, erf-based GELU).
        pad_id: the padding token id; attention and pooling skip it, and positions are offset by it.
        norm_eps: LayerNorm epsilon.
        pool: one of HF_TEXT_POOLS; "cls" adds the BERT pooler (dense + tanh on the first token).
        proj_type: one of HF_TEXT_PROJECTIONS.
    """

    context_length: int = 77
    vocab_size: int = 50265
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_positions: int = 514
    type_vocab_size: int = 1
    act: str = "gelu"
    pad_id: int = 1
    norm_eps: float = 1e-5
    pool: str = "mean"
    proj_type: str = "mlp"

    kind = "bert"


@dataclass(frozen=True)
class T5TextConfig:
    """The encoder of (m)T5 v1.1: RMSNorm pre-norm blocks without biases, attention without the 1/sqrt(d) scale and
    with a learned relative-position bias (bucketed offsets, shared by every block), a gated tanh-GELU feed-forward
    layer, and a final RMSNorm. No absolute positions.

    Attributes:
        context_length: token positions L the tokenizer emits.
        vocab_size: tokenizer vocabulary size.
        width: hidden size D (transformers' d_model).
        layers: number of encoder blocks.
        heads: attention heads per block.
        head_width: size of each head (d_kv); heads * head_width need not equal width.
        mlp_width: hidden size of the gated feed-forward layer (d_ff).
        rel_buckets: relative-position buckets (half for each direction).
        rel_max_distance: offsets at or beyond this share the last bucket.
        pad_id: the padding token id; attention and pooling skip it.
        norm_eps: RMSNorm epsilon.
        pool: one of HF_TEXT_POOLS ("cls" and "first" are the same here: T5 has no pooler).
        proj_type: one of HF_TEXT_PROJECTIONS.
    """

    context_length: int = 77
    vocab_size: int = 250112
    width: int = 768
    layers: int = 12
    heads: int = 12
    head_width: int = 64
    mlp_width: int = 2048
    rel_buckets: int = 32
    rel_max_distance: int = 128
    pad_id: int = 0
    norm_eps: float = 1e-6
    pool: str = "mean"
    proj_type: str = "mlp"

    kind = "t5"


@dataclass(frozen=True)
class M2M100TextConfig:
    """The encoder of M2M100 / NLLB: pre-LN blocks, token embeddings scaled by sqrt(width), fixed sinusoidal positions
    numbered from `pad_id + 1` over real tokens only (padding gets a zero vector), and a final LayerNorm.

    Attributes:
        context_length: token positions L the tokenizer emits.
        vocab_size: tokenizer vocabulary size.
        width: hidden size D (transformers' d_model).
        layers: number of encoder blocks.
        heads: attention heads per block.
        mlp_width: hidden size of each block's feed-forward layer (encoder_ffn_dim).
        act: feed-forward activation ("relu" for NLLB).
        scale_embedding: multiply token embeddings by sqrt(width).
        pad_id: the padding token id; attention and pooling skip it, and positions are offset by it.
        norm_eps: LayerNorm epsilon.
        pool: one of HF_TEXT_POOLS ("cls" and "first" are the same here: the encoder has no pooler).
        proj_type: one of HF_TEXT_PROJECTIONS.
    """

    context_length: int = 77
    vocab_size: int = 256206
    width: int = 1024
    layers: int = 12
    heads: int = 16
    mlp_width: int = 4096
    act: str = "relu"
    scale_embedding: bool = True
    pad_id: int = 1
    norm_eps: float = 1e-5
    pool: str = "cls"
    proj_type: str = "linear"

    kind = "m2m100"


HFTextConfig = Union[BertTextConfig, T5TextConfig, M2M100TextConfig]
TEXT_CONFIGS.update({c.kind: c for c in (BertTextConfig, T5TextConfig, M2M100TextConfig)})

# --- end of the Hugging Face text-encoder families ---


# --- CoCa's caption decoder (models/coca.py) ---


@dataclass(frozen=True)
class CoCaDecoderConfig:
    """CoCa's caption decoder (OpenCLIP's `MultimodalTransformer`): pre-norm blocks, each a causal self-attention
    block over the text tower's token states then a cross-attention block over the image tower's caption tokens
    (MLPs 4 x width wide, as OpenCLIP builds them whatever its config says), a final LayerNorm and a bias-free
    projection to the vocabulary.

    Attributes:
        context_length: the longest text it decodes (OpenCLIP's `multimodal_cfg.context_length`).
        vocab_size: logits per position; OpenCLIP sizes it by the text tower's vocabulary.
        width: hidden size D; the text tower's width and the image tower's caption-token width must equal it.
        layers: number of (self-attention, cross-attention) block pairs.
        heads: attention heads per block.
        act: "gelu" or "quick_gelu" (OpenCLIP's `quick_gelu` flag reaches the decoder too).
    """

    context_length: int = 76
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    act: str = "gelu"


# --- end of CoCa's caption decoder ---


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP model: both towers and the shared embedding size.

    A model may have one tower only (transformers' `CLIPVisionModelWithProjection`, `CLIPTextModelWithProjection`):
    the other is None.

    Attributes:
        embed_dim: size E of the shared embedding space.
        vision: the image tower's config, or None for a text-only model.
        text: the text tower's config, or None for an image-only model.
        init_logit_scale: initial log temperature, ln(1/0.07) for CLIP, ln(10) for SigLIP.
        init_logit_bias: initial logit bias for sigmoid-loss models; None for softmax CLIP (no bias).
        decoder: CoCa's caption decoder, or None (every model but CoCa: nothing of it is built or stored).
    """

    embed_dim: int
    vision: VisionConfig | None
    text: Any = field(default_factory=TextConfig)  # one of TEXT_CONFIGS' classes, or None
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    decoder: CoCaDecoderConfig | None = None

    def __post_init__(self):
        if self.vision is None and self.text is None:
            raise ValueError("a CLIPConfig needs at least one tower: vision and text are both None")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for tower in ("vision", "text"):
            cfg = getattr(self, tower)
            if cfg is not None:
                d[tower] = {"kind": cfg.kind, **d[tower]}
        if self.decoder is None:  # configs of models without a decoder read as they did before CoCa
            del d["decoder"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        d = dict(d)
        vision = _tower_from_dict(d.pop("vision"), VISION_CONFIGS, "vit", "vision")
        text = _tower_from_dict(d.pop("text", {}), TEXT_CONFIGS, TextConfig.kind, "text")
        decoder = d.pop("decoder", None)
        decoder = None if decoder is None else _build(CoCaDecoderConfig, decoder)
        return cls(vision=vision, text=text, decoder=decoder, **_check_keys(cls, d, exclude={"vision", "text"}))


def _tower_from_dict(d: dict[str, Any] | None, kinds: dict[str, type], default: str, where: str):
    if d is None:
        return None
    d = dict(d)
    kind = d.pop("kind", default)  # configs written before towers had kinds name none
    if kind not in kinds:
        raise ValueError(f"unknown {where} tower kind {kind!r}; expected one of {sorted(kinds)}")
    return _build(kinds[kind], d)


@dataclass(frozen=True)
class PreprocessConfig:
    """How images were prepared for the weights: travels with the checkpoint, not the architecture.

    Attributes:
        image_size: output side in pixels.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        interpolation: "bicubic", "bilinear" or "nearest".
        resize_mode: "shortest" (resize the short side, centre crop; OpenAI), "longest" (resize the long side,
            pad to square with `fill_color`), or "squash" (resize both sides, ignoring aspect ratio).
        fill_color: padding value (0-255) for "longest".
    """

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        return _build(cls, d)


TOKENIZER_KINDS = ("clip", "hf")
TEXT_CLEANING = ("lower", "canonicalize", "whitespace")


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer a text tower was trained with: like preprocessing, it travels with the weights.

    Attributes:
        kind: "clip" is clipworks' built-in CLIP BPE (OpenAI's vocabulary); "hf" is a Hugging Face `tokenizers`
            tokenizer read from the release's own files (SentencePiece/Unigram for SigLIP and XLM-R, Gemma's BPE
            for SigLIP 2, byte-level BPE for RoBERTa, NLLB's, ...), as OpenCLIP's `HFTokenizer` reads them.
        source: for "hf", the Hugging Face hub repository whose tokenizer files are used (OpenCLIP's
            `hf_tokenizer_name`, e.g. "timm/ViT-B-16-SigLIP"); None when the files sit beside the weights (a
            `local-dir:` or `hf-hub:` checkpoint, or a clipworks directory that saved them).
        clean: text cleaning before tokenizing, as OpenCLIP names it: "lower" (ftfy, HTML unescape, whitespace
            collapsed, lower case: CLIP's), "canonicalize" (that, then punctuation removed: SigLIP's), or
            "whitespace" (ftfy, HTML unescape, whitespace collapsed, case kept: the HF text towers').
        context_length: tokens per text, special tokens included; texts are padded or truncated to it.
        strip_sep_token: replace the separator token BERT's framing ends a text with by id 0, as OpenCLIP's
            `HFTokenizer(strip_sep_token=True)` does for CLIPA (whose text tower pools the last position).
        language: the source-language code a multilingual tokenizer prefixes (NLLB: "eng_Latn"); None for the
            tokenizer's default.
    """

    kind: str = "clip"
    source: str | None = None
    clean: str = "lower"
    context_length: int = 77
    language: str | None = None
    strip_sep_token: bool = False

    def __post_init__(self):
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}; expected one of {TOKENIZER_KINDS}")
        if self.clean not in TEXT_CLEANING:
            raise ValueError(f"unknown text cleaning {self.clean!r}; expected one of {TEXT_CLEANING}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        return _build(cls, d)


def _check_keys(cls: type, d: dict[str, Any], exclude: set[str] = frozenset()) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; valid keys are {sorted(names)}")
    return d


def _build(cls: type, d: dict[str, Any]):
    d = _check_keys(cls, dict(d))
    # JSON has no tuples: restore them for fields whose default is a tuple so configs compare equal.
    for f in dataclasses.fields(cls):
        if f.name in d and isinstance(d[f.name], list):
            d[f.name] = tuple(d[f.name])
    return cls(**d)
