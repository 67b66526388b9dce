"""The architecture presets, under OpenCLIP's model names."""

from __future__ import annotations

import difflib
import math
from dataclasses import replace

from .checkpoints.open_clip_hf import hf_model_name, hf_text_config
from .config import (
    CLIPConfig, CoCaDecoderConfig, ConvNeXtConfig, ResNetConfig, TextConfig, TimmVisionConfig, TokenizerConfig,
    VisionTransformerConfig,
)  # fmt: skip


def _text(width: int, heads: int, layers: int = 12) -> TextConfig:
    return TextConfig(width=width, heads=heads, layers=layers)


def _resnet(embed: int, layers, width: int, image: int, text: TextConfig) -> CLIPConfig:
    # OpenAI's attention pool has width * 32 // 64 heads (64-channel heads over width * 32 channels).
    vision = ResNetConfig(image_size=image, layers=tuple(layers), width=width, heads=width * 32 // 64)
    return CLIPConfig(embed, vision, text)


def _vit(embed: int, patch: int, width: int, layers: int, text: TextConfig, image: int = 224,
         head_width: int = 64, mlp_ratio: float = 4.0) -> CLIPConfig:  # fmt: skip
    vision = VisionTransformerConfig(
        image_size=image, patch_size=patch, width=width, layers=layers, heads=width // head_width, mlp_ratio=mlp_ratio
    )
    return CLIPConfig(embed, vision, text)


# timm's ConvNeXt sizes, which OpenCLIP builds by name ("convnext_<size>"): (stage depths, stage widths, LayerNorm eps).
CONVNEXT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]] = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768), 1e-6),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768), 1e-6),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024), 1e-6),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536), 1e-6),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048), 1e-6),
    "xxlarge": ((3, 4, 30, 3), (384, 768, 1536, 3072), 1e-5),
}


def _convnext(size: str, embed: int, image: int, text: TextConfig, proj_type: str = "linear") -> CLIPConfig:
    depths, dims, eps = CONVNEXT_SIZES[size]
    vision = ConvNeXtConfig(image, depths, dims, drop_path=0.1, norm_eps=eps, proj_type=proj_type)
    return CLIPConfig(embed, vision, text)


_BASE: dict[str, CLIPConfig] = {
    "RN50": _resnet(1024, (3, 4, 6, 3), 64, 224, _text(512, 8)),
    "RN101": _resnet(512, (3, 4, 23, 3), 64, 224, _text(512, 8)),
    "RN50x4": _resnet(640, (4, 6, 10, 6), 80, 288, _text(640, 10)),
    "RN50x16": _resnet(768, (6, 8, 18, 8), 96, 384, _text(768, 12)),
    "RN50x64": _resnet(1024, (3, 15, 36, 10), 128, 448, _text(1024, 16)),
    "ViT-B-32": _vit(512, 32, 768, 12, _text(512, 8)),
    "ViT-B-32-256": _vit(512, 32, 768, 12, _text(512, 8), image=256),
    "ViT-B-16": _vit(512, 16, 768, 12, _text(512, 8)),
    "ViT-L-14": _vit(768, 14, 1024, 24, _text(768, 12)),
    "ViT-L-14-336": _vit(768, 14, 1024, 24, _text(768, 12), image=336),
    "ViT-H-14": _vit(1024, 14, 1280, 32, _text(1024, 16, 24), head_width=80),
    "ViT-g-14": _vit(1024, 14, 1408, 40, _text(1024, 16, 24), head_width=88, mlp_ratio=4.3637),
    "ViT-bigG-14": _vit(1280, 14, 1664, 48, _text(1280, 20, 32), head_width=104, mlp_ratio=4.9231),
    "ViT-B-16-plus": _vit(640, 16, 896, 12, _text(640, 10)),
    "ViT-B-16-plus-240": _vit(640, 16, 896, 12, _text(640, 10), image=240),
    "ViT-H-14-378": _vit(1024, 14, 1280, 32, _text(1024, 16, 24), image=378, head_width=80),
    "convnext_tiny": _convnext("tiny", 1024, 224, _text(512, 8)),
    "convnext_small": _convnext("small", 512, 224, _text(512, 8)),
    "convnext_base": _convnext("base", 512, 224, _text(512, 8)),
    "convnext_base_w": _convnext("base", 640, 256, _text(640, 10)),
    "convnext_base_w_320": _convnext("base", 640, 320, _text(640, 10)),
    "convnext_large": _convnext("large", 768, 224, _text(768, 12)),
    "convnext_large_d": _convnext("large", 768, 256, _text(768, 12, 16), proj_type="mlp"),
    "convnext_large_d_320": _convnext("large", 768, 320, _text(768, 12, 16), proj_type="mlp"),
    "convnext_xlarge": _convnext("xlarge", 1024, 256, _text(1024, 16, 20)),
    "convnext_xxlarge": _convnext("xxlarge", 1024, 256, _text(1024, 16, 24)),
    "convnext_xxlarge_320": _convnext("xxlarge", 1024, 320, _text(1024, 16, 24)),
}


