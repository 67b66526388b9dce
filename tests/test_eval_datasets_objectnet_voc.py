"""ObjectNet and PASCAL VOC 2007 adapters read miniatures in the sets' exact on-disk layouts as CLIP_benchmark's own
dataset classes do (same samples, labels, class names and pixels), and the multi-label mAP equals its metric."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clipworks.eval.metrics import average_precision, multilabel_metrics
from clipworks.eval.prompts import load_templates
from clipworks.eval.sources import load_classification, load_multilabel

# --- ObjectNet --------------------------------------------------------------------------------------------------------

# folder -> ObjectNet label; "air_freshener" maps to no ImageNet class, so it is no class. Classes are ordered by
# folder (banana before mug) where the labels sort the other way ("Drinking Cup" before "Plantain"), and named by
# the lower-cased label, not the folder; "Alarm clock" maps to two ImageNet classes, joined by "; ".
FOLDERS = {"tv": "TV", "alarm_clock": "Alarm clock", "air_freshener": "Air freshener", "banana": "Plantain",
           "mug": "Drinking Cup"}  # fmt: skip
TO_IMAGENET = {"Plantain": "banana", "Alarm clock": "analog clock; digital clock",
               "TV": "television, television system", "Drinking Cup": "coffee mug"}  # fmt: skip
IMAGENET_LINES = ["digital clock", "banana", "coffee mug", "analog clock", "television, television system", "tench"]


def _objectnet(root, copy_mappings=True):
    """objectnet-1.0 as unzipped, with the mapping files also copied beside it (CLIP_benchmark's builder)."""
    base = root / "objectnet-1.0"
    rng = np.random.default_rng(0)
    for k, folder in enumerate(sorted(FOLDERS)):
        for i in range(2 + k % 2):
            pixels = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
            pixels[[0, -1], :], pixels[:, [0, -1]] = (255, 0, 0), (255, 0, 0)  # ObjectNet's 1-pixel red border
            path = base / "images" / folder / f"{i:032x}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    maps = base / "mappings"
    maps.mkdir(parents=True)
    (maps / "folder_to_objectnet_label.json").write_text(json.dumps(FOLDERS, indent=4))
    (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps(TO_IMAGENET, indent=4))
    # PyTorch class index -> line of imagenet_to_label_2012_v2 (a permutation, as in the real file)
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): (i + 2) % 6 for i in range(6)}))
    (maps / "imagenet_to_label_2012_v2").write_text("".join(f"{n}\n" for n in IMAGENET_LINES))
    if copy_mappings:
        for f in maps.iterdir():
            shutil.copy(f, root / f.name)
    return root


def test_objectnet_equals_clip_benchmark(tmp_path):
    from clip_benchmark.datasets.objectnet import ObjectNetDataset

    root = _objectnet(tmp_path / "objectnet")
    data = load_classification(f"objectnet:{root}")
    ref = ObjectNetDataset(root=str(root), transform=None)
    assert data.class_names == ref.classes == ["alarm clock", "plantain", "drinking cup", "tv"]
    assert [str(p) for p in data.images.paths] == [p for p, _ in ref.samples]
    assert data.labels == [ref[i][1] for i in range(len(ref))] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert not any("air_freshener" in str(p) for p in data.images.paths)
    for i in range(len(ref)):  # whole images: the 1-pixel red border stays, as CLIP_benchmark keeps it
        assert np.array_equal(np.asarray(data.images.load(i)), np.asarray(ref[i][0]))
    assert np.asarray(data.images.load(0))[0, 0].tolist() == [255, 0, 0]
    assert data.templates == load_templates("imagenet") and len(data.templates) == 80


def test_objectnet_finds_mappings_in_the_zip_layout_and_from_objectnet_folder(tmp_path):
    root = _objectnet(tmp_path / "on", copy_mappings=False)
    expected = load_classification(f"objectnet:{_objectnet(tmp_path / 'copied')}")
    for spec in (f"objectnet:{root}", f"objectnet:{root / 'objectnet-1.0'}"):
        data = load_classification(spec)
        assert data.class_names == expected.class_names and data.labels == expected.labels


