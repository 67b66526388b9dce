"""Public factories: models by preset name or checkpoint, with their transforms and tokenizer."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoints.io import CheckpointError, load_state_dict, load_weights
from .checkpoints.native import is_clipworks_dir, load_clipworks
from .checkpoints.open_clip import convert_from_open_clip
from .config import SIGLIP_MEAN, SIGLIP_STD, CLIPConfig, PreprocessConfig, TokenizerConfig
from .models.clip import CLIP, MissingTowerError
from .presets import get_preset, get_preset_tokenizer

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"


def default_preprocess(cfg: CLIPConfig) -> PreprocessConfig:
    """Preprocessing for a model with no weights to say otherwise (random init or a bare state dict).

    Raises:
        MissingTowerError: a text-only model, which has no image preprocessing.
    """
    if cfg.vision is None:
        raise MissingTowerError("a text-only model has no image tower, so it has no image preprocessing")
    if cfg.init_logit_bias is not None:  # SigLIP models were trained on [-1, 1] inputs
        return PreprocessConfig(image_size=cfg.vision.image_size, mean=SIGLIP_MEAN, std=SIGLIP_STD)
    return PreprocessConfig(image_size=cfg.vision.image_size)


def default_tokenizer_config(cfg: CLIPConfig) -> TokenizerConfig:
    """The tokenizer of a model known only by its architecture: the CLIP BPE, at the text tower's context length."""
    return TokenizerConfig(context_length=cfg.text.context_length) if cfg.text is not None else TokenizerConfig()


def dir_tokenizer_config(path: Path, cfg: CLIPConfig, hub_repo: str | None = None) -> TokenizerConfig:
    """The tokenizer a checkpoint directory's text tower was trained with: what its config names, else the CLIP
    BPE. `source` is the directory itself when the tokenizer's files are in it, else `hub_repo` (the repository an
    hf-hub: load came from) when that has them (see `hf_tokenizer.tokenizer_config_of_dir`)."""
    from .hf_tokenizer import tokenizer_config_of_dir

    return tokenizer_config_of_dir(path, cfg, hub_repo)


def _preprocess_of(cfg: CLIPConfig) -> PreprocessConfig | None:
    """`default_preprocess`, or None for a text-only model."""
    return None if cfg.vision is None else default_preprocess(cfg)


def _load_dir(path: Path) -> tuple[CLIPConfig, PreprocessConfig | None, dict]:
    """(config, preprocessing (None for a text-only model), clipworks state dict) of a clipworks, OpenCLIP-layout or
    transformers directory (CLIPModel and its one-tower classes, SiglipModel, Siglip2Model)."""
    from .checkpoints.open_clip_dir import is_open_clip_dir, load_open_clip_dir

    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if is_clipworks_dir(path):
        return load_clipworks(path)
    # before config.json: hub snapshots in OpenCLIP's layout may also carry a timm config.json
    if is_open_clip_dir(path):
        return load_open_clip_dir(path)
    if (path / "config.json").is_file():
        from .checkpoints.transformers import load_transformers_dir

        return load_transformers_dir(path)
    raise CheckpointError(f"{path} has neither open_clip_config.json nor config.json: expected a clipworks, "
                          "OpenCLIP or transformers (CLIP, SigLIP) directory")  # fmt: skip


def _dir_config(path: Path) -> CLIPConfig:
    """The architecture a checkpoint directory declares, without reading its weights."""
    from .checkpoints.open_clip_dir import config_from_open_clip, is_open_clip_dir

    if is_clipworks_dir(path):
        return CLIPConfig.from_dict(json.loads((path / "config.json").read_text())["model"])
    if is_open_clip_dir(path):
        return config_from_open_clip(json.loads((path / "open_clip_config.json").read_text())["model_cfg"])
    from .checkpoints.transformers import load_transformers_config

    return load_transformers_config(path)


