"""More dataset adapters read miniatures written in each published set's exact on-disk layout: Karpathy's caption
splits (Flickr8k, Flickr30k, COCO), STL-10's binary files, SugarCrepe's JSON files and Winoground's examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipworks.cli import main
from clipworks.eval.sources import load_captioned, load_classification, load_paired, load_with_negatives


def _image(path, rgb, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)


def _assert_one_line_errors(load, cases) -> None:
    """Each (spec, error class, message pattern) of `cases` raises that error from `load`, in one line."""
    for spec, error, message in cases:
        with pytest.raises(error, match=message) as info:
            load(spec)
        assert "\n" not in str(info.value)


# --- Karpathy's splits ------------------------------------------------------------------------------------------


def _karpathy(root, entries, name="dataset_flickr30k.json", dataset="flickr30k"):
    """Karpathy's file: (filename, split, captions[, filepath]) per image, with his other fields beside them."""
    images, sent = [], 0
    for k, (filename, split, captions, *filepath) in enumerate(entries):
        sentences = [{"tokens": c.lower().split(), "raw": c, "imgid": k, "sentid": sent + j}
                     for j, c in enumerate(captions)]  # fmt: skip
        image = {"sentids": list(range(sent, sent + len(captions))), "imgid": k, "sentences": sentences,
                 "split": split, "filename": filename}  # fmt: skip
        if filepath:
            image.update(filepath=filepath[0], cocoid=k)
        images.append(image)
        sent += len(captions)
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps({"images": images, "dataset": dataset}))
    return root / name


def _flickr30k(root):
    """Three test images with five captions each (the third with only four), one val and one train image."""
    entries = [(f"{1000 + k}.jpg", "test", [f"picture {k} caption {j}" for j in range(5 - (k == 2))])
               for k in range(3)]  # fmt: skip
    entries += [("2000.jpg", "val", ["a val caption"]), ("3000.jpg", "train", ["a train caption"])]
    for k, (filename, *_) in enumerate(entries):
        _image(root / "flickr30k-images" / filename, (60 * k, 255 - 50 * k, 30))
    return _karpathy(root, entries)


def test_karpathy_flickr30k_test_split(tmp_path):
    file = _flickr30k(tmp_path)
    data = load_captioned(f"karpathy:{file}?images={tmp_path / 'flickr30k-images'}")
    assert len(data.images) == 3 and len(data.captions) == 14
    assert data.caption_image == [0] * 5 + [1] * 5 + [2] * 4
    assert data.captions[:2] == ["picture 0 caption 0", "picture 0 caption 1"]
    assert data.images.name(2).endswith("flickr30k-images/1002.jpg")
    val = load_captioned(f"karpathy:{file}?images={tmp_path / 'flickr30k-images'}&split=val")
    assert val.captions == ["a val caption"] and val.images.name(0).endswith("2000.jpg")
    # --images names the folder as it does for coco:
    assert load_captioned(f"karpathy:{file}", str(tmp_path / "flickr30k-images")).captions == data.captions


def test_karpathy_coco_reads_each_images_filepath_folder(tmp_path):
    entries = [("COCO_val2014_000000000042.jpg", "test", ["a dog"] * 5, "val2014"),
               ("COCO_val2014_000000000073.jpg", "restval", ["a cat"] * 5, "val2014"),
               ("COCO_train2014_000000000009.jpg", "train", ["a bus"] * 5, "train2014")]  # fmt: skip
    for k, (filename, _, _, folder) in enumerate(entries):
        _image(tmp_path / "coco" / folder / filename, (90 * k, 40, 40))
    file = _karpathy(tmp_path / "caption_datasets", entries, "dataset_coco.json", "coco")
    data = load_captioned(f"karpathy:{file}?images={tmp_path / 'coco'}")
    assert data.captions == ["a dog"] * 5 and data.images.name(0).endswith("val2014/COCO_val2014_000000000042.jpg")
    rest = load_captioned(f"karpathy:{file}?images={tmp_path / 'coco'}&split=restval")
    assert rest.images.name(0).endswith("val2014/COCO_val2014_000000000073.jpg")


def test_karpathy_errors_are_one_line(tmp_path):
    file = _flickr30k(tmp_path)
    images = tmp_path / "flickr30k-images"
    cases = [
        (f"karpathy:{tmp_path / 'dataset_flickr8k.json'}", FileNotFoundError, "caption file not found"),
        (f"karpathy:{file}?images={tmp_path / 'nowhere'}", FileNotFoundError, "image folder not found"),
        (f"karpathy:{file}", FileNotFoundError, r"no image .*1000\.jpg; name the folder .* \?images=DIR"),
        (f"karpathy:{file}?images={images}&split=dev", ValueError, r"\?split=dev: choose train, restval, val, test"),
        (f"karpathy:{file}?images={images}&split=restval", ValueError, r"no 'restval' images \(splits found: test, "
                                                                       r"train, val\)"),
    ]  # fmt: skip
    (tmp_path / "broken.json").write_text(json.dumps({"images": [{"filename": "1000.jpg", "split": "test"}]}))
    cases.append((f"karpathy:{tmp_path / 'broken.json'}", ValueError, "not a Karpathy split file .*KeyError"))
    for spec, error, message in cases:
        with pytest.raises(error, match=message) as info:
            load_captioned(spec)
        assert "\n" not in str(info.value)


