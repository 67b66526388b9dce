"""Zero-shot classifiers from class names and prompt templates, and accuracy and retrieval-recall metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def build_classifier(model, tokenizer: Callable[[list[str]], Tensor], class_names: Sequence[str],
                     templates: Sequence[str], device: torch.device | str = "cpu") -> Tensor:  # fmt: skip
    """Class embeddings (C, E): each template's text embedding normalised, averaged over templates, normalised.

    Args:
        model: a CLIP model (`encode_text`).
        tokenizer: maps a list of texts to token ids (N, L).
        class_names: one name per class, filled into each template's "{}".
        templates: prompts such as "a photo of a {}.".
    """
    prompts = [t.format(name) for name in class_names for t in templates]
    features = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
    features = features.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, E)
    return F.normalize(features, dim=-1)


@torch.no_grad()
def encode_images(model, images: Tensor, batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """Normalised image features (N, E) of preprocessed images (N, 3, S, S), in batches."""
    chunks = [model.encode_image(images[i : i + batch_size].to(device), normalize=True).float()
              for i in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(chunks)


def accuracy(logits: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy for each k: the fraction of rows whose label is among the k highest logits."""
    top = logits.topk(max(topk), dim=-1).indices  # (N, K)
    hits = top == labels[:, None]
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in topk}


def retrieval_recall(image_features: Tensor, text_features: Tensor, positives: Tensor | None = None,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:  # fmt: skip
    """Image-to-text and text-to-image recall@k of paired features (row i of each is a pair).

    Args:
        image_features: normalised (N, E).
        text_features: normalised (N, E).
        positives: (N, N) bool, `positives[i, j]` when text j is a right answer for image i (for example equal
            captions); the diagonal alone when None.
        ks: the cut-offs.

    Returns:
        `{"image_to_text@k": ..., "text_to_image@k": ...}` for each k.
    """
    n = len(image_features)
    if positives is None:
        positives = torch.eye(n, dtype=torch.bool)
    sims = image_features @ text_features.t()  # (N images, N texts)
    out = {}
    for name, s, pos in (("image_to_text", sims, positives), ("text_to_image", sims.t(), positives.t())):
        top = s.topk(min(max(ks), n), dim=1).indices  # (N, K)
        hit = pos.gather(1, top)
        for k in ks:
            out[f"{name}@{k}"] = hit[:, :k].any(dim=1).float().mean().item()
    return out


@dataclass
class EvalResult:
    """Zero-shot accuracy among all classes on held-out and on seen attribute combinations, and retrieval recall."""

    top1: float
    top5: float
    chance: float
    seen_top1: float
    recall: dict[str, float]

    def format(self) -> str:
        recall = ", ".join(f"{k} {v:.1%}" for k, v in self.recall.items())
        return (f"zero-shot top-1 on held-out combinations {self.top1:.1%} (chance {self.chance:.1%}, "
                f"{self.top1 / self.chance:.1f}x), top-5 {self.top5:.1%}; on seen combinations {self.seen_top1:.1%}; "
                f"held-out retrieval recall: {recall}")  # fmt: skip


class SyntheticEval:
    """Held-out `synthetic:shapes` scenes, preprocessed once, for zero-shot accuracy and retrieval recall.

    Zero-shot classification runs on single-object scenes of the held-out (colour, shape) pairs and, for
    comparison, of seen pairs (split "val"); retrieval on captioned held-out scenes.
    """

    def __init__(self, size: int, transform, tokenizer):
        from ..data.synthetic import ShapesDataset, zero_shot_task

        self.tokenizer = tokenizer
        self.tasks = {}
        for split in ("heldout", "val"):
            task = zero_shot_task(split, size=size)
            items = [task.item(k) for k in range(len(task))]
            images = torch.stack([transform(image) for image, _ in items])  # (N, 3, S, S)
            self.tasks[split] = (images, torch.tensor([label for _, label in items]))
        self.class_names, self.templates, self.chance = task.class_names, task.templates, task.chance
        pairs = ShapesDataset("heldout", size=size)
        captions = [pairs[i][1] for i in range(size)]
        self.pair_images = torch.stack([transform(pairs[i][0]) for i in range(size)])
        self.pair_tokens = tokenizer(captions)
        # Many scenes share a caption; retrieving any image or caption equal to the query's counts as a hit.
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        cid = torch.tensor([ids[c] for c in captions])
        self.positives = cid[:, None] == cid[None, :]  # (N, N)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> EvalResult:
        """Zero-shot accuracy and retrieval recall of `model` (left in the mode it was in)."""
        was_training = model.training
        model.eval()
        try:
            classifier = build_classifier(model, self.tokenizer, self.class_names, self.templates, device)
            acc = {}
            for split, (images, labels) in self.tasks.items():
                logits = encode_images(model, images, device=device) @ classifier.t()  # (N, C)
                acc[split] = accuracy(logits.cpu(), labels)
            image_f = encode_images(model, self.pair_images, device=device)
            text_f = F.normalize(model.encode_text(self.pair_tokens.to(device)).float(), dim=-1)
            recall = retrieval_recall(image_f.cpu(), text_f.cpu(), self.positives)
        finally:
            model.train(was_training)
        return EvalResult(acc["heldout"][1], acc["heldout"][5], self.chance, acc["val"][1], recall)