def _same_architecture(a: CLIPConfig, b: CLIPConfig) -> bool:
    # Pooling at the highest id ("argmax") or at the first end token ("eos") picks the same position for
    # CLIP's tokenizer, whose end token is the highest id: transformers' newer configs say "eos".
    def norm(c: CLIPConfig) -> CLIPConfig:
        t = c.text
        if t is not None and t.kind == "transformer" and t.pool in ("argmax", "eos") and t.eos_id == t.vocab_size - 1:
            return replace(c, text=replace(c.text, pool="argmax"))
        return c

    return norm(a) == norm(b)


def _is_ours(sd: dict) -> bool:
    return "text.token_embed.weight" in sd


def _load_into_new(cfg: CLIPConfig, sd: dict, source: str, ours: bool = False) -> CLIP:
    """A model of `cfg` holding `sd` (in clipworks' layout if `ours`, else told apart from OpenAI's/OpenCLIP's by its
    keys); a misfit names every bad key and the presets the weights do fit."""
    with torch.device("meta"):  # the weights replace every tensor: skip allocating and initialising them
        model = CLIP(cfg)
    try:
        load_weights(model, sd if ours or _is_ours(sd) else convert_from_open_clip(sd, cfg), source=source)
    except ValueError as e:  # CheckpointError, or keys no converter rule knows
        from .checkpoints.match import matching_presets

        fits = matching_presets(sd)
        hint = f" These weights fit the preset(s) {', '.join(fits)}." if fits else ""
        raise CheckpointError(f"{e}{hint}") from e
    return model


def names_no_weights(name: str, pretrained) -> bool:
    """Whether `create_model(name, pretrained)` would give a randomly initialised model: a preset name with no
    ":TAG", no `pretrained`, and not a `local-dir:`/`hf-hub:` spec. Commands whose output outlives the process
    (embed, serve) refuse such a model unless asked: a fresh random init differs on every run."""
    return isinstance(name, str) and pretrained is None and ":" not in name


def _split_tag(name: str, pretrained) -> tuple[str, object]:
    """"ViT-B-32:openai" is the preset "ViT-B-32" with pretrained="openai" (the CLI's --model syntax)."""
    if ":" in name and not name.startswith((LOCAL_DIR, HF_HUB)):
        base, tag = name.split(":", 1)
        if pretrained is not None:
            raise ValueError(f"{name!r} already names its weights; pretrained={pretrained!r} cannot be added")
        return base, tag
    return name, pretrained


class _Resolved(NamedTuple):
    model: CLIP
    preprocess: PreprocessConfig | None  # None for a text-only model
    tokenizer: TokenizerConfig


def _from_dir(path: Path, source: str, hub_repo: str | None = None) -> _Resolved:
    cfg, preprocess, sd = _load_dir(path)  # directories' state dicts come converted to our layout
    tokenizer = dir_tokenizer_config(path, cfg, hub_repo)
    return _Resolved(_load_into_new(cfg, sd, source, ours=True), preprocess, tokenizer)


