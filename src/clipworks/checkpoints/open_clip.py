"""Conversion between OpenAI/OpenCLIP state dicts and clipworks' layout (pure dict-to-dict)."""

from __future__ import annotations

import importlib

from torch import Tensor

from ..config import CLIPConfig
from ..models import text as text_tower

# OpenAI's state dicts carry these model hyper-parameters as tensors; they are not weights.
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")
_VISION_MODULES = {"vit": "vit", "resnet": "resnet", "convnext": "convnext"}


def _vision_module(cfg: CLIPConfig):
    return importlib.import_module(f"..models.{_VISION_MODULES[cfg.vision.kind]}", __package__)


def _split(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    visual, text, top = {}, {}, {}
    for key, value in sd.items():
        if key.startswith("module."):  # saved from a DistributedDataParallel wrapper
            key = key[len("module.") :]
        if key in _OPENAI_METADATA or key.endswith("attn_mask"):  # causal masks are rebuilt, not loaded
            continue
        if key.startswith("visual."):
            visual[key[len("visual.") :]] = value
        elif key in ("logit_scale", "logit_bias"):
            top[key] = value
        elif key.startswith("text."):  # OpenCLIP's CustomTextCLIP nests the text tower
            text[key[len("text.") :]] = value
        else:
            text[key] = value
    return visual, text, top


def convert_from_open_clip(sd: dict[str, Tensor], cfg: CLIPConfig) -> dict[str, Tensor]:
    """An OpenAI/OpenCLIP CLIP state dict to clipworks' `CLIP` keys.

    Raises:
        ValueError: keys that no rule converts, named.
    """
    visual, text, top = _split(sd)
    out = {f"visual.{k}": v for k, v in _vision_module(cfg).convert_from_open_clip(visual).items()}
    out.update({f"text.{k}": v for k, v in _text_from_open_clip(text, cfg).items()})
    out.update(top)
    return out


def _hf_text(cfg: CLIPConfig) -> bool:
    """Whether the text tower is one of the Hugging Face encoder families (OpenCLIP's `hf_model_name` towers)."""
    return cfg.text is not None and cfg.text.kind != "transformer"


def _text_from_open_clip(text: dict[str, Tensor], cfg: CLIPConfig) -> dict[str, Tensor]:
    if _hf_text(cfg):
        from . import open_clip_hf

        return open_clip_hf.convert_from_open_clip(text, cfg.text)
    return text_tower.convert_from_open_clip(text)


def custom_text(cfg: CLIPConfig) -> bool:
    """Whether OpenCLIP holds this model as a `CustomTextCLIP` (text tower nested under `text.`, projection a Linear):
    every Hugging Face text tower, and the SigLIP text towers (a projection with a bias, or none: i18n SO400M).
    CLIPA's bidirectional tower, with a bias-free projection matrix, is a plain `CLIP`'s."""
    return _hf_text(cfg) or cfg.text.proj_bias or not cfg.text.projection


def convert_to_open_clip(sd: dict[str, Tensor], cfg: CLIPConfig) -> dict[str, Tensor]:
    """clipworks' `CLIP` keys to the state dict OpenCLIP's model of the same architecture loads."""
    visual = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
    text = {k[len("text.") :]: v for k, v in sd.items() if k.startswith("text.")}
    nested = custom_text(cfg)
    out = {f"visual.{k}": v for k, v in _vision_module(cfg).convert_to_open_clip(visual).items()}
    prefix = "text." if nested else ""
    if _hf_text(cfg):
        from . import open_clip_hf

        text = open_clip_hf.convert_to_open_clip(text, cfg.text)
    else:
        text = text_tower.convert_to_open_clip(text, nested)
    out.update({prefix + k: v for k, v in text.items()})
    out.update({k: v for k, v in sd.items() if k in ("logit_scale", "logit_bias")})
    return out
