"""Linear probe: multinomial logistic regression on frozen features, regularisation chosen on a validation split.

Two methods. `linear_probe` (L-BFGS): the objective is mean cross-entropy + (l2 / 2) * ||W||^2 (the bias is not
penalised), minimised with full-batch L-BFGS. scikit-learn's `LogisticRegression(C=...)` minimises
C * sum(cross-entropy) + ||W||^2 / 2, the same problem for l2 = 1 / (C * N).

`linear_probe_adamw`: CLIP_benchmark's protocol (its `metrics/linear_probe.py`, version 1.6): a `torch.nn.Linear`
trained with AdamW on shuffled mini-batches under a cosine learning-rate schedule, optionally on `fewshot_k`
random features per class, its weight decay searched over 97 values on a validation split. It reproduces
CLIP_benchmark's random draws, so on the same features and seed, on the CPU and without mixed precision
(`--no_amp`), it trains the same weights and gives the same metrics (tests/test_eval_benchmark_parity.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import classification_metrics, per_class_recall

DEFAULT_L2_GRID = tuple(10.0**e for e in range(-6, 2))


@dataclass
class LogisticRegression:
    """A fitted probe: logits = features @ weight.T + bias."""

    weight: Tensor  # (C, E)
    bias: Tensor  # (C,)

    def logits(self, features: Tensor) -> Tensor:
        """(N, C) class scores."""
        return features.double() @ self.weight.t() + self.bias


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, l2: float, max_iter: int = 500,
                 tol: float = 1e-7, init: LogisticRegression | None = None) -> LogisticRegression:  # fmt: skip
    """Minimise mean cross-entropy + l2/2 * ||W||^2 over (W, b) with L-BFGS, in float64 (strictly convex for
    l2 > 0, so the optimum is unique and any solver reaches the same one); `init` warm-starts it."""
    if l2 < 0:
        raise ValueError(f"l2={l2}: expected a non-negative L2 strength")
    x = features.double()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64) if init is None else init.weight.clone()
    b = torch.zeros(num_classes, dtype=torch.float64) if init is None else init.bias.clone()
    w.requires_grad_(True), b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=tol,
                            history_size=20, line_search_fn="strong_wolfe", tolerance_change=tol * 1e-3)  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, labels) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticRegression(w.detach(), b.detach())


@dataclass
class ProbeResult:
    """Test accuracy of the probe refit on train + validation with the chosen `l2`, and the validation sweep."""

    top1: float
    mean_per_class_recall: float
    l2: float
    validation: dict[float, float] = field(default_factory=dict)


def split_validation(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices): a seeded random `fraction` of `n` held out (at least one)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * fraction)))
    return order[n_val:], order[:n_val]


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.2,
                 seed: int = 0) -> ProbeResult:  # fmt: skip
    """Choose the L2 strength with the best accuracy on a validation split of the training features (ties go
    to the stronger regularisation), refit on all training features and score the test features."""
    if len(train_x) < 2:
        raise ValueError(f"linear probe: {len(train_x)} training feature(s); need at least 2")
    l2_grid = sorted(l2_grid, reverse=True)
    validation = {}
    if len(l2_grid) > 1:
        tr, va = split_validation(len(train_x), val_fraction, seed)
        probe = None
        for l2 in l2_grid:  # strongest first, each warm-started from the last: weak L2 alone converges slowly
            probe = fit_logistic(train_x[tr], train_y[tr], num_classes, l2, init=probe)
            validation[l2] = (probe.logits(train_x[va]).argmax(1) == train_y[va]).double().mean().item()
    best = max(l2_grid, key=lambda l2: validation.get(l2, 0.0))  # max keeps the first of equals: the strongest
    probe = fit_logistic(train_x, train_y, num_classes, best)
    pred = probe.logits(test_x).argmax(1)
    top1 = (pred == test_y).double().mean().item()
    return ProbeResult(top1, per_class_recall(pred, test_y, num_classes).nanmean().item(), best, validation)


# CLIP_benchmark's weight decays: 97 log-spaced from 1e-6 to 100; the search starts from every 16th (7 of them).
WEIGHT_DECAYS = tuple(np.logspace(-6, 2, num=97).tolist())
_FIRST_WEIGHT_DECAYS = range(0, len(WEIGHT_DECAYS), 16)


@dataclass(frozen=True)
class AdamWProtocol:
    """Settings of CLIP_benchmark's linear probe; the defaults are its command line's."""

    fewshot_k: int = -1  # training features kept per class, drawn at random; -1 keeps all
    epochs: int = 10
    lr: float = 0.1  # the peak of the cosine schedule (CLIP_benchmark's `--fewshot_lr`; it is not searched)
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.fewshot_k == 0 or self.fewshot_k < -1:
            raise ValueError(f"fewshot_k={self.fewshot_k}: expected -1 (all training features) or at least 1")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}: expected "
                             "epochs >= 1, batch_size >= 1 and lr > 0")  # fmt: skip


@dataclass
class AdamWProbeResult:
    """Test metrics of the probe trained with the chosen weight decay, and the validation top-1 of each one tried."""

    top1: float
    top5: float | None  # None when the largest test label is below 5, as CLIP_benchmark's `target.max() >= 5`
    mean_per_class_recall: float
    weight_decay: float
    validation: dict[float, float] = field(default_factory=dict)


def fit_linear_adamw(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float,
                     protocol: AdamWProtocol = AdamWProtocol()) -> torch.nn.Linear:  # fmt: skip
    """CLIP_benchmark's `train`: a `Linear(E, num_classes)` trained with AdamW, one cosine step per batch.

    The initialisation and the shuffles draw from the CPU generator seeded with `protocol.seed`, in
    CLIP_benchmark's order (its `torch.manual_seed(seed)` then a shuffling DataLoader); the caller's random
    state is left as it was.
    """
    x = features.float()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(protocol.seed)
        linear = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
        opt = torch.optim.AdamW(linear.parameters(), lr=protocol.lr, weight_decay=weight_decay)
        # Batches of indices drawn as CLIP_benchmark's loader draws its batches of features: the same sampler
        # over the same length, hence the same two draws from the generator per epoch.
        batches = torch.utils.data.DataLoader(range(len(x)), batch_size=protocol.batch_size, shuffle=True)
        steps = protocol.epochs * len(batches)
        for epoch in range(protocol.epochs):
            for i, idx in enumerate(batches):
                step = i + epoch * len(batches)
                for group in opt.param_groups:  # numpy's cos, as CLIP_benchmark's `cosine_lr` (no warm-up)
                    group["lr"] = 0.5 * (1 + np.cos(np.pi * step / steps)) * protocol.lr
                opt.zero_grad()
                loss = F.cross_entropy(linear(x[idx]), labels[idx])
                loss.backward()
                opt.step()
    return linear.requires_grad_(False)


def fewshot_indices(labels: Tensor, k: int) -> list[int]:
    """Indices of the first `k` features of each class in a `torch.randperm` from the global generator (all
    features, in that order, for k = -1), as CLIP_benchmark samples its few-shot training set."""
    counts: dict[int, int] = {}
    keep, labels = [], labels.tolist()
    for p in torch.randperm(len(labels)).tolist():
        label = labels[p]
        if k < 0 or counts.get(label, 0) < k:
            counts[label] = counts.get(label, 0) + 1
            keep.append(p)
    short = sorted(c for c, n in counts.items() if 0 < k and n < k)
    if short:
        raise ValueError(f"few-shot k={k}: class(es) {short[:5]} have fewer than {k} training features")
    return keep


def linear_probe_adamw(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                       val_x: Tensor | None = None, val_y: Tensor | None = None, val_fraction: float | None = None,
                       protocol: AdamWProtocol = AdamWProtocol()) -> AdamWProbeResult:  # fmt: skip
    """CLIP_benchmark's linear probe (`linear_probe.evaluate`) on features.

    With a validation set (`val_x`, `val_y`, or `val_fraction` of the training features split off as its
    `--val_proportion` does, with `torch.utils.data.random_split`), the weight decay is searched as CLIP_benchmark
    does: validation top-1 of every 16th of `WEIGHT_DECAYS`, then of the best one's neighbours 8, 4, 2 and 1
    steps away (the first best wins a tie); the final probe is trained on training + validation features
    (only the few-shot training features when `fewshot_k` is set). Without one the weight decay is 0.

    The random draws (the split, the few-shot sample, then each training run) follow CLIP_benchmark's
    `torch.manual_seed(seed)` then `linear_probe.evaluate`; its command line also builds a model between the
    two, so compare with a run that seeds right before the split. `num_classes` should be the largest training
    label + 1, the output width CLIP_benchmark gives its Linear.
    """
    if (val_x is None) != (val_y is None) or (val_fraction is not None and val_x is not None):
        raise ValueError("linear probe: give a validation set (val_x and val_y) or a validation fraction, not both")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: expected a fraction between 0 and 1")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(protocol.seed)
        if val_fraction is not None:
            split = torch.utils.data.random_split(range(len(train_x)), [1 - val_fraction, val_fraction])
            tr, va = (part.indices for part in split)
            train_x, train_y, val_x, val_y = train_x[tr], train_y[tr], train_x[va], train_y[va]
        keep = fewshot_indices(train_y, protocol.fewshot_k)
    x, y = train_x[keep], train_y[keep]
    validation: dict[float, float] = {}
    best = 0.0
    if val_x is not None:
        best = _search_weight_decay(x, y, val_x, val_y, num_classes, protocol, validation)
        if protocol.fewshot_k < 0:
            x, y = torch.cat([x, val_x]), torch.cat([y, val_y])
    linear = fit_linear_adamw(x, y, num_classes, best, protocol)
    test = classification_metrics(linear(test_x.float()), test_y, (1, 5) if test_y.max() >= 5 else (1,))
    return AdamWProbeResult(test["top1"], test.get("top5"), test["mean_per_class_recall"], best,
                            dict(sorted(validation.items())))  # fmt: skip


def _search_weight_decay(x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
                         protocol: AdamWProtocol, validation: dict[float, float]) -> float:  # fmt: skip
    """CLIP_benchmark's weight-decay search (`find_peak` and its loop); fills `validation` with each tried."""
    def top1(i: int) -> float:  # training is deterministic: each weight decay is trained once, not once a round
        wd = WEIGHT_DECAYS[i]
        if wd not in validation:
            linear = fit_linear_adamw(x, y, num_classes, wd, protocol)
            validation[wd] = classification_metrics(linear(val_x.float()), val_y, (1,))["top1"]
        return validation[wd]

    def peak(indices) -> int:
        best, best_top1 = 0, 0.0  # CLIP_benchmark's start: index 0 wins when every validation top-1 is 0
        for i in indices:
            if best_top1 < top1(i):
                best, best_top1 = i, top1(i)
        return best

    i = peak(_FIRST_WEIGHT_DECAYS)
    span = 8
    while span > 0:
        i = peak([max(i - span, 0), i, min(i + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[i]
