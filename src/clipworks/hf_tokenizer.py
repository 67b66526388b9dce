"""Tokenizers read from a release's own files with the Hugging Face `tokenizers` library (placeholder)."""

from __future__ import annotations

from pathlib import Path

from .config import CLIPConfig, TokenizerConfig


def tokenizer_config_of_dir(path: Path, cfg: CLIPConfig) -> TokenizerConfig:
    """The tokenizer a checkpoint directory names; the CLIP BPE until the HF tokenizers land."""
    return TokenizerConfig(context_length=cfg.text.context_length) if cfg.text is not None else TokenizerConfig()
