"""Reports: results.json, a Markdown table, a confusion-matrix PNG and a retrieval-grid PNG (Pillow only)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor


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


def _font():
    return ImageFont.load_default()


def confusion_png(matrix: Tensor, class_names: Sequence[str], path: str | os.PathLike, max_classes: int = 60) -> Path:
    """Draw a row-normalised confusion matrix (row = true class) as a heat map with class names.

    Only classes that occur (as a true or a predicted class) are drawn; beyond `max_classes` of them, the ones
    with the lowest recall.
    """
    counts = matrix.double()
    keep = ((counts.sum(0) + counts.sum(1)) > 0).nonzero().squeeze(1).tolist()
    if len(keep) > max_classes:
        recall = counts.diag() / counts.sum(1).clamp(min=1)
        keep = sorted(sorted(keep, key=lambda k: recall[k].item())[:max_classes])
    rates = counts[keep][:, keep] / counts[keep].sum(1, keepdim=True).clamp(min=1)
    cell, label_w, top = max(8, min(36, 900 // max(len(keep), 1))), 150, 40
    side = cell * len(keep)
    img = Image.new("RGB", (max(label_w + side + 20, 560), top + side + label_w), "white")
    draw, font = ImageDraw.Draw(img), _font()
    draw.text((4, 8), "confusion matrix (rows: true class, columns: predicted; row-normalised)", fill="black", font=font)
    for r in range(len(keep)):
        for c in range(len(keep)):
            rate = rates[r, c].item()
            shade = int(255 * (1 - rate))
            x, y = label_w + c * cell, top + r * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(shade, shade, 255), outline=(235, 235, 235))
            if cell >= 28 and rate > 0:
                draw.text((x + 3, y + cell // 2 - 6), f"{100 * rate:.0f}", fill="white" if rate > 0.5 else "black",
                          font=font)  # fmt: skip
        draw.text((4, top + r * cell + max(0, cell // 2 - 6)), class_names[keep[r]][:22], fill="black", font=font)
    columns = Image.new("RGB", (label_w, max(side, 1)), "white")  # column names, written sideways
    cdraw = ImageDraw.Draw(columns)
    for c in range(len(keep)):
        cdraw.text((4, c * cell + max(0, cell // 2 - 6)), class_names[keep[c]][:22], fill="black", font=font)
    img.paste(columns.rotate(90, expand=True), (label_w, top + side + 2))
    out = Path(path)
    img.save(out)
    return out


def _thumb(load: Callable[[int], Image.Image], i: int, size: int) -> Image.Image:
    try:
        im = ImageOps.contain(load(i), (size, size))  # up or down to fit
    except (OSError, ValueError):
        im = Image.new("RGB", (size, size), (200, 200, 200))
    tile = Image.new("RGB", (size, size), "white")
    tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return tile


def retrieval_grid_png(queries: Sequence[str], ranked: Sequence[Sequence[int]], correct: Sequence[int],
                       load: Callable[[int], Image.Image], path: str | os.PathLike, size: int = 96) -> Path:  # fmt: skip
    """One row per query caption: the caption, then its top images left to right; the right image is outlined
    in green (a red bar closes a row whose right image is not among them)."""
    k = max((len(r) for r in ranked), default=1)
    text_w, pad = 260, 6
    head = 20
    img = Image.new("RGB", (text_w + k * (size + pad) + pad, head + len(queries) * (size + pad) + pad), "white")
    draw, font = ImageDraw.Draw(img), _font()
    draw.text((pad, 4), f"query caption -> its top {k} images, best first (green outline: the right image)",
              fill="black", font=font)  # fmt: skip
    for row, (query, images, right) in enumerate(zip(queries, ranked, correct)):
        y = head + pad + row * (size + pad)
        for j, line in enumerate(_wrap(query, 40)[: max(1, size // 12)]):
            draw.text((pad, y + 12 * j), line, fill="black", font=font)
        for col, i in enumerate(images):
            x = text_w + pad + col * (size + pad)
            img.paste(_thumb(load, i, size), (x, y))
            if i == right:
                draw.rectangle((x - 3, y - 3, x + size + 2, y + size + 2), outline=(0, 170, 0), width=4)
        if right not in images:
            draw.rectangle((img.width - 4, y, img.width - 1, y + size), fill=(210, 30, 30))
    out = Path(path)
    img.save(out)
    return out


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines

