"""Public factories: models by preset name or checkpoint, with their transforms and tokenizer."""

from __future__ import annotations

import functools
import json
import os
import warnings
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


def _load_into_new(cfg: CLIPConfig, sd: dict, source: str, ours: bool = False, resize: bool = False) -> CLIP:
    """A model of `cfg` holding `sd` (in clipworks' layout if `ours`, else told apart from OpenAI's/OpenCLIP's by its
    keys); a misfit names every bad key and the presets the weights do fit. `resize`: position tables of another
    length are interpolated to the model's (OpenCLIP's `force_image_size`/`force_context_length` loads)."""
    with torch.device("meta"):  # the weights replace every tensor: skip allocating and initialising them
        model = CLIP(cfg)
    try:
        sd = sd if ours or _is_ours(sd) else convert_from_open_clip(sd, cfg)
        if resize:
            from .compat import resize_position_tables

            sd = resize_position_tables(sd, cfg)
        load_weights(model, sd, source=source)
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


def _from_dir(path: Path, source: str, hub_repo: str | None = None, adapt=None, weights: bool = True) -> _Resolved:
    if not weights:  # the directory's architecture and tokenizer, randomly initialised (OpenCLIP's load_weights=False)
        cfg = _dir_config(path)
        new_cfg = _adapt(cfg, adapt)
        tokenizer = _fit_tokenizer(dir_tokenizer_config(path, cfg, hub_repo), cfg, new_cfg)
        return _Resolved(CLIP(new_cfg), _preprocess_of(new_cfg), tokenizer)
    cfg, preprocess, sd = _load_dir(path)  # directories' state dicts come converted to our layout
    new_cfg = _adapt(cfg, adapt)
    tokenizer = _fit_tokenizer(dir_tokenizer_config(path, cfg, hub_repo), cfg, new_cfg)
    model = _load_into_new(new_cfg, sd, source, ours=True, resize=new_cfg != cfg)
    return _Resolved(model, preprocess, tokenizer)


def _adapt(cfg: CLIPConfig, adapt) -> CLIPConfig:
    return cfg if adapt is None else adapt(cfg)


def _fit_tokenizer(tokenizer: TokenizerConfig, before: CLIPConfig, after: CLIPConfig) -> TokenizerConfig:
    """The tokenizer of a text tower whose context length `_adapt` changed (force_context_length) tokenizes to it."""
    if after.text is None or before.text.context_length == after.text.context_length:
        return tokenizer
    return replace(tokenizer, context_length=after.text.context_length)


def _resolve(name: str | CLIPConfig, pretrained: str | os.PathLike | None, adapt=None, cache_dir=None,
             weights: bool = True) -> _Resolved:  # fmt: skip
    """The model, preprocessing and tokenizer `name` and `pretrained` describe; `adapt` changes the architecture
    before it is built (OpenCLIP's force_* options), `weights=False` skips loading any (random initialisation)."""
    if isinstance(name, str):
        name, pretrained = _split_tag(name, pretrained)
        for scheme in (LOCAL_DIR, HF_HUB):
            if name.startswith(scheme) and pretrained is not None:
                raise ValueError(f"{name!r} already names its weights; pretrained={pretrained!r} cannot be added")
        if name.startswith(HF_HUB):
            from .hub import download_config, download_repo

            repo = name[len(HF_HUB) :]
            fetch = download_repo if weights else download_config
            return _from_dir(fetch(repo, cache_dir=cache_dir), name, hub_repo=repo, adapt=adapt, weights=weights)
        if name.startswith(LOCAL_DIR):
            return _from_dir(Path(name[len(LOCAL_DIR) :]).expanduser(), name, adapt=adapt, weights=weights)
    base_cfg = name if isinstance(name, CLIPConfig) else get_preset(name)
    cfg = _adapt(base_cfg, adapt)
    tokenizer = default_tokenizer_config(cfg) if isinstance(name, CLIPConfig) else get_preset_tokenizer(name)
    tokenizer = _fit_tokenizer(tokenizer, base_cfg, cfg)
    if pretrained is None or not weights:
        return _Resolved(CLIP(cfg), _preprocess_of(cfg), tokenizer)
    resize = cfg != base_cfg
    path = Path(pretrained).expanduser()
    if path.is_dir():
        dir_cfg, preprocess, sd = _load_dir(path)
        if not _same_architecture(dir_cfg, base_cfg):
            raise CheckpointError(f"{path} holds another architecture than {name!r}; load it as {LOCAL_DIR}{path}")
        model = _load_into_new(cfg, sd, str(path), ours=True, resize=resize)
        return _Resolved(model, preprocess, _fit_tokenizer(dir_tokenizer_config(path, base_cfg), base_cfg, cfg))
    if path.exists():
        return _Resolved(_load_into_new(cfg, load_state_dict(path), str(path), resize=resize), _preprocess_of(cfg),
                         tokenizer)  # fmt: skip
    if isinstance(name, CLIPConfig) or looks_like_path(str(pretrained)):
        raise FileNotFoundError(f"no weights file or checkpoint directory at {str(pretrained)!r} (it does not exist)")
    # a registry tag: the entry names the preset its weights need (OpenAI's are QuickGELU) and their preprocessing
    from .hub import resolve_pretrained

    weights, entry = resolve_pretrained(name, str(pretrained), cache_dir=cache_dir)
    entry_cfg = get_preset(entry.preset)
    cfg = _adapt(entry_cfg, adapt)
    model = _load_into_new(cfg, load_state_dict(weights), f"{name}:{pretrained}", resize=cfg != entry_cfg)
    return _Resolved(model, entry.preprocess, _fit_tokenizer(get_preset_tokenizer(entry.preset), entry_cfg, cfg))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def looks_like_path(value: str) -> bool:
    """Whether a `pretrained` value is meant as a file or directory rather than a registry tag."""
    return "/" in value or os.sep in value or value.startswith((".", "~")) or value.lower().endswith(WEIGHT_SUFFIXES)


