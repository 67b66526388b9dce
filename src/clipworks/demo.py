"""The built-in demo: encode the images and captions the package ships and compare them."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

DEMO_DIR = resources.files("clipworks") / "assets" / "demo"


@dataclass(frozen=True)
class SimilarityTable:
    """Cosine similarities between every shipped image (rows) and every caption (columns).

    Attributes:
        images: image file names, one per row.
        captions: captions, one per column; caption i belongs to image i.
        similarity: (images, captions) cosine similarities.
        probs: per image, the softmax over captions at the model's temperature.
    """

    images: list[str]
    captions: list[str]
    similarity: torch.Tensor
    probs: torch.Tensor

    def top1_accuracy(self) -> float:
        """Fraction of images whose own caption scores highest."""
        hits = self.similarity.argmax(dim=1) == torch.arange(len(self.images))
        return hits.float().mean().item()

    def format(self) -> str:
        width = max(len(c) for c in self.captions)
        head = " " * 22 + " ".join(f"{i:>6}" for i in range(len(self.captions)))
        rows = [head]
        for name, sims in zip(self.images, self.similarity.tolist()):
            best = max(range(len(sims)), key=sims.__getitem__)
            cells = " ".join(f"{s:6.3f}" for s in sims)
            rows.append(f"{name[:21]:<22}{cells}   best: {self.captions[best]}")
        legend = [f"  {i:>2}: {c:<{width}}" for i, c in enumerate(self.captions)]
        return "\n".join(rows + ["captions:"] + legend)


def read_demo_pairs(directory: Path | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from the demo folder's captions.tsv."""
    directory = Path(str(directory or DEMO_DIR))
    with open(directory / "captions.tsv", newline="", encoding="utf-8") as f:
        return [(directory / row["filepath"], row["caption"]) for row in csv.DictReader(f, delimiter="\t")]


@torch.no_grad()
def similarity_table(model, preprocess, tokenizer, pairs: list[tuple[Path, str]]) -> SimilarityTable:
    """Encode every image and caption and compare them all."""
    from .data.decode import load_image

    device = next(model.parameters()).device
    images = torch.stack([preprocess(load_image(path)) for path, _ in pairs])  # (N, 3, S, S)
    captions = [caption for _, caption in pairs]
    image_features = model.encode_image(images.to(device), normalize=True)
    text_features = model.encode_text(tokenizer(captions).to(device), normalize=True)
    similarity = image_features @ text_features.t()  # (N, N)
    probs = (model.logit_scale.exp() * similarity).softmax(dim=-1)
    return SimilarityTable([p.name for p, _ in pairs], captions, similarity.cpu(), probs.cpu())
