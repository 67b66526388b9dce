"""The PNG a run leaves behind: loss and held-out zero-shot accuracy against step, drawn with Pillow alone."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H, MARGIN = 520, 300, 48
COLORS = {"loss": (31, 119, 180), "zero_shot_top1": (214, 39, 40), "zero_shot_seen_top1": (44, 160, 44)}


def _series(rows: list[dict[str, str]], key: str) -> list[tuple[float, float]]:
    points = []
    for row in rows:
        try:
            x, y = float(row["step"]), float(row.get(key) or "nan")
        except ValueError:
            continue
        if math.isfinite(y):
            points.append((x, y))
    return points


def _panel(title: str, series: dict[str, list[tuple[float, float]]], x_max: float) -> Image.Image:
    """One chart: axes from 0 to the largest step and from the smallest to the largest value, a line a series."""
    img = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, top, right, bottom = MARGIN + 12, 28, PANEL_W - 16, PANEL_H - MARGIN + 8
    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    values = [y for points in series.values() for _, y in points]
    if not values:
        draw.text((left + 10, top + 10), "no data", fill="gray", font=font)
        return img
    lo, hi = min(values), max(values)
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)
    x_max = max(x_max, 1.0)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (right - left) * x / x_max, bottom - (bottom - top) * (y - lo) / (hi - lo)

    for frac in (0.0, 0.5, 1.0):  # y ticks at the bottom, middle and top; x ticks at 0, half and the last step
        y = lo + (hi - lo) * frac
        draw.text((4, at(0, y)[1] - 6), f"{y:.3g}", fill="black", font=font)
        draw.text((at(x_max * frac, lo)[0] - 10, bottom + 6), f"{x_max * frac:.0f}", fill="black", font=font)
    for i, (name, points) in enumerate(series.items()):
        color = COLORS.get(name, (0, 0, 0))
        if len(points) > 1:
            draw.line([at(x, y) for x, y in points], fill=color, width=2)
        for x, y in points if len(points) < 40 else []:
            px, py = at(x, y)
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        draw.text((right - 150, top + 6 + 12 * i), name, fill=color, font=font)
    draw.text((right - 30, bottom + 20), "step", fill="black", font=font)
    return img


def plot_metrics(metrics_csv: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Draw the loss curve and the zero-shot curves of a run's metrics.csv side by side into `out_png`."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    x_max = max((float(r["step"]) for r in rows), default=1.0)
    loss = _panel("training loss", {"loss": _series(rows, "loss")}, x_max)
    zero_shot = {k: _series(rows, k) for k in ("zero_shot_top1", "zero_shot_seen_top1")}
    accuracy = _panel("zero-shot top-1 (held-out / seen pairs)", {k: v for k, v in zero_shot.items() if v}, x_max)
    canvas = Image.new("RGB", (2 * PANEL_W, PANEL_H), "white")
    canvas.paste(loss, (0, 0))
    canvas.paste(accuracy, (PANEL_W, 0))
    out = Path(out_png)
    canvas.save(out)
    return out