class RandomWeightsWarning(UserWarning):
    """A preset was built without weights: its outputs are noise. Said once per preset and process."""


_warned_random: set[str] = set()


def _warn_random(name: str) -> None:
    if name in _warned_random:
        return
    _warned_random.add(name)
    warnings.warn(f"{name!r} has random (untrained) weights: pass pretrained= (a tag of clipworks.list_pretrained"
                  f"({name!r}), a weights file or a checkpoint directory), or load_weights=False to say random init is "
                  "meant", RandomWeightsWarning, stacklevel=3)  # fmt: skip


def create_model(
    model_name: str | CLIPConfig,
    pretrained: str | os.PathLike | None = None,
    *,
    load_weights: bool = True,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    force_quick_gelu: bool = False,
    force_image_size: int | tuple[int, int] | None = None,
    force_context_length: int | None = None,
    force_patch_dropout: float | None = None,
    force_preprocess_cfg: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    output_dict: bool | None = None,
    require_pretrained: bool = False,
    **open_clip_options,
) -> CLIP:
    """A CLIP model in eval mode. The keywords are OpenCLIP's (`open_clip.create_model`), plus `dtype`.

    Args:
        model_name: a preset name (`clipworks.list_models()`), "NAME:TAG", a `CLIPConfig`, `local-dir:DIR` for a
            clipworks, OpenCLIP or transformers directory, or `hf-hub:ORG/REPO` for a Hugging Face hub repository
            in OpenCLIP's or transformers' layout (the architecture then comes from its config).
        pretrained: weights for a preset: a registry tag (`clipworks.list_pretrained(name)`; downloaded through
            the Hugging Face hub cache, checksum verified), a state dict file in the OpenAI/OpenCLIP or clipworks
            key layout (`.safetensors`; `.bin`/`.pt` read with `torch.load(weights_only=True)`; OpenAI's
            TorchScript `.pt` read without running its code), or a checkpoint directory. None gives random
            weights, with a `RandomWeightsWarning` once per preset unless `load_weights=False` says it is meant.
        load_weights: False builds the architecture `model_name` names with random weights, loading none.
        precision: OpenCLIP's names: "fp32" (and the "amp" ones: float32 parameters), "bf16"/"fp16" (matrix-product
            weights in that dtype, normalisation layers and the logit scale in float32), "pure_bf16"/"pure_fp16"
            (the whole model in that dtype); and "auto" (bf16 where the device computes it natively and the model
            gains from it, else fp32: `hardware.resolve_precision`; bf16 then checked on this model's own weights,
            fp32 kept below cosine 0.999 on a probe batch), "int8" (`quantize_int8`; the CPU only). The
            weights are cast once, here; `model.precision` records the result. See `clipworks.models.precision`.
        device: where to put the model.
        dtype: parameter dtype for the whole model (e.g. torch.bfloat16: "pure_bf16"); default float32. With a
            precision other than fp32 it must agree with it.
        force_quick_gelu, force_image_size, force_context_length: change the architecture before it is built;
            loaded position tables are interpolated to new sizes as OpenCLIP does.
        force_patch_dropout: the fraction of a ViT's patch tokens dropped at random in training mode (FLIP;
            `CLIP.set_patch_dropout`); a non-zero one on a tower without patches is a ValueError.
        force_preprocess_cfg: OpenCLIP's preprocessing keys to override (`size`, `mean`, `std`, `interpolation`,
            `resize_mode`, `fill_color`).
        cache_dir: the Hugging Face hub cache to download into.
        output_dict: the model's forward returns a dict (OpenCLIP's keys) instead of a tuple.
        require_pretrained: raise instead of building a model without weights.
        **open_clip_options: OpenCLIP's other keywords, at their defaults (`clipworks.compat.ONLY_DEFAULT` says why
            the others are refused) or ones that change nothing here (`force_custom_text`, `pretrained_text`).

    Raises:
        ValueError: unknown name, or weights that cannot be found; never a silently random model.
        FileNotFoundError: `pretrained` names a path that does not exist.
        CheckpointError: weights that are unsafe or do not fit (names every mismatching key).
    """
    from . import compat

    compat.check_options("create_model", open_clip_options)
    dtype = compat.precision_dtype(precision, dtype)
    adapt = compat.architecture_overrides(force_quick_gelu, force_image_size, force_context_length)
    random_init = isinstance(model_name, str) and names_no_weights(model_name, pretrained)
    if random_init and require_pretrained:
        raise ValueError(f"{model_name!r} names no weights and require_pretrained=True: pass pretrained=")
    model, preprocess, tokenizer = _resolve(model_name, pretrained, adapt, cache_dir, weights=load_weights)
    if random_init and load_weights:
        _warn_random(model_name)
    if preprocess is not None:
        preprocess = compat.preprocess_overrides(preprocess, force_preprocess_cfg)
        if force_image_size is not None and force_preprocess_cfg is None:
            preprocess = replace(preprocess, image_size=model.config.vision.image_size)
        model.visual.preprocess_cfg = compat.preprocess_dict(preprocess)  # OpenCLIP's attribute
    model.preprocess_config = preprocess
    model.tokenizer_config = tokenizer
    model.output_dict = bool(output_dict)
    compat.apply_patch_dropout(model, force_patch_dropout)
    model.to(device=device)
    if dtype is not None and precision in ("fp32", *compat.AMP):  # `dtype` alone: the whole model, as today
        model.to(dtype)
        model.precision = {torch.bfloat16: "pure_bf16", torch.float16: "pure_fp16"}.get(dtype, "fp32")
    else:
        from .models.precision import apply_precision

        apply_precision(model, precision, next(model.parameters()).device.type)
    return model.eval()


