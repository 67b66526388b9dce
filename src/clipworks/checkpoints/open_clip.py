"""Conversion between OpenAI/OpenCLIP state dicts and clipworks' layout (pure dict-to-dict)."""

from __future__ import annotations

import importlib

from torch import Tensor

from ..config import CLIPConfig
from ..models import text as text_tower

# OpenAI's state dicts carry these model hyper-parameters as tensors; they are not weights.
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")
_VISION_MODULES = {"vit": "vit", "resnet": "resnet", "convnext": "convnext", "timm": "timm_tower"}


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
    sd, decoder = _decoder_from_open_clip(sd, cfg)
    visual, text, top = _split(sd)
    out = {f"visual.{k}": v for k, v in _vision_module(cfg).convert_from_open_clip(visual).items()}
    out.update({f"text.{k}": v for k, v in _text_from_open_clip(text, cfg).items()})
    out.update(top)
    out.update(decoder)
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
    """Whether OpenCLIP holds this model as a `CustomTextCLIP` (text tower nested under `text.`): every Hugging Face
    text tower, the SigLIP text towers (a projection with a bias, or none: i18n SO400M), and every model with a timm
    image tower other than ConvNeXt and SigLIP's (EVA-CLIP, PE-Core, ViTamin, MobileCLIP: OpenCLIP's configs say
    `custom_text`). CLIPA's bidirectional tower, with a bias-free projection matrix, is a plain `CLIP`'s."""
    timm_tower = cfg.vision is not None and cfg.vision.kind == "timm"
    coca = cfg.decoder is not None  # OpenCLIP's CoCa nests its text tower too
    return _hf_text(cfg) or cfg.text.proj_bias or not cfg.text.projection or timm_tower or coca


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
        text = text_tower.convert_to_open_clip(text, linear_projection=cfg.text.proj_bias)  # else a (D, E) matrix
    out.update({prefix + k: v for k, v in text.items()})
    out.update({k: v for k, v in sd.items() if k in ("logit_scale", "logit_bias")})
    out.update(_decoder_to_open_clip(sd))
    return out


# --- CoCa's caption decoder: OpenCLIP's `text_decoder.` subtree, our `decoder.` ---

_DECODER = "text_decoder."


def _decoder_from_open_clip(sd: dict[str, Tensor], cfg: CLIPConfig) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(`sd` without OpenCLIP's caption decoder, the decoder in our keys) for a CoCa config; for any other config,
    (`sd`, {}): a decoder's keys then reach the text tower's key map, which names them as unexpected."""
    if cfg.decoder is None:
        return sd, {}
    from ..models import coca

    rest, decoder = {}, {}
    for key, value in sd.items():
        name = key.removeprefix("module.")
        if not name.startswith(_DECODER):
            rest[key] = value
        elif not name.endswith("attn_mask"):  # its causal mask is rebuilt, not loaded
            decoder[name[len(_DECODER) :]] = value
    return rest, {f"decoder.{k}": v for k, v in coca.convert_from_open_clip(decoder).items()}


def _decoder_to_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    decoder = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
    if not decoder:
        return {}
    from ..models import coca

    return {_DECODER + k: v for k, v in coca.convert_to_open_clip(decoder).items()}


# --- end of CoCa ---
