"""The clipworks checkpoint format: a directory with config.json (model + preprocessing) and model.safetensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

from ..config import CLIPConfig, PreprocessConfig
from .io import CheckpointError, atomic_directory, load_state_dict

FORMAT = "clipworks"
FORMAT_VERSION = 1


def is_clipworks_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def save_clipworks(model, path: str | os.PathLike, preprocess: PreprocessConfig, tokenizer: str = "clip") -> Path:
    """Write `model` as a clipworks directory; the directory appears complete or not at all (a crash mid-save
    never leaves a half-written checkpoint under the final name; see `atomic_directory`)."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "tokenizer": tokenizer,
    }
    with atomic_directory(path) as tmp:
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    return Path(path)


def load_clipworks(path: str | os.PathLike) -> tuple[CLIPConfig, PreprocessConfig, dict[str, Tensor]]:
    """Read a clipworks directory: (model config, preprocessing config, state dict)."""
    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
        version = meta.get("version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: clipworks format version {version!r}; this build reads {FORMAT_VERSION}")
        cfg = CLIPConfig.from_dict(meta["model"])
        preprocess = PreprocessConfig.from_dict(meta["preprocess"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json is not a valid clipworks config: {e}") from e
    return cfg, preprocess, load_state_dict(path / "model.safetensors")
