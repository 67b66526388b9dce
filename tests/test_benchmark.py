"""`clipworks benchmark`: two tiny models x a class folder, a COCO caption set and a CLIP_benchmark export found by
name; results.csv as CLIP_benchmark's `build` writes it, results.md, plots, resuming, and its error lines."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from reference import tiny_config

import clipworks
import clipworks.factory
from clipworks.cli import main
from clipworks.eval import suite

COLORS = {"red_thing": (220, 30, 30), "blue_thing": (30, 30, 220), "green_thing": (30, 200, 30)}
CLASSIFICATION_METRICS = ["acc1", "acc5", "mean_per_class_recall"]
RETRIEVAL_METRICS = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]


def _image(rgb, i: int) -> Image.Image:
    image = Image.new("RGB", (40, 40), rgb)
    image.paste((255, 255, 255), (4 * i, 4 * i, 4 * i + 8, 4 * i + 8))
    return image


def write_shard(split: Path, samples: list[tuple[str, Image.Image, str, bytes]]) -> None:
    """SPLIT/0.tar of (key, image saved as PNG, label extension, label bytes) samples, and SPLIT/nshards.txt."""
    split.mkdir(parents=True)
    with tarfile.open(split / "0.tar", "w") as tar:
        for key, image, ext, label in samples:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.{ext}", label)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (split / "nshards.txt").write_text("1\n")


def _wds_export(root: Path) -> None:
    """A classification export as CLIP_benchmark writes it (one shard of 6 PNG samples with .cls labels)."""
    samples = [(f"s{i:07d}", _image(list(COLORS.values())[i % 3], i), "cls", str(i % 3).encode()) for i in range(6)]
    write_shard(root / "test", samples)
    (root / "classnames.txt").write_text("red thing\nblue thing\ngreen thing\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two saved tiny models, a class folder (3 x 3 images), a COCO caption file (6 images, 9 captions), a dataset
    root holding vtab/cifar10's export, and a finished suite of the 2 x 3 cells in `base`."""
    root = tmp_path_factory.mktemp("bench")
    for seed in (0, 1):
        torch.manual_seed(seed)
        clipworks.save_pretrained(clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-32"))),
                                  root / f"m{seed}")  # fmt: skip
    for name, rgb in COLORS.items():
        (root / "photos" / name).mkdir(parents=True)
        for i in range(3):
            _image(rgb, i).save(root / "photos" / name / f"{i}.png")
    images, notes = [], []
    for i in range(6):
        name = list(COLORS)[i % 3]
        _image(COLORS[name], i).save(root / f"c{i}.png")
        images.append({"id": i, "file_name": f"c{i}.png"})
        notes += [{"image_id": i, "caption": f"a {name.replace('_', ' ')} number {i}"}] * (1 + i % 2)
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": notes}))
    _wds_export(root / "datasets" / "wds_vtab-cifar10")
    base = root / "base"
    code, out, err = _bench(root, base)
    assert code == 0, err
    return {"root": root, "base": base, "out": out, "err": err}


def _models(root: Path) -> str:
    return f"local-dir:{root / 'm0'},local-dir:{root / 'm1'}"


def _datasets(root: Path) -> str:
    return f"photos=folder:{root / 'photos'},coco:{root / 'captions.json'},vtab/cifar10"


def _bench(root: Path, out: Path, *extra, models=None, datasets=None) -> tuple[int, str, str]:
    argv = ["benchmark", "--models", models or _models(root), "--datasets", datasets or _datasets(root), "--out",
            out, "--dataset-root", root / "datasets", "--quiet", "--device", "cpu", *extra]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def _copy(env, tmp_path) -> Path:
    out = tmp_path / "suite"
    shutil.copytree(env["base"], out)
    return out


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


def _count_model_loads(monkeypatch) -> list[str]:
    loads = []
    real = clipworks.factory.create_model_and_transforms

    def counting(name, *args, **kwargs):
        loads.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(clipworks.factory, "create_model_and_transforms", counting)
    return loads


