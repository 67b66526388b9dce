"""The figures (training curves, confusion matrix, retrieval grid): PNG and SVG files people can read, and a run or an
evaluation that still finishes, with one line saying so, when matplotlib is not installed."""

from __future__ import annotations

import csv
import importlib.util
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipworks.eval.report import confusion_png, retrieval_grid_png, sample_queries
from clipworks.train.plot import PLOTS_SKIPPED, plot_metrics, read_metrics

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="the plots extra (matplotlib) is not installed")  # fmt: skip

FIELDS = ("step", "loss", "lr", "logit_scale", "samples_per_s", "skipped", "skipped_steps", "zero_shot_top1",
          "zero_shot_seen_top1")  # fmt: skip


def _metrics(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        writer.writerows([[row.get(k, "") for k in FIELDS] for row in rows])
    return path


def _svg_text(path: Path) -> str:
    """All text of an SVG (it parses as XML), one string, runs of white space as one space."""
    return " ".join(" ".join(ET.parse(path).getroot().itertext()).split())


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()  # decodes the whole file
        assert image.format == "PNG"
        return image.size


@needs_matplotlib
def test_curves_have_readable_labels_in_png_and_svg(tmp_path):
    rows = [{"step": s, "loss": 3 - s / 50, "lr": 1e-4 * min(1, s / 20)} for s in range(2, 62, 2)]
    for row in rows[9::10]:
        row.update(zero_shot_top1=row["step"] / 200, zero_shot_seen_top1=row["step"] / 150)
    written = plot_metrics(_metrics(tmp_path / "metrics.csv", rows), tmp_path / "curves.png", chance=1 / 36)
    assert written == [tmp_path / "curves.png", tmp_path / "curves.svg"]
    width, height = _png(tmp_path / "curves.png")
    assert 1200 <= width <= 2400 and 350 <= height <= 800  # three panels side by side
    text = _svg_text(tmp_path / "curves.svg")
    for label in ("Training loss", "Learning rate", "Zero-shot accuracy", "optimiser step", "top-1 accuracy",
                  "held-out combinations, top-1", "seen combinations, top-1", "chance (2.8%)", "40.0%"):  # fmt: skip
        assert label in text, label
    assert "zero_shot" not in text  # no column names in the legend


@needs_matplotlib
def test_one_evaluation_is_a_labelled_marker_and_missing_columns_say_so(tmp_path):
    rows = [{"step": s, "loss": 2.0} for s in (5, 10)]
    rows[-1].update(zero_shot_top1=0.25)
    plot_metrics(_metrics(tmp_path / "metrics.csv", rows), tmp_path / "curves.png")
    text = _svg_text(tmp_path / "curves.svg")
    assert "25.0%" in text and "held-out combinations, top-1" in text and "seen combinations" not in text
    assert "no learning rate in metrics.csv" in text
    plot_metrics(_metrics(tmp_path / "none.csv", rows[:1]), tmp_path / "none.png")
    assert "no zero-shot evaluation in this run" in _svg_text(tmp_path / "none.svg")


def test_read_metrics_orders_steps_and_keeps_the_last_row_of_a_step(tmp_path):
    # a resumed run appends to metrics.csv and may log a step again
    path = _metrics(tmp_path / "m.csv", [{"step": 4, "loss": 1.0}, {"step": 8, "loss": 2.0}, {"step": 4, "loss": 3.0}])
    m = read_metrics(path)
    assert m["step"].tolist() == [4, 8] and m["loss"].tolist() == [3.0, 2.0]
    assert all(v != v for v in m["zero_shot_top1"])  # empty cells are NaN


@needs_matplotlib
def test_confusion_matrix_has_colour_bar_class_names_counts_and_accuracy(tmp_path):
    names = ["red circle", "blue square", "green triangle", "never seen"]
    matrix = torch.tensor([[3, 1, 0, 0], [0, 4, 0, 0], [2, 0, 2, 0], [0, 0, 0, 0]])
    assert confusion_png(matrix, names, tmp_path / "confusion.png") == [tmp_path / "confusion.png",
                                                                        tmp_path / "confusion.svg"]  # fmt: skip
    width, height = _png(tmp_path / "confusion.png")
    assert width > 500 and height > 500
    text = _svg_text(tmp_path / "confusion.svg")
    assert "top-1 accuracy 75.0% (9 of 12 images)" in text
    assert "share of the true class's images" in text and "100%" in text  # the colour bar
    assert "predicted class" in text and "true class" in text
    assert all(n in text for n in names[:3]) and "never seen" not in text  # only classes that occur
    assert all(f" {c} " in f" {text} " for c in ("3", "1", "4", "2"))  # counts in the cells


@needs_matplotlib
def test_confusion_matrix_keeps_the_worst_classes_beyond_max(tmp_path):
    matrix = torch.eye(8, dtype=torch.long) * 5
    matrix[2, 3] = matrix[6, 1] = 5  # classes 2 and 6: half right
    confusion_png(matrix, [f"class {i}" for i in range(8)], tmp_path / "c.png", max_classes=3)
    text = _svg_text(tmp_path / "c.svg")
    assert "the 3 classes of 8 with the lowest recall" in text and "class 2" in text and "class 6" in text


def test_sample_queries_takes_misses_first_then_hits_evenly_spaced():
    ranks = [1, 9, 2, 1, 30, 1, 1, 6, 3, 1]  # misses (rank > 5) at 1, 4 and 7
    assert sample_queries(ranks, n=4, k=5) == [1, 4, 0, 5]  # hits at 0, 2, 3, 5, 6, 8, 9
    assert sample_queries(ranks, n=6, k=5) == [1, 4, 7, 0, 3, 6]
    assert sample_queries([1, 2], n=12, k=5) == [0, 1]
    assert sample_queries([8, 9, 10, 1], n=3, k=5) == [0, 1, 3]  # misses fill what hits cannot


def _images(n: int) -> list[Image.Image]:
    colours = [(200, 30, 30), (30, 30, 200), (30, 160, 30), (220, 200, 40)]
    return [Image.new("RGB", (32 + 8 * (i % 2), 32), colours[i % 4]) for i in range(n)]


@needs_matplotlib
def test_retrieval_grid_shows_scores_ranks_and_the_missed_image(tmp_path):
    images = _images(6)

    def load(i):
        if i == 5:
            raise OSError("broken file")
        return images[i]

    queries = ["a red square", "a blue square that the model misses"]
    written = retrieval_grid_png(queries, [[0, 2, 5], [0, 3, 4]], [0, 1], load, tmp_path / "retrieval.png",
                                 scores=[[0.41, 0.3, 0.2], [0.5, 0.4, 0.3]], correct_ranks=[1, 7],
                                 correct_scores=[0.41, 0.123])  # fmt: skip
    assert written == [tmp_path / "retrieval.png", tmp_path / "retrieval.svg"]
    width, height = _png(tmp_path / "retrieval.png")
    assert width > 800 and height > 2 * 150
    text = _svg_text(tmp_path / "retrieval.svg")
    assert all(q in text for q in queries)
    assert "#1 0.410" in text and "#3 0.300" in text  # rank and score above each hit
    assert "rank 7 0.123" in text and "missed: its image is at rank 7" in text and "found at rank 1" in text
    assert "unreadable" in text
    assert "Green frame: the image the caption belongs to" in text and "cosine similarity" in text  # the legend
    assert "1 of these 2 captions find their own image in their top 3" in text


@needs_matplotlib
def test_retrieval_grid_without_scores_as_eval_calls_it(tmp_path):
    images = _images(4)
    retrieval_grid_png(["a", "b"], [[0, 1], [2, 3]], [1, 0], images.__getitem__, tmp_path / "r.png")
    text = _svg_text(tmp_path / "r.svg")
    assert "#2" in text and "rank > 2" in text and "not in the top 2" in text and "0." not in text


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib as if not installed: importing it raises ImportError."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_without_matplotlib_each_figure_is_skipped_with_one_line(tmp_path, capsys, no_matplotlib):
    path = _metrics(tmp_path / "metrics.csv", [{"step": 1, "loss": 1.0}])
    assert plot_metrics(path, tmp_path / "curves.png") == []
    assert confusion_png(torch.eye(2, dtype=torch.long), ["a", "b"], tmp_path / "confusion.png") == []
    assert retrieval_grid_png(["a"], [[0]], [0], _images(1).__getitem__, tmp_path / "retrieval.png") == []
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [PLOTS_SKIPPED] * 3
    assert "pip install 'clipworks[plots]'" in PLOTS_SKIPPED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_training_finishes_without_matplotlib(tmp_path, capsys, no_matplotlib):
    from clipworks.train.config import load_config
    from clipworks.train.loop import train

    tiny = ["--model.embed_dim", "16", "--model.image_size", "16", "--model.patch_size", "8",
            "--model.vision_width", "16", "--model.vision_layers", "1", "--model.vision_heads", "2",
            "--model.text_width", "16", "--model.text_layers", "1", "--model.text_heads", "2",
            "--data.train", "synthetic:shapes?size=16&seed=0&image_size=16", "--data.batch_size", "8",
            "--data.workers", "0", "--data.eval_size", "0", "--run.progress", "false", "--run.tensorboard", "false",
            "--run.steps", "2", "--run.out_dir", str(tmp_path / "run")]  # fmt: skip
    result = train(load_config(None, tiny))
    assert result.step == 2 and (tmp_path / "run" / "model").is_dir() and (tmp_path / "run" / "metrics.csv").exists()
    assert not (tmp_path / "run" / "curves.png").exists()
    assert capsys.readouterr().err.count(PLOTS_SKIPPED) == 1
