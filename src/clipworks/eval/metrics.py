"""Evaluation metrics on features: zero-shot classification, retrieval recall, compositional accuracy, CLIP score.

Definitions follow CLIP_benchmark's (and the CLIP paper's): top-k accuracy counts an image when its label is
among the k highest logits; mean per-class recall is scikit-learn's balanced accuracy (the mean, over the
classes present among the labels, of the fraction of each class predicted right); retrieval recall@k counts
a caption when its image is among the k images it scores highest (text to image) and an image when any of
its captions is among the k captions it scores highest (image to text).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def classification_metrics(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float | None]:
    """`top{k}` for each k (None where k exceeds the number of classes) and `mean_per_class_recall`.

    Args:
        logits: (N, C) scores.
        labels: (N,) class indices.
    """
    n, c = logits.shape
    out: dict[str, float | None] = {}
    top = logits.topk(min(max(ks), c), dim=1).indices  # (N, K)
    hits = top == labels[:, None]
    for k in ks:
        out[f"top{k}"] = hits[:, :k].any(dim=1).double().mean().item() if k <= c else None
    out["mean_per_class_recall"] = per_class_recall(logits.argmax(dim=1), labels, c).nanmean().item()
    return out


def per_class_recall(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C,) the fraction of each class's images predicted as that class; NaN for a class with no images."""
    total = torch.bincount(labels, minlength=num_classes).double()
    right = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    return torch.where(total > 0, right / total.clamp(min=1), torch.full_like(total, float("nan")))


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def retrieval_metrics(image_features: Tensor, text_features: Tensor, caption_image: Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:  # fmt: skip
    """`text_to_image@k` and `image_to_text@k` recall for each k.

    Args:
        image_features: normalised (N, E).
        text_features: normalised (T, E).
        caption_image: (T,) the image each caption describes; every image needs at least one caption.
    """
    scores = text_features @ image_features.t()  # (T, N)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), caption_image] = True
    if not positive.any(dim=0).all():
        raise ValueError("retrieval: every image needs at least one caption")
    out = {}
    for name, s, pos in (("text_to_image", scores, positive), ("image_to_text", scores.t(), positive.t())):
        top = s.topk(min(max(ks), s.shape[1]), dim=1).indices  # (queries, K)
        hit = pos.gather(1, top)
        for k in ks:
            out[f"{name}@{k}"] = hit[:, :k].any(dim=1).double().mean().item()
    return out


def ranked(scores: Tensor, k: int) -> Tensor:
    """Indices (Q, k') of the k highest scores per row (k' = min(k, columns))."""
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


def compositional_accuracy(image_features: Tensor, caption_features: Tensor, negative_features: Tensor,
                           negative_mask: Tensor, kinds: Sequence[str]) -> dict[str, float]:  # fmt: skip
    """The fraction of images whose true caption scores above every hard negative, overall and per kind.

    Args:
        image_features: normalised (N, E).
        caption_features: normalised (N, E), row i the true caption of image i.
        negative_features: normalised (N, M, E), M negatives per image.
        negative_mask: (N, M) bool, False for a missing negative (ignored).
        kinds: M names, one per negative column (what it swaps).

    Returns:
        `{"accuracy": ..., "accuracy_<kind>": ...}`; a kind's accuracy is over the images that have one.
    """
    true = (image_features * caption_features).sum(-1)  # (N,)
    neg = torch.einsum("ne,nme->nm", image_features, negative_features)  # (N, M)
    beats = (true[:, None] > neg) | ~negative_mask  # (N, M)
    out = {"accuracy": beats.all(dim=1).double().mean().item()}
    for m, kind in enumerate(kinds):
        have = negative_mask[:, m]
        if have.any():
            out[f"accuracy_{kind}"] = beats[have, m].double().mean().item()
    return out


def clip_score(image_features: Tensor, text_features: Tensor) -> Tensor:
    """(N,) CLIP score of each image-caption pair: 100 * max(cos, 0), as torchmetrics' `CLIPScore` (whose value
    is the mean of these)."""
    cos = (image_features * text_features).sum(-1) / (image_features.norm(dim=-1) * text_features.norm(dim=-1))
    return 100 * cos.clamp(min=0)
