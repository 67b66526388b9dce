"""Evaluation while training on real data (issue 18): zero-shot on `run.eval_data`, validation loss and recall on
`data.val_size` held-out training samples, the synthetic scenes only on synthetic data, and exact resume."""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import tarfile
from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from clipworks.data.datasets import make_loader
from clipworks.data.synthetic import ShapesConfig, ShapesDataset, zero_shot_task
from clipworks.train import state as run_state
from clipworks.train.evaluation import (
    DATA_FIELDS,
    SYNTHETIC_FIELDS,
    VAL_FIELDS,
    EvalImages,
    bounded_templates,
    contrastive_loss,
    hold_out,
)
from clipworks.train.losses import build_loss
from clipworks.train.loop import train

SHAPES = ShapesConfig(image_size=32, seed=3)


def _captioned_csv(root: Path, n: int) -> Path:
    """`n` synthetic scenes written as PNG files with a captions.csv, as a user's own data would be."""
    root.mkdir()
    scenes = ShapesDataset("train", n, SHAPES)
    rows = []
    for i in range(n):
        image, caption = scenes[i]
        image.save(root / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{caption}")
    (root / "captions.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    return root / "captions.csv"


def _class_folders(root: Path, n: int) -> Path:
    """`n` single-object scenes in one sub-folder per class (`red_circle/`, ...), as `folder:DIR` reads them."""
    task = zero_shot_task("val", n, SHAPES)
    for i, label in task.samples:
        folder = root / task.class_names[label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        task.dataset[i][0].save(folder / f"{i:03d}.png")
    return root


def _rows(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (run / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return _captioned_csv(root / "pairs", 64), _class_folders(root / "eval", 40)


def test_real_data_run_evaluates_eval_data_and_a_validation_slice(tmp_path, data, capsys):
    pairs, folders = data
    run = tmp_path / "run"
    args = ["--data.train", f"csv:{pairs}", "--data.val_size", "16", "--run.eval_data", f"folder:{folders}",
            "--run.eval_max_images", "30", "--run.steps", "4", "--run.eval_every", "2", "--run.log_every", "1",
            "--run.tensorboard", "false"]  # fmt: skip
    result = train(tiny_config(run, *args))
    header, rows = _rows(run)
    assert set(DATA_FIELDS) <= set(header) and set(VAL_FIELDS) <= set(header)
    assert not set(SYNTHETIC_FIELDS) & set(header)  # real data: no synthetic scenes unless asked
    evaluated = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in evaluated] == [2, 4] and all(r["eval_top1"] for r in evaluated)
    for r in evaluated:
        assert math.isfinite(float(r["val_loss"])) and float(r["val_loss"]) > 0
        assert all(0 <= float(r[k]) <= 1 for k in (*DATA_FIELDS, *VAL_FIELDS[1:]))
        assert float(r["eval_top1"]) <= float(r["eval_top5"])
    assert result.eval is None and result.eval_data.images == 30 and result.val.samples == 16
    assert result.eval_data.chance == pytest.approx(1 / len(list(folders.iterdir())))
    out = capsys.readouterr().out
    assert f"data: csv:{pairs} (48 samples for training, 16 held out); zero-shot on folder:{folders} (30 of 40 " \
           "images," in out  # fmt: skip
    assert "validation loss and recall on the last 16 samples" in out and "note:" not in out
    assert f"step 2: zero-shot on folder:{folders}: top-1" in out and "step 4: validation on 16 held-out samples" in out
    if importlib.util.find_spec("matplotlib") is not None:
        svg = (run / "curves.svg").read_text()
        assert "Retrieval on held-out training samples" in svg and "validation loss" in svg and "folder:eval" in svg


def test_synthetic_scenes_only_on_synthetic_data_and_a_bare_real_run_says_so(tmp_path, data, capsys):
    pairs, _ = data
    common = ["--run.steps", "2", "--run.tensorboard", "false", "--data.eval_size", "8"]
    result = train(tiny_config(tmp_path / "synthetic", *common))
    header, rows = _rows(tmp_path / "synthetic")
    assert set(SYNTHETIC_FIELDS) <= set(header) and not set(DATA_FIELDS + VAL_FIELDS) & set(header)
    assert rows[-1]["zero_shot_top1"] != "" and result.eval is not None
    assert "note:" not in capsys.readouterr().out
    result = train(tiny_config(tmp_path / "real", *common, "--data.train", f"csv:{pairs}"))
    header, _ = _rows(tmp_path / "real")
    assert result.eval is None and not set(SYNTHETIC_FIELDS) & set(header)
    out = capsys.readouterr().out
    assert "no held-out evaluation" in out and "the training loss is this run's only sign of progress" in out
    assert "--data.val_size" in out and "--run.eval_data folder:DIR" in out
    train(tiny_config(tmp_path / "asked", *common, "--data.train", f"csv:{pairs}", "--run.synthetic_eval", "true"))
    assert set(SYNTHETIC_FIELDS) <= set(_rows(tmp_path / "asked")[0])


def test_resume_with_evaluations_matches_the_uninterrupted_run(tmp_path, data):
    pairs, folders = data
    # Evaluations at steps 3 and 6 in the whole run; the first half also evaluates at its last step (2).
    common = ["--data.train", f"csv:{pairs}", "--data.val_size", "16", "--run.eval_data", f"folder:{folders}",
              "--run.eval_every", "3", "--run.save_every", "2", "--run.tensorboard", "false"]  # fmt: skip
    whole = train(tiny_config(tmp_path / "whole", *common, "--run.steps", "4"))
    train(tiny_config(tmp_path / "resumed", *common, "--run.steps", "2"))
    resumed = train(tiny_config(tmp_path / "resumed", *common, "--run.steps", "4", "--run.resume", "latest"))
    expected = run_state.load_checkpoint(run_state.checkpoint_dir(whole.run_dir, 4))["model"]
    got = run_state.load_checkpoint(run_state.checkpoint_dir(resumed.run_dir, 4))["model"]
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert resumed.val.loss == pytest.approx(whole.val.loss, rel=1e-5)
    steps = [int(r["step"]) for r in _rows(tmp_path / "resumed")[1] if r["val_loss"]]
    assert steps == [2, 3, 4]  # the first run's last step, then the resumed run's


def test_the_held_out_slice_is_never_trained_on(tmp_path, data):
    pairs, _ = data
    loader = make_loader(f"csv:{pairs}", lambda image: image, lambda texts: torch.zeros(len(texts), 1),
                         batch_size=8, workers=0)  # fmt: skip
    held = hold_out(loader, f"csv:{pairs}", 16, 8)
    assert held.train_samples == 48 and len(loader) == 6
    assert sorted(loader.sampler.indices()) == list(range(48))
    with pytest.raises(ValueError, match="less than one batch of 8"):
        hold_out(loader, f"csv:{pairs}", 44, 8)


def _shard(path: Path, first: int, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + n):
            for ext, payload in (("png", _png_bytes()), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_wds_stream_holds_out_its_last_shard(tmp_path):
    for k in range(2):
        _shard(tmp_path / f"shard-{k}.tar", 10 * k, 5)
    spec = f"wds:{tmp_path}/shard-{{0..1}}.tar"
    transform = lambda image: torch.zeros(3, 2, 2)  # noqa: E731
    loader = make_loader(spec, transform, lambda texts: torch.zeros(len(texts), 1), batch_size=2, workers=0)
    held = hold_out(loader, spec, 3, 2)
    assert loader.dataset.shards == [str(tmp_path / "shard-0.tar")] and held.shard == str(tmp_path / "shard-1.tar")
    samples = EvalImages(held.read(transform))
    assert samples.payloads == ["caption 10", "caption 11", "caption 12"] and samples.images.shape == (3, 3, 2, 2)
    trained = [s for batch in loader for s in batch.tokens]
    assert len(trained) == 4  # the 5 samples of shard 0 in batches of 2, the last dropped
    one = make_loader(f"wds:{tmp_path}/shard-0.tar", transform, lambda t: torch.zeros(len(t), 1), batch_size=2,
                      workers=0)
    with pytest.raises(ValueError, match="at least 2 shards"):
        hold_out(one, "wds:one", 3, 2)


def test_images_over_the_memory_budget_are_read_again_at_each_pass():
    reads = []

    def read():
        reads.append(1)
        yield from ((torch.full((3, 2, 2), float(i)), i) if i != 2 else None for i in range(5))

    kept, streamed = EvalImages(read), EvalImages(read, max_bytes=100)
    assert kept.images is not None and streamed.images is None and kept.skipped == streamed.skipped == 1
    for images in (kept, streamed):
        batches = list(images.batches(3))
        assert [p for _, p in batches] == [[0, 1, 3], [4]] and batches[1][0][0, 0, 0, 0] == 4
    assert len(reads) == 3  # once each to start, then again for the streamed one's pass


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_validation_loss_is_the_training_loss(kind):
    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 8), dim=-1) for _ in range(2))
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0) if kind == "siglip" else None
    expected = build_loss(kind)(image, text, scale, bias)
    torch.testing.assert_close(contrastive_loss(kind, image, text, scale, bias), expected)


def test_prompt_templates_are_bounded():
    assert len(bounded_templates(10, None)) == 80  # OpenAI's ImageNet templates
    assert len(bounded_templates(1000, None)) == 7  # its 7 best: 7,000 prompts
    assert bounded_templates(100_000, None) == ["a photo of a {}."]
    own = [f"{i} {{}}" for i in range(18)]
    assert bounded_templates(10, own) == own and bounded_templates(1000, own) == own[:8]


def test_a_resumed_run_that_evaluates_more_extends_the_metrics_columns(tmp_path):
    from clipworks.train.loop import METRIC_FIELDS, MetricsLog

    path = tmp_path / "metrics.csv"
    MetricsLog(path).write(step=1, loss=2.0)
    log = MetricsLog(path, fields=METRIC_FIELDS + VAL_FIELDS)
    log.write(step=2, loss=1.5, val_loss=1.75)
    header, rows = _rows(tmp_path)
    assert header == [*METRIC_FIELDS, *VAL_FIELDS]
    assert [(r["step"], r["loss"], r["val_loss"]) for r in rows] == [("1", "2", ""), ("2", "1.5", "1.75")]
