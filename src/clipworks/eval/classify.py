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


@torch.no_grad()
def encode_image_files(model, preprocess: Callable, paths: Sequence[str], device="cpu", batch_size: int = 64) -> Tensor:
    """Normalised features (N, E) of image files (`load_image` errors propagate, naming the file)."""
    from ..transforms import preprocess_file

    chunks = []
    for i in range(0, len(paths), batch_size):
        images = torch.stack([preprocess_file(preprocess, p) for p in paths[i : i + batch_size]])  # (B, 3, S, S)
        chunks.append(model.encode_image(images.to(device), normalize=True).float().cpu())
    return torch.cat(chunks)


def _rank(names: Sequence[str], paths: Sequence[str], probs: Tensor, top: int) -> list[Ranking]:
    p, idx = probs.topk(min(top, probs.shape[1]), dim=1)
    return [Ranking(str(path), [names[j] for j in row], pr.tolist()) for path, row, pr in zip(paths, idx.tolist(), p)]


@torch.no_grad()
def classify(model, preprocess: Callable, tokenizer: Callable, paths: Sequence[str], class_names: Sequence[str],
             templates: Sequence[str], top: int = 5, device="cpu") -> list[Ranking]:  # fmt: skip
    """The `top` classes of each image with probabilities (softmax of logit_scale * cos with the zero-shot
    class embeddings built from `templates`)."""
    check_unique(class_names, "class names")
    weights = zero_shot_weights(model, tokenizer, class_names, templates, device).cpu()  # (C, E)
    probs = _probabilities(model, encode_image_files(model, preprocess, paths, device), weights)
    return _rank(class_names, paths, probs.cpu(), top)


@torch.no_grad()
def rank_captions(model, preprocess: Callable, tokenizer: Callable, paths: Sequence[str], captions: Sequence[str],
                  top: int = 5, device="cpu", batch_size: int = 256) -> list[Ranking]:  # fmt: skip
    """The `top` captions of a bank for each image (captioning by matching), with probabilities."""
    if not captions:
        raise ValueError("the caption bank is empty")
    chunks = [model.encode_text(tokenizer(list(captions[i : i + batch_size])).to(device), normalize=True).float()
              for i in range(0, len(captions), batch_size)]  # fmt: skip
    probs = _probabilities(model, encode_image_files(model, preprocess, paths, device), torch.cat(chunks).cpu())
    return _rank(captions, paths, probs, top)


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
