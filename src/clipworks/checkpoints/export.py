"""Writing a model in every checkpoint layout: clipworks, OpenCLIP's hub directory, transformers' CLIPModel (or its
one-tower classes) and SiglipModel.

Each writer checks that the layout can hold the model before it writes anything, and writes through a temporary
directory renamed into place, so a failed export never replaces a good one.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from ..config import PreprocessConfig
from ..tokenizer import VOCAB_PATH, Tokenizer, _bytes_to_unicode
from . import transformers as hf
from .io import atomic_directory, check_replaceable
from .native import save_clipworks
from .open_clip_dir import config_to_open_clip, save_open_clip_dir
from .transformers_common import preprocess_to_transformers  # noqa: F401  (public here since before the split)

# transformers names CLIP's control tokens differently from OpenCLIP (<start_of_text>, <end_of_text>).
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


def save_transformers_dir(model, path: str | os.PathLike, preprocess: PreprocessConfig | None) -> Path:
    """Write `model` as a transformers directory: config.json, model.safetensors, the image processor's
    preprocessor_config.json (for a model with an image tower) and the tokenizer's files.

    CLIP models become a `CLIPModel` directory, which `CLIPModel`, `CLIPTextModel(WithProjection)`,
    `CLIPVisionModel(WithProjection)`, `CLIPTokenizer`, `CLIPImageProcessor` and `CLIPProcessor` all load with
    `from_pretrained(path)` (transformers' tokenizer pads with the end token (49407) where clipworks and OpenCLIP pad
    with 0; with a causal text tower the features are the same). One-tower models become the matching one-tower CLIP
    class's directory. SigLIP models (attention-pool image tower, bidirectional text tower) become a `SiglipModel`
    directory with a `SiglipImageProcessor` config; a model read from a Siglip2 (NaFlex) directory is written at its
    fixed resolution. Tokenizer files: a Hugging Face tokenizer (`model.tokenizer_config.kind == "hf"`: SigLIP's,
    ...) has its own files copied (`clipworks.hf_tokenizer.save_tokenizer_files`); CLIP's BPE vocabulary is written
    as `CLIPTokenizer` files.

    Raises:
        ValueError: a model neither CLIPModel nor SiglipModel can hold (ResNet, ConvNeXt, ...), or preprocessing its
            image processor cannot express; the message names the formats that can hold the model.
    """
    from safetensors.torch import save_file

    cfg = model.config
    try:
        hf.config_to_transformers(cfg)
    except ValueError as e:
        raise ValueError(f"{e}; this model can be saved as {' or '.join(formats_for(model))}") from e
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ckpt = hf.convert_checkpoint_to_transformers(cfg, sd, preprocess)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = {**ckpt.config, "dtype": dtype, "torch_dtype": dtype}  # `dtype` for transformers 5, `torch_dtype` 4.x
    with atomic_directory(path) as tmp:
        save_file(ckpt.state_dict, str(tmp / hf.SAFETENSORS_FILE), metadata={"format": "pt"})
        (tmp / hf.CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if ckpt.image_processor is not None:
            (tmp / hf.PREPROCESSOR_FILE).write_text(json.dumps(ckpt.image_processor, indent=2))
        _write_tokenizer(model, config["model_type"], tmp)
    return Path(path)


def _write_tokenizer(model, model_type: str, path: Path) -> None:
    """The tokenizer's files beside the weights: a Hugging Face tokenizer's own files (when they cannot be found,
    offline or missing, the export goes on without them, with a warning), or CLIP's BPE as `CLIPTokenizer` files."""
    text = model.config.text
    if text is None:
        return
    tokenizer = getattr(model, "tokenizer_config", None)
    if tokenizer is not None and tokenizer.kind == "hf":
        from ..hf_tokenizer import save_tokenizer_files

        try:
            save_tokenizer_files(tokenizer, path)
        except OSError as e:  # no files in the source directory, or the hub unreachable
            warnings.warn(f"the tokenizer's files were not written: {e}", stacklevel=4)
    elif text.vocab_size == Tokenizer.vocab_size and model_type != "siglip":
        # (not for SigLIP: CLIPTokenizer pads with the end token, and SigLIP's last-position pooling sees padding)
        write_tokenizer_files(path, text.context_length)


