"""Figures with matplotlib (the `plots` extra), written as PNG and SVG: a run's training curves, and the helpers
the evaluation figures share."""

from __future__ import annotations

import csv
import math
import os
import sys
from pathlib import Path

import numpy as np

PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install 'clipworks[plots]')"
PNG_DPI = 120
# held-out combinations: attribute combinations no training caption has; seen: new scenes of trained combinations
ZERO_SHOT_SERIES = {"zero_shot_top1": ("held-out combinations, top-1", "tab:red"),
                    "zero_shot_seen_top1": ("seen combinations, top-1", "tab:green")}  # fmt: skip
EVAL_COLOR = "tab:purple"  # zero-shot on run.eval_data: top-1 solid, top-5 dashed
# validation on held-out training samples (data.val_size): (legend, colour, line style) by metrics.csv column
RECALL_SERIES = {"val_image_to_text@1": ("image to text, recall@1", "tab:blue", "-"),
                 "val_image_to_text@5": ("image to text, recall@5", "tab:blue", "--"),
                 "val_text_to_image@1": ("text to image, recall@1", "tab:orange", "-"),
                 "val_text_to_image@5": ("text to image, recall@5", "tab:orange", "--")}  # fmt: skip


def load_matplotlib():
    """The `matplotlib` module with `figure` and `ticker` loaded, or None after printing one line
    (`PLOTS_SKIPPED`) to stderr when the `plots` extra is not installed."""
    try:
        import matplotlib
        import matplotlib.figure
        import matplotlib.ticker
    except ImportError:
        print(PLOTS_SKIPPED, file=sys.stderr)
        return None
    return matplotlib


def new_figure(mpl, width: float, height: float, layout: str | None = "constrained"):
    """A pyplot-free figure (no global state, no display) of width x height inches, laid out by matplotlib's
    constrained layout unless `layout` is None (the caller places the axes)."""
    return mpl.figure.Figure(figsize=(width, height), layout=layout)


def save_figure(mpl, fig, path: str | os.PathLike) -> list[Path]:
    """Write `fig` to `path` as PNG and next to it as SVG (same stem); returns both paths.

    The SVG keeps its text as text (searchable, editable; fonts from the viewer) and has no date or random ids,
    so the same figure writes the same file.
    """
    png, svg = Path(path).with_suffix(".png"), Path(path).with_suffix(".svg")
    fig.savefig(png, dpi=PNG_DPI, facecolor="white")
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "clipworks"}):
        fig.savefig(svg, facecolor="white", metadata={"Date": None})
    return [png, svg]


def read_metrics(metrics_csv: str | os.PathLike) -> dict[str, np.ndarray]:
    """Each column of a run's metrics.csv as floats (NaN where empty), one row per step, ordered by step.

    A resumed run appends to the same file and may log a step again; the last row of a step wins.
    """
    with open(metrics_csv, newline="") as f:
        by_step = {}
        for row in csv.DictReader(f):
            try:
                by_step[int(float(row["step"]))] = row
            except (KeyError, TypeError, ValueError):
                continue
    steps = sorted(by_step)
    columns = {k for row in by_step.values() for k in row if k is not None}
    return {k: np.array([_float(by_step[s].get(k)) for s in steps]) for k in columns} | {"step": np.array(steps)}


def _float(text: str | None) -> float:
    try:
        return float(text) if text else math.nan
    except ValueError:
        return math.nan


