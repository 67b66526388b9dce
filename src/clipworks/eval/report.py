"""Reports: results.json, a Markdown table, and figures (matplotlib, the `plots` extra): a confusion matrix and a
retrieval grid, each as PNG and SVG."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor

from ..train.plot import load_matplotlib, new_figure, save_figure


def write_results(out_dir: str | os.PathLike, task: str, metrics: dict, info: dict) -> Path:
    """Write `results.json` ({"task", "metrics", "info"}) and `results.md` (a table of the metrics) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"task": task, "metrics": metrics, "info": info}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(task, metrics, info))
    return out


FRACTION_WORDS = ("top", "recall", "accuracy", "chance", "@")


def format_value(key: str, value) -> str:
    """A metric for people: accuracies and recalls (by their names) as percentages, other numbers with 4
    significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and any(w in key for w in FRACTION_WORDS):
        return f"{100 * value:.2f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(task: str, metrics: dict, info: dict) -> str:
    """A Markdown report: a heading, the run's details as a list, the metrics as a table."""
    lines = [f"# {task}", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {format_value(k, v)} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def print_table(metrics: dict) -> None:
    """Print metrics one a line, aligned."""
    width = max((len(k) for k in metrics), default=0)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {format_value(k, v)}")


def _accuracy_title(counts: Tensor) -> str:
    total = int(counts.sum())
    right = int(counts.diag().sum())
    return f"top-1 accuracy {100 * right / max(total, 1):.1f}% ({right} of {total} images)"


def confusion_png(matrix: Tensor, class_names: Sequence[str], path: str | os.PathLike,
                  max_classes: int = 60) -> list[Path]:  # fmt: skip
    """Draw the confusion matrix (row = true class, column = predicted) into `path` (PNG) and the SVG beside it:
    cells coloured by the share of the true class's images (row-normalised), with a colour bar, and the image
    counts written in the cells when at most 20 classes are drawn.

    Only classes that occur (as a true or a predicted class) are drawn; beyond `max_classes` of them, the ones
    with the lowest recall. Returns the files written; none (after one line on stderr) without matplotlib.
    """
    mpl = load_matplotlib()
    if mpl is None:
        return []
    counts = matrix.double()
    keep = ((counts.sum(0) + counts.sum(1)) > 0).nonzero().squeeze(1).tolist()
    occurring = len(keep)
    if len(keep) > max_classes:
        recall = counts.diag() / counts.sum(1).clamp(min=1)
        keep = sorted(sorted(keep, key=lambda k: recall[k].item())[:max_classes])
    shown = counts[keep][:, keep]
    rates = (100 * shown / counts[keep].sum(1, keepdim=True).clamp(min=1)).numpy()  # (n, n) percent of the row
    n = len(keep)
    side = min(max(3.0 + n * (0.42 if n <= 20 else 0.28), 6.0), 22.0)  # inches; about 11 and 8 points a class
    fig = new_figure(mpl, side + 1.6, side)
    ax = fig.subplots()
    title = f"Confusion matrix: {_accuracy_title(counts)}"
    if n < occurring:
        title += f"\nthe {n} classes of {occurring} with the lowest recall"
    ax.set_title(title, fontsize=13)
    if n == 0:
        ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes, fontsize=12)
        ax.set_axis_off()
        return save_figure(mpl, fig, path)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, shrink=0.8, format=mpl.ticker.PercentFormatter(100, decimals=0))
    bar.set_label("share of the true class's images (row-normalised)", fontsize=11)
    names = [_shorten(class_names[k], 28) for k in keep]
    size = 11 if n <= 12 else 9 if n <= 30 else 7
    ax.set_xticks(range(n), names, rotation=45 if n <= 30 else 90, ha="right" if n <= 30 else "center",
                  rotation_mode="anchor" if n <= 30 else "default", fontsize=size)  # fmt: skip
    ax.set_yticks(range(n), names, fontsize=size)
    ax.set_xlabel("predicted class" + (" (cell: number of images)" if n <= 20 else ""), fontsize=12)
    ax.set_ylabel("true class", fontsize=12)
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=1)
    ax.tick_params(which="minor", length=0)
    if n <= 20:  # counts, not shares: small classes stay honest ("1" of 1 is not "100" of 100)
        for (r, c), count in np.ndenumerate(shown.numpy()):
            if count > 0:
                ax.text(c, r, f"{count:.0f}", ha="center", va="center", fontsize=size,
                        color="white" if rates[r, c] > 55 else "black")  # fmt: skip
    return save_figure(mpl, fig, path)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def sample_queries(correct_ranks: Sequence[int], n: int = 12, k: int = 5) -> list[int]:
    """Which queries a retrieval grid shows: up to half of `n` from the misses (right answer ranked below `k`),
    the rest from the hits, each group evenly spaced through the evaluation set; misses first.

    Args:
        correct_ranks: for each query, the 1-based rank of its right image.
        n: rows wanted (fewer when there are fewer queries).
        k: the hits the grid shows a row.
    """
    misses = [q for q, r in enumerate(correct_ranks) if r > k]
    hits = [q for q, r in enumerate(correct_ranks) if r <= k]
    take_misses = min(len(misses), max(n // 2, n - len(hits)))
    return _spaced(misses, take_misses) + _spaced(hits, min(len(hits), n - take_misses))


def _spaced(items: list[int], m: int) -> list[int]:
    return [items[int(i * len(items) / m)] for i in range(m)] if m else []


def _thumb(load: Callable[[int], Image.Image], i: int, size: int) -> Image.Image | None:
    """Image i scaled to fit a white size x size square (every cell the same), or None when it cannot be read."""
    try:
        image = ImageOps.contain(load(i).convert("RGB"), (size, size))  # up or down to fit
    except (OSError, ValueError):
        return None
    tile = Image.new("RGB", (size, size), "white")
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


# the retrieval grid's geometry in inches: caption column, image cell, rank line above a cell, gap before the
# column of missed images, a line of the title, the column heads (two lines), legend band, margin
CAPTION_W, CELL, LABEL_H, GAP, TITLE_LINE, HEADS_H, FOOT_H, MARGIN = 3.4, 1.3, 0.3, 0.3, 0.26, 0.5, 1.0, 0.2
RIGHT, MISSED = "#1a9e3a", "#c62828"


class _Grid:
    """The retrieval grid's figure and where its cells go (inches from the top left)."""

    def __init__(self, mpl, rows: int, k: int, title: str):
        self.mpl, self.k = mpl, k
        self.width = 2 * MARGIN + CAPTION_W + (k + 1) * CELL + GAP
        self.title = textwrap.wrap(title, int((self.width - 2 * MARGIN) / 0.1))  # 14-point characters: ~0.1 inch
        self.head = 0.12 + TITLE_LINE * len(self.title) + HEADS_H
        self.height = self.head + rows * (CELL + LABEL_H) + FOOT_H
        self.fig = new_figure(mpl, self.width, self.height, layout=None)
        self.thumbs: dict[int, Image.Image | None] = {}

    def axes(self, left: float, top: float, width: float, height: float):
        return self.fig.add_axes((left / self.width, 1 - (top + height) / self.height, width / self.width,
                                  height / self.height))  # fmt: skip

    def row_top(self, row: int) -> float:
        return self.head + row * (CELL + LABEL_H)

    def column_left(self, col: int) -> float:
        """Left edge of hit column `col` (0-based); column k is the missed images' column, after a gap."""
        return MARGIN + CAPTION_W + col * CELL + (GAP if col == self.k else 0)


def retrieval_grid_png(queries: Sequence[str], ranked: Sequence[Sequence[int]], correct: Sequence[int],
                       load: Callable[[int], Image.Image], path: str | os.PathLike, size: int = 96,
                       scores: Sequence[Sequence[float]] | None = None, correct_ranks: Sequence[int] | None = None,
                       correct_scores: Sequence[float] | None = None) -> list[Path]:  # fmt: skip
    """Draw text-to-image retrieval examples into `path` (PNG) and the SVG beside it: a row per query caption,
    then its top images best first, each with its rank (and score when given); the caption's own image framed
    in green among them, or, when it is not among them, in a last column with its rank (and score) when known.

    Args:
        queries: the captions, one a row (the caller picks them; `sample_queries` mixes misses and hits).
        ranked: each caption's top image indices, best first.
        correct: each caption's own image.
        load: an image index to its image.
        size: the thumbnails' size in pixels.
        scores: the scores of `ranked` (cosine similarities of caption and image).
        correct_ranks, correct_scores: the 1-based rank and the score of each caption's own image.

    Returns:
        The files written; none (after one line on stderr) without matplotlib.
    """
    mpl = load_matplotlib()
    if mpl is None:
        return []
    k = max((len(r) for r in ranked), default=1)
    found = sum(right in hits for hits, right in zip(ranked, correct))
    title = f"Text-to-image retrieval: {found} of these {len(queries)} captions find their own image in their top {k}"
    grid = _Grid(mpl, len(queries), k, title)
    for row, (query, hits, right) in enumerate(zip(queries, ranked, correct)):
        hits = list(hits)
        rank = correct_ranks[row] if correct_ranks is not None else hits.index(right) + 1 if right in hits else None
        _caption_cell(grid, row, query, rank, right in hits)
        for col, i in enumerate(hits):
            label = f"#{col + 1}" + (f"  {scores[row][col]:.3f}" if scores is not None else "")
            _image_cell(grid, row, col, load, i, size, label, RIGHT if i == right else None)
        if right not in hits:
            label = (f"rank {rank}" if rank is not None else f"rank > {k}") + \
                (f"  {correct_scores[row]:.3f}" if correct_scores is not None else "")  # fmt: skip
            _image_cell(grid, row, k, load, right, size, label, RIGHT)
    _titles(grid, scores is not None, correct_ranks is not None)
    return save_figure(mpl, grid.fig, path)


def _caption_cell(grid: _Grid, row: int, query: str, rank: int | None, found: bool) -> None:
    """The query caption, wrapped, and whether (and where) its own image was found."""
    ax = grid.axes(MARGIN, grid.row_top(row) + LABEL_H, CAPTION_W - 0.15, CELL)
    ax.set_axis_off()
    lines = textwrap.wrap(query, 38, max_lines=4, placeholder=" …") or ["(empty caption)"]
    ax.text(0, 1, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=10.5, wrap=False)
    if found:
        status, color = f"✓ found at rank {rank}", RIGHT
    else:
        where = f"at rank {rank}" if rank is not None else f"not in the top {grid.k}"
        status, color = f"✗ missed: its image is {where}", MISSED
    ax.text(0, 0.02, status, transform=ax.transAxes, va="bottom", ha="left", fontsize=10, color=color,
            fontweight="bold")  # fmt: skip


def _image_cell(grid: _Grid, row: int, col: int, load, i: int, size: int, label: str, frame: str | None) -> None:
    """A thumbnail under its label, framed in `frame`'s colour (or a thin grey line)."""
    ax = grid.axes(grid.column_left(col) + 0.06, grid.row_top(row) + LABEL_H, CELL - 0.12, CELL - 0.12)
    if i not in grid.thumbs:
        grid.thumbs[i] = _thumb(load, i, size)
    thumb = grid.thumbs[i]
    if thumb is None:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=9, color="0.4", transform=ax.transAxes)
    else:
        ax.imshow(np.asarray(thumb), interpolation="lanczos")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set(edgecolor=frame or "0.75", linewidth=4 if frame else 0.8)
    ax.set_title(label, fontsize=10, color=frame or "black", fontweight="bold" if frame else "normal", pad=4)


def _titles(grid: _Grid, with_scores: bool, with_ranks: bool) -> None:
    """The figure's title, the column heads and a legend that explains every mark."""
    fig, k = grid.fig, grid.k
    fig.text(MARGIN / grid.width, 1 - 0.12 / grid.height, "\n".join(grid.title), fontsize=14, va="top")
    head = 1 - (grid.head - 0.1) / grid.height
    fig.text(MARGIN / grid.width, head, "query caption", fontsize=11, color="0.3", va="bottom")
    hits = f"its top {k} images, best first" if k > 1 else "its top image"
    fig.text((grid.column_left(0) + k * CELL / 2) / grid.width, head, hits,
             fontsize=11, color="0.3", ha="center", va="bottom")  # fmt: skip
    fig.text((grid.column_left(k) + CELL / 2) / grid.width, head, "its own image,\nwhen missed", fontsize=11,
             color="0.3", ha="center", va="bottom")  # fmt: skip
    score = " and score (cosine similarity of caption and image)" if with_scores else ""
    rank = "with its rank" + (" and score" if with_scores else "") if with_ranks else "ranked below the top shown"
    legend = (f"Above each image: its rank{score}. Green frame: the image the caption belongs to (the right answer). "
              f"✓ the right image is in the top {k}, at the rank given; ✗ it is not, and the last column shows it, "
              f"{rank}.")  # fmt: skip
    fig.text(MARGIN / grid.width, (FOOT_H - 0.15) / grid.height, textwrap.fill(legend, int(grid.width * 12)),
             fontsize=10, va="top", color="0.2")  # fmt: skip
