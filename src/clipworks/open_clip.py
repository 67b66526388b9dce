"""OpenCLIP's API on clipworks: `import clipworks.open_clip as open_clip` runs code written for `open_clip` unchanged.

The factories, tokenizers and models are clipworks' own (they take OpenCLIP's keywords and return its conventions:
`image_features, text_features, logit_scale = model(image, text)`, `output_dict=True` dicts, `visual.image_size`
tuples); this module adds the names OpenCLIP's README and training loops use that clipworks spells differently:
the losses' constructors and outputs, `image_transform`'s signature, zero-shot classifier building with OpenCLIP's
callable templates, and its constants. Numbers agree with OpenCLIP's (tests/test_open_clip_facade.py runs OpenCLIP's
README example and a training step through both libraries).

What is not here raises AttributeError naming this module; what differs is said where it is defined.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import __version__  # noqa: F401 - open_clip.__version__ is clipworks' version here
from .compat import augment_config, get_model_config, preprocess_overrides
from .config import OPENAI_MEAN as OPENAI_DATASET_MEAN
from .config import OPENAI_STD as OPENAI_DATASET_STD
from .config import PreprocessConfig
from .factory import create_model, create_model_and_transforms, create_model_from_pretrained, get_tokenizer
from .hf_tokenizer import HFTokenizer
from .models.clip import CLIP
from .presets import list_models
from .pretrained import list_pretrained
from .tokenizer import Tokenizer as SimpleTokenizer
from .tokenizer import decode, tokenize
from .train import losses as _losses

__all__ = [
    "CLIP", "ClipLoss", "HFTokenizer", "IMAGENET_CLASSNAMES", "OPENAI_DATASET_MEAN", "OPENAI_DATASET_STD",
    "OPENAI_IMAGENET_TEMPLATES", "SIMPLE_IMAGENET_TEMPLATES", "SigLipLoss", "SimpleTokenizer",
    "build_zero_shot_classifier", "create_model", "create_model_and_transforms", "create_model_from_pretrained",
    "decode", "get_model_config", "get_tokenizer", "image_transform", "list_models", "list_pretrained",
    "list_pretrained_tags_by_model", "tokenize",
]  # fmt: skip


def list_pretrained_tags_by_model(model: str) -> list[str]:
    """The pretrained tags registered for `model` (OpenCLIP's name for `list_pretrained(model)`'s tags)."""
    return [tag for _, tag in list_pretrained(model)]


def image_transform(image_size, is_train: bool, mean=None, std=None, resize_mode: str | None = None,
                    interpolation: str | None = None, fill_color: int = 0, aug_cfg=None):  # fmt: skip
    """OpenCLIP's `image_transform` signature over `clipworks.transforms.image_transform`: the same tensors."""
    from .transforms import image_transform as _image_transform

    overrides = {"size": image_size, "mean": mean, "std": std, "resize_mode": resize_mode,
                 "interpolation": interpolation, "fill_color": fill_color}  # fmt: skip
    cfg = preprocess_overrides(PreprocessConfig(), overrides)
    return _image_transform(cfg, train=is_train, augment=augment_config(aug_cfg))


class ClipLoss(_losses.ClipLoss):
    """OpenCLIP's `ClipLoss` constructor and call. Rank and world size are read from torch.distributed (the
    arguments are accepted for OpenCLIP's signature); `cache_labels` changes nothing (labels are cheap here)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):  # fmt: skip
        if use_horovod:
            raise ValueError("use_horovod=True: Horovod is not supported; run under torchrun (torch.distributed)")
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, output_dict: bool = False):
        loss = super().forward(image_features, text_features, logit_scale)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(_losses.SigLipLoss):
    """OpenCLIP's `SigLipLoss` constructor and call; text features are all-gathered across ranks instead of passed
    round a ring (same loss and gradients), so `dist_impl` is accepted and unused."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 bidir: bool = True, use_horovod: bool = False):  # fmt: skip
        if use_horovod:
            raise ValueError("use_horovod=True: Horovod is not supported; run under torchrun (torch.distributed)")
        super().__init__(gather_with_grad=True)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                output_dict: bool = False):  # fmt: skip
        loss = super().forward(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


def _as_format(template: str | Callable[[str], str]) -> str:
    """A "{}" template from OpenCLIP's callable one (`lambda c: f"a photo of a {c}."`)."""
    return template if isinstance(template, str) else template("{}")


def build_zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence,
                               num_classes_per_batch: int | None = 10, device: str | torch.device = "cpu",
                               use_tqdm: bool = False) -> Tensor:  # fmt: skip
    """OpenCLIP's zero-shot classifier: (E, C) class embeddings (each template's text embedding normalised, averaged,
    normalised), built `num_classes_per_batch` classes at a time; templates are "{}" strings or OpenCLIP's
    callables."""
    from .train.zeroshot import build_classifier

    formats = [_as_format(t) for t in templates]
    step = num_classes_per_batch or len(classnames)
    with torch.no_grad():
        chunks = [build_classifier(model, tokenizer, classnames[i : i + step], formats, device)
                  for i in range(0, len(classnames), step)]  # fmt: skip
    return torch.cat(chunks).t()


def _load_constants() -> dict:
    from .eval.prompts import imagenet_class_names, load_templates

    return {
        "IMAGENET_CLASSNAMES": tuple(imagenet_class_names()),
        "OPENAI_IMAGENET_TEMPLATES": tuple(_formatter(t) for t in load_templates("imagenet")),
        "SIMPLE_IMAGENET_TEMPLATES": tuple(_formatter(t) for t in load_templates("simple")),
    }


def _formatter(template: str) -> Callable[[str], str]:
    return lambda c: template.format(c)  # OpenCLIP's templates are callables


def __getattr__(name: str):
    if name in ("IMAGENET_CLASSNAMES", "OPENAI_IMAGENET_TEMPLATES", "SIMPLE_IMAGENET_TEMPLATES"):
        globals().update(_load_constants())  # read the shipped files on first use
        return globals()[name]
    raise AttributeError(f"module 'clipworks.open_clip' has no attribute {name!r} (OpenCLIP's API as far as "
                         "clipworks implements it: see clipworks.open_clip.__all__)")  # fmt: skip
