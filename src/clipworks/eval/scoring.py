"""A scoring head on image embeddings (quality, aesthetics, ...): fit on (image, score) pairs, save, score.

The head is linear (`hidden=0`) or a one-hidden-layer MLP, fit with AdamW on mean squared error, with the
epoch of lowest validation error kept. It is saved as safetensors with its shape and the embedding model's
name in the metadata, so `load_head` rebuilds it and `clipworks score` knows which model it needs.

`load_head` also reads heads trained elsewhere, as a torch state dict (`.pth`, read with
`torch.load(weights_only=True)`) or a safetensors file without clipworks metadata. The layout is told from the
keys and shapes:

- LAION's improved aesthetic predictor (github christophschuhmann/improved-aesthetic-predictor, e.g.
  `sac+logos+ava1-l14-linearMSE.pth`): `layers.{0,2,4,6,7}.{weight,bias}`, Linear(E, 1024), Dropout(0.2),
  Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1), no activations;
  rebuilt as `build_aesthetic_mlp` (dropout is the identity at inference).
- LAION's first aesthetic predictor (`sa_0_4_vit_l_14_linear.pth`): one Linear(E, 1), keys `weight`, `bias`.
- any other chain of linear layers applied in turn, ending in one output.

Both LAION predictors read L2-normalised ViT-L-14:openai image embeddings (E = 768), which is what `clipworks
score --model ViT-L-14:openai` gives them. Such a file does not name its model. A pickled module object is
refused (its state_dict() is what to save), as is any state dict that is not a chain of linear layers.
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


EXPECTED = ("a .safetensors head written by `clipworks eval fit-score`, or a state dict (.pth or .safetensors) of "
            "linear layers such as LAION's aesthetic predictors")  # fmt: skip

# LAION's improved aesthetic predictor: the `layers` Sequential of its MLP, Linear layers at these indices.
AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)
AESTHETIC_INDICES = (0, 2, 4, 6, 7)


def build_aesthetic_mlp(embed_dim: int = 768) -> nn.Module:
    """LAION's improved aesthetic predictor MLP, mapping (N, E) normalised image embeddings to (N,) scores.

    The layers sit at the indices of the original `nn.Sequential` (simple_inference.py), so its state dict loads
    once the `layers.` prefix is dropped; the dropouts are the identity in eval mode.
    """
    if embed_dim < 1:
        raise ValueError(f"embed_dim={embed_dim}: expected a positive width")
    return nn.Sequential(
        nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1), nn.Flatten(0),
    ).eval()  # fmt: skip


def load_head(path: str | os.PathLike) -> LoadedHead:
    """Read a head written by `save_head`, or a state dict of linear layers (a torch file read with
    `torch.load(weights_only=True)`, which runs no code from the file, or a safetensors file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: neither of those (the message says what is expected).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"score head not found: {str(path)!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its legacy pickle
        return LoadedHead(head_from_state_dict(_torch_state_dict(path), path), None, None)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a score head ({e}); expected {EXPECTED}") from e
    if meta.get("format") != "clipworks-score-head":  # a foreign state dict; safetensors sorts its keys
        return LoadedHead(head_from_state_dict(dict(sorted(state.items(), key=_natural)), path), None, None)
    head = build_head(int(meta["embed_dim"]), int(meta["hidden"]))
    head.load_state_dict(state)
    return LoadedHead(head.eval(), meta["model"], json.loads(meta["pretrained"]))


def _natural(item: tuple[str, Tensor]) -> list:
    """Sort key putting `layers.10` after `layers.2`."""
    return [int(part) if part.isdigit() else part for part in item[0].split(".")]


def _torch_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    import pickle
    import re

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled objects other than tensors"
        raise ValueError(f"{path}: holds {what}, which clipworks does not unpickle (it could run code); save the "
                         f"module's state_dict() instead; expected {EXPECTED}") from e  # fmt: skip
    except (RuntimeError, EOFError) as e:
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"{path}: cannot be read as a torch state dict ({reason}); expected {EXPECTED}") from e
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd  # a Lightning checkpoint holds it under a key
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors; expected {EXPECTED}")
    return sd


def head_from_state_dict(sd: dict[str, Tensor], path: str | os.PathLike = "state dict") -> nn.Module:
    """The head a foreign state dict describes: LAION's improved aesthetic predictor (`build_aesthetic_mlp`) when its
    keys are that MLP's, otherwise the chain of linear layers it holds, in its order.

    Raises:
        ValueError: not a chain of linear layers ending in one output (the message gives the shapes found).
    """
    aesthetic = {f"layers.{i}.{kind}" for i in AESTHETIC_INDICES for kind in ("weight", "bias")}
    if set(sd) != aesthetic:
        return _linear_stack(sd, path)
    embed_dim = sd["layers.0.weight"].shape[-1]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    want = {}
    for i, (fan_in, fan_out) in zip(AESTHETIC_INDICES, zip((embed_dim, *AESTHETIC_WIDTHS), AESTHETIC_WIDTHS)):
        want[f"layers.{i}.weight"], want[f"layers.{i}.bias"] = (fan_out, fan_in), (fan_out,)
    if shapes != want:
        wrong = {k: v for k, v in shapes.items() if want[k] != v}
        raise ValueError(f"{path}: has the keys of LAION's improved aesthetic predictor, but shapes {wrong} where it "
                         f"has {({k: want[k] for k in wrong})} (Linear widths {embed_dim}, "
                         f"{', '.join(map(str, AESTHETIC_WIDTHS))})")  # fmt: skip
    head = build_aesthetic_mlp(embed_dim)
    head.load_state_dict({k.removeprefix("layers."): v.float() for k, v in sd.items()})
    return head


def _linear_stack(sd: dict[str, Tensor], path) -> nn.Module:
    """The linear layers a state dict describes (`[prefix.]weight` (out, in) and `[prefix.]bias` (out,), in the
    file's order), applied in turn to (N, E) features, giving (N,) scores."""
    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        prefix, _, kind = key.rpartition(".") if "." in key else ("", "", key)
        if kind not in ("weight", "bias"):
            raise ValueError(f"{path}: key {key!r} is not a linear layer's weight or bias; expected {EXPECTED}")
        layers.setdefault(prefix, {})[kind] = value.float()
    modules, width = [], None
    for prefix, p in layers.items():
        w, b = p.get("weight"), p.get("bias")
        if w is None or w.ndim != 2 or (b is not None and b.shape != w.shape[:1]) or width not in (None, w.shape[1]):
            shapes = str({k: tuple(v.shape) for k, v in sd.items()})  # a whole model's would fill the screen
            shapes = shapes if len(shapes) <= 300 else shapes[:300] + " ...}"
            raise ValueError(f"{path}: not a chain of linear layers (shapes {shapes}); expected {EXPECTED}")
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        linear.load_state_dict(p)
        modules.append(linear)
        width = w.shape[0]
    if width != 1:
        gives = f"its last layer gives {width} outputs, not one score" if modules else "it holds no tensors"
        raise ValueError(f"{path}: {gives}; expected {EXPECTED}")
    return nn.Sequential(*modules, nn.Flatten(0)).eval()