# SigLIP towers as timm builds them: (width, layers, heads, mlp_ratio) of the image tower, then of the text tower.
_SIGLIP_SIZES = {
    "B": ((768, 12, 12, 4.0), (768, 12, 12, 4.0)),
    "L": ((1024, 24, 16, 4.0), (1024, 24, 16, 4.0)),
    "SO400M": ((1152, 27, 16, 3.7362), (1152, 27, 16, 3.7362)),
    "gopt": ((1536, 40, 16, 4.0), (1152, 27, 16, 3.7362)),  # giant-opt image tower, SO400M text tower
}
# Text vocabularies: SigLIP's English SentencePiece, its multilingual one (mC4) and SigLIP 2's Gemma tokenizer;
# (end id, padding id) as their tokenizers emit them.
_SIGLIP_VOCABS = {32000: (1, 1), 250000: (1, 1), 256000: (1, 0)}


def _siglip(size: str, patch: int, image: int, vocab: int, *, vision_act: str = "gelu", text_act: str = "gelu",
            context: int = 64, text_projection: bool = True) -> CLIPConfig:  # fmt: skip
    """A SigLIP / SigLIP 2 model as OpenCLIP builds it: timm's attention-pool ViT (no class token, patch bias, no
    ln_pre, no projection) and a bidirectional text tower pooled at the last position."""
    (vw, vl, vh, vr), (tw, tl, th, tr) = _SIGLIP_SIZES[size]
    eos, pad = _SIGLIP_VOCABS[vocab]
    vision = VisionTransformerConfig(
        image_size=image, patch_size=patch, width=vw, layers=vl, heads=vh, mlp_ratio=vr, act=vision_act, pool="map",
        class_token=False, patch_bias=True, ln_pre=False, projection=False, norm_eps=1e-6,
    )  # fmt: skip
    text = TextConfig(
        context_length=context, vocab_size=vocab, width=tw, heads=th, layers=tl, mlp_ratio=tr, act=text_act,
        causal=False, pool="last", eos_id=eos, pad_id=pad, projection=text_projection, proj_bias=text_projection,
        norm_eps=1e-6,
    )  # fmt: skip
    return CLIPConfig(vw, vision, text, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)


