"""The suite's other tasks: image_caption_selection counted as CLIP_benchmark counts it (ties included), linear_probe
on a dataset's train split, captioning with a CoCa model (a plain CLIP model's cells are skipped, not failed), and
`--task` choosing among them."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import tiny_config
from test_benchmark import _bench, _wds_export, write_shard
from test_eval_datasets_more import SUGARCREPE, _sugarcrepe, _winoground

import clipworks
from clipworks.eval import suite, suite_tasks
from clipworks.eval.captioning import caption_metrics
from clipworks.eval.embed import Embedder
from clipworks.eval.sources import load_captioned, load_classification


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny CLIP and a tiny CoCa saved, vtab/cifar10's export with train and test splits, SugarCrepe, Winoground
    and a COCO caption file."""
    root = tmp_path_factory.mktemp("tasks")
    torch.manual_seed(0)
    clipworks.save_pretrained(clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-32"))), root / "clip")
    clipworks.save_pretrained(clipworks.create_model(tiny_config(clipworks.get_preset("coca_ViT-B-32"))),
                              root / "coca")  # fmt: skip
    export = root / "datasets" / "wds_vtab-cifar10"
    _wds_export(export)
    (export / "train").mkdir()
    with tarfile.open(export / "test" / "0.tar") as src, tarfile.open(export / "train" / "0.tar", "w") as dst:
        for m in src:  # the same samples under other keys, twice: a train split of 12
            for copy in range(2):
                info = tarfile.TarInfo(f"t{copy}{m.name}")
                info.size = m.size
                dst.addfile(info, src.extractfile(m))
    (export / "train" / "nshards.txt").write_text("1\n")
    _sugarcrepe(root / "sc", SUGARCREPE)
    _winoground(root / "wg")
    images, notes = [], []
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 100, 200 - 50 * i)).save(root / f"c{i}.png")
        images.append({"id": i, "file_name": f"c{i}.png"})
        notes += [{"image_id": i, "caption": f"a photo of thing {i} on a table."},
                  {"image_id": i, "caption": f"A blue thing, number {i}!"}]  # fmt: skip
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": notes}))
    return root


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- image_caption_selection against CLIP_benchmark's own loop ---


class _Lookup(torch.nn.Module):
    """encode_image / encode_text that return stored features: images carry their row index, texts are "t{k}"."""

    def __init__(self, image_f, text_f):
        super().__init__()
        self.image_f, self.text_f = image_f, text_f

    def encode_image(self, x):
        return self.image_f[x.view(len(x), -1)[:, 0].long()]

    def encode_text(self, ids):
        return self.text_f[ids[:, 0]]


@pytest.mark.parametrize("shape", [(1, 2), (1, 4), (2, 2)])
def test_selection_metrics_equal_clip_benchmarks_with_ties(shape):
    selection = pytest.importorskip("clip_benchmark.metrics.image_caption_selection")
    nim, nt = shape
    g = torch.Generator().manual_seed(nim * 10 + nt)
    n = 200
    image_f = torch.randint(0, 2, (n * nim, 3), generator=g).float() + torch.tensor([1.0, 0, 0])  # few values: ties
    text_f = torch.randint(0, 2, (n * nt, 3), generator=g).float() + torch.tensor([1.0, 0, 0])
    batches = []
    for start in range(0, n, 16):
        rows = range(start, min(start + 16, n))
        images = torch.tensor([[[[[float(r * nim + k)]]] for k in range(nim)] for r in rows])  # (B, nim, 1, 1, 1)
        batches.append((images, [[f"t{r * nt + k}" for k in range(nt)] for r in rows]))
    tokenizer = lambda texts: torch.tensor([[int(t[1:])] for t in texts])  # noqa: E731
    theirs = selection.evaluate(_Lookup(image_f, text_f), batches, tokenizer, "cpu", amp=False)
    i_n, t_n = F.normalize(image_f, dim=-1).view(n, nim, 3), F.normalize(text_f, dim=-1).view(n, nt, 3)
    ours = suite_tasks.selection_metrics([i_n[r] @ t_n[r].t() for r in range(n)])
    assert ours == pytest.approx(theirs, abs=1e-6)  # the same counts (1/n = 0.005); theirs is a float32 mean
    ties = sum(bool((s := i_n[r] @ t_n[r].t()).eq(s.max(dim=1, keepdim=True).values).sum(1).gt(1).any()) for r in range(n))
    assert ties > 10  # the comparison covered ties


