"""Writing a model in every checkpoint layout: clipworks, OpenCLIP's hub directory, transformers' CLIPModel.

Each writer checks that the layout can hold the model before it writes anything, and writes through a temporary
directory renamed into place, so a failed export never replaces a good one.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import PreprocessConfig
from ..tokenizer import VOCAB_PATH, Tokenizer, _bytes_to_unicode
from . import transformers as hf
from .native import save_clipworks
from .io import atomic_directory, check_replaceable
from .open_clip_dir import config_to_open_clip, save_open_clip_dir

# PIL resampling filter codes, as transformers' image processors store them.
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
# transformers names CLIP's control tokens differently from OpenCLIP (<start_of_text>, <end_of_text>).
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


def save_transformers_dir(model, path: str | os.PathLike, preprocess: PreprocessConfig) -> Path:
    """Write `model` as a transformers `CLIPModel` directory: config.json, model.safetensors, the image processor's
    preprocessor_config.json and, for CLIP's vocabulary, the tokenizer files.

    `CLIPModel`, `CLIPTextModel(WithProjection)`, `CLIPVisionModel(WithProjection)`, `CLIPTokenizer`,
    `CLIPImageProcessor` and `CLIPProcessor` all load it with `from_pretrained(path)`. Note that transformers'
    tokenizer pads with the end token (49407) where clipworks and OpenCLIP pad with 0; with a causal text
    tower the features are the same.

    Raises:
        ValueError: a model transformers' CLIPModel cannot hold (ResNet, ConvNeXt, SigLIP), or preprocessing its
            image processor cannot express; the message names the formats that can hold the model.
    """
    from safetensors.torch import save_file

    cfg = model.config
    try:
        config = hf.config_to_transformers(cfg)
    except ValueError as e:
        raise ValueError(f"{e}; this model can be saved as {' or '.join(formats_for(model))}") from e
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config.update(dtype=dtype, torch_dtype=dtype)  # `dtype` for transformers 5, `torch_dtype` for 4.x
    image_processor = preprocess_to_transformers(preprocess)
    sd = hf.convert_to_transformers({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    with atomic_directory(path) as tmp:
        save_file(sd, str(tmp / hf.SAFETENSORS_FILE), metadata={"format": "pt"})
        (tmp / hf.CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (tmp / hf.PREPROCESSOR_FILE).write_text(json.dumps(image_processor, indent=2))
        if cfg.text.vocab_size == Tokenizer.vocab_size:
            write_tokenizer_files(tmp, cfg.text.context_length)
    return Path(path)


def preprocess_to_transformers(pp: PreprocessConfig) -> dict[str, Any]:
    """The `CLIPImageProcessor` preprocessor_config.json dict for `pp` (`preprocess_from_transformers` inverts it).

    Raises:
        ValueError: a resize mode or interpolation the image processor cannot express ("longest" pads to a
            square, which CLIPImageProcessor does not do).
    """
    if pp.resize_mode not in ("shortest", "squash"):
        raise ValueError(
            f"resize_mode={pp.resize_mode!r} cannot be expressed by transformers' CLIPImageProcessor; expected "
            "'shortest' (resize the short side, centre crop) or 'squash' (resize both sides)"
        )
    if pp.interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation={pp.interpolation!r}; expected one of {sorted(_RESAMPLE)}")
    side = pp.image_size
    shortest = pp.resize_mode == "shortest"
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": side} if shortest else {"height": side, "width": side},
        "resample": _RESAMPLE[pp.interpolation],
        "do_center_crop": shortest,
        "crop_size": {"height": side, "width": side},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pp.mean),
        "image_std": list(pp.std),
    }


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


def _save_clipworks(model, path, preprocess: PreprocessConfig) -> Path:
    return save_clipworks(model, path, preprocess)


WRITERS: dict[str, Callable[..., Path]] = {
    "clipworks": _save_clipworks,
    "open_clip": save_open_clip_dir,
    "transformers": save_transformers_dir,
}
FORMATS = tuple(WRITERS)


def formats_for(model) -> list[str]:
    """The checkpoint formats that can hold `model`'s architecture."""
    formats = ["clipworks"]
    for name, check in (("open_clip", config_to_open_clip), ("transformers", hf.config_to_transformers)):
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
            default for its architecture.
        format: "clipworks" (what `clipworks.create_model("local-dir:...")` and training read), "open_clip"
            (`open_clip.create_model_and_transforms("local-dir:...")`), or "transformers"
            (`transformers.CLIPModel.from_pretrained`, ViT models only).

    Raises:
        ValueError: an unknown format, one that cannot hold this model (the message names those that can), or a
            `path` that is a file or a non-empty directory holding no checkpoint.
    """
    if format not in WRITERS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {list(FORMATS)}")
    check_replaceable(Path(path))
    if preprocess is None:
        from ..factory import default_preprocess

        preprocess = getattr(model, "preprocess_config", None) or default_preprocess(model.config)
    if format == "open_clip":
        try:
            config_to_open_clip(model.config)
        except ValueError as e:
            raise ValueError(f"{e}; this model can be saved as {' or '.join(formats_for(model))}") from e
    return WRITERS[format](model, path, preprocess)