def _resolve(name: str | CLIPConfig, pretrained: str | os.PathLike | None) -> _Resolved:
    if isinstance(name, str):
        name, pretrained = _split_tag(name, pretrained)
        for scheme in (LOCAL_DIR, HF_HUB):
            if name.startswith(scheme) and pretrained is not None:
                raise ValueError(f"{name!r} already names its weights; pretrained={pretrained!r} cannot be added")
        if name.startswith(HF_HUB):
            from .hub import download_repo

            repo = name[len(HF_HUB) :]
            return _from_dir(download_repo(repo), name, hub_repo=repo)
        if name.startswith(LOCAL_DIR):
            return _from_dir(Path(name[len(LOCAL_DIR) :]).expanduser(), name)
    cfg = name if isinstance(name, CLIPConfig) else get_preset(name)
    tokenizer = default_tokenizer_config(cfg) if isinstance(name, CLIPConfig) else get_preset_tokenizer(name)
    if pretrained is None:
        return _Resolved(CLIP(cfg), _preprocess_of(cfg), tokenizer)
    path = Path(pretrained).expanduser()
    if path.is_dir():
        dir_cfg, preprocess, sd = _load_dir(path)
        if not _same_architecture(dir_cfg, cfg):
            raise CheckpointError(f"{path} holds another architecture than {name!r}; load it as {LOCAL_DIR}{path}")
        return _Resolved(_load_into_new(cfg, sd, str(path), ours=True), preprocess, dir_tokenizer_config(path, cfg))
    if path.exists():
        return _Resolved(_load_into_new(cfg, load_state_dict(path), str(path)), _preprocess_of(cfg), tokenizer)
    if isinstance(name, CLIPConfig):
        raise FileNotFoundError(f"pretrained={str(pretrained)!r} is neither a file nor a directory")
    # a registry tag: the entry names the preset its weights need (OpenAI's are QuickGELU) and their preprocessing
    from .hub import resolve_pretrained

    weights, entry = resolve_pretrained(name, str(pretrained))
    model = _load_into_new(get_preset(entry.preset), load_state_dict(weights), f"{name}:{pretrained}")
    return _Resolved(model, entry.preprocess, get_preset_tokenizer(entry.preset))


