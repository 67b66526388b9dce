"""`clipworks classify`, `score` and `eval ...` end to end on a tiny random model and small image sets."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from PIL import Image
from reference import tiny_config

import clipworks
from clipworks.cli import main

COLORS = {"red_thing": (220, 30, 30), "blue_thing": (30, 30, 220), "green_thing": (30, 200, 30)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A saved tiny model, class folders of 4 images each, and a CSV of them (+ one broken image)."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    clipworks.save_pretrained(clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-32"))), root / "model")
    rows = []
    for name, rgb in COLORS.items():
        (root / "folder" / name).mkdir(parents=True)
        for i in range(4):
            image = Image.new("RGB", (40, 40), rgb)
            image.paste((255, 255, 255), (4 * i, 4 * i, 4 * i + 8, 4 * i + 8))
            image.save(root / "folder" / name / f"{i}.png")
            label = name.replace("_", " ")
            rows.append({"filepath": f"folder/{name}/{i}.png", "label": label, "caption": f"a photo of a {label}",
                         "neg": f"a photo of a {'blue' if 'red' in name else 'red'} thing", "score": str(i)})  # fmt: skip
    (root / "broken.png").write_bytes(b"not an image")
    rows.append({"filepath": "broken.png", "label": "red thing", "caption": "a broken red thing",
                 "neg": "a broken blue thing", "score": "1"})  # fmt: skip
    _write_csv(root / "data.csv", rows)
    return root


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _eval(env, capsys, task, *argv):
    model = f"local-dir:{env / 'model'}"
    return _run(capsys, "eval", task, "--model", model, "--no-progress", "--cache-dir", env / "cache", *argv)


def test_classify_prints_top_classes_with_the_model_probabilities(env, capsys):
    from clipworks.data.decode import load_image
    from clipworks.train.zeroshot import build_classifier

    image = env / "folder" / "red_thing" / "0.png"
    code, out, _ = _run(capsys, "classify", "--model", f"local-dir:{env / 'model'}", "--labels", "cat, dog,car",
                        "--top", "2", "--templates", "simple", image)  # fmt: skip
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 3
    printed = {m.group(2): float(m.group(1)) / 100 for m in (re.match(r"\s*([\d.]+)%\s+(.+)", s) for s in lines[1:])}

    model, _, preprocess = clipworks.create_model_and_transforms(f"local-dir:{env / 'model'}")
    tok = clipworks.get_tokenizer(model)
    from clipworks.eval.prompts import load_templates

    with torch.no_grad():
        weights = build_classifier(model, tok, ["cat", "dog", "car"], load_templates("simple"))
        f = model.encode_image(preprocess(load_image(image))[None], normalize=True)
        probs = (model.logit_scale.exp() * f @ weights.t()).softmax(-1)[0]
    expected = dict(zip(["cat", "dog", "car"], probs.tolist()))
    assert set(printed) == set(sorted(expected, key=expected.get)[1:])  # the two most probable
    for name, p in printed.items():
        assert p == pytest.approx(expected[name], abs=6e-5)  # printed with two decimals of a percent


def test_classify_ranks_a_caption_bank(env, capsys, tmp_path):
    bank = tmp_path / "captions.txt"
    bank.write_text("a red square\n\na blue square\na green square\na cat\n")
    images = [env / "folder" / n / "1.png" for n in COLORS]
    code, out, _ = _run(capsys, "classify", "--model", f"local-dir:{env / 'model'}", "--captions", bank, "--top", "4",
                        *images)  # fmt: skip
    assert code == 0
    blocks = out.strip().split("\n" + str(env))
    assert len(blocks) == 3 and all(len(b.splitlines()) == 5 for b in blocks)  # image line + all 4 captions
    assert sorted(re.findall(r"%\s+(.+)", blocks[0])) == ["a blue square", "a cat", "a green square", "a red square"]


def _bad_images(folder) -> tuple:
    """A decompression bomb (a PNG header claiming 9000x9000 pixels over a few bytes of data) and a PNG cut short."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)
    bomb = folder / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))  # fmt: skip
    cut = folder / "cut.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return bomb, cut


def test_classify_skips_and_names_unreadable_images(env, capsys, tmp_path):
    good = [env / "folder" / n / "2.png" for n in COLORS]
    bomb, cut = _bad_images(tmp_path)
    model = ("--model", f"local-dir:{env / 'model'}", "--labels", "red,green,blue", "--templates", "photo")
    code, out, err = _run(capsys, "classify", *model, good[0], bomb, good[1], cut, good[2])
    assert code == 0
    blocks = re.split(r"\n(?=\S)", out.strip())  # one per image: its path, then indented lines
    assert [b.splitlines()[0] for b in blocks] == [str(p) for p in good]
    for path, block in zip(good, blocks):  # each good image gets the result it gets alone
        assert block == _run(capsys, "classify", *model, path)[1].strip()
    lines = err.strip().splitlines()
    assert len(lines) == 3 and lines[2] == "clipworks classify: 2 of 5 images unreadable (skipped); 3 done"
    assert lines[0].startswith(f"clipworks classify: skipped {bomb}: ") and "9000x9000" in lines[0]
    assert lines[1].startswith(f"clipworks classify: skipped {cut}: ") and "cannot read image" in lines[1]


def test_classify_and_score_fail_when_no_image_is_readable(env, capsys, tmp_path):
    bomb, cut = _bad_images(tmp_path)
    code, out, err = _run(capsys, "classify", "--model", f"local-dir:{env / 'model'}", "--captions", env / "data.csv",
                          bomb, cut)  # fmt: skip
    assert code == 1 and out == "" and f"skipped {bomb}" in err and f"skipped {cut}" in err  # a run-time failure
    assert err.strip().splitlines()[-1] == "clipworks classify: error: none of the 2 image(s) could be read"


def test_zeroshot_on_class_folders_writes_reports(env, capsys, tmp_path):
    code, out, _ = _eval(env, capsys, "zeroshot", "--data", f"folder:{env / 'folder'}", "--templates", "photo",
                         "--out", tmp_path / "zs")  # fmt: skip
    assert code == 0 and "12 images, 0 unreadable" in out
    result = json.loads((tmp_path / "zs" / "results.json").read_text())
    assert result["task"] == "zeroshot" and result["info"]["classes"] == 3
    assert result["metrics"]["top5"] is None  # 3 classes: top-5 is meaningless, not 100%
    assert 0.0 <= result["metrics"]["top1"] <= 1.0
    md = (tmp_path / "zs" / "results.md").read_text()
    assert "| metric | value |" in md and f"| top1 | {100 * result['metrics']['top1']:.2f}% |" in md
    with Image.open(tmp_path / "zs" / "confusion.png") as png:
        assert png.width > 100 and png.height > 100


def test_zeroshot_on_synthetic_shapes(env, capsys):
    code, out, _ = _eval(env, capsys, "zeroshot", "--data", "synthetic:shapes?size=10&image_size=32", "--templates",
                         "photo")  # fmt: skip
    assert code == 0 and "10 images, 0 unreadable" in out and re.search(r"^top5\s+[\d.]+%", out, re.M)


def test_model_identity_keys_the_cache(env, tmp_path):
    import shutil

    from clipworks.eval.embed import model_identity

    assert model_identity("ViT-B-32", None) is None  # random weights are never cached
    assert model_identity("ViT-B-32", "openai") == model_identity("ViT-B-32", "openai") != model_identity("ViT-B-32", "laion")
    shutil.copytree(env / "model", tmp_path / "m")
    first = model_identity(f"local-dir:{tmp_path / 'm'}", None)
    assert first is not None and first != model_identity(f"local-dir:{env / 'model'}", None)
    assert model_identity(f"local-dir:{tmp_path / 'm'}", None) == first
    with open(tmp_path / "m" / "model.safetensors", "ab") as f:  # new weights: a new identity
        f.write(b"\0")
    assert model_identity(f"local-dir:{tmp_path / 'm'}", None) != first


def test_zeroshot_on_a_csv_counts_unreadable_images(env, capsys, tmp_path):
    code, out, _ = _eval(env, capsys, "zeroshot", "--data", f"csv:{env / 'data.csv'}?label=label", "--templates",
                         "photo", "--out", tmp_path)  # fmt: skip
    assert code == 0 and "13 images, 1 unreadable (skipped)" in out
    assert json.loads((tmp_path / "results.json").read_text())["info"]["unreadable images skipped"] == 1