_TANH = {"vision_act": "gelu_tanh"}  # timm's newer SigLIP ViTs (B/32, L/16-512, SO400M/16, gopt) use tanh GELU
_SIGLIP2 = {"text_act": "gelu_tanh"}  # SigLIP 2's text tower
_SIGLIP_PRESETS: dict[str, CLIPConfig] = {
    "ViT-B-16-SigLIP": _siglip("B", 16, 224, 32000),
    "ViT-B-16-SigLIP-256": _siglip("B", 16, 256, 32000),
    "ViT-B-16-SigLIP-384": _siglip("B", 16, 384, 32000),
    "ViT-B-16-SigLIP-512": _siglip("B", 16, 512, 32000),
    "ViT-B-16-SigLIP-i18n-256": _siglip("B", 16, 256, 250000),
    "ViT-L-16-SigLIP-256": _siglip("L", 16, 256, 32000),
    "ViT-L-16-SigLIP-384": _siglip("L", 16, 384, 32000),
    "ViT-SO400M-14-SigLIP": _siglip("SO400M", 14, 224, 32000, context=16),
    "ViT-SO400M-14-SigLIP-378": _siglip("SO400M", 14, 378, 32000),
    "ViT-SO400M-14-SigLIP-384": _siglip("SO400M", 14, 384, 32000),
    "ViT-SO400M-16-SigLIP-i18n-256": _siglip("SO400M", 16, 256, 250000, **_TANH, text_projection=False),
    "ViT-B-32-SigLIP2-256": _siglip("B", 32, 256, 256000, **_TANH, **_SIGLIP2),
    "ViT-B-16-SigLIP2": _siglip("B", 16, 224, 256000, **_SIGLIP2),
    "ViT-B-16-SigLIP2-256": _siglip("B", 16, 256, 256000, **_SIGLIP2),
    "ViT-B-16-SigLIP2-384": _siglip("B", 16, 384, 256000, **_SIGLIP2),
    "ViT-B-16-SigLIP2-512": _siglip("B", 16, 512, 256000, **_SIGLIP2),
    "ViT-L-16-SigLIP2-256": _siglip("L", 16, 256, 256000, **_SIGLIP2),
    "ViT-L-16-SigLIP2-384": _siglip("L", 16, 384, 256000, **_SIGLIP2),
    "ViT-L-16-SigLIP2-512": _siglip("L", 16, 512, 256000, **_TANH, **_SIGLIP2),
    "ViT-SO400M-14-SigLIP2": _siglip("SO400M", 14, 224, 256000, **_SIGLIP2),
    "ViT-SO400M-14-SigLIP2-378": _siglip("SO400M", 14, 378, 256000, **_SIGLIP2),
    "ViT-SO400M-16-SigLIP2-256": _siglip("SO400M", 16, 256, 256000, **_TANH, **_SIGLIP2),
    "ViT-SO400M-16-SigLIP2-384": _siglip("SO400M", 16, 384, 256000, **_TANH, **_SIGLIP2),
    "ViT-SO400M-16-SigLIP2-512": _siglip("SO400M", 16, 512, 256000, **_TANH, **_SIGLIP2),
    "ViT-gopt-16-SigLIP2-256": _siglip("gopt", 16, 256, 256000, **_TANH, **_SIGLIP2),
    "ViT-gopt-16-SigLIP2-384": _siglip("gopt", 16, 384, 256000, **_TANH, **_SIGLIP2),
}


def _worldwide(base: str, image: int = 224, vocab: int = 901629, eos: int = 2, pad: int = 1) -> CLIPConfig:
    """MetaCLIP 2 "worldwide": the CLIP ViT of `base` with a causal text tower over a multilingual vocabulary
    (XLM-V's 901,629 tokens; mT5's for L/14), pooled at the first end token."""
    cfg = _BASE[base]
    text = replace(cfg.text, vocab_size=vocab, pool="eos", eos_id=eos, pad_id=pad)
    return replace(cfg, vision=replace(cfg.vision, image_size=image), text=text)


_WORLDWIDE_PRESETS: dict[str, CLIPConfig] = {
    "ViT-L-14-worldwide": _worldwide("ViT-L-14", vocab=250100, eos=1, pad=0),  # mT5's tokenizer
    "ViT-H-14-worldwide": _worldwide("ViT-H-14"),
    "ViT-H-14-worldwide-378": _worldwide("ViT-H-14", 378),
    "ViT-bigG-14-worldwide": _worldwide("ViT-bigG-14"),
    "ViT-bigG-14-worldwide-378": _worldwide("ViT-bigG-14", 378),
}

def _hf(embed: int, vision: CLIPConfig, text_model: str, pool: str = "mean", proj: str = "mlp") -> CLIPConfig:
    """A model whose text tower is the Hugging Face encoder `text_model` (sizes from open_clip_hf.HF_TEXT_MODELS),
    beside the image tower and logit initialisation of `vision`."""
    text = hf_text_config(text_model, pool, proj)
    return replace(vision, embed_dim=embed, text=text)


