"""A scoring head on image embeddings (quality, aesthetics, ...): fit on (image, score) pairs, save, score.

The head is linear (`hidden=0`) or a one-hidden-layer MLP, fit with AdamW on mean squared error, with the
epoch of lowest validation error kept. It is saved as safetensors with its shape and the embedding model's
name in the metadata, so `load_head` rebuilds it and `clipworks score` knows which model it needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .linear_probe import split_validation


def build_head(embed_dim: int, hidden: int = 0) -> nn.Module:
    """Linear (hidden=0) or Linear-GELU-Linear head mapping (N, E) features to (N,) scores."""
    if hidden < 0:
        raise ValueError(f"hidden={hidden}: expected 0 (linear head) or a positive width")
    if hidden == 0:
        return nn.Sequential(nn.Linear(embed_dim, 1), nn.Flatten(0))
    return nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1), nn.Flatten(0))


@dataclass
class FitResult:
    """The fitted head and its errors: root mean squared error on the training and validation splits, and the
    validation RMSE of always predicting the training mean (a baseline to beat)."""

    head: nn.Module
    train_rmse: float
    val_rmse: float
    baseline_rmse: float


def _rmse(head: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (head(x) - y).pow(2).mean().sqrt().item()


def fit_head(features: Tensor, scores: Tensor, hidden: int = 0, epochs: int = 300, lr: float = 1e-2,
             weight_decay: float = 1e-4, val_fraction: float = 0.2, seed: int = 0) -> FitResult:  # fmt: skip
    """Fit a head to predict `scores` (N,) from `features` (N, E), full batch, keeping the best epoch on a
    validation split (all data trains when there are fewer than 5 samples; validation then equals training)."""
    if len(features) < 2:
        raise ValueError(f"fit-score: {len(features)} scored image(s); need at least 2")
    torch.manual_seed(seed)
    head = build_head(features.shape[1], hidden)
    if len(features) >= 5:
        tr, va = split_validation(len(features), val_fraction, seed)
    else:
        tr = va = torch.arange(len(features))
    x, y = features.float(), scores.float()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state = float("inf"), None
    for _ in range(epochs):
        opt.zero_grad()
        (head(x[tr]) - y[tr]).pow(2).mean().backward()
        opt.step()
        err = _rmse(head, x[va], y[va])
        if err < best:
            best, best_state = err, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    baseline = (y[va] - y[tr].mean()).pow(2).mean().sqrt().item()
    return FitResult(head.eval(), _rmse(head, x[tr], y[tr]), best, baseline)


def save_head(head: nn.Module, path: str | os.PathLike, model: str, pretrained: str | None) -> None:
    """Write the head's weights and metadata (shape, the model whose embeddings it reads) as safetensors."""
    from safetensors.torch import save_file

    embed_dim, hidden = head[0].in_features, head[0].out_features if len(head) > 2 else 0
    meta = {"format": "clipworks-score-head", "embed_dim": str(embed_dim), "hidden": str(hidden),
            "model": model, "pretrained": json.dumps(pretrained)}  # fmt: skip
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path), metadata=meta)


@dataclass
class LoadedHead:
    """A head read back, with the model it was fit on (pass the same to `clipworks score`)."""

    head: nn.Module
    model: str
    pretrained: str | None


def load_head(path: str | os.PathLike) -> LoadedHead:
    """Read a head written by `save_head`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a clipworks scoring head.
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"score head not found: {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "clipworks-score-head":
            raise ValueError(f"{path}: not a clipworks score head (written by `clipworks eval fit-score`)")
        state = {k: f.get_tensor(k) for k in f.keys()}
    head = build_head(int(meta["embed_dim"]), int(meta["hidden"]))
    head.load_state_dict(state)
    return LoadedHead(head.eval(), meta["model"], json.loads(meta["pretrained"]))