def test_retrieval_csv_and_coco_agree(env, capsys, tmp_path):
    rows = [r for r in csv.DictReader(open(env / "data.csv")) if r["filepath"] != "broken.png"]
    extra = [{**rows[0], "caption": "another caption of the first image"}]
    _write_csv(tmp_path / "pairs.csv", [{"filepath": str(env / r["filepath"]), "caption": r["caption"]}
                                        for r in rows + extra])  # fmt: skip
    paths = list(dict.fromkeys(r["filepath"] for r in rows))
    coco = {"images": [{"id": 100 + k, "file_name": p} for k, p in enumerate(paths)],
            "annotations": [{"image_id": 100 + paths.index(r["filepath"]), "caption": r["caption"]} for r in rows + extra]}  # fmt: skip
    Image.new("RGB", (16, 16)).save(tmp_path / "uncaptioned.png")  # listed without captions: left out
    coco["images"].append({"id": 7, "file_name": str(tmp_path / "uncaptioned.png")})
    (tmp_path / "captions.json").write_text(json.dumps(coco))

    code, out_csv, _ = _eval(env, capsys, "retrieval", "--data", f"csv:{tmp_path / 'pairs.csv'}", "--out", tmp_path / "a")
    assert code == 0
    code, out_coco, _ = _eval(env, capsys, "retrieval", "--data", f"coco:{tmp_path / 'captions.json'}", "--images",
                              env, "--out", tmp_path / "b")  # fmt: skip
    assert code == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["metrics"] for d in "ab")
    assert a == b and a["captions"] == 13 and set(a) >= {"text_to_image@1", "image_to_text@10"}
    assert a["text_to_image@10"] >= a["text_to_image@5"] >= a["text_to_image@1"]
    with Image.open(tmp_path / "a" / "retrieval.png") as png:
        assert png.height > 8 * 96  # eight query rows


def test_compositional_synthetic_and_csv(env, capsys):
    code, out, _ = _eval(env, capsys, "compositional", "--data", "synthetic:shapes?size=6&image_size=32")
    assert code == 0 and "6 images" in out
    assert {"accuracy", "accuracy_color", "accuracy_relation", "chance"} <= set(re.findall(r"^(\w+)\s", out, re.M))
    code, out, _ = _eval(env, capsys, "compositional", "--data", f"csv:{env / 'data.csv'}?negatives=neg")
    assert code == 0 and "1 unreadable" in out and re.search(r"chance\s+50.00%", out)


def test_linear_probe_and_clipscore(env, capsys):
    code, out, _ = _eval(env, capsys, "linear-probe", "--data", f"csv:{env / 'data.csv'}", "--test-data",
                         f"folder:{env / 'folder'}", "--l2", "0.001", "0.1")  # fmt: skip
    assert code == 0 and re.search(r"^top1\s+[\d.]+%", out, re.M) and "val_top1@l2=0.001" in out
    code, out, _ = _eval(env, capsys, "clipscore", "--data", f"csv:{env / 'data.csv'}")
    assert code == 0 and re.search(r"^pairs\s+12$", out, re.M)


def test_fit_score_then_score(env, capsys, tmp_path):
    head = tmp_path / "head.safetensors"
    code, out, _ = _eval(env, capsys, "fit-score", "--data", f"csv:{env / 'data.csv'}?score=score", "--out", head,
                         "--hidden", "8", "--epochs", "20")  # fmt: skip
    assert code == 0 and "12 images (1 unreadable" in out and head.is_file()
    images = [env / "folder" / "red_thing" / "0.png", env / "folder" / "blue_thing" / "3.png"]
    code, out, _ = _run(capsys, "score", "--head", head, *images)
    assert code == 0
    printed = [float(line.split()[0]) for line in out.strip().splitlines()]

    from clipworks.eval.classify import encode_image_files
    from clipworks.eval.scoring import load_head

    loaded = load_head(head)
    model, _, preprocess = clipworks.create_model_and_transforms(loaded.model)
    expected = loaded.head(encode_image_files(model, preprocess, images).features).tolist()
    assert printed == pytest.approx(expected, abs=1e-4)
    bomb, cut = _bad_images(tmp_path)
    code, out, err = _run(capsys, "score", "--head", head, bomb, images[0], cut, images[1])
    assert code == 0 and [line.split()[1] for line in out.strip().splitlines()] == [str(p) for p in images]
    assert [float(line.split()[0]) for line in out.strip().splitlines()] == printed
    assert f"skipped {bomb}" in err and f"skipped {cut}" in err and "2 of 4 images unreadable" in err
    code, out, err = _run(capsys, "score", "--head", head, bomb)
    assert code == 1 and out == "" and "none of the 1 image(s) could be read" in err


