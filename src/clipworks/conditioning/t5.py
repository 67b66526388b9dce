"""T5 v1.1 text encoders in transformers' `T5EncoderModel` layout: SD3's `text_encoder_3`, Flux's `text_encoder_2`.

The computation is clipworks' native T5 tower (models/hf_families.py, the one OpenCLIP's mT5 towers use) and the key
map is that tower's (checkpoints/open_clip_hf.py): a `T5EncoderModel` names the same modules under `encoder.` where
OpenCLIP's tower has `transformer.`, and keeps the token embeddings in `shared.weight`. `T5Encoder` returns the last
hidden state, (B, L, D), the final RMSNorm applied: what diffusers reads as `text_encoder_3(ids)[0]`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoints.io import CheckpointError, load_state_dict, load_weights
from ..checkpoints.open_clip_hf import convert_from_open_clip
from ..config import T5TextConfig
from ..models.hf_families import T5TextTower
from .encoders import read_config

_T5_MODEL_TYPES = ("t5", "mt5")  # umT5 (a bias per block) is another architecture
_GATED_GELU = "gated-gelu"  # T5 v1.1 and mT5: wo(gelu_tanh(wi_0 x) * wi_1 x); original T5's "relu" is not built
_EMBEDDINGS = ("encoder.embed_tokens.weight", "shared.weight")  # tied: either (or both) may be stored
_UNUSED = ("decoder.", "lm_head.")  # a T5ForConditionalGeneration's decoder half: never read
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CONTEXT_LENGTH = 512  # T5 has no absolute positions; this is only the tokenizer default it is recorded with


# T5TextConfig's fields: transformers' T5Config names and defaults.
_FIELDS = {
    "vocab_size": ("vocab_size", 32128), "width": ("d_model", 512), "layers": ("num_layers", 6),
    "heads": ("num_heads", 8), "head_width": ("d_kv", 64), "mlp_width": ("d_ff", 2048),
    "rel_buckets": ("relative_attention_num_buckets", 32), "rel_max_distance": ("relative_attention_max_distance", 128),
    "pad_id": ("pad_token_id", 0), "norm_eps": ("layer_norm_epsilon", 1e-6),
}  # fmt: skip


def t5_config_from_transformers(config: dict[str, Any]) -> T5TextConfig:
    """A T5TextConfig from a `T5EncoderModel` (or `T5ForConditionalGeneration`, `MT5...`) config.json dict.

    Raises:
        CheckpointError: another model type, or a feed-forward layer other than T5 v1.1's gated GELU, named.
    """
    model_type = config.get("model_type")
    if model_type not in _T5_MODEL_TYPES:
        raise CheckpointError(f"model_type={model_type!r} is not a T5 encoder; expected one of {_T5_MODEL_TYPES}")
    ff = config.get("feed_forward_proj", "relu")
    if ff != _GATED_GELU:
        raise CheckpointError(f"feed_forward_proj={ff!r} is not supported; clipworks builds T5 v1.1's {_GATED_GELU!r}")
    sizes = {ours: config.get(theirs, default) for ours, (theirs, default) in _FIELDS.items()}
    if sizes["pad_id"] is None:
        sizes["pad_id"] = 0
    return T5TextConfig(context_length=_CONTEXT_LENGTH, pool="mean", proj_type="none", **sizes)


def convert_t5_from_transformers(sd: dict[str, Tensor], config: T5TextConfig) -> dict[str, Tensor]:
    """A `T5EncoderModel` state dict to the native T5 tower's keys (pure dict-to-dict; decoder keys are dropped).

    Raises:
        CheckpointError: no token embeddings, or keys that are not a T5 encoder's, named.
    """
    embed = next((sd[k] for k in _EMBEDDINGS if k in sd), None)
    if embed is None:
        raise CheckpointError(f"not a T5 encoder's weights: no token embeddings ({' or '.join(_EMBEDDINGS)})")
    keys = {k: v for k, v in sd.items() if k not in _EMBEDDINGS and not k.startswith(_UNUSED)}
    foreign = sorted(k for k in keys if not k.startswith("encoder."))
    if foreign:
        raise CheckpointError(f"not a T5 encoder's weights: {foreign[:8]} belong to another model")
    theirs = {f"transformer.{k.removeprefix('encoder.')}": v for k, v in keys.items()}
    theirs["transformer.embed_tokens.weight"] = embed
    try:
        return convert_from_open_clip(theirs, config)
    except ValueError as e:
        raise CheckpointError(f"not a T5 encoder's weights: {e}") from e


class T5Encoder(nn.Module):
    """A T5 encoder's last hidden state for token ids: `encoder(ids)` is (B, L, D), final RMSNorm applied.

    Args:
        tower: the native T5 tower holding the weights (its pooling and projection are not used).
    """

    def __init__(self, tower: T5TextTower):
        super().__init__()
        self.tower = tower
        self.config = tower.config

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.token_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tower.token_embed.weight.device

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Token ids (B, L) to the last hidden state (B, L, D).

        Args:
            attention_mask: (B, L), nonzero at the tokens to attend to; None attends to every position, padding
                included, which is what SD3 and Flux do (diffusers calls the encoder without a mask).
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, L) ids, got shape {tuple(tokens.shape)}")
        mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = self.tower.embed(tokens, mask)  # (B, L, D)
        bias = self.tower.attention_mask(mask)  # (B, H, L, L): relative positions, masked keys
        for block in self.tower.blocks:
            x = block(x, bias)
        return self.tower.ln_final(x)


def t5_encoder_from_transformers(config: dict[str, Any] | T5TextConfig, state_dict: dict[str, Tensor]) -> T5Encoder:
    """A clipworks T5 encoder holding a transformers `T5EncoderModel`'s weights, in eval mode, in their dtype.

    Args:
        config: the model's config.json dict (`model.config.to_dict()`), or a T5TextConfig.
        state_dict: its state dict (`encoder.block.N.layer.0.SelfAttention.q.weight`, `shared.weight`, ...).

    Raises:
        CheckpointError: a config or key clipworks cannot read, or missing / mis-shaped weights, named.
    """
    cfg = config if isinstance(config, T5TextConfig) else t5_config_from_transformers(config)
    ours = convert_t5_from_transformers(state_dict, cfg)
    dtype = ours["token_embed.weight"].dtype
    with torch.device("meta"):  # no random init to throw away: load_weights assigns the tensors
        tower = T5TextTower(cfg, cfg.width).to(dtype)
    load_weights(tower, ours, source="transformers T5 encoder")
    return T5Encoder(tower).eval()


def as_t5_encoder(model: nn.Module) -> T5Encoder:
    """`model` if it is a clipworks `T5Encoder`; a live transformers `T5EncoderModel` converted to one (the same
    states as transformers', tested).

    Raises:
        ValueError: neither.
    """
    if isinstance(model, T5Encoder):
        return model
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(model, "state_dict"):
        raise ValueError(f"expected a clipworks T5Encoder or a transformers T5EncoderModel, got {type(model).__name__}")
    return t5_encoder_from_transformers(config.to_dict(), model.state_dict())


def _shards(path: Path, variant: str | None) -> list[Path]:
    """The weight files of a transformers directory: one file, or the shards its `.index.json` lists."""
    names = [name.replace(".", f".{variant}.", 1) if variant else name for name in _WEIGHT_FILES]
    for name in names:
        if (path / name).is_file():
            return [path / name]
        index = path / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a readable shard index ({e})") from e
            return [path / shard for shard in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{path} has no weights: expected one of {names} or a sharded {names[0]}.index.json")


def load_t5_encoder(path: str | os.PathLike, variant: str | None = None) -> T5Encoder:
    """Read a transformers T5 encoder directory (config.json and weights, sharded or not), such as a diffusers
    pipeline's `text_encoder_3/` (SD3) or `text_encoder_2/` (Flux).

    Args:
        variant: diffusers' weight variant, e.g. "fp16" for `model.fp16.safetensors` (or its shards).

    Raises:
        CheckpointError: no config or weights, or weights clipworks cannot read, naming the directory.
    """
    path = Path(path)
    config = read_config(path)
    sd: dict[str, Tensor] = {}
    for shard in _shards(path, variant):
        sd.update(load_state_dict(shard))
    try:
        return t5_encoder_from_transformers(config, sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
