"""Zero-shot use: classify images among class names, or rank a bank of captions for each image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .prompts import check_unique, zero_shot_weights


@dataclass
class Ranking:
    """The best `labels` (class names or captions) for one image, with their probabilities, best first."""

    image: str
    labels: list[str]
    probs: list[float]

    def format(self) -> str:
        """The image's name, then one `probability  label` line per label."""
        return "\n".join([self.image] + [f"  {p:7.2%}  {label}" for label, p in zip(self.labels, self.probs)])


def _probabilities(model, image_features: Tensor, text_features: Tensor) -> Tensor:
    """(N, T) softmax over the texts of logit_scale * cos (SigLIP's bias shifts every logit equally)."""
    return (model.logit_scale.exp().float().cpu() * image_features @ text_features.t()).softmax(dim=-1)


@dataclass
class ImageFeatures:
    """Normalised features (N, E) of the image files that could be read, with their paths in the order given,
    and (path, reason) for each file that could not."""

    features: Tensor
    paths: list[str]
    failed: list[tuple[str, str]]


@dataclass
class Rankings:
    """One `Ranking` per readable image, in the order given, and (path, reason) for each unreadable one."""

    rankings: list[Ranking]
    failed: list[tuple[str, str]]


@torch.no_grad()
def encode_image_files(model, preprocess: Callable, paths: Sequence[str], device="cpu",
                       batch_size: int = 64) -> ImageFeatures:  # fmt: skip
    """Normalised features of image files; a file that cannot be read (missing, truncated, not an image, a
    decompression bomb) is listed in `failed` with `load_image`'s reason and the others are still encoded."""
    from ..data.decode import ImageDecodeError
    from ..transforms import preprocess_file

    chunks, good, failed, batch = [], [], [], []

    def encode() -> None:
        chunks.append(model.encode_image(torch.stack(batch).to(device), normalize=True).float().cpu())  # (B, E)
        batch.clear()

    for path in paths:
        try:
            batch.append(preprocess_file(preprocess, path))  # (3, S, S)
        except (ImageDecodeError, OSError) as e:
            failed.append((str(path), str(e).replace("\n", " ")))
            continue
        good.append(str(path))
        if len(batch) == batch_size:
            encode()
    if batch:
        encode()
    embed_dim = int(model.config.embed_dim)
    return ImageFeatures(torch.cat(chunks) if chunks else torch.zeros(0, embed_dim), good, failed)


def _rank(names: Sequence[str], images: ImageFeatures, probs: Tensor, top: int) -> Rankings:
    p, idx = probs.topk(min(top, probs.shape[1]), dim=1)
    rows = zip(images.paths, idx.tolist(), p)
    return Rankings([Ranking(path, [names[j] for j in row], pr.tolist()) for path, row, pr in rows], images.failed)


@torch.no_grad()
def classify(model, preprocess: Callable, tokenizer: Callable, paths: Sequence[str], class_names: Sequence[str],
             templates: Sequence[str], top: int = 5, device="cpu") -> Rankings:  # fmt: skip
    """The `top` classes of each readable image with probabilities (softmax of logit_scale * cos with the
    zero-shot class embeddings built from `templates`); unreadable images are listed, not ranked."""
    check_unique(class_names, "class names")
    images = encode_image_files(model, preprocess, paths, device)
    if not images.paths:
        return Rankings([], images.failed)
    weights = zero_shot_weights(model, tokenizer, class_names, templates, device).cpu()  # (C, E)
    return _rank(class_names, images, _probabilities(model, images.features, weights).cpu(), top)


@torch.no_grad()
def rank_captions(model, preprocess: Callable, tokenizer: Callable, paths: Sequence[str], captions: Sequence[str],
                  top: int = 5, device="cpu", batch_size: int = 256) -> Rankings:  # fmt: skip
    """The `top` captions of a bank for each readable image (captioning by matching), with probabilities;
    unreadable images are listed, not ranked."""
    if not captions:
        raise ValueError("the caption bank is empty")
    images = encode_image_files(model, preprocess, paths, device)
    if not images.paths:
        return Rankings([], images.failed)
    chunks = [model.encode_text(tokenizer(list(captions[i : i + batch_size])).to(device), normalize=True).float()
              for i in range(0, len(captions), batch_size)]  # fmt: skip
    return _rank(captions, images, _probabilities(model, images.features, torch.cat(chunks).cpu()), top)


def read_captions(path: str) -> list[str]:
    """Captions one a line (blank lines skipped)."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"caption file not found: {path!r}")
    captions = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"{path}: no captions")
    return captions