def test_retrieval_end_to_end_on_karpathy_layout(tmp_path, model_dir):
    file = _flickr30k(tmp_path)
    code = main(["eval", "retrieval", "--model", f"local-dir:{model_dir}", "--data", f"karpathy:{file}",
                 "--images", str(tmp_path / "flickr30k-images"), "--no-cache", "--quiet", "--out",
                 str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    assert metrics["captions"] == 14 and metrics["image_to_text@1"] <= metrics["image_to_text@5"] <= 1
    assert metrics["text_to_image@5"] is None  # 3 images: k = 5 exceeds the candidates, as in CLIP_benchmark
    assert (tmp_path / "out" / "retrieval.png").is_file()


# --- STL-10 -----------------------------------------------------------------------------------------------------

STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _stl10(root, images, labels, split="test"):
    """(N, 96, 96, 3) images written as STL-10 stores them: each colour plane column by column."""
    root.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tofile(root / f"{split}_X.bin")  # (N, 3, W, H)
    np.asarray(labels, dtype=np.uint8).tofile(root / f"{split}_y.bin")
    (root / "class_names.txt").write_text("\n".join(STL10_NAMES) + "\n")


def test_stl10_binary_orientation_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    images[0] = 0
    images[0, :10, :, 0] = 255  # a red band along the top
    images[0, :, :5, 2] = 255  # a blue band down the left side
    _stl10(tmp_path / "stl10_binary", images, [1, 10, 4])
    data = load_classification(f"stl10:{tmp_path}")  # the folder holding stl10_binary/
    assert data.class_names == STL10_NAMES and data.labels == [0, 9, 3]
    assert data.templates == ["a photo of a {}.", "a photo of the {}."]
    first = np.asarray(data.images.load(0))
    assert first[0, 50].tolist() == [255, 0, 0] and first[50, 0].tolist() == [0, 0, 255]  # not transposed
    assert all((np.asarray(data.images.load(i)) == images[i]).all() for i in range(3))
    assert data.images.name(1) == "stl10/test/1"


def test_stl10_errors(tmp_path):
    root = tmp_path / "stl10_binary"
    _stl10(root, np.zeros((2, 96, 96, 3), np.uint8), [1, 11])
    with pytest.raises(ValueError, match=r"labels in test_y.bin must be 1..10 .* found 1..11"):
        load_classification(f"stl10:{root}")
    with pytest.raises(FileNotFoundError, match=r"no train_X.bin, train_y.bin in .*stl10_binary"):
        load_classification(f"stl10:{root}?split=train")
    with pytest.raises(ValueError, match=r"\?split=unlabeled: choose test or train"):
        load_classification(f"stl10:{root}?split=unlabeled")
    (root / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match="not whole 27648-byte images"):
        load_classification(f"stl10:{root}")
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        load_classification(f"stl10:{tmp_path / 'nowhere'}")


# --- SugarCrepe -------------------------------------------------------------------------------------------------


def _sugarcrepe(root, files):
    """SugarCrepe's files, {kind: [(filename, caption, negative), ...]}, over a val2017 image folder."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for kind, rows in files.items():
        table = {str(i): {"filename": f, "caption": c, "negative_caption": n} for i, (f, c, n) in enumerate(rows)}
        (root / "data" / f"{kind}.json").write_text(json.dumps(table))
        for f, *_ in rows:
            _image(root / "val2017" / f, (len(f) * 9 % 256, 120, 60))


SUGARCREPE = {
    "swap_att": [("000000000139.jpg", "a white dog and a black cat", "a black dog and a white cat")],
    "add_att": [("000000000139.jpg", "a dog on a sofa", "a dog on a red sofa"),
                ("000000000285.jpg", "a bear in the grass", "a bear in the tall grass")],
}  # fmt: skip


def test_sugarcrepe_one_negative_per_entry_and_kind_per_file(tmp_path):
    _sugarcrepe(tmp_path, SUGARCREPE)
    data = load_with_negatives(f"sugarcrepe:{tmp_path / 'data'}?images={tmp_path / 'val2017'}")
    assert data.kinds == ["add_att", "swap_att"]  # the files in name order
    assert data.captions == ["a dog on a sofa", "a bear in the grass", "a white dog and a black cat"]
    assert data.negatives == [["a dog on a red sofa", ""], ["a bear in the tall grass", ""],
                              ["", "a black dog and a white cat"]]  # fmt: skip
    assert [data.images.name(i).rsplit("/", 1)[-1] for i in range(3)] == ["000000000139.jpg", "000000000285.jpg",
                                                                          "000000000139.jpg"]  # fmt: skip
    one = load_with_negatives(f"sugarcrepe:{tmp_path / 'data' / 'swap_att.json'}?images={tmp_path / 'val2017'}")
    assert one.kinds == ["swap_att"] and one.negatives == [["a black dog and a white cat"]]


def test_sugarcrepe_errors_are_one_line(tmp_path):
    _sugarcrepe(tmp_path, SUGARCREPE)
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.json").write_text(json.dumps({"0": {"filename": "a.jpg", "caption": "a"}}))
    cases = [
        (f"sugarcrepe:{tmp_path / 'none'}", FileNotFoundError, "data path not found"),
        (f"sugarcrepe:{tmp_path / 'empty'}", ValueError, r"no \.json files"),
        (f"sugarcrepe:{tmp_path / 'data'}", FileNotFoundError, r"no image .*000000000139.jpg; name COCO's val2017"),
        (f"sugarcrepe:{tmp_path / 'data'}?images={tmp_path / 'v'}", FileNotFoundError, "image folder not found"),
        (f"sugarcrepe:{tmp_path / 'other.json'}", ValueError, "other.json is not a SugarCrepe file .*negative_caption"),
    ]  # fmt: skip
    _assert_one_line_errors(load_with_negatives, cases)


def test_compositional_end_to_end_on_sugarcrepe_layout(tmp_path, model_dir, capsys):
    _sugarcrepe(tmp_path, SUGARCREPE)
    code = main(["eval", "compositional", "--model", f"local-dir:{model_dir}", "--data",
                 f"sugarcrepe:{tmp_path / 'data'}?images={tmp_path / 'val2017'}", "--no-cache", "--quiet", "--out",
                 str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    assert {"accuracy", "accuracy_add_att", "accuracy_swap_att"} <= set(metrics) and metrics["chance"] == 0.5


# --- Winoground -------------------------------------------------------------------------------------------------


def _winoground(root, examples=3):
    """facebook/winoground's data/examples.jsonl and data/images/ex_{n}_img_{k}.png."""
    lines = []
    for n in range(examples):
        lines.append(json.dumps({"id": n, "caption_0": f"a mug in some grass {n}",
                                 "caption_1": f"some grass in a mug {n}",
                                 "image_0": f"ex_{n}_img_0", "image_1": f"ex_{n}_img_1", "tag": "Noun",
                                 "secondary_tag": "", "num_main_preds": 1,
                                 "collapsed_tag": "Object" if n % 2 else "Relation"}))  # fmt: skip
        for k in range(2):
            _image(root / "data" / "images" / f"ex_{n}_img_{k}.png", (80 * n % 256, 200 * k, 90))
    (root / "data" / "examples.jsonl").write_text("\n".join(lines) + "\n")


def test_winoground_scores_count_each_direction_and_ties_as_wrong():
    from clipworks.eval.metrics import winoground_scores

    scores = torch.tensor([[[0.9, 0.1], [0.2, 0.8]],  # all right
                           [[0.9, 0.95], [0.2, 0.99]],  # text right (0.9 > 0.2, 0.99 > 0.95), image wrong (0.9 < 0.95)
                           [[0.5, 0.1], [0.6, 0.7]],  # image right (0.5 > 0.1, 0.7 > 0.6), text wrong (0.5 < 0.6)
                           [[0.5, 0.5], [0.5, 0.5]]])  # ties: wrong every way  # fmt: skip
    assert winoground_scores(scores) == {"text_score": 0.5, "image_score": 0.5, "group_score": 0.25}


def test_winoground_layout_and_errors(tmp_path):
    _winoground(tmp_path)
    data = load_paired(f"winoground:{tmp_path}")  # the folder holding data/
    assert len(data.images) == 6 and data.tags == ["Relation", "Object", "Relation"]
    assert data.captions[:2] == ["a mug in some grass 0", "some grass in a mug 0"]
    assert data.images.name(3).endswith("data/images/ex_1_img_1.png")
    assert load_paired(f"winoground:{tmp_path / 'data'}").captions == data.captions
    (tmp_path / "bad" / "images").mkdir(parents=True)
    (tmp_path / "bad" / "examples.jsonl").write_text('{"caption_0": "a"}\n')
    cases = [
        (f"winoground:{tmp_path / 'none'}", FileNotFoundError, "data folder not found"),
        (f"winoground:{tmp_path}?images={tmp_path / 'zip'}", FileNotFoundError,
         r"image folder not found: .*zip' \(extract data/images\.zip"),
        (f"winoground:{tmp_path}?images={tmp_path / 'bad' / 'images'}", FileNotFoundError, r"no image ex_0_img_0\.png"),
        (f"winoground:{tmp_path / 'bad'}", ValueError, "examples.jsonl line 1: not a Winoground example .*KeyError"),
    ]  # fmt: skip
    _assert_one_line_errors(load_paired, cases)


def test_compositional_end_to_end_on_winoground_layout(tmp_path, model_dir, capsys):
    _winoground(tmp_path)
    code = main(["eval", "compositional", "--model", f"local-dir:{model_dir}", "--data", f"winoground:{tmp_path}",
                 "--no-cache", "--quiet", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    assert metrics["examples"] == 3 and metrics["group_score"] <= min(metrics["text_score"], metrics["image_score"])
    assert {"text_score_Object", "image_score_Relation", "group_score_Object"} <= set(metrics)