_NLLB_BASE, _NLLB_LARGE = "facebook/nllb-200-distilled-600M", "facebook/nllb-200-distilled-1.3B"
_B32, _H14 = _BASE["ViT-B-32"], _BASE["ViT-H-14"]
_NLLB = {"pool": "cls", "proj": "linear"}  # NLLB-CLIP: the first token's state, a linear projection
def _clipa(base: str, image: int = 224) -> CLIPConfig:
    """CLIPA (Li et al. 2023, "An Inverse Scaling Law for CLIP Training"): the CLIP ViT of `base` without ln_pre,
    pooling the average of its patch tokens (LayerNorm after the pool), and a bidirectional text tower over BERT's
    ids (a 32,000-row table), pooled at the last of its 32 positions."""
    cfg = _BASE[base]
    vision = replace(cfg.vision, image_size=image, ln_pre=False, pool="avg")
    text = replace(cfg.text, context_length=32, vocab_size=32000, causal=False, pool="last", eos_id=102, pad_id=0)
    return replace(cfg, vision=vision, text=text)


_CLIPA_PRESETS: dict[str, CLIPConfig] = {
    "ViT-L-14-CLIPA": _clipa("ViT-L-14"),
    "ViT-L-14-CLIPA-336": _clipa("ViT-L-14", 336),
    "ViT-H-14-CLIPA": _clipa("ViT-H-14"),
    "ViT-H-14-CLIPA-336": _clipa("ViT-H-14", 336),
    "ViT-bigG-14-CLIPA": _clipa("ViT-bigG-14"),
    "ViT-bigG-14-CLIPA-336": _clipa("ViT-bigG-14", 336),
}

# Presets whose text towers are Hugging Face encoder families (RoBERTa, XLM-R, mT5, NLLB): see models/hf_text.py.
# As OpenCLIP's model configs build them: their hf_pooler_type / hf_proj_type, or its defaults (mean_pooler, mlp).
_HF_TEXT_PRESETS: dict[str, CLIPConfig] = {
    # OpenCLIP's roberta-ViT-B-32 config sets quick_gelu: the image tower's activation (the text tower has its own)
    "roberta-ViT-B-32": _hf(512, replace(_B32, vision=replace(_B32.vision, act="quick_gelu")), "roberta-base"),
    "xlm-roberta-base-ViT-B-32": _hf(512, _B32, "xlm-roberta-base"),
    "xlm-roberta-large-ViT-H-14": _hf(1024, _H14, "xlm-roberta-large"),
    "mt5-base-ViT-B-32": _hf(512, _B32, "google/mt5-base"),
    "mt5-xl-ViT-H-14": _hf(1024, _H14, "google/mt5-xl"),
    "nllb-clip-base": _hf(512, _B32, _NLLB_BASE, **_NLLB),
    "nllb-clip-large": _hf(1024, _H14, _NLLB_LARGE, **_NLLB),
    # SigLIP image towers (timm's B/16 and SO400M/14 at 384px), sigmoid loss with a logit bias
    "nllb-clip-base-siglip": _hf(768, _siglip("B", 16, 384, 32000), _NLLB_BASE, **_NLLB),
    "nllb-clip-large-siglip": _hf(1152, _siglip("SO400M", 14, 384, 32000), _NLLB_LARGE, **_NLLB),
}


# --- timm image towers by name: EVA-CLIP, PE-Core, ViTamin, MobileCLIP (models/timm_tower.py) ---


def _timm(embed: int, model: str, image: int, text: TextConfig, pool: str, proj: str | None = None,
          drop_path: float | None = None) -> CLIPConfig:  # fmt: skip
    """A model whose image tower timm builds by name, as OpenCLIP's config of it says (timm_pool, timm_proj,
    timm_drop_path), beside OpenCLIP's own text tower."""
    vision = TimmVisionConfig(model, image_size=image, pool=pool, projection=proj, drop_path=drop_path)
    return CLIPConfig(embed, vision, text)


def _eva(embed: int, model: str, text: TextConfig, image: int = 224) -> CLIPConfig:
    """EVA-CLIP (Sun et al. 2023): timm's EVA / EVA-02 ViT, class token, timm's classifier as the projection."""
    return _timm(embed, model, image, text, "token")


def _pe(embed: int, model: str, image: int, text: TextConfig, context: int = 32) -> CLIPConfig:
    """PE-Core (Bolya et al. 2025, "Perception Encoder"): timm's RoPE ViT with an attention-pool head and timm's
    classifier as the projection; a CLIP text tower over 32 positions (72 for bigG)."""
    return _timm(embed, model, image, replace(text, context_length=context), "map")


def _vitamin(embed: int, model: str, image: int, text: TextConfig) -> CLIPConfig:
    """ViTamin (Chen et al. 2024): timm's conv-stem hybrid ViT, its own average pool, a linear projection."""
    return _timm(embed, model, image, text, "", "linear", drop_path=0.1)