def write_tokenizer_files(path: Path, context_length: int) -> None:
    """Write CLIP's BPE vocabulary as transformers' `CLIPTokenizer` files (vocab.json, merges.txt, configs).

    The vocabulary is built as `clipworks.tokenizer.Tokenizer` builds it, so the ids are the same on ordinary
    text. transformers skips ftfy's text repair and pads with the end token; clipworks pads with 0.
    """
    with gzip.open(VOCAB_PATH) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : Tokenizer.vocab_size - 512 - 2 + 1]  # 256 bytes, 256 word-final bytes, merges, 2 controls
    base = list(_bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    assert len(vocab) == Tokenizer.vocab_size
    vocab_json = json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
    (path / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", **special, "model_max_length": context_length,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
              "clean_up_tokenization_spaces": False}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _save_clipworks(model, path, preprocess: PreprocessConfig | None) -> Path:
    return save_clipworks(model, path, preprocess)


WRITERS: dict[str, Callable[..., Path]] = {
    "clipworks": _save_clipworks,
    "open_clip": save_open_clip_dir,
    "transformers": save_transformers_dir,
}
FORMATS = tuple(WRITERS)


def _check_open_clip(cfg) -> None:
    if cfg.vision is None or cfg.text is None:
        raise ValueError(f"OpenCLIP's layout holds two-tower models only; this model has no "
                         f"{'text' if cfg.text is None else 'image'} tower")  # fmt: skip
    config_to_open_clip(cfg)


def formats_for(model) -> list[str]:
    """The checkpoint formats that can hold `model`'s architecture."""
    formats = ["clipworks"]
    for name, check in (("open_clip", _check_open_clip), ("transformers", hf.config_to_transformers)):
        try:
            check(model.config)
        except ValueError:
            continue
        formats.append(name)
    return formats


def save_pretrained(
    model, path: str | os.PathLike, preprocess: PreprocessConfig | None = None, *, format: str = "clipworks"
) -> Path:
    """Write `model` and its preprocessing as a checkpoint directory; returns the directory.

    Args:
        model: a clipworks `CLIP`.
        path: the directory to write; an existing checkpoint directory there is replaced once the new one is
            complete (any other non-empty directory is refused).
        preprocess: the preprocessing to store; defaults to the one the model was loaded with, else the
            default for its architecture (none for a text-only model).
        format: "clipworks" (what `clipworks.create_model("local-dir:...")` and training read), "open_clip"
            (`open_clip.create_model_and_transforms("local-dir:...")`, two-tower models), or "transformers"
            (`transformers.CLIPModel.from_pretrained` for ViT CLIP models, the one-tower CLIP classes for
            one-tower models, `SiglipModel.from_pretrained` for SigLIP models; see `save_transformers_dir`).

    Raises:
        ValueError: an unknown format, one that cannot hold this model (the message names those that can), a model
            fused by `clipworks.reparameterize`, or a `path` that is a file or a non-empty directory holding no
            checkpoint.
    """
    if format not in WRITERS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {list(FORMATS)}")
    if getattr(getattr(model, "visual", None), "reparameterized", False):
        raise ValueError("this model's image tower was fused for inference (clipworks.reparameterize): its weights "
                         "fit no checkpoint layout; save the model before fusing it")  # fmt: skip
    check_replaceable(Path(path))
    if preprocess is None:
        from ..factory import default_preprocess

        preprocess = getattr(model, "preprocess_config", None)
        if preprocess is None and model.config.vision is not None:
            preprocess = default_preprocess(model.config)
    if format == "open_clip":
        try:
            _check_open_clip(model.config)
        except ValueError as e:
            raise ValueError(f"{e}; this model can be saved as {' or '.join(formats_for(model))}") from e
    return WRITERS[format](model, path, preprocess)