def create_model_and_transforms(
    model_name: str | CLIPConfig,
    pretrained: str | os.PathLike | None = None,
    *,
    augment=None,
    aug_cfg=None,
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
    image_interpolation: str | None = None,
    image_resize_mode: str | None = None,
    **create_options,
):
    """(model, train_transform, eval_transform): the model as `create_model` builds it (which takes every other
    keyword), and the image transforms of the preprocessing its weights were trained with. OpenCLIP's signature.

    Args:
        augment: the training transform's augmentation (`clipworks.transforms.AugmentConfig`); `aug_cfg` is
            OpenCLIP's name for it (an `AugmentationCfg` or dict; only `scale` has an equivalent here).
        image_mean, image_std, image_interpolation, image_resize_mode: override the weights' preprocessing.

    A text-only model has no image transforms: both are None.
    """
    from . import compat
    from .transforms import image_transform

    if augment is not None and aug_cfg is not None:
        raise ValueError("pass augment= or OpenCLIP's aug_cfg=, not both")
    augment = augment if augment is not None else compat.augment_config(aug_cfg)
    model = create_model(model_name, pretrained, **create_options)
    cfg = model.preprocess_config
    if cfg is None:
        return model, None, None
    cfg = compat.preprocess_overrides(cfg, {"mean": image_mean, "std": image_std, "interpolation": image_interpolation,
                                            "resize_mode": image_resize_mode})  # fmt: skip
    model.preprocess_config = cfg
    model.visual.preprocess_cfg = compat.preprocess_dict(cfg)
    return model, image_transform(cfg, train=True, augment=augment), image_transform(cfg)