def _mobileclip(embed: int, model: str, text: TextConfig, vit: bool = False, causal: bool = False,
                drop_path: float = 0.0) -> CLIPConfig:  # fmt: skip
    """MobileCLIP (Vasu et al. 2024) and MobileCLIP 2: timm's FastViT MCi (256px, average pool), or with `vit` a ViT
    (224px, class token), timm's classifier as the projection; the text tower bidirectional unless `causal` (the B
    models), pooled at the highest token id either way."""
    image, pool = (224, "token") if vit else (256, "avg")
    return _timm(embed, model, image, replace(text, causal=causal), pool, drop_path=drop_path)


_EVA_PRESETS: dict[str, CLIPConfig] = {
    "EVA01-g-14": _eva(1024, "eva_giant_patch14_224", _text(768, 12)),
    "EVA01-g-14-plus": _eva(1024, "eva_giant_patch14_224", _text(1024, 16, 24)),
    "EVA02-B-16": _eva(512, "eva02_base_patch16_clip_224", _text(512, 8)),
    "EVA02-L-14": _eva(768, "eva02_large_patch14_clip_224", _text(768, 12)),
    "EVA02-L-14-336": _eva(768, "eva02_large_patch14_clip_336", _text(768, 12), image=336),
    "EVA02-E-14": _eva(1024, "eva02_enormous_patch14_clip_224", _text(1024, 16, 24)),
    "EVA02-E-14-plus": _eva(1024, "eva02_enormous_patch14_clip_224", _text(1280, 20, 32)),
}
_PE_PRESETS: dict[str, CLIPConfig] = {
    "PE-Core-T-16-384": _pe(512, "vit_pe_core_tiny_patch16_384", 384, _text(512, 8)),
    "PE-Core-S-16-384": _pe(512, "vit_pe_core_small_patch16_384", 384, _text(512, 8)),
    "PE-Core-B-16": _pe(1024, "vit_pe_core_base_patch16_224", 224, _text(1024, 16, 24)),
    "PE-Core-L-14-336": _pe(1024, "vit_pe_core_large_patch14_336", 336, _text(1024, 16, 24)),
    "PE-Core-bigG-14-448": _pe(1280, "vit_pe_core_gigantic_patch14_448", 448, _text(1280, 20, 24), context=72),
}
_VITAMIN_PRESETS: dict[str, CLIPConfig] = {
    "ViTamin-S": _vitamin(384, "vitamin_small_224", 224, _text(384, 6)),
    "ViTamin-S-LTT": _vitamin(768, "vitamin_small_224", 224, _text(768, 12)),
    "ViTamin-B": _vitamin(512, "vitamin_base_224", 224, _text(512, 8)),
    "ViTamin-B-LTT": _vitamin(768, "vitamin_base_224", 224, _text(768, 12)),
    **{f"ViTamin-L{suffix}": _vitamin(768, f"vitamin_large_{image}", image, _text(768, 12))
       for suffix, image in (("", 224), ("-256", 256), ("-336", 336), ("-384", 384))},
    **{f"ViTamin-L2{suffix}": _vitamin(1024, f"vitamin_large2_{image}", image, _text(1024, 16, 24))
       for suffix, image in (("", 224), ("-256", 256), ("-336", 336), ("-384", 384))},
    "ViTamin-XL-256": _vitamin(1152, "vitamin_xlarge_256", 256, _text(1152, 16, 27)),
    "ViTamin-XL-336": _vitamin(1152, "vitamin_xlarge_336", 336, _text(1152, 16, 27)),
    # OpenCLIP's config gives this 384px timm model image_size 256, so its preprocessing makes 256px images: the tower
    # takes them (timm's ViTamin-XL has no position table); kept as OpenCLIP builds and feeds it
    "ViTamin-XL-384": _vitamin(1152, "vitamin_xlarge_384", 256, _text(1152, 16, 27)),
}  # fmt: skip
_MOBILECLIP_PRESETS: dict[str, CLIPConfig] = {
    "MobileCLIP-S1": _mobileclip(512, "fastvit_mci1", _text(512, 8)),
    "MobileCLIP-S2": _mobileclip(512, "fastvit_mci2", _text(512, 8)),
    "MobileCLIP-B": _mobileclip(512, "vit_base_mci_224", _text(512, 8), vit=True, causal=True),
    "MobileCLIP2-B": _mobileclip(512, "vit_base_mci_224", _text(512, 8), vit=True, causal=True),
    "MobileCLIP2-S0": _mobileclip(512, "fastvit_mci0", _text(512, 8)),
    "MobileCLIP2-S2": _mobileclip(512, "fastvit_mci2", _text(512, 8)),
    "MobileCLIP2-S3": _mobileclip(768, "fastvit_mci3", _text(768, 12)),
    "MobileCLIP2-S4": _mobileclip(768, "fastvit_mci4", _text(768, 12)),
    "MobileCLIP2-L-14": _mobileclip(768, "vit_large_patch14_clip_224", _text(768, 12), vit=True, drop_path=0.1),
}
_TIMM_FAMILIES: dict[str, dict[str, CLIPConfig]] = {
    "EVA-CLIP": _EVA_PRESETS, "PE-Core": _PE_PRESETS, "ViTamin": _VITAMIN_PRESETS, "MobileCLIP": _MOBILECLIP_PRESETS,
}  # fmt: skip
_TIMM_PRESETS: dict[str, CLIPConfig] = {n: c for family in _TIMM_FAMILIES.values() for n, c in family.items()}

