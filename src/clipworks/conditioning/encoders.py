"""clipworks text towers from transformers `CLIPTextModel` / `CLIPTextModelWithProjection` (what diffusers holds).

The key map is the one `checkpoints.transformers` uses for a whole `CLIPModel`; a text model's keys are the
text half of it. `CLIPTextModel` has no projection: its pooled output is the final-normed end-token state,
so the tower gets an identity projection and `pooled` means the same thing for both classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoints.io import CheckpointError, load_state_dict, load_weights
from ..checkpoints.transformers import config_from_transformers, convert_from_transformers
from ..config import TextConfig
from ..models.text import TextTransformer

_TEXT_MODEL_TYPES = ("clip_text_model", "clip")
# The top-level names of transformers 5's CLIPTextModel, which stores its text model without a prefix.
_UNPREFIXED = ("embeddings.", "encoder.", "final_layer_norm.")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def text_config_from_transformers(config: dict[str, Any]) -> TextConfig:
    """A TextConfig from a `CLIPTextModel(WithProjection)` config.json dict (or a `CLIPModel` one's text part).

    Raises:
        CheckpointError: another model type, or a field clipworks cannot express, named.
    """
    model_type = config.get("model_type")
    if model_type not in _TEXT_MODEL_TYPES:
        raise CheckpointError(
            f"model_type={model_type!r} is not a CLIP text model; expected one of {_TEXT_MODEL_TYPES}"
        )
    text = config.get("text_config", {}) if model_type == "clip" else config
    return config_from_transformers({"model_type": "clip", "text_config": text}).text


def convert_text_from_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers CLIP text model's state dict to `TextTransformer` keys (pure dict-to-dict).

    Keys with or without the `text_model.` prefix are read. Without `text_projection.weight` (a `CLIPTextModel`)
    the result has no `proj.weight`: see `build_text_encoder`.

    Raises:
        CheckpointError: keys that are not a CLIP text model's, named.
    """
    # transformers 5 writes CLIPTextModel's keys without the `text_model.` prefix earlier versions (and the
    # diffusers checkpoints on the hub) carry; both are read.
    sd = {f"text_model.{k}" if k.startswith(_UNPREFIXED) else k: v for k, v in sd.items()}
    foreign = sorted(k for k in sd if not k.startswith(("text_model.", "text_projection.")))
    if foreign:
        raise CheckpointError(f"not a CLIP text model's weights: {foreign[:8]} belong to another model or tower")
    try:
        converted = convert_from_transformers(sd)
    except ValueError as e:
        raise CheckpointError(f"not a CLIP text model's weights: {e}") from e
    return {k.removeprefix("text."): v for k, v in converted.items()}


def build_text_encoder(config: dict[str, Any] | TextConfig, sd: dict[str, Tensor]) -> TextTransformer:
    """A clipworks text tower holding a transformers CLIP text model's weights, in eval mode.

    Args:
        config: the model's config.json dict (`model.config.to_dict()`), or a TextConfig.
        sd: its state dict (`model.state_dict()`), with or without a text projection.

    Raises:
        CheckpointError: a config or key clipworks cannot read, or missing / mis-shaped weights, named.
    """
    cfg = config if isinstance(config, TextConfig) else text_config_from_transformers(config)
    ours = convert_text_from_transformers(sd)
    projection = ours.get("proj.weight")
    embed_dim = cfg.width if projection is None else projection.shape[0]
    dtype = ours["token_embed.weight"].dtype if "token_embed.weight" in ours else torch.float32
    if projection is None:  # CLIPTextModel: pooled = the final-normed end-token state
        ours["proj.weight"] = torch.eye(cfg.width, dtype=dtype)
    with torch.device("meta"):  # no random init to throw away: load_weights assigns the tensors
        encoder = TextTransformer(cfg, embed_dim).to(dtype)
    load_weights(encoder, ours, source="transformers text model")
    return encoder.eval()


def text_encoder_from_transformers(model: torch.nn.Module) -> TextTransformer:
    """A clipworks text tower with the weights of a live transformers `CLIPTextModel` or
    `CLIPTextModelWithProjection` (tensors are shared with it, not copied, except the fused q/k/v)."""
    return build_text_encoder(model.config.to_dict(), model.state_dict())


def read_config(path: Path) -> dict[str, Any]:
    """A transformers model directory's config.json.

    Raises:
        CheckpointError: missing or not JSON, naming the file.
    """
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: not readable JSON ({e})") from e


def load_text_encoder(path: str | os.PathLike, variant: str | None = None) -> TextTransformer:
    """Read a transformers text-model directory (config.json and model.safetensors or pytorch_model.bin), such
    as a diffusers pipeline's `text_encoder/` or `text_encoder_2/`.

    Args:
        variant: diffusers' weight variant, e.g. "fp16" for `model.fp16.safetensors`.

    Raises:
        CheckpointError: no config or weights, or weights clipworks cannot read, naming the directory.
    """
    path = Path(path)
    config = read_config(path)
    names = [name.replace(".", f".{variant}.", 1) if variant else name for name in _WEIGHT_FILES]
    weights = next((path / name for name in names if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has no weights: expected one of {names} (sharded weights are not read)")
    try:
        return build_text_encoder(config, load_state_dict(weights))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
