"""Which presets a state dict fits: the suggestion an architecture-mismatch error carries."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..config import CLIPConfig
from ..models.clip import CLIP
from ..presets import PRESETS
from .open_clip import convert_from_open_clip


@functools.cache
def _signature(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = CLIP(PRESETS[name])
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _as_ours(sd: dict[str, Tensor], cfg: CLIPConfig) -> dict[str, Tensor] | None:
    if "text.token_embed.weight" in sd:
        return sd
    try:
        return convert_from_open_clip(sd, cfg)
    except ValueError:  # keys of another tower family
        return None


def _text_fits(sd: dict[str, Tensor], cfg: CLIPConfig) -> bool:
    # A cheap first cut before building the preset's shapes: the text tower's two largest matrices.
    t = cfg.text
    if t is None or t.kind != "transformer":  # a one-tower preset, or a text tower of other keys: no cheap cut
        return True
    return (
        tuple(sd.get("text.token_embed.weight", torch.empty(0)).shape) == (t.vocab_size, t.width)
        and tuple(sd.get("text.proj.weight", torch.empty(0)).shape) == (cfg.embed_dim, t.width)
    )


def matching_presets(sd: dict[str, Tensor]) -> list[str]:
    """Preset names whose every key and shape equals the state dict's (OpenCLIP or clipworks layout).

    Activation variants ("-quickgelu") share shapes with their base, so both are returned.
    """
    found = []
    for name, cfg in PRESETS.items():
        ours = _as_ours(sd, cfg)
        if ours is None or not _text_fits(ours, cfg):
            continue
        shapes = {k: tuple(v.shape) for k, v in ours.items()}
        if shapes == _signature(name):
            found.append(name)
    return sorted(found)
