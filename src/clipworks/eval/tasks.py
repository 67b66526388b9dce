"""Evaluations as functions: an `Embedder` and an evaluation set in, metrics (and what the figures need) out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .embed import Embedder
from .linear_probe import DEFAULT_L2_GRID, AdamWProtocol, linear_probe, linear_probe_adamw
from .metrics import (average_precision, classification_metrics, clip_score, compositional_accuracy,
                      confusion_matrix, multilabel_metrics, retrieval_metrics, winoground_scores)  # fmt: skip
from .report import sample_queries
from .sources import Captioned, Classification, MultiLabel, Paired, WithNegatives


@dataclass
class Evaluation:
    """Metrics and counts of one evaluation; `extra` holds what its figure needs."""

    metrics: dict
    images: int
    skipped: int
    extra: dict = field(default_factory=dict)


def zeroshot(embedder: Embedder, data: Classification, templates: Sequence[str]) -> Evaluation:
    """Top-1, top-5 and mean per-class recall of zero-shot classification; `extra["confusion"]` (C, C)."""
    feats = embedder.images(data.images)
    weights = embedder.text_weights(data.class_names, templates)  # (C, E)
    valid = feats.valid
    logits = 100.0 * feats.features[valid] @ weights.t()  # (N, C): CLIP_benchmark's scale; ranks are unchanged
    labels = torch.tensor(data.labels)[valid]
    _require(len(labels), "zero-shot classification")
    metrics = classification_metrics(logits, labels)
    confusion = confusion_matrix(logits.argmax(1), labels, len(data.class_names))
    return Evaluation(metrics, len(data.labels), feats.skipped, {"confusion": confusion})


def zeroshot_multilabel(embedder: Embedder, data: MultiLabel, templates: Sequence[str]) -> Evaluation:
    """Mean average precision of zero-shot multi-label classification (each class's prompts scored against every
    image, as CLIP_benchmark does); `extra["average_precision"]` (C,) per class, in `data.class_names` order."""
    feats = embedder.images(data.images)
    weights = embedder.text_weights(data.class_names, templates)  # (C, E)
    valid = feats.valid
    logits = 100.0 * feats.features[valid] @ weights.t()  # (N, C)
    targets = data.labels[valid]
    _require(len(targets), "zero-shot multi-label classification")
    metrics = multilabel_metrics(logits, targets)
    extra = {"average_precision": average_precision(logits, targets)}
    return Evaluation(metrics, len(data.labels), feats.skipped, extra)


def _require(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"{what}: no readable images")


def retrieval(embedder: Embedder, data: Captioned, ks: Sequence[int] = (1, 5, 10), grid_rows: int = 12,
              grid_k: int = 5) -> Evaluation:  # fmt: skip
    """Recall@k in both directions; images that cannot be read are dropped with their captions, and images
    without a caption (a COCO file may list some) are left out.

    `extra["grid"]`: for the first `grid_rows` captions, (caption, its top `grid_k` image indices, its image).
    """
    feats = embedder.images(data.images)
    text = embedder.texts(data.captions)
    captioned = torch.zeros(len(data.images), dtype=torch.bool)
    captioned[torch.tensor(data.caption_image)] = True
    keep_img = (feats.valid & captioned).nonzero().squeeze(1)  # (N',) indices into the image set
    new_index = torch.full((len(data.images),), -1, dtype=torch.long)
    new_index[keep_img] = torch.arange(len(keep_img))
    cap_img = new_index[torch.tensor(data.caption_image)]
    keep_cap = cap_img >= 0
    _require(len(keep_img), "retrieval")
    image_f, text_f = feats.features[keep_img], text[keep_cap]
    metrics = retrieval_metrics(image_f, text_f, cap_img[keep_cap], ks)
    scores = text_f @ image_f.t()  # (Q, N') the kept captions against the kept images
    right = cap_img[keep_cap]
    right_score = scores.gather(1, right[:, None]).squeeze(1)  # (Q,)
    right_rank = (scores > right_score[:, None]).sum(1) + 1  # 1-based; ties count for the caption
    rows = sample_queries(right_rank.tolist(), grid_rows, grid_k)  # misses first, then hits, evenly spaced
    top = scores[rows].topk(min(grid_k, scores.shape[1]), dim=1)  # (rows, k) in kept-image numbering
    captions = [c for c, kept in zip(data.captions, keep_cap.tolist()) if kept]
    grid = [(captions[q], keep_img[t].tolist(), int(keep_img[right[q]]), s.tolist(), int(right_rank[q]),
             float(right_score[q])) for q, t, s in zip(rows, top.indices, top.values)]  # fmt: skip
    metrics["captions"] = int(keep_cap.sum())
    return Evaluation(metrics, len(data.images), feats.skipped, {"grid": grid})


def linear_probe_eval(embedder: Embedder, train: Classification, test: Classification,
                      l2_grid: Sequence[float] = DEFAULT_L2_GRID, seed: int = 0,
                      adamw: AdamWProtocol | None = None) -> Evaluation:  # fmt: skip
    """Logistic regression on training-set features, L2 chosen on a validation split, scored on the test set.
    With `adamw`, CLIP_benchmark's protocol instead (`linear_probe_adamw`; its seed is `adamw.seed`), the weight
    decay searched on a 20% validation split.

    Test classes are matched to training classes by name.
    """
    unknown = sorted(set(test.class_names) - set(train.class_names))
    if unknown:
        raise ValueError(f"linear probe: test classes {unknown[:5]} do not occur in the training data")
    tr, te = embedder.images(train.images), embedder.images(test.images)
    same = test.class_names == train.class_names  # then by index: ImageNet's names repeat ("missile" twice)
    to_train = torch.tensor([k if same else train.class_names.index(n) for k, n in enumerate(test.class_names)],
                            dtype=torch.long)  # fmt: skip
    train_y = torch.tensor(train.labels)[tr.valid]
    test_y = to_train[torch.tensor(test.labels)][te.valid]
    _require(len(train_y) * len(test_y), "linear probe")
    if adamw is not None:
        r = linear_probe_adamw(tr.features[tr.valid], train_y, te.features[te.valid], test_y, len(train.class_names),
                               val_fraction=0.2, protocol=adamw)  # fmt: skip
        metrics = {"top1": r.top1, "top5": r.top5, "mean_per_class_recall": r.mean_per_class_recall,
                   "weight_decay": r.weight_decay}  # fmt: skip
        metrics.update({f"val_top1@wd={k:.4g}": v for k, v in r.validation.items()})
        return Evaluation(metrics, len(train.labels) + len(test.labels), tr.skipped + te.skipped)
    result = linear_probe(tr.features[tr.valid], train_y, te.features[te.valid], test_y, len(train.class_names),
                          l2_grid, seed=seed)  # fmt: skip
    metrics = {"top1": result.top1, "mean_per_class_recall": result.mean_per_class_recall, "l2": result.l2}
    metrics.update({f"val_top1@l2={k:g}": v for k, v in sorted(result.validation.items())})
    return Evaluation(metrics, len(train.labels) + len(test.labels), tr.skipped + te.skipped)


def compositional(embedder: Embedder, data: WithNegatives) -> Evaluation:
    """The fraction of images whose true caption beats every hard negative (and per negative kind)."""
    feats = embedder.images(data.images)
    m = len(data.kinds)
    flat = [n for row in data.negatives for n in row]
    texts = list(dict.fromkeys([*data.captions, *[n for n in flat if n]]))  # each distinct text embedded once
    where = {t: i for i, t in enumerate(texts)}
    text_f = embedder.texts(texts)
    valid = feats.valid
    _require(int(valid.sum()), "compositional probe")
    caption_f = text_f[torch.tensor([where[c] for c in data.captions])]
    neg_idx = torch.tensor([[where.get(n, 0) for n in row] for row in data.negatives]).view(-1, m)
    mask = torch.tensor([[bool(n) for n in row] for row in data.negatives]).view(-1, m)
    metrics = compositional_accuracy(feats.features[valid], caption_f[valid], text_f[neg_idx][valid], mask[valid],
                                     data.kinds)  # fmt: skip
    metrics["chance"] = _chance(mask[valid])
    return Evaluation(metrics, len(data.captions), feats.skipped)


def paired(embedder: Embedder, data: Paired) -> Evaluation:
    """Winoground's text, image and group scores, overall and per tag (`text_score_<tag>`, ...); an example with
    an unreadable image is left out."""
    feats = embedder.images(data.images)
    text = embedder.texts(data.captions)
    keep = feats.valid.view(-1, 2).all(dim=1)  # (N,) both images readable
    _require(int(keep.sum()), "paired probe")
    image_f = feats.features.view(len(keep), 2, -1)[keep]  # (N', 2, E)
    text_f = text.view(len(keep), 2, -1)[keep]  # (N', 2, E)
    scores = torch.einsum("nce,nie->nci", text_f, image_f)  # (N', 2 captions, 2 images)
    metrics: dict = winoground_scores(scores)
    tags = [tag for tag, k in zip(data.tags, keep.tolist()) if k]
    for tag in sorted(set(tags) - {""}):
        rows = torch.tensor([t == tag for t in tags])
        metrics.update({f"{name}_{tag}": v for name, v in winoground_scores(scores[rows]).items()})
    metrics["examples"] = int(keep.sum())
    return Evaluation(metrics, len(data.images), feats.skipped)


def _chance(mask: Tensor) -> float:
    """Accuracy of random scores: the true caption first among itself and its negatives."""
    return (1.0 / (1 + mask.sum(1).double())).mean().item()


def clipscore(embedder: Embedder, data: Captioned) -> Evaluation:
    """Mean CLIP score (100 * max(cos, 0)) over image-caption pairs, as torchmetrics' `CLIPScore`."""
    feats = embedder.images(data.images)
    text = embedder.texts(data.captions)
    idx = torch.tensor(data.caption_image)
    keep = feats.valid[idx]
    _require(int(keep.sum()), "CLIP score")
    scores = clip_score(feats.features[idx[keep]], text[keep])
    metrics = {"clip_score": scores.mean().item(), "clip_score_std": scores.std().item() if len(scores) > 1 else 0.0,
               "pairs": int(keep.sum())}  # fmt: skip
    return Evaluation(metrics, len(data.images), feats.skipped, {"scores": scores})