# --- end of the timm image towers ---


# --- CoCa: contrastive towers and a caption decoder (models/coca.py) ---


def _coca(embed: int, vision: VisionTransformerConfig, text: TextConfig, decoder_heads: int) -> CLIPConfig:
    """CoCa (Yu et al. 2022) as OpenCLIP builds it: `vision`, a causal text tower over 76 positions with CoCa's class
    embedding appended (and pooled), and a 12-layer caption decoder as wide as the text tower, over its vocabulary."""
    text = replace(text, context_length=76, pool="cls")
    decoder = CoCaDecoderConfig(context_length=76, vocab_size=text.vocab_size, width=text.width, layers=12,
                                heads=decoder_heads)  # fmt: skip
    return CLIPConfig(embed, vision, text, decoder=decoder)


def _attentional(base: str) -> VisionTransformerConfig:
    """The CLIP ViT of `base` pooled by CoCa's attentional pooler (256 queries, 8 heads)."""
    return replace(_BASE[base].vision, pool="attentional", pool_queries=256, pool_heads=8)


_COCA_PRESETS: dict[str, CLIPConfig] = {
    "coca_ViT-B-32": _coca(512, _attentional("ViT-B-32"), _text(512, 8), decoder_heads=8),
    "coca_ViT-L-14": _coca(768, _attentional("ViT-L-14"), _text(768, 12), decoder_heads=12),
    # OpenCLIP's coca_base (no released weights): a class-token ViT at 288px whose patch tokens the decoder reads, and
    # a 64,000-token vocabulary (its tokenizer is still CLIP's BPE, as OpenCLIP's get_tokenizer gives it)
    "coca_base": _coca(512, VisionTransformerConfig(image_size=288, patch_size=18, width=768, layers=12, heads=12),
                       replace(_text(768, 12), vocab_size=64000), decoder_heads=12),
}

# --- end of CoCa ---


def _quickgelu(cfg: CLIPConfig) -> CLIPConfig:
    vision = replace(cfg.vision, act="quick_gelu") if cfg.vision.kind == "vit" else cfg.vision
    return replace(cfg, vision=vision, text=replace(cfg.text, act="quick_gelu"))


# OpenAI's weights were trained with QuickGELU: OpenCLIP names those variants "<name>-quickgelu".
_QUICKGELU = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336",
              "ViT-H-14", "ViT-H-14-378", "ViT-bigG-14", "ViT-L-14-worldwide", "ViT-H-14-worldwide"]  # fmt: skip
_UNVARIED = {**_BASE, **_SIGLIP_PRESETS, **_WORLDWIDE_PRESETS, **_CLIPA_PRESETS, **_HF_TEXT_PRESETS, **_TIMM_PRESETS,
             **_COCA_PRESETS}  # fmt: skip
PRESETS: dict[str, CLIPConfig] = {**_UNVARIED, **{f"{n}-quickgelu": _quickgelu(_UNVARIED[n]) for n in _QUICKGELU}}