def create_model_from_pretrained(
    model_name: str | CLIPConfig,
    pretrained: str | os.PathLike | None = None,
    *,
    return_transform: bool = True,
    **options,
):
    """OpenCLIP's `create_model_from_pretrained`: `(model, eval_transform)` (the model alone without
    `return_transform`), refusing to build a model without weights. Takes `create_model_and_transforms`' keywords."""
    options.setdefault("require_pretrained", True)
    model, _, preprocess = create_model_and_transforms(model_name, pretrained, **options)
    return (model, preprocess) if return_transform else model


def get_tokenizer(model_name: str | CLIPConfig | CLIP = "ViT-B-32", context_length: int | None = None,
                  cache_dir: str | os.PathLike | None = None, **kwargs):  # fmt: skip
    """The tokenizer a model's text tower was trained with (a `clipworks.tokenizer.TextTokenizer`); OpenCLIP's
    signature.

    CLIP's BPE is built in; the other families' tokenizers (SigLIP, SigLIP 2, MetaCLIP 2, the Hugging Face text
    towers) are read from their releases' files (`clipworks.hf_tokenizer.HFTokenizer`), downloaded from the hub
    when the model names a repository. Built tokenizers are shared: repeated calls are cheap.

    Args:
        model_name: a built `CLIP` model (its `tokenizer_config`; CLIP's BPE for a model built without one), a
            preset or "NAME:TAG", `local-dir:DIR` or `hf-hub:REPO` (what the checkpoint's config names), or a
            `CLIPConfig` (CLIP's BPE, for CLIP's vocabulary only).
        context_length: tokens per text; None for the model's.
        cache_dir: the Hugging Face hub cache the tokenizer's files are downloaded into.
        **kwargs: `language=`, the source language of an NLLB tokenizer (default "eng_Latn").

    Raises:
        ValueError: an unknown name or keyword, or a CLIPConfig whose vocabulary is not CLIP's (a config alone does
            not say which tokenizer that is).
        MissingTowerError: an image-only model, which has no tokenizer.
        HubUnavailableError: the tokenizer's files are on the hub, not cached, and the hub cannot be reached.
    """
    unknown = sorted(set(kwargs) - {"language"})
    if unknown:
        raise ValueError(f"get_tokenizer got unknown keyword arguments {unknown}; it takes context_length, cache_dir "
                         "and language")  # fmt: skip
    cfg = _tokenizer_config(model_name, cache_dir)
    return build_tokenizer(cfg, context_length, kwargs.get("language"), cache_dir)


def _tokenizer_config(name: str | CLIPConfig | CLIP, cache_dir: str | os.PathLike | None = None) -> TokenizerConfig:
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
        path, repo = _tokenizer_dir_of(name, cache_dir)
        cfg = _dir_config(path)
        _require_text(cfg)
        return dir_tokenizer_config(path, cfg, repo)
    base = _split_tag(name, None)[0]
    _require_text(get_preset(base))
    return get_preset_tokenizer(base)


def _require_text(cfg: CLIPConfig) -> None:
    if cfg.text is None:
        raise MissingTowerError("this is an image-only model: it has no text tower, so it has no tokenizer")


def _tokenizer_dir_of(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """(directory holding the checkpoint's configs, hub repository or None) for a local-dir:/hf-hub: name; from the
    hub, only the configs are fetched, not the weights."""
    if name.startswith(LOCAL_DIR):
        return Path(name[len(LOCAL_DIR) :]).expanduser(), None
    from .hub import download_config

    repo = name[len(HF_HUB) :]
    return download_config(repo, cache_dir=cache_dir), repo


def build_tokenizer(cfg: TokenizerConfig, context_length: int | None = None, language: str | None = None,
                    cache_dir: str | os.PathLike | None = None):  # fmt: skip
    """The tokenizer a TokenizerConfig describes: CLIP's BPE (the shared `default_tokenizer()` at context 77), or a
    Hugging Face tokenizer read from `cfg.source` (`clipworks.hf_tokenizer.load_hf_tokenizer`)."""
    if cfg.kind == "hf":
        from .hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(cfg, context_length, language, cache_dir)
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
