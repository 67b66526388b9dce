"""The clipworks checkpoint format: a directory with config.json (model + preprocessing) and model.safetensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

from ..config import CLIPConfig, PreprocessConfig, TokenizerConfig
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


def save_clipworks(
    model, path: str | os.PathLike, preprocess: PreprocessConfig | None, tokenizer: TokenizerConfig | None = None
) -> Path:
    """Write `model` as a clipworks directory; the directory appears complete or not at all (a crash mid-save
    never leaves a half-written checkpoint under the final name; see `atomic_directory`). `preprocess` is None
    for a text-only model.

    The tokenizer (default: the model's `tokenizer_config`, else CLIP's BPE at its context length) is recorded in
    config.json's "tokenizer"; a Hugging Face tokenizer's files are copied beside the weights and recorded with
    source None ("the files in this directory"), or, when they cannot be found, recorded by their source with a
    warning (see `hf_tokenizer.copy_tokenizer_files`).
    """
    from safetensors.torch import save_file

    from ..hf_tokenizer import copy_tokenizer_files

    if tokenizer is None:
        from ..factory import default_tokenizer_config

        tokenizer = getattr(model, "tokenizer_config", None) or default_tokenizer_config(model.config)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "preprocess": None if preprocess is None else preprocess.to_dict(),
    }
    with atomic_directory(path) as tmp:
        meta["tokenizer"] = copy_tokenizer_files(tokenizer, tmp).to_dict()
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    return Path(path)


def load_clipworks(path: str | os.PathLike) -> tuple[CLIPConfig, PreprocessConfig | None, dict[str, Tensor]]:
    """Read a clipworks directory: (model config, preprocessing config (None for a text-only model), state dict)."""
    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
        version = meta.get("version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: clipworks format version {version!r}; this build reads {FORMAT_VERSION}")
        cfg = CLIPConfig.from_dict(meta["model"])
        preprocess = None if meta["preprocess"] is None else PreprocessConfig.from_dict(meta["preprocess"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json is not a valid clipworks config: {e}") from e
    return cfg, preprocess, load_state_dict(path / "model.safetensors")