def test_every_cell_once_with_csv_md_plots_and_progress(env):
    root, base, out = env["root"], env["base"], env["out"]
    lines = [line for line in out.splitlines() if line.startswith("cell ")]
    assert len(lines) == 6 and [line.split(":")[0] for line in lines] == [f"cell {k}/6" for k in range(1, 7)]
    assert "× photos (zeroshot_classification): acc1 " in lines[0] and lines[0].endswith(" images/s")
    assert f"× coco:{root / 'captions.json'} (zeroshot_retrieval): mean recall@5 " in lines[1]
    assert len(list((base / "cells").glob("*.json"))) == 6 and any((base / "cache").iterdir())

    with open(base / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["dataset", "model", "pretrained", "task", *CLASSIFICATION_METRICS,
                                 *RETRIEVAL_METRICS, "language", "model_fullname", "precision"]  # fmt: skip
    assert len(rows) == 6
    assert [(r["model"], r["dataset"], r["task"]) for r in rows[:3]] == [
        (f"local-dir:{root / 'm0'}", "photos", "zeroshot_classification"),
        (f"local-dir:{root / 'm0'}", f"coco:{root / 'captions.json'}", "zeroshot_retrieval"),
        (f"local-dir:{root / 'm0'}", "vtab/cifar10", "zeroshot_classification")]  # fmt: skip
    photos = rows[0]
    assert photos["acc5"] == "" and photos["image_retrieval_recall@5"] == ""  # 3 classes: no top-5, as CLIP_benchmark
    assert 0 <= float(photos["acc1"]) <= 1 and photos["language"] == "en" and photos["pretrained"] == ""
    assert all(0 <= float(rows[1][m]) <= 1 for m in RETRIEVAL_METRICS if not m.endswith("@10"))
    assert rows[1]["image_retrieval_recall@10"] == ""  # 6 images: no recall@10, where CLIP_benchmark's topk fails
    assert rows[1]["model_fullname"] == f"local-dir:{root / 'm0'} "  # CLIP_benchmark's "model pretrained"

    md = (base / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    coco = f"coco:{root / 'captions.json'}"
    assert table[0] == f"| name | pretrained | Average perf. on 3 datasets | photos | {coco} | CIFAR-10 |"
    assert len(table) == 4 and {row.split(" | ")[0] for row in table[2:]} == {f"| local-dir:{root / m}" for m in
                                                                               ("m0", "m1")}  # fmt: skip
    averages = [float(row.split(" | ")[2]) for row in table[2:]]
    assert averages == sorted(averages, reverse=True)  # best first, as OpenCLIP's table
    assert {p.name for p in (base / "plots").iterdir()} == {"datasets.png", "datasets.svg"}


def test_results_csv_is_what_clip_benchmark_build_makes_of_the_cells(env, tmp_path):
    cb = pytest.importorskip("clip_benchmark.cli")
    import argparse

    built = tmp_path / "built.csv"
    cb.main_build(argparse.Namespace(files=[str(env["base"] / "cells")], output=str(built)))
    with open(built, newline="") as f:
        theirs = {(r["model"], r["dataset"]): r for r in csv.DictReader(f)}
    with open(env["base"] / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        ours = {(r["model"], r["dataset"]): r for r in reader}
    assert set(reader.fieldnames) == set(next(iter(theirs.values())))  # the same columns (theirs in set order)
    assert ours.keys() == theirs.keys()
    for key, row in ours.items():
        assert {k: v for k, v in row.items() if v} == {k: v for k, v in theirs[key].items() if v}, key


def test_a_rerun_computes_nothing_and_loads_no_model(env, tmp_path, monkeypatch):
    out = _copy(env, tmp_path)
    before, loads = _mtimes(out), _count_model_loads(monkeypatch)
    code, stdout, _ = _bench(env["root"], out)
    assert code == 0 and loads == [] and _mtimes(out) == before
    assert "0 cell(s) computed, 6 done before, 0 failed" in stdout
    assert (out / "results.csv").read_text() == (env["base"] / "results.csv").read_text()


def test_after_a_kill_only_the_missing_cell_is_computed(env, tmp_path, monkeypatch):
    out = _copy(env, tmp_path)
    lost = sorted((out / "cells").glob("*.json"))[0]
    record = json.loads(lost.read_text())
    lost.unlink()  # as if killed while computing it (cells are renamed into place only when complete)
    (out / "cells" / f".{lost.name}.tmp123").write_text('{"half": ')  # the killed run's partial temporary
    before, loads = _mtimes(out), _count_model_loads(monkeypatch)
    code, stdout, _ = _bench(env["root"], out)
    assert code == 0 and "1 cell(s) computed, 5 done before" in stdout
    assert loads == [record["model"]]  # only the model of the missing cell is loaded
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k != lost.name} == before
    assert json.loads(lost.read_text()) == record  # the same numbers; its image features came from the cache
    (line,) = [s for s in stdout.splitlines() if s.startswith("cell ")]
    assert line.endswith("image features from the cache")


def test_more_models_later_reuse_the_finished_cells(env, tmp_path, monkeypatch):
    out = tmp_path / "suite"
    code, stdout, _ = _bench(env["root"], out, models=f"local-dir:{env['root'] / 'm1'}", datasets="vtab/cifar10")
    assert code == 0 and "1 cell(s) computed" in stdout
    loads = _count_model_loads(monkeypatch)
    code, stdout, _ = _bench(env["root"], out, datasets="vtab/cifar10")
    assert code == 0 and "1 cell(s) computed, 1 done before" in stdout and loads == [f"local-dir:{env['root'] / 'm0'}"]


def test_another_precision_computes_its_own_cells_and_rows(env, tmp_path):
    out = _copy(env, tmp_path)
    before = _mtimes(out)
    code, stdout, err = _bench(env["root"], out, "--precision", "bf16", datasets="vtab/cifar10")
    assert code == 0, err
    assert "2 cell(s) computed, 0 done before" in stdout and " in bf16 × vtab/cifar10 " in stdout
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == len(before) + 2
    records = [json.loads((out / "cells" / name).read_text()) for name in after.keys() - before.keys()]
    assert {r["precision"] for r in records} == {"bf16"}
    assert {json.loads(p.read_text())["precision"] for p in (out / "cells").glob("*.json")} == {"fp32", "bf16"}
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| local-dir:")]
    assert len(rows) == 2 and all(" | [bf16] | " in row for row in rows)  # the fp32 rows are not in this run
    with open(out / "results.csv", newline="") as f:
        assert {r["precision"] for r in csv.DictReader(f)} == {"bf16"}
    code, stdout, _ = _bench(env["root"], out, "--precision", "bf16", datasets="vtab/cifar10")
    assert code == 0 and "0 cell(s) computed, 2 done before" in stdout


def test_list_prints_the_collections_and_what_is_found(env, capsys):
    assert main(["benchmark", "--list", "--dataset-root", str(env["root"] / "datasets")]) == 0
    out = capsys.readouterr().out
    for name, names in suite.collections().items():
        assert f"  {name} ({len(names)}): {', '.join(names)}" in out
    assert set(suite.collections()) == {"vtab", "vtab+", "retrieval", "imagenet_robustness"}
    assert "wds_vtab-cifar10 found" in out and "wds_vtab-caltech101 missing" in out
    assert "mscoco_captions" in out and "zeroshot_retrieval" in out


def test_an_unknown_dataset_is_one_line(env, tmp_path):
    code, out, err = _bench(env["root"], tmp_path / "s", datasets="vtab/cifar10,cifar11")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("clipworks benchmark: error: unknown dataset 'cifar11': ") and "--list" in err


def test_missing_data_says_what_to_fetch_and_can_be_skipped(env, tmp_path):
    code, out, err = _bench(env["root"], tmp_path / "s", datasets="vtab/cifar10,vtab/pets")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "no data for vtab/pets" in err and "hf-hub:clip-benchmark/wds_vtab-pets" in err
    assert f"{env['root'] / 'datasets' / 'wds_vtab-pets'}" in err and "--skip-missing" in err
    code, out, err = _bench(env["root"], tmp_path / "s", "--skip-missing", datasets="vtab/cifar10,vtab/pets")
    assert code == 0 and "2 cell(s) computed" in out and "skipped: no data for vtab/pets" in err


def test_presets_without_weights_need_random_init(env, tmp_path):
    code, _, err = _bench(env["root"], tmp_path / "s", models="ViT-B-32", datasets="vtab/cifar10")
    assert code == 2 and "--random-init" in err and not (tmp_path / "s").exists()


def test_datasets_and_models_resolve_as_clip_benchmark_names_them(env):
    root = env["root"]
    plan = suite.plan_datasets(["retrieval", "wds/vtab/cifar10", "vtab+"], root / "datasets")
    assert [d.name for d in plan.datasets] == ["vtab/cifar10"]
    assert [n for n, _ in plan.missing][:3] == ["mscoco_captions", "flickr8k", "flickr30k"]
    assert ("vtab/cifar100", "wds_vtab-cifar100") in plan.missing
    assert plan.unsupported == [] and ("voc2007_multilabel", "wds_voc2007_multilabel") in plan.missing
    assert plan.groups["vtab+"].count("vtab/cifar10") == 1 and plan.groups["datasets"] == ["vtab/cifar10"]
    with pytest.raises(ValueError, match="two datasets are named 'vtab/cifar10'"):
        suite.plan_datasets(["vtab/cifar10", f"vtab/cifar10=folder:{root / 'photos'}"], root / "datasets")
    assert suite.export_dir_name("cifar10") == "wds_vtab-cifar10"  # torchvision's CIFAR: the vtab export's images
    assert suite.spec_task(f"coco:{root / 'captions.json'}") == suite.RETRIEVAL
    assert suite.spec_task(f"folder:{root / 'photos'}") == suite.CLASSIFICATION
    for spec, model, pretrained in (("ViT-B-32:openai", "ViT-B-32", "openai"), ("local-dir:/a/b", "local-dir:/a/b", ""),
                                    ("ViT-B-32:/w/x.pt", "ViT-B-32", "/w/x.pt"), ("hf-hub:o/r", "hf-hub:o/r", "")):
        assert (suite.SuiteModel(spec).model, suite.SuiteModel(spec).pretrained) == (model, pretrained)


def test_a_broken_dataset_fails_its_cells_and_the_rest_run(env, tmp_path):
    broken = tmp_path / "broken"
    (broken / "cats").mkdir(parents=True)  # a class folder without images
    code, out, err = _bench(env["root"], tmp_path / "s", datasets=f"broken=folder:{broken},vtab/cifar10")
    assert code == 1 and err.strip().splitlines()[-1].startswith("clipworks benchmark: error: 2 of 4 cells failed")
    failed = [line for line in out.splitlines() if ": failed: " in line]
    assert len(failed) == 2 and all("× broken (zeroshot_classification): failed: " in line for line in failed)
    assert "holds no images" in failed[0] and "2 cell(s) computed, 0 done before, 2 failed" in out
    assert len((tmp_path / "s" / "results.csv").read_text().splitlines()) == 3  # header + the 2 finished cells
    code, out, err = _bench(env["root"], tmp_path / "s", datasets=f"gone=folder:{tmp_path / 'gone'}")
    assert code == 1 and out == "" and err.strip() == (f"clipworks benchmark: error: folder:{tmp_path / 'gone'}: no "
                                                       f"such file or folder {str(tmp_path / 'gone')!r}")  # fmt: skip