def plot_metrics(metrics_csv: str | os.PathLike, out_png: str | os.PathLike, chance: float | None = None, *,
                 eval_name: str | None = None, eval_chance: float | None = None) -> list[Path]:  # fmt: skip
    """Draw a run's training (and validation) loss, learning rate and zero-shot accuracy against step into `out_png`
    and the SVG beside it; with validation recall columns (`val_image_to_text@1`, ...) a fourth panel shows them.

    Args:
        metrics_csv: the run's metrics.csv (columns `step`, `loss`, `lr`, `zero_shot_top1`, `eval_top1`,
            `val_loss`, ...).
        out_png: where the PNG goes; the SVG takes the same name with `.svg`.
        chance: the synthetic zero-shot accuracy of guessing (a fraction), drawn as a dashed line when given.
        eval_name: the `run.eval_data` set the `eval_top1`/`eval_top5` columns are on, for the legend.
        eval_chance: its accuracy of guessing, drawn as a dotted line when given.

    Returns:
        The files written; none (after one line on stderr) when matplotlib is missing.
    """
    mpl = load_matplotlib()
    if mpl is None:
        return []
    m = read_metrics(metrics_csv)
    steps = m["step"]
    recall = any(np.isfinite(m[k]).any() for k in RECALL_SERIES if k in m)
    fig = new_figure(mpl, 20 if recall else 15, 4.4)
    axes = fig.subplots(1, 4 if recall else 3)
    loss_ax, lr_ax, zs_ax = axes[:3]
    last = int(steps[-1]) if len(steps) else 0
    for ax in axes:
        ax.set_xlabel("optimiser step", fontsize=11)
        ax.set_xlim(0, max(last, 1) * 1.02)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=10)
    _loss_panel(loss_ax, steps, m.get("loss"), m.get("val_loss"))
    _lr_panel(lr_ax, steps, m.get("lr"))
    _zero_shot_panel(mpl, zs_ax, steps, m, chance, eval_name, eval_chance)
    if recall:
        _recall_panel(mpl, axes[3], steps, m)
    fig.suptitle(f"Training run {Path(metrics_csv).resolve().parent.name}: {last} steps", fontsize=14)
    return save_figure(mpl, fig, out_png)