def test_selection_cells_on_sugarcrepe_and_winoground(root, tmp_path):
    datasets = (f"sc=sugarcrepe:{root / 'sc' / 'data'}?images={root / 'sc' / 'val2017'},"
                f"wg=winoground:{root / 'wg'}")  # fmt: skip
    code, out, err = _bench(root, tmp_path / "o", models=f"local-dir:{root / 'clip'}", datasets=datasets)
    assert code == 0, err
    rows = {r["dataset"]: r for r in _rows(tmp_path / "o")}
    assert {r["task"] for r in rows.values()} == {"image_caption_selection"}
    assert float(rows["sc"]["image_acc"]) == 1.0  # one image per example: always its own best image
    assert rows["sc"]["acc"] == rows["sc"]["text_acc"]
    for r in rows.values():
        assert all(0 <= float(r[m]) <= 1 for m in ("image_acc", "text_acc", "acc"))
    md = (tmp_path / "o" / "results.md").read_text()
    assert "Average perf. on 0 datasets" in md and "caption selection: acc" in md


# --- linear probe ---


def test_linear_probe_cell_equals_the_probe_on_the_train_split(root, tmp_path):
    code, out, err = _bench(root, tmp_path / "o", "--task", "auto,linear_probe", models=f"local-dir:{root / 'clip'}",
                            datasets="vtab/cifar10")  # fmt: skip
    assert code == 0, err
    rows = {r["task"]: r for r in _rows(tmp_path / "o")}
    assert set(rows) == {"zeroshot_classification", "linear_probe"} and "x 2 tasks = 2 cells" in out
    export = root / "datasets" / "wds_vtab-cifar10"
    train, test = (load_classification(f"wds-benchmark:{export}?split={s}") for s in ("train", "test"))
    assert len(train.labels) == 12 and len(test.labels) == 6
    model, _, preprocess = clipworks.create_model_and_transforms(f"local-dir:{root / 'clip'}")
    embedder = Embedder(model, preprocess, clipworks.get_tokenizer(model), device="cpu", show_progress=False)
    expected = suite_tasks.evaluate(embedder, "linear_probe", (train, test))
    got = rows["linear_probe"]
    assert float(got["lp_acc1"]) == pytest.approx(expected["lp_acc1"], abs=1e-9)
    assert float(got["weight_decay"]) == expected["weight_decay"] and got["epochs"] == "10"
    md = (tmp_path / "o" / "results.md").read_text()
    assert "(linear probe)" in md and "Average perf. on 1 datasets" in md


def test_linear_probe_without_a_train_split_is_skipped_with_a_reason(root, tmp_path):
    code, out, err = _bench(root, tmp_path / "o", "--task", "linear_probe", models=f"local-dir:{root / 'clip'}",
                            datasets=f"c=coco:{root / 'captions.json'},vtab/cifar10")  # fmt: skip
    assert code == 0, err
    assert "skipped c: not a linear_probe set (it runs zeroshot_retrieval, captioning)" in err
    code, _, err = _bench(root, tmp_path / "p", "--task", "linear_probe", models=f"local-dir:{root / 'clip'}",
                          datasets=f"p=folder:{root / 'wg' / 'data'}")  # fmt: skip
    assert code == 1 and "p (linear_probe): " in err and "has no ?split=" in err
    code, _, err = _bench(root, tmp_path / "q", "--task", "zero_shot", models=f"local-dir:{root / 'clip'}",
                          datasets="vtab/cifar10")  # fmt: skip
    assert code == 2 and "unknown task 'zero_shot': choose from auto, zeroshot_classification" in err


# --- captioning ---


