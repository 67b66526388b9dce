"""A scoring head on image embeddings (quality, aesthetics, ...): fit on (image, score) pairs, save, score.

The head is linear (`hidden=0`) or a one-hidden-layer MLP, fit with AdamW on mean squared error, with the
epoch of lowest validation error kept. It is saved as safetensors with its shape and the embedding model's
name in the metadata, so `load_head` rebuilds it and `clipworks score` knows which model it needs.

`load_head` also reads heads trained elsewhere as a torch state dict (`.pth`) of linear layers applied in turn:
LAION's aesthetic predictors (v1, one linear layer; v2, five linear layers with dropout and no activations between
them) on ViT-L-14:openai embeddings. Such a file does not name its model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checkpoints.io import apply_umask
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
    apply_umask(path)  # safetensors writes 0600 whatever the umask


@dataclass
class LoadedHead:
    """A head read back, with the model it was fit on (pass the same to `clipworks score`); None for a state dict
    file, which does not say."""

    head: nn.Module
    model: str | None
    pretrained: str | None


EXPECTED = ("a .safetensors head written by `clipworks eval fit-score`, or a torch state dict (.pth) of linear layers "
            "such as LAION's aesthetic predictors")  # fmt: skip


def load_head(path: str | os.PathLike) -> LoadedHead:
    """Read a head written by `save_head`, or a torch state dict of linear layers (read with
    `torch.load(weights_only=True)`, which runs no code from the file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: neither of those (the message says what is expected).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"score head not found: {str(path)!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its legacy pickle
        return LoadedHead(_linear_stack(_torch_state_dict(path), path), None, None)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "clipworks-score-head":
                raise ValueError(f"{path}: a safetensors file, but not a score head; expected {EXPECTED}")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a score head ({e}); expected {EXPECTED}") from e
    head = build_head(int(meta["embed_dim"]), int(meta["hidden"]))
    head.load_state_dict(state)
    return LoadedHead(head.eval(), meta["model"], json.loads(meta["pretrained"]))


def _torch_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    import pickle

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"{path}: cannot be read as a torch state dict ({reason}); expected {EXPECTED}") from e
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd  # a Lightning checkpoint holds it under a key
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors; expected {EXPECTED}")
    return sd


def _linear_stack(sd: dict[str, Tensor], path) -> nn.Module:
    """The linear layers a state dict describes (`[prefix.]weight` (out, in) and `[prefix.]bias` (out,), in the
    file's order), applied in turn to (N, E) features, giving (N,) scores."""
    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        prefix, _, kind = key.rpartition(".") if "." in key else ("", "", key)
        if kind not in ("weight", "bias"):
            raise ValueError(f"{path}: key {key!r} is not a linear layer's weight or bias; expected {EXPECTED}")
        layers.setdefault(prefix, {})[kind] = value
    modules, width = [], None
    for prefix, p in layers.items():
        w, b = p.get("weight"), p.get("bias")
        if w is None or w.ndim != 2 or (b is not None and b.shape != w.shape[:1]) or width not in (None, w.shape[1]):
            shapes = {k: tuple(v.shape) for k, v in sd.items()}
            raise ValueError(f"{path}: not a chain of linear layers (shapes {shapes}); expected {EXPECTED}")
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        linear.load_state_dict(p)
        modules.append(linear)
        width = w.shape[0]
    if width != 1:
        gives = f"its last layer gives {width} outputs, not one score" if modules else "it holds no tensors"
        raise ValueError(f"{path}: {gives}; expected {EXPECTED}")
    return nn.Sequential(*modules, nn.Flatten(0)).eval()