def test_objectnet_errors_are_one_line(tmp_path):
    root = _objectnet(tmp_path / "on", copy_mappings=False)
    (root / "objectnet-1.0" / "mappings" / "imagenet_to_label_2012_v2").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mapping file imagenet_to_label_2012_v2 in .*mappings") as e:
        load_classification(f"objectnet:{root}")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"no objectnet-1.0/images/") as e:
        load_classification(f"objectnet:{tmp_path}")
    assert "\n" not in str(e.value)
    bad = _objectnet(tmp_path / "bad")
    (bad / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Plantain": "banana; plantain"}))
    with pytest.raises(ValueError, match=r"maps 'Plantain' to 'plantain', which is not a line of") as e:
        load_classification(f"objectnet:{bad}")
    assert "\n" not in str(e.value)
    (bad / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Toaster": "banana"}))
    with pytest.raises(ValueError, match=r"maps 'Toaster', which no folder"):
        load_classification(f"objectnet:{bad}")
    with pytest.raises(ValueError, match=r"'objectnet' takes: none"):
        load_classification(f"objectnet:{bad}?split=test")


# --- PASCAL VOC 2007 --------------------------------------------------------------------------------------------------

_OBJECT = """	<object>
		<name>{name}</name>
		<pose>Left</pose>
		<truncated>{truncated}</truncated>
		<difficult>{difficult}</difficult>
		<bndbox>
			<xmin>{box[0]}</xmin>
			<ymin>{box[1]}</ymin>
			<xmax>{box[2]}</xmax>
			<ymax>{box[3]}</ymax>
		</bndbox>{part}
	</object>
"""
_PART = """
		<part>
			<name>head</name>
			<bndbox>
				<xmin>2</xmin>
				<ymin>2</ymin>
				<xmax>6</xmax>
				<ymax>6</ymax>
			</bndbox>
		</part>"""
# image id -> (split, objects as (name, box, truncated, difficult)); boxes are VOC's 1-based pixel coordinates
VOC = {
    "000001": ("test", [("dog", (5, 10, 40, 47), 1, 0), ("person", (1, 1, 20, 30), 0, 0)]),
    "000002": ("train", [("train", (3, 4, 60, 40), 0, 0)]),
    "000004": ("test", [("car", (10, 12, 64, 48), 1, 0), ("car", (2, 3, 9, 11), 0, 1),
                        ("tvmonitor", (7, 8, 30, 33), 0, 0)]),
    "000006": ("test", [("pottedplant", (20, 5, 31, 22), 0, 1)]),  # only a difficult object
    "000008": ("train", [("diningtable", (1, 1, 64, 48), 0, 0), ("chair", (30, 20, 50, 47), 1, 1)]),
}


def _annotation(image_id, objects):
    body = "".join(_OBJECT.format(name=n, box=b, truncated=t, difficult=d, part=_PART if n == "person" else "")
                   for n, b, t, d in objects)  # fmt: skip
    return (f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{image_id}.jpg</filename>\n\t<source>\n"
            "\t\t<database>The VOC2007 Database</database>\n\t</source>\n\t<size>\n\t\t<width>64</width>\n"
            "\t\t<height>48</height>\n\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
            f"{body}</annotation>\n")  # fmt: skip


def _voc(root):
    """VOCdevkit/VOC2007 as the VOC 2007 trainval and test tars extract; returns the folder holding VOCdevkit."""
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for image_id, (_, objects) in VOC.items():
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        (voc / "Annotations" / f"{image_id}.xml").write_text(_annotation(image_id, objects))
    for split in ("train", "test"):
        for cls in ("aeroplane", "car", "pottedplant"):  # <class>_<split>.txt: 1 present, 0 only difficult, -1 absent
            rows = []
            for image_id, (s, objects) in VOC.items():
                if s == split:
                    kinds = [d for n, _, _, d in objects if n == cls]
                    rows.append(f"{image_id} {-1 if not kinds else 0 if all(kinds) else 1:2d}\n")
            (voc / "ImageSets" / "Main" / f"{cls}_{split}.txt").write_text("".join(rows))
    return root


@pytest.mark.parametrize("split", ["test", "train"])
def test_voc2007_crops_equal_clip_benchmark(tmp_path, split):
    from clip_benchmark.datasets.voc2007 import PASCALVoc2007Cropped

    root = _voc(tmp_path / "voc")
    data = load_classification(f"voc2007:{root}?split={split}")
    ref = PASCALVoc2007Cropped(root=str(root), set=split, transform=None)
    assert data.class_names == list(ref.classes) and len(data.class_names) == 20
    assert len(data.images) == len(ref) == sum(len(o) for s, o in VOC.values() if s == split)  # difficult included
    for i in range(len(ref)):
        image, label = ref[i]
        assert data.labels[i] == label
        assert np.array_equal(np.asarray(data.images.load(i)), np.asarray(image))
    assert data.templates == ["a photo of a {}."]
    if split == "test":  # (5, 10, 40, 47) crops to 35 x 37 pixels starting at 0-based (5, 10)
        assert data.images.boxes[0] == (5, 10, 40, 47) and data.images.load(0).size == (35, 37)
        assert [data.class_names[k] for k in data.labels] == ["dog", "person", "car", "car", "tvmonitor", "pottedplant"]


@pytest.mark.parametrize("split", ["test", "train"])
def test_voc2007_multilabel_equals_clip_benchmark(tmp_path, split):
    from clip_benchmark.datasets.voc2007 import PASCALVoc2007

    root = _voc(tmp_path / "voc")
    data = load_multilabel(f"voc2007-multilabel:{root}?split={split}")
    ref = PASCALVoc2007(root=str(root), set=split, transform=None)
    assert data.class_names == list(ref.classes)
    assert data.labels.dtype == torch.bool and torch.equal(data.labels, ref.labels.bool())
    for i in range(len(ref)):
        assert np.array_equal(np.asarray(data.images.load(i)), np.asarray(ref[i][0]))
    if split == "test":  # an image with only a difficult pottedplant counts as showing one
        assert [data.class_names[k] for k in data.labels[2].nonzero().squeeze(1)] == ["pottedplant"]


def test_voc2007_accepts_vocdevkit_and_voc2007_folders(tmp_path):
    root = _voc(tmp_path / "voc")
    expected = load_classification(f"voc2007:{root}")
    for folder in (root / "VOCdevkit", root / "VOCdevkit" / "VOC2007"):
        data = load_classification(f"voc2007:{folder}")
        assert data.labels == expected.labels and data.images.boxes == expected.images.boxes
        assert torch.equal(load_multilabel(f"voc2007-multilabel:{folder}").labels,
                           load_multilabel(f"voc2007-multilabel:{root}").labels)  # fmt: skip


def test_voc2007_errors_are_one_line(tmp_path):
    root = _voc(tmp_path / "voc")
    voc = root / "VOCdevkit" / "VOC2007"
    cases = [(f"voc2007:{root}?split=val", ValueError, r"\?split=val: choose test or train"),
             (f"voc2007:{tmp_path}", ValueError, r"no VOC2007/Annotations and VOC2007/ImageSets/Main"),
             (f"voc2007-multilabel:{root}?splt=test", ValueError, r"'voc2007-multilabel' takes: split=")]  # fmt: skip
    for spec, kind, message in cases:
        with pytest.raises(kind, match=message) as e:
            (load_multilabel if "multilabel" in spec else load_classification)(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"SCHEME one of voc2007-multilabel"):
        load_multilabel(f"voc2007:{root}")
    xml = voc / "Annotations" / "000004.xml"
    xml.write_text('<?xml version="1.0"?>\n<!DOCTYPE a [<!ENTITY e "car">]>\n' + xml.read_text())
    with pytest.raises(ValueError, match=r"000004.xml: refusing an annotation with a DTD") as e:
        load_classification(f"voc2007:{root}")
    assert "\n" not in str(e.value)
    xml.write_text(_annotation("000004", [("horse", (1, 2, 3, 4), 0, 0)]).replace("horse", "zebra"))
    with pytest.raises(ValueError, match=r"object name 'zebra'; VOC's classes are aeroplane, bicycle") as e:
        load_multilabel(f"voc2007-multilabel:{root}")
    assert "\n" not in str(e.value)
    xml.write_text(_annotation("000004", [("horse", (1, 2, "3.5", 4), 0, 0)]))
    with pytest.raises(ValueError, match=r"'horse' object without an integer <bndbox>"):
        load_classification(f"voc2007:{root}")
    (voc / "ImageSets" / "Main" / "aeroplane_train.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no .*aeroplane_train.txt \(\?split=train lists its images"):
        load_classification(f"voc2007:{root}?split=train")


# --- multi-label mean average precision ---------------------------------------------------------------------------


def test_multilabel_map_equals_clip_benchmark_with_ties():
    from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class

    g = torch.Generator().manual_seed(0)
    for n, c in ((50, 20), (7, 3), (200, 5)):
        logits = torch.randint(-3, 4, (n, c), generator=g).float() * 0.5  # many exact ties
        targets = torch.rand(n, c, generator=g) < 0.3
        targets[:, 0] = False  # a class with no positives counts as AP 0
        ref = average_precision_per_class(logits, targets.float())
        assert torch.equal(average_precision(logits, targets), ref)
        assert multilabel_metrics(logits, targets) == {"mean_average_precision": ref.mean().item()}
    perfect = torch.eye(4, dtype=torch.bool)
    assert multilabel_metrics(perfect.float(), perfect)["mean_average_precision"] == 1.0
    with pytest.raises(ValueError, match=r"logits \(4, 4\) and targets \(4, 3\) must both be \(N, C\)"):
        multilabel_metrics(perfect.float(), perfect[:, :3])


def test_zeroshot_multilabel_scores_every_class_on_voc_layout(tmp_path):
    import clipworks
    from clipworks.eval.embed import Embedder
    from clipworks.eval.tasks import zeroshot_multilabel
    from reference import tiny_config

    torch.manual_seed(0)
    config = tiny_config(clipworks.get_preset("ViT-B-32"))
    model, size = clipworks.create_model(config), config.vision.image_size

    def transform(image):
        return torch.from_numpy(np.asarray(image.resize((size, size)), dtype=np.float32) / 255).permute(2, 0, 1)

    embedder = Embedder(model, transform, clipworks.get_tokenizer(model), batch_size=4, show_progress=False)
    data = load_multilabel(f"voc2007-multilabel:{_voc(tmp_path / 'voc')}")
    result = zeroshot_multilabel(embedder, data, data.templates)
    feats = embedder.images(data.images).features
    logits = 100.0 * feats @ embedder.text_weights(data.class_names, data.templates).t()
    assert result.metrics == multilabel_metrics(logits, data.labels)
    assert result.images == 3 and result.skipped == 0 and result.extra["average_precision"].shape == (20,)
