"""Linear probe: multinomial logistic regression on frozen features, L2 strength chosen on a validation split.

The objective is mean cross-entropy + (l2 / 2) * ||W||^2 (the bias is not penalised), minimised with full-batch
L-BFGS. scikit-learn's `LogisticRegression(C=...)` minimises C * sum(cross-entropy) + ||W||^2 / 2, the same
problem for l2 = 1 / (C * N).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

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
    from .metrics import per_class_recall

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