def test_captioning_cells_score_the_generated_captions(root, tmp_path):
    models = f"local-dir:{root / 'coca'},local-dir:{root / 'clip'}"
    code, out, err = _bench(root, tmp_path / "o", "--task", "captioning", models=models,
                            datasets=f"c=coco:{root / 'captions.json'}")  # fmt: skip
    assert code == 0, err
    assert "skipped: captioning needs a model with a caption decoder" in out + err
    assert "1 cell(s) computed, 0 done before, 1 not applicable to their model, 0 failed" in out
    (row,) = _rows(tmp_path / "o")
    assert row["task"] == "captioning" and row["model"] == f"local-dir:{root / 'coca'}"
    model, _, preprocess = clipworks.create_model_and_transforms(f"local-dir:{root / 'coca'}")
    embedder = Embedder(model, preprocess, clipworks.get_tokenizer(model), device="cpu", show_progress=False)
    data = load_captioned(f"coco:{root / 'captions.json'}")
    kept, generated = suite_tasks.generate_captions(embedder, data.images)
    assert kept == [0, 1, 2] and len(generated) == 3
    references = [[c for c, i in zip(data.captions, data.caption_image) if i == k] for k in kept]
    expected = caption_metrics(references, generated)
    assert {k: float(row[k]) for k in expected} == pytest.approx(expected, abs=1e-12)
    assert "| c (captioning) |" in (tmp_path / "o" / "results.md").read_text()


# --- a multi-label export (voc2007_multilabel) ---


def _npy(array) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=True)
    return buf.getvalue()


def _multilabel_export(folder: Path, labels: list[bytes]) -> None:
    """CLIP_benchmark's export of a multilabel set: .npy multi-hot vectors and dataset_type.txt saying multilabel."""
    from PIL import Image

    write_shard(folder / "test", [(f"s{i:04d}", Image.new("RGB", (32, 32), (50 * i % 256, 90, 200 - 30 * i)), "npy",
                                   label) for i, label in enumerate(labels)])  # fmt: skip
    (folder / "classnames.txt").write_text("cat\ndog\ncar\n")
    (folder / "dataset_type.txt").write_text("multilabel\n")


def test_a_multilabel_export_by_name_gives_mean_average_precision(root, tmp_path):
    from clipworks.eval import tasks
    from clipworks.eval.prompts import load_templates
    from clipworks.eval.sources import load_multilabel

    hot = [[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 0]]
    _multilabel_export(tmp_path / "datasets" / "wds_voc2007_multilabel", [_npy(h) for h in hot])
    code, out, err = _bench(tmp_path, tmp_path / "o", models=f"local-dir:{root / 'clip'}",
                            datasets="voc2007_multilabel")  # fmt: skip
    assert code == 0, err
    (row,) = _rows(tmp_path / "o")
    data = load_multilabel(f"wds-benchmark:{tmp_path / 'datasets' / 'wds_voc2007_multilabel'}")
    assert data.labels.tolist() == [[bool(v) for v in h] for h in hot]
    model, _, preprocess = clipworks.create_model_and_transforms(f"local-dir:{root / 'clip'}")
    embedder = Embedder(model, preprocess, clipworks.get_tokenizer(model), device="cpu", show_progress=False)
    expected = tasks.zeroshot_multilabel(embedder, data, load_templates("imagenet")).metrics
    assert float(row["mean_average_precision"]) == pytest.approx(expected["mean_average_precision"], abs=1e-7)
    assert "acc1" not in row and "Pascal VOC 2007 multilabel" in (tmp_path / "o" / "results.md").read_text()


def test_a_multilabel_export_refuses_pickled_or_misshapen_labels(tmp_path):
    from clipworks.eval.sources import load_multilabel

    for name, label, message in (("pickled", _npy([{"a": 1}, 0, 1]), "not a NumPy array file"),
                                 ("short", _npy([1, 0]), r"int64\[2\]; expected a multi-hot vector of the 3 classes"),
                                 ("counts", _npy([2, 0, 1]), "expected a multi-hot")):  # fmt: skip
        _multilabel_export(tmp_path / name, [_npy([1, 0, 0]), label])
        with pytest.raises(ValueError, match=message) as e:
            load_multilabel(f"wds-benchmark:{tmp_path / name}")
        assert "\n" not in str(e.value)


def test_eval_zeroshot_reads_a_multilabel_set_as_mean_average_precision(root, tmp_path, capsys):
    from clipworks.cli import main

    _multilabel_export(tmp_path / "ml", [_npy(h) for h in ([1, 0, 0], [0, 1, 1], [1, 1, 0])])
    code = main(["eval", "zeroshot", "--model", f"local-dir:{root / 'clip'}", "--data", f"wds-benchmark:{tmp_path / 'ml'}",
                 "--no-cache", "--quiet", "--device", "cpu", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())
    assert 0 < metrics["metrics"]["mean_average_precision"] <= 1
