"""CoCa in OpenCLIP's model configs: `multimodal_cfg` (the caption decoder) and the `output_tokens` flags its towers
carry, read into a `CoCaDecoderConfig` and written back."""

from __future__ import annotations

from typing import Any

from ..config import CLIPConfig, CoCaDecoderConfig, TextConfig
from .io import CheckpointError

# multimodal_cfg keys OpenCLIP's CoCa reads (MultimodalCfg's other fields, mlp_ratio, dim_head, n_queries,
# attn_pooler_heads and vocab_size among them, never reach its decoder: the image tower's attentional pool has its
# own in vision_cfg, and the logits are sized by text_cfg's vocabulary), with MultimodalCfg's defaults.
_READ = {"context_length": 77, "width": 512, "heads": 8, "layers": 12}


def decoder_from_open_clip(model_cfg: dict[str, Any], text: Any, quick_gelu: bool) -> CoCaDecoderConfig:
    """The caption decoder of an OpenCLIP CoCa config (one with a `multimodal_cfg`).

    Raises:
        CheckpointError: a CoCa clipworks cannot build (a Hugging Face text tower: coca_roberta-ViT-B-32; layer scale),
            named.
    """
    m = model_cfg["multimodal_cfg"]
    if not isinstance(m, dict):
        raise CheckpointError(f"multimodal_cfg must be a JSON object, got {type(m).__name__}")
    if text.kind != TextConfig.kind or text.pool != "cls":
        what = f"a {text.kind!r} text tower" if text.kind != TextConfig.kind else "a text tower without embed_cls"
        raise CheckpointError(f"CoCa with {what} is not supported: clipworks' caption decoder reads CLIP's text tower "
                              "with its class embedding (text_cfg.embed_cls)")  # fmt: skip
    if m.get("ls_init_value") is not None:
        raise CheckpointError(f"multimodal_cfg.ls_init_value={m['ls_init_value']!r}: layer scale is not supported")
    fields = {k: m.get(k, default) for k, default in _READ.items()}
    return CoCaDecoderConfig(vocab_size=text.vocab_size, act="quick_gelu" if quick_gelu else "gelu", **fields)


def coca_to_open_clip(cfg: CLIPConfig, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """`model_cfg` (what config_to_open_clip wrote for the towers) with the `multimodal_cfg` of `cfg.decoder`, and the
    towers' `output_tokens`, which OpenCLIP's CoCa needs to read their tokens.

    Raises:
        ValueError: a decoder OpenCLIP's CoCa cannot build: a vocabulary other than the text tower's, or an activation
            other than the towers' (one `quick_gelu` flag sets all three).
    """
    d = cfg.decoder
    if d.vocab_size != cfg.text.vocab_size:
        raise ValueError(f"decoder.vocab_size {d.vocab_size} differs from text.vocab_size {cfg.text.vocab_size}: "
                         "OpenCLIP sizes CoCa's logits by the text tower's vocabulary")  # fmt: skip
    if d.act != cfg.text.act or d.act != cfg.vision.act:
        raise ValueError(f"decoder.act={d.act!r} with vision.act={cfg.vision.act!r} and text.act={cfg.text.act!r}: "
                         "OpenCLIP's quick_gelu flag applies to all three")  # fmt: skip
    multimodal = {"context_length": d.context_length, "vocab_size": d.vocab_size, "width": d.width, "heads": d.heads,
                  "layers": d.layers}  # fmt: skip
    return {
        **model_cfg,
        "vision_cfg": {**model_cfg["vision_cfg"], "output_tokens": True},
        "text_cfg": {**model_cfg["text_cfg"], "output_tokens": True},
        "multimodal_cfg": multimodal,
    }