def test_features_are_cached_by_model_and_data(env, capsys, tmp_path):
    data = tmp_path / "folder"
    for name in ("red_thing", "blue_thing"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), COLORS[name]).save(data / name / "a.png")
    args = ("--data", f"folder:{data}", "--templates", "photo", "--cache-dir", tmp_path / "cache")
    model = f"local-dir:{env / 'model'}"
    first = _run(capsys, "eval", "zeroshot", "--model", model, "--no-progress", *args)[1]
    second = _run(capsys, "eval", "zeroshot", "--model", model, "--no-progress", *args)[1]
    assert "embedded 2 images and 2 texts, 0 feature set(s) read from the cache" in first
    assert "embedded 0 images and 0 texts, 2 feature set(s) read from the cache" in second
    assert first.splitlines()[1:] == second.splitlines()[1:]  # same metrics
    Image.new("RGB", (24, 20), (9, 9, 9)).save(data / "red_thing" / "a.png")  # the data changed
    assert "embedded 2 images and 0 texts" in _run(capsys, "eval", "zeroshot", "--model", model, "--no-progress", *args)[1]
    uncached = _run(capsys, "eval", "zeroshot", "--model", model, "--no-progress", "--no-cache", *args)[1]
    assert "embedded 2 images and 2 texts, 0 feature set(s)" in uncached
    # --int8 features are not the fp32 ones: cached apart, never read for the other
    int8 = [_run(capsys, "eval", "zeroshot", "--model", model, "--no-progress", "--int8", *args)[1] for _ in range(2)]
    assert "embedded 2 images and 2 texts, 0 feature set(s) read from the cache" in int8[0]
    assert "embedded 0 images and 0 texts, 2 feature set(s) read from the cache" in int8[1]
    assert "2 feature set(s) read from the cache" in _run(capsys, "eval", "zeroshot", "--model", model,
                                                            "--no-progress", *args)[1]  # fmt: skip


@pytest.mark.parametrize("argv, message, status", [
    (("eval", "zeroshot", "--data", "folder:/no/such/dir"), "data folder not found: '/no/such/dir'", 1),
    (("eval", "retrieval", "--data", "csv:{root}/data.csv?caption=text"), "missing column(s) 'text'", 2),
    (("eval", "zeroshot", "--data", "csv:{root}/data.csv?label=klass"), "missing column(s) 'klass'", 2),
    (("eval", "zeroshot", "--data", "parquet:x"), "SCHEME one of folder, csv, tsv", 2),
    (("eval", "compositional", "--data", "csv:{root}/data.csv"), "?negatives=COL1,COL2", 2),
    (("classify", "--labels", "cat,dog,cat", "x.png"), "duplicate class names ['cat']", 2),
    (("classify", "--labels", "cat,,dog", "x.png"), "non-empty class names", 2),
    (("classify", "--labels", "cat,dog", "/no/such.png"), "cannot read image '/no/such.png'", 1),
    (("eval", "retrieval", "--data", "coco:{root}/data.csv"), "not a COCO caption file", 2),
])  # fmt: skip
def test_bad_input_gives_a_clear_error(env, capsys, argv, message, status):
    """Exit status 2 for input that cannot work, 1 for files that cannot be read."""
    argv = [a.format(root=env) for a in argv]
    code, _, err = _run(capsys, *argv, "--model", f"local-dir:{env / 'model'}")
    assert code == status and message in err


def test_empty_class_folder_is_named(env, capsys, tmp_path):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "notes.txt").write_text("no images here")
    code, _, err = _eval(env, capsys, "zeroshot", "--data", f"folder:{tmp_path}")
    assert code == 2 and "class folder 'dogs' holds no images" in err