def _siglip_tokenizer(repo: str, context: int = 64) -> TokenizerConfig:
    return TokenizerConfig(kind="hf", source=repo, clean="canonicalize", context_length=context)


# The tokenizer each preset's text tower was trained with, as OpenCLIP's configs name it (`hf_tokenizer_name`,
# `tokenizer_kwargs`); presets not listed use the CLIP BPE tokenizer.
_SIGLIP_EN, _SIGLIP_I18N = "timm/ViT-B-16-SigLIP", "timm/ViT-B-16-SigLIP-i18n-256"
PRESET_TOKENIZERS: dict[str, TokenizerConfig] = {
    **{n: _siglip_tokenizer(_SIGLIP_EN, PRESETS[n].text.context_length) for n in _SIGLIP_PRESETS
       if PRESETS[n].text.vocab_size == 32000},
    **{n: _siglip_tokenizer(_SIGLIP_I18N) for n in _SIGLIP_PRESETS if PRESETS[n].text.vocab_size == 250000},
    # SigLIP 2 releases each carry their own copy of the Gemma tokenizer
    **{n: _siglip_tokenizer(f"timm/{n}") for n in _SIGLIP_PRESETS if PRESETS[n].text.vocab_size == 256000},
    **{n: TokenizerConfig(kind="hf", source="facebook/xlm-v-base", clean="whitespace")
       for n in PRESETS if n.split("-quickgelu")[0] in _WORLDWIDE_PRESETS},
    # CLIPA: BERT's uncased WordPiece with its closing [SEP] replaced by 0, as OpenCLIP's configs say
    **{n: TokenizerConfig(kind="hf", source="bert-base-uncased", clean="whitespace", context_length=32,
                       strip_sep_token=True)
       for n in _CLIPA_PRESETS},
    **{n: TokenizerConfig(kind="hf", source="google/mt5-base", clean="canonicalize")
       for n in ("ViT-L-14-worldwide", "ViT-L-14-worldwide-quickgelu")},
    # the Hugging Face text towers' own tokenizers (OpenCLIP's hf_tokenizer_name is the text model's name), cleaned as
    # OpenCLIP's HFTokenizer cleans by default
    **{n: TokenizerConfig(kind="hf", source=hf_model_name(cfg.text), clean="whitespace", context_length=77)
       for n, cfg in _HF_TEXT_PRESETS.items()},
}  # fmt: skip


def list_models() -> list[str]:
    """Every preset name, sorted."""
    return sorted(PRESETS)


def preset_family(name: str) -> str:
    """The model family a preset belongs to, for listings ("CLIP ViT", "SigLIP 2", "MetaCLIP 2", ...)."""
    base = name.removesuffix("-quickgelu")
    cfg = get_preset(name)
    if base in _SIGLIP_PRESETS:
        return "SigLIP 2" if cfg.text.vocab_size == 256000 else "SigLIP"
    if base in _WORLDWIDE_PRESETS:
        return "MetaCLIP 2 (worldwide)"
    if base in _CLIPA_PRESETS:
        return "CLIPA"
    if base in _HF_TEXT_PRESETS:
        return "multilingual (Hugging Face text towers)"
    if base in _TIMM_PRESETS:
        return next(family for family, presets in _TIMM_FAMILIES.items() if base in presets)
    if base in _COCA_PRESETS:
        return "CoCa"
    return {"vit": "CLIP ViT", "resnet": "CLIP ResNet", "convnext": "CLIP ConvNeXt"}[cfg.vision.kind]


def get_preset_tokenizer(name: str) -> TokenizerConfig:
    """The tokenizer the preset's text tower was trained with (the CLIP BPE unless the preset says otherwise).

    Raises:
        ValueError: the name is unknown; the message lists the closest names.
    """
    cfg = get_preset(name)
    default = TokenizerConfig(context_length=cfg.text.context_length) if cfg.text is not None else TokenizerConfig()
    return PRESET_TOKENIZERS.get(name, default)


def get_preset(name: str) -> CLIPConfig:
    """The architecture config registered under `name`.

    Raises:
        ValueError: the name is unknown; the message lists the closest names.
    """
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=5, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (clipworks.list_models() lists all {len(PRESETS)})")