def _finite(steps: np.ndarray, values: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if values is None:
        return steps[:0], steps[:0].astype(float)
    ok = np.isfinite(values)
    return steps[ok], values[ok]


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.4", wrap=True)


def _loss_panel(ax, steps: np.ndarray, loss: np.ndarray | None, val_loss: np.ndarray | None = None) -> None:
    """Raw logged loss (faint) and its moving average, and the validation loss where there is one; the y axis
    starts at 0 so that a small change looks small."""
    x, y = _finite(steps, loss)
    vx, vy = _finite(steps, val_loss)
    ax.set_title("Training and validation loss" if len(vx) else "Training loss", fontsize=13)
    ax.set_ylabel("contrastive loss", fontsize=11)
    if len(vx):
        ax.plot(vx, vy, color="tab:orange", lw=2, marker="o", ms=5, label="validation loss (held-out samples)")
    if len(x) == 0:
        _no_data(ax, "no finite loss logged")
        return
    window = max(1, len(y) // 10)
    if window >= 3:
        smooth = np.convolve(y, np.ones(window) / window, mode="valid")  # trailing mean of `window` rows
        ax.plot(x, y, color="tab:blue", alpha=0.3, lw=1, label="logged loss")
        ax.plot(x[window - 1 :], smooth, color="tab:blue", lw=2, label=f"mean of the last {window} logged rows")
    else:
        ax.plot(x, y, color="tab:blue", lw=2, marker="o" if len(y) < 30 else None, ms=4, label="logged loss")
    both = np.concatenate([y, vy])
    ax.set_ylim(min(0.0, float(both.min())), float(both.max()) * 1.08)
    ax.legend(fontsize=10, loc="best")


def _lr_panel(ax, steps: np.ndarray, lr: np.ndarray | None) -> None:
    ax.set_title("Learning rate", fontsize=13)
    ax.set_ylabel("learning rate", fontsize=11)
    x, y = _finite(steps, lr)
    if len(x) == 0:
        _no_data(ax, "no learning rate in metrics.csv")
        return
    ax.plot(x, y, color="tab:purple", lw=2, marker="o" if len(y) < 30 else None, ms=4)
    ax.set_ylim(0, float(y.max()) * 1.1 or 1.0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def _zero_shot_panel(mpl, ax, steps: np.ndarray, m: dict[str, np.ndarray], chance: float | None,
                     eval_name: str | None = None, eval_chance: float | None = None) -> None:  # fmt: skip
    """Held-out and seen-combination top-1 (synthetic) and `run.eval_data` top-1 and top-5 in percent from 0;
    each series' last point labelled with its value (a run with one evaluation shows one labelled marker a series)."""
    name = _short_name(eval_name) if eval_name else "eval data"
    top1, top5 = f"{name}, top-1", f"{name}, top-5"
    keys = {**ZERO_SHOT_SERIES, "eval_top1": (top1, EVAL_COLOR), "eval_top5": (top5, EVAL_COLOR)}
    series = {label: (color, *_finite(steps, m.get(key))) for key, (label, color) in keys.items()}
    series = {label: (color, x, 100 * y) for label, (color, x, y) in series.items() if len(x)}
    on_eval_data = top1 in series or top5 in series
    ax.set_title("Zero-shot accuracy" if on_eval_data else "Zero-shot accuracy on held-out scenes", fontsize=13)
    ax.set_ylabel("accuracy" if top5 in series else "top-1 accuracy", fontsize=11)
    ax.yaxis.set_major_formatter(mpl.ticker.PercentFormatter(100, decimals=0))
    if chance is not None:
        ax.axhline(100 * chance, color="0.35", ls="--", lw=1.2, label=f"chance ({100 * chance:.1f}%)")
    if eval_chance is not None:
        ax.axhline(100 * eval_chance, color=EVAL_COLOR, ls=":", lw=1.2,
                   label=f"chance on {name} ({100 * eval_chance:.1f}%)")  # fmt: skip
    if not series:
        _no_data(ax, "no zero-shot evaluation in this run\n(run.eval_data; data.eval_size on synthetic data)")
    for label, (color, x, y) in series.items():
        ax.plot(x, y, color=color, lw=2, ls="--" if label == top5 else "-", marker="o", ms=6, label=label)
    top = max([y.max() for _, _, y in series.values()] + [100 * (chance or 0), 100 * (eval_chance or 0)], default=0)
    _percent_axis(mpl, ax, top)
    _label_last_points(ax, series)
    if series or chance is not None or eval_chance is not None:
        ax.legend(fontsize=10, loc="best")  # where it hides the fewest points (runs near 100% fill the top)


def _recall_panel(mpl, ax, steps: np.ndarray, m: dict[str, np.ndarray]) -> None:
    """Validation retrieval recall@1 and @5, both directions, in percent from 0, last points labelled."""
    ax.set_title("Retrieval on held-out training samples", fontsize=13)
    ax.set_ylabel("recall", fontsize=11)
    ax.yaxis.set_major_formatter(mpl.ticker.PercentFormatter(100, decimals=0))
    series = {}
    for key, (label, color, style) in RECALL_SERIES.items():
        x, y = _finite(steps, m.get(key))
        if len(x):
            ax.plot(x, 100 * y, color=color, lw=2, ls=style, marker="o", ms=5, label=label)
            series[label] = (color, x, 100 * y)
    _percent_axis(mpl, ax, max(y.max() for _, _, y in series.values()))
    _label_last_points(ax, series)
    ax.legend(fontsize=10, loc="best")


def _percent_axis(mpl, ax, top: float) -> None:
    """A y axis from 0 to 100% (and a margin, so that points near 100% and their labels stay inside the frame) when
    values pass 60%, else to just above the largest, in round steps."""
    ax.set_ylim(0, 106 if top > 60 else max(10, 10 * math.ceil(top * 1.25 / 10)))
    ax.yaxis.set_major_locator(mpl.ticker.MaxNLocator(nbins=6, steps=[1, 2, 5, 10], integer=True))


def _short_name(spec: str) -> str:
    """A data string as a legend shows it: the scheme and the last part of the path (`folder:val`)."""
    scheme, _, rest = spec.partition(":")
    path = rest.partition("?")[0].rstrip("/")
    return f"{scheme}:{Path(path).name or path}" if rest else spec


def _label_last_points(ax, series: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Each series' last value written right of its last point, in a margin the x axis leaves for it; labels
    closer than a line height are pushed apart (a run with one evaluation shows one labelled marker a series)."""
    if not series:
        return
    last_x = max(max(x[-1] for _, x, _ in series.values()), 1)
    ax.set_xlim(0, last_x * 1.2)
    lo, hi = ax.get_ylim()
    gap = 0.07 * (hi - lo)  # about a line of 10-point text on this panel
    placed = []
    for label, (color, x, y) in sorted(series.items(), key=lambda s: s[1][2][-1]):
        at = max(y[-1], lo + 0.6 * gap, placed[-1] + gap if placed else lo)  # off the x axis and the label below
        placed.append(at)
        ax.annotate(f"{y[-1]:.1f}%", (x[-1], y[-1]), xytext=(x[-1] + 0.04 * last_x, at), textcoords="data",
                    va="center", ha="left", fontsize=10, color=color, fontweight="bold")  # fmt: skip
