"""The architecture presets, under OpenCLIP's model names."""

from __future__ import annotations

import difflib
import math
from dataclasses import replace

from .config import CLIPConfig, ConvNeXtConfig, ResNetConfig, TextConfig, VisionTransformerConfig


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
    "convnext_base": CLIPConfig(512, ConvNeXtConfig(image_size=224, drop_path=0.1), _text(512, 8)),
    "convnext_base_w": CLIPConfig(640, ConvNeXtConfig(image_size=256, drop_path=0.1), _text(640, 10)),
    "convnext_base_w_320": CLIPConfig(640, ConvNeXtConfig(image_size=320, drop_path=0.1), _text(640, 10)),
    "ViT-B-16-SigLIP": CLIPConfig(
        768,
        VisionTransformerConfig(
            patch_size=16, width=768, layers=12, heads=12, pool="map", class_token=False,
            patch_bias=True, ln_pre=False, projection=False, norm_eps=1e-6,
        ),  # fmt: skip
        TextConfig(
            context_length=64, vocab_size=32000, width=768, heads=12, layers=12, causal=False, pool="last",
            eos_id=1, pad_id=1, proj_bias=True, norm_eps=1e-6,
        ),  # fmt: skip
        init_logit_scale=math.log(10.0),
        init_logit_bias=-10.0,
    ),
}


def _quickgelu(cfg: CLIPConfig) -> CLIPConfig:
    vision = replace(cfg.vision, act="quick_gelu") if cfg.vision.kind == "vit" else cfg.vision
    return replace(cfg, vision=vision, text=replace(cfg.text, act="quick_gelu"))


# OpenAI's weights were trained with QuickGELU: OpenCLIP names those variants "<name>-quickgelu".
_QUICKGELU = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336",
              "ViT-H-14", "ViT-bigG-14"]  # fmt: skip
PRESETS: dict[str, CLIPConfig] = {**_BASE, **{f"{n}-quickgelu": _quickgelu(_BASE[n]) for n in _QUICKGELU}}


def list_models() -> list[str]:
    """Every preset name, sorted."""
    return sorted(PRESETS)


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