def create_model(
    name: str | CLIPConfig,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> CLIP:
    """A CLIP model in eval mode.

    Args:
        name: a preset name (`clipworks.list_models()`), "NAME:TAG", a `CLIPConfig`, `local-dir:DIR` for a
            clipworks, OpenCLIP or transformers directory, or `hf-hub:ORG/REPO` for a Hugging Face hub repository
            in OpenCLIP's or transformers' layout (the architecture then comes from its config).
        pretrained: weights for a preset: a registry tag (`clipworks.list_pretrained(name)`; downloaded through
            the Hugging Face hub cache, checksum verified), a state dict file in the OpenAI/OpenCLIP or clipworks
            key layout (`.safetensors`; `.bin`/`.pt` read with `torch.load(weights_only=True)`; OpenAI's
            TorchScript `.pt` read without running its code), or a checkpoint directory. None gives random
            weights.
        device: where to put the model.
        dtype: parameter dtype (e.g. torch.bfloat16 on GPUs); default float32.

    Raises:
        ValueError: unknown name, or weights that cannot be found; never a silently random model.
        CheckpointError: weights that are unsafe or do not fit (names every mismatching key).
    """
    model, preprocess, tokenizer = _resolve(name, pretrained)
    model.preprocess_config = preprocess
    model.tokenizer_config = tokenizer
    model.to(device=device, dtype=dtype)
    return model.eval()


def create_model_and_transforms(
    name: str | CLIPConfig,
    pretrained: str | os.PathLike | None = None,
    *,
    augment=None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """(model, train_transform, eval_transform): the model as `create_model` builds it, and the image
    transforms of the preprocessing its weights were trained with. `augment` configures the training
    transform (`clipworks.transforms.AugmentConfig`). A text-only model has no image transforms: both are None."""
    from .transforms import image_transform

    model = create_model(name, pretrained, device=device, dtype=dtype)
    cfg = model.preprocess_config
    if cfg is None:
        return model, None, None
    return model, image_transform(cfg, train=True, augment=augment), image_transform(cfg)


def get_tokenizer(name_or_cfg_or_model: str | CLIPConfig | CLIP = "ViT-B-32", context_length: int | None = None,
                  **kwargs):  # fmt: skip
    """The tokenizer a model's text tower was trained with (a `clipworks.tokenizer.TextTokenizer`).

    CLIP's BPE is built in; the other families' tokenizers (SigLIP, SigLIP 2, MetaCLIP 2, the Hugging Face text
    towers) are read from their releases' files (`clipworks.hf_tokenizer.HFTokenizer`), downloaded from the hub
    when the model names a repository. Built tokenizers are shared: repeated calls are cheap.

    Args:
        name_or_cfg_or_model: a built `CLIP` model (its `tokenizer_config`; CLIP's BPE for a model built without
            one), a preset or "NAME:TAG", `local-dir:DIR` or `hf-hub:REPO` (what the checkpoint's config names), or a
            `CLIPConfig` (CLIP's BPE, for CLIP's vocabulary only).
        context_length: tokens per text; None for the model's.
        **kwargs: `language=`, the source language of an NLLB tokenizer (default "eng_Latn").

    Raises:
        ValueError: an unknown name or keyword, or a CLIPConfig whose vocabulary is not CLIP's (a config alone does
            not say which tokenizer that is).
        MissingTowerError: an image-only model, which has no tokenizer.
        HubUnavailableError: the tokenizer's files are on the hub, not cached, and the hub cannot be reached.
    """
    unknown = sorted(set(kwargs) - {"language"})
    if unknown:
        raise ValueError(f"get_tokenizer got unknown keyword arguments {unknown}; it takes context_length and language")
    return build_tokenizer(_tokenizer_config(name_or_cfg_or_model), context_length, kwargs.get("language"))


def _tokenizer_config(name: str | CLIPConfig | CLIP) -> TokenizerConfig:
    if isinstance(name, CLIP):
        _require_text(name.config)
        return getattr(name, "tokenizer_config", None) or default_tokenizer_config(name.config)
    if isinstance(name, CLIPConfig):
        from .tokenizer import Tokenizer

        _require_text(name)
        if name.text.kind != "transformer" or name.text.vocab_size != Tokenizer.vocab_size:
            raise ValueError(f"a CLIPConfig alone does not say which tokenizer its {name.text.vocab_size}-token "
                             "vocabulary needs (only CLIP's BPE is implied); pass the preset's name, the checkpoint "
                             "(local-dir:/hf-hub:) or the built model")  # fmt: skip
        return default_tokenizer_config(name)
    if not isinstance(name, str):
        raise ValueError(f"expected a model name, a CLIPConfig or a CLIP model, got {type(name).__name__}")
    if name.startswith((LOCAL_DIR, HF_HUB)):
        path, repo = _tokenizer_dir_of(name)
        cfg = _dir_config(path)
        _require_text(cfg)
        return dir_tokenizer_config(path, cfg, repo)
    base = _split_tag(name, None)[0]
    _require_text(get_preset(base))
    return get_preset_tokenizer(base)


def _require_text(cfg: CLIPConfig) -> None:
    if cfg.text is None:
        raise MissingTowerError("this is an image-only model: it has no text tower, so it has no tokenizer")


def _tokenizer_dir_of(name: str) -> tuple[Path, str | None]:
    """(directory holding the checkpoint's configs, hub repository or None) for a local-dir:/hf-hub: name; from the
    hub, only the configs are fetched, not the weights."""
    if name.startswith(LOCAL_DIR):
        return Path(name[len(LOCAL_DIR) :]).expanduser(), None
    from .hub import download_config

    repo = name[len(HF_HUB) :]
    return download_config(repo), repo


def build_tokenizer(cfg: TokenizerConfig, context_length: int | None = None, language: str | None = None):
    """The tokenizer a TokenizerConfig describes: CLIP's BPE (the shared `default_tokenizer()` at context 77), or a
    Hugging Face tokenizer read from `cfg.source` (`clipworks.hf_tokenizer.load_hf_tokenizer`)."""
    if cfg.kind == "hf":
        from .hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(cfg, context_length, language)
    if language is not None:
        raise ValueError(f"language={language!r}: only NLLB tokenizers take a language; this model uses CLIP's BPE")
    from .tokenizer import default_tokenizer

    context = cfg.context_length if context_length is None else context_length
    tok = default_tokenizer()
    return tok if context == tok.context_length else _clip_tokenizer(context)


@functools.lru_cache(maxsize=8)
def _clip_tokenizer(context_length: int):
    from .tokenizer import Tokenizer

    return Tokenizer(context_length=context_length)
