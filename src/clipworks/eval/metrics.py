"""Evaluation metrics on features: zero-shot classification, retrieval recall, compositional accuracy, CLIP score.

Definitions follow CLIP_benchmark's (and the CLIP paper's): top-k accuracy counts an image when its label is
among the k highest logits; mean per-class recall is scikit-learn's balanced accuracy (the mean, over the
classes present among the labels, of the fraction of each class predicted right); retrieval recall@k counts
a caption when its image is among the k images it scores highest (text to image) and an image when any of
its captions is among the k captions it scores highest (image to text); multi-label mean average precision is
torchnet's per-class average precision, averaged over every class.

Where scores tie exactly, "the k highest" is what `torch.topk(k)` returns, called once per k as CLIP_benchmark
does: its tie order depends on k, so the top 5 is not always the first 5 of the top 10 (issue 18). On the same
features (on the CPU) the counts are CLIP_benchmark's, tested in tests/test_eval_benchmark_parity.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def classification_metrics(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float | None]:
    """`top{k}` for each k (None where k exceeds the number of classes) and `mean_per_class_recall`.

    As CLIP_benchmark's `accuracy`, one `topk` call for the largest k computed gives every k (so with 3
    classes top-1 comes from `topk(1)`, with 1000 from `topk(5)`: the two can differ where logits tie), and
    mean per-class recall ranks by `argmax`.

    Args:
        logits: (N, C) scores.
        labels: (N,) class indices.
    """
    n, c = logits.shape
    _check_ks(ks)
    out: dict[str, float | None] = {}
    within = [k for k in ks if k <= c]
    hits = logits.topk(max(within), dim=1).indices == labels[:, None] if within else None  # (N, K)
    for k in ks:
        out[f"top{k}"] = hits[:, :k].any(dim=1).double().mean().item() if k <= c else None
    out["mean_per_class_recall"] = per_class_recall(logits.argmax(dim=1), labels, c).nanmean().item()
    return out


def multilabel_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """`mean_average_precision`: the mean over all classes of `average_precision`, CLIP_benchmark's zero-shot
    multi-label metric (not interpolated, unlike VOC 2007's own 11-point AP).

    Args:
        logits: (N, C) scores.
        targets: (N, C) bool or 0/1, True where image n shows class c.
    """
    if logits.shape != targets.shape or logits.ndim != 2:
        raise ValueError(f"multi-label: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both "
                         "be (N, C)")  # fmt: skip
    return {"mean_average_precision": average_precision(logits, targets).mean().item()}


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """(C,) float32 average precision of each class: the mean, over its positives, of the precision among the
    images ranked down to that positive; 0 for a class with no positives (which still counts in a mean).

    CLIP_benchmark's `average_precision_per_class` (from torchnet's APMeter), computed as it does: ranked by one
    `torch.sort(descending=True)` per class, whose order among tied scores decides what the ties count, in
    float32.
    """
    n, c = scores.shape
    ap = torch.zeros(c)
    rank = torch.arange(1, n + 1).float()  # (N,)
    for k in range(c):
        _, order = torch.sort(scores[:, k], 0, True)
        truth = targets[:, k][order]  # (N,) in ranked order
        precision = truth.float().cumsum(0).div(rank)
        ap[k] = precision[truth.bool()].sum() / max(float(truth.sum()), 1)
    return ap


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or min(ks) < 1:
        raise ValueError(f"k = {list(ks)}: expected one or more k, each at least 1")


def per_class_recall(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C,) the fraction of each class's images predicted as that class; NaN for a class with no images."""
    total = torch.bincount(labels, minlength=num_classes).double()
    right = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    return torch.where(total > 0, right / total.clamp(min=1), torch.full_like(total, float("nan")))


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def retrieval_metrics(image_features: Tensor, text_features: Tensor, caption_image: Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float | None]:  # fmt: skip
    """`text_to_image@k` and `image_to_text@k` recall for each k; None where k exceeds the number of
    candidates (images for text to image, captions for image to text), where CLIP_benchmark's `topk` fails.

    Args:
        image_features: normalised (N, E).
        text_features: normalised (T, E).
        caption_image: (T,) the image each caption describes; every image needs at least one caption.
    """
    _check_ks(ks)
    scores = text_features @ image_features.t()  # (T, N)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), caption_image] = True
    if not positive.any(dim=0).all():
        raise ValueError("retrieval: every image needs at least one caption")
    out: dict[str, float | None] = {}
    for name, s, pos in (("text_to_image", scores, positive), ("image_to_text", scores.t(), positive.t())):
        for k in ks:
            out[f"{name}@{k}"] = recall_at_k(s, pos, k) if k <= s.shape[1] else None
    return out


def recall_at_k(scores: Tensor, positive: Tensor, k: int) -> float:
    """The fraction of queries with a positive among the `topk(k)` of their scores.

    Args:
        scores: (Q, M) query-candidate scores.
        positive: (Q, M) bool, True where the candidate answers the query.
    """
    # topk(k) for each k, never a slice of a larger topk: CLIP_benchmark's recall_at_k does so, and where scores
    # tie the candidates topk picks depend on k.
    top = scores.topk(k, dim=1).indices  # (Q, k)
    return positive.gather(1, top).any(dim=1).double().mean().item()


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


def winoground_scores(scores: Tensor) -> dict[str, float]:
    """Winoground's text, image and group scores (Thrush et al. 2022): the fraction of examples where each image
    scores its own caption above the other caption (text), each caption scores its own image above the other
    image (image), and both (group). Ties count as wrong. Random scores reach 25%, 25% and 16.7%.

    Args:
        scores: (N, 2, 2), `scores[n, c, i]` caption c of example n against its image i (caption c describes
            image c).
    """
    s = scores
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])  # (N,)
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])  # (N,)
    return {"text_score": text.double().mean().item(), "image_score": image.double().mean().item(),
            "group_score": (text & image).double().mean().item()}  # fmt: skip
