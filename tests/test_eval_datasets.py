"""Dataset adapters read miniatures written in each published set's exact on-disk layout: ImageNet and its test
sets, CIFAR's binary files, MNIST's idx files, CLIP_benchmark's WebDataset export; and `csv:` quoting."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clipworks.cli import main
from clipworks.eval.prompts import imagenet_class_names
from clipworks.eval.sources import load_captioned, load_classification

NAMES = imagenet_class_names()
TENCH, MISSILE, PROJECTILE = "n01440764", "n03773504", "n04008634"  # classes 0, 657 and 744


def _image(path, rgb, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)


def _class_folders(root, folders, per_class=2, name="ILSVRC2012_val_{:08d}.JPEG"):
    for k, folder in enumerate(folders):
        for i in range(per_class):
            _image(root / folder / name.format(k * per_class + i + 1), (40 * k % 256, 90, 200 - 30 * i))


def _zeroshot(model_dir, data, out, *argv):
    return main(["eval", "zeroshot", "--model", f"local-dir:{model_dir}", "--data", data, "--no-cache", "--quiet",
                 "--out", str(out), *argv])  # fmt: skip


# --- ImageNet ---------------------------------------------------------------------------------------------------


def test_imagenet_wnid_folders_get_openai_names_and_repeated_names_stay_distinct(tmp_path):
    _class_folders(tmp_path / "ILSVRC2012" / "val", [TENCH, MISSILE, PROJECTILE])
    _class_folders(tmp_path / "ILSVRC2012" / "train", [TENCH, MISSILE], per_class=1, name="{}.JPEG")
    data = load_classification(f"imagenet:{tmp_path / 'ILSVRC2012'}")  # DIR/val by default
    assert data.class_names == ["tench", "missile", "missile"]  # "projectile, missile" is "missile" too
    assert data.labels == [0, 0, 1, 1, 2, 2] and len(data.images) == 6
    assert data.images.name(0).endswith(f"val/{TENCH}/ILSVRC2012_val_00000001.JPEG")
    train = load_classification(f"imagenet:{tmp_path / 'ILSVRC2012'}?split=train")
    assert train.class_names == ["tench", "missile"] and train.labels == [0, 1]
    # folder: recognises WordNet ids too, rather than prompting "a photo of a n01440764"
    assert load_classification(f"folder:{tmp_path / 'ILSVRC2012' / 'val'}").class_names == data.class_names


@pytest.mark.parametrize("layout, folders, indices", [
    ("imagenetv2-matched-frequency-format-val", ["0", "2", "10", "657", "744"], [0, 2, 10, 657, 744]),
    ("imagenet-r", ["n01443537", MISSILE, "n04596742"], [1, 657, 909]),  # goldfish, missile, wok: 3 of its 200
    ("imagenet-a", ["n01498041", "n02086240"], [6, 155]),
    ("sketch", [TENCH, PROJECTILE], [0, 744]),
])  # fmt: skip
def test_imagenet_test_sets(tmp_path, layout, folders, indices):
    root = tmp_path / layout
    _class_folders(root, folders, per_class=1, name="{}.jpg")
    (root / "README.txt").write_text("a file beside the class folders, as ImageNet-A ships one")
    data = load_classification(f"imagenet:{root}")
    assert data.class_names == [NAMES[k] for k in indices]  # V2's folders in numeric order, not "0", "10", "2"
    assert data.labels == list(range(len(folders)))  # one image per class, classes in index order
    assert [data.images.name(i).split("/")[-2] for i in range(len(folders))] == folders


def test_imagenet_errors_are_one_line(tmp_path):
    _class_folders(tmp_path / "mixed", [TENCH, "7"], per_class=1)
    (tmp_path / "flat").mkdir()
    _image(tmp_path / "flat" / "ILSVRC2012_val_00000001.JPEG", (1, 2, 3))
    cases = {f"imagenet:{tmp_path / 'mixed'}": "class folders must be ImageNet-1k WordNet ids",
             f"imagenet:{tmp_path / 'flat'}": "sort them into WordNet-id folders",
             f"imagenet:{tmp_path / 'mixed'}?split=val": "no folder",
             f"imagenet:{tmp_path}?colour=red": "'imagenet' takes: split=..."}  # fmt: skip
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message) as e:
            load_classification(spec)
        assert "\n" not in str(e.value)


def test_csv_labels_index_a_class_list_whose_names_repeat(tmp_path):
    _image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "val.csv").write_text("filepath,label\na.png,657\na.png,744\na.png,tench\n")
    data = load_classification(f"csv:{tmp_path / 'val.csv'}?classes=imagenet")
    assert len(data.class_names) == 1000 and data.labels == [657, 744, 0]  # not 998 classes
    (tmp_path / "bad.csv").write_text("filepath,label\na.png,missile\n")
    with pytest.raises(ValueError, match=r"label .missile. names classes \[657, 744\].*give a class index 0..999"):
        load_classification(f"csv:{tmp_path / 'bad.csv'}?classes=imagenet")
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    (tmp_path / "far.csv").write_text("filepath,label\na.png,2\n")
    with pytest.raises(ValueError, match="label .2. is out of range for the 2 classes"):
        load_classification(f"csv:{tmp_path / 'far.csv'}?classes={tmp_path / 'names.txt'}")


def test_zeroshot_end_to_end_on_imagenet_layout_with_repeated_names(tmp_path, model_dir):
    _class_folders(tmp_path / "val", [TENCH, MISSILE, PROJECTILE])
    assert _zeroshot(model_dir, f"imagenet:{tmp_path}", tmp_path / "out", "--templates", "photo") == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["info"]["classes"] == 3 and result["info"]["images"] == 6 and result["info"]["templates"] == 1



def test_linear_probe_keeps_classes_whose_names_repeat_apart():
    """Train and test sets with the same class list are matched by index, not by name ("missile" twice)."""
    from clipworks.eval.embed import ImageFeatures
    from clipworks.eval.sources import Classification
    from clipworks.eval.tasks import linear_probe_eval

    labels = [k for k in range(3) for _ in range(8)]
    features = torch.eye(3)[labels] + 0.01 * torch.randn(len(labels), 3, generator=torch.Generator().manual_seed(0))

    class Table:  # an Embedder whose image features are well separated by class
        def images(self, images):
            return ImageFeatures(features, torch.ones(len(labels), dtype=torch.bool))

    train, test = (Classification(object(), labels, ["tench", "missile", "missile"]) for _ in range(2))
    assert linear_probe_eval(Table(), train, test, l2_grid=(1e-4,)).metrics["top1"] == 1.0

# --- CIFAR ------------------------------------------------------------------------------------------------------


def _cifar_records(labels: list[tuple[int, ...]]) -> bytes:
    """Records of label byte(s) then a 32x32 image whose pixel (0, 0) is red and (1, 0) green, the rest grey."""
    out = b""
    for i, label in enumerate(labels):
        planes = np.full((3, 32, 32), 10 * i, dtype=np.uint8)  # (C, H, W): red plane, green plane, blue plane
        planes[:, 0, 0] = (255, 0, 0)
        planes[:, 0, 1] = (0, 255, 0)
        out += bytes(label) + planes.tobytes()
    return out


def test_cifar10_binary(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")  # the distributed file ends in blank lines
    (folder / "test_batch.bin").write_bytes(_cifar_records([(3,), (8,), (0,)]))
    for b in range(1, 6):
        (folder / f"data_batch_{b}.bin").write_bytes(_cifar_records([(b,)]))
    data = load_classification(f"cifar10:{tmp_path}")  # the folder holding cifar-10-batches-bin, or the folder itself
    assert data.class_names == names and data.labels == [3, 8, 0] and len(data.images) == 3
    image = data.images.load(1)
    assert image.size == (32, 32) and image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((1, 0)) == (0, 255, 0)
    assert image.getpixel((5, 5)) == (10, 10, 10)
    assert data.templates[0] == "a photo of a {}." and len(data.templates) == 18  # OpenAI's CIFAR templates
    train = load_classification(f"cifar10:{folder}?split=train")
    assert train.labels == [1, 2, 3, 4, 5]
    (folder / "test_batch.bin").write_bytes(_cifar_records([(3,)])[:-5])
    with pytest.raises(ValueError, match="not whole 3073-byte records: cut short"):
        load_classification(f"cifar10:{folder}")


def test_cifar100_binary_fine_and_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    fine = ["apple", "aquarium_fish", "baby", "bear"] + [f"fine_{i}" for i in range(4, 100)]
    coarse = ["aquatic_mammals", "fish", "flowers"] + [f"coarse_{i}" for i in range(3, 20)]
    (folder / "fine_label_names.txt").write_text("\n".join(fine) + "\n")
    (folder / "coarse_label_names.txt").write_text("\n".join(coarse) + "\n")
    (folder / "test.bin").write_bytes(_cifar_records([(1, 1), (2, 99), (0, 3)]))  # (coarse, fine)
    data = load_classification(f"cifar100:{folder}")
    assert len(data.class_names) == 100 and data.class_names[1] == "aquarium fish" and data.labels == [1, 99, 3]
    assert data.images.load(0).getpixel((0, 0)) == (255, 0, 0)
    coarse_data = load_classification(f"cifar100:{folder}?labels=coarse")
    assert coarse_data.class_names[:2] == ["aquatic mammals", "fish"] and coarse_data.labels == [1, 2, 0]
    with pytest.raises(ValueError, match=r"\?labels=medium: choose fine or coarse"):
        load_classification(f"cifar100:{folder}?labels=medium")
    with pytest.raises(ValueError, match=r"\?split=val: choose train or test"):
        load_classification(f"cifar100:{folder}?split=val")
    with pytest.raises(FileNotFoundError, match="no train.bin"):
        load_classification(f"cifar100:{folder}?split=train")


# --- MNIST ------------------------------------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    return bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("scheme, folder, gz", [("mnist", "MNIST/raw", True), ("fashion-mnist", "", False)])
def test_mnist_idx_files(tmp_path, scheme, folder, gz):
    pixels = np.zeros((4, 28, 28), dtype=np.uint8)
    pixels[:, 3, 5] = [50, 100, 150, 200]  # row 3, column 5
    labels = np.array([7, 2, 1, 9], dtype=np.uint8)
    where = tmp_path / folder
    where.mkdir(parents=True, exist_ok=True)
    for name, array in (("t10k-images-idx3-ubyte", pixels), ("t10k-labels-idx1-ubyte", labels)):
        data = _idx(array)
        (where / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    data = load_classification(f"{scheme}:{tmp_path}")
    assert data.labels == [7, 2, 1, 9] and len(data.images) == 4
    if scheme == "mnist":
        assert data.class_names == [str(d) for d in range(10)] and data.templates == ['a photo of the number: "{}".']
    else:
        assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot" and data.templates is None
    image = data.images.load(2)
    assert image.mode == "RGB" and image.size == (28, 28) and image.getpixel((5, 3)) == (150, 150, 150)


def test_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no t10k-images-idx3-ubyte or t10k-images-idx3-ubyte.gz in"):
        load_classification(f"mnist:{tmp_path}")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((2, 28, 28), np.uint8))[:-10])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros((2, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="cut short"):
        load_classification(f"mnist:{tmp_path}")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((2, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="not an idx file of 1-d unsigned bytes"):
        load_classification(f"mnist:{tmp_path}")


# --- CLIP_benchmark's WebDataset export ---------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _encoded(rgb, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), rgb).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def _wds(root, samples_per_shard, target, kind=None):
    """DIR/test/{0..n-1}.tar, nshards.txt and metadata as clip_benchmark's exporter writes them."""
    (root / "test").mkdir(parents=True)
    index = 0
    for shard, samples in enumerate(samples_per_shard):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for value, fmt in samples:
                key = f"s{index:07d}"
                _add(tar, f"{key}.{fmt.lower()}", _encoded((30 * index % 256, 80, 160), fmt))
                _add(tar, f"{key}.{target}", str(value).encode())
                index += 1
    (root / "test" / "nshards.txt").write_text(f"{len(samples_per_shard)}\n")
    if kind:
        (root / "dataset_type.txt").write_text(kind + "\n")


def test_wds_benchmark_classification(tmp_path, model_dir):
    root = tmp_path / "wds_vtab-cifar10"
    _wds(root, [[(2, "WEBP"), (0, "WEBP"), (1, "PNG")], [(2, "JPEG")]], "cls")
    (root / "classnames.txt").write_text("cat\ndog\nbird\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na blurry photo of a {c}.\n")
    data = load_classification(f"wds-benchmark:{root}")
    assert data.class_names == ["cat", "dog", "bird"] and data.labels == [2, 0, 1, 2]
    assert data.templates == ["a photo of a {}.", "a blurry photo of a {}."]
    assert [data.images.load(i).getpixel((3, 3)) for i in (1, 2)] == [(30, 80, 160), (60, 80, 160)]  # lossless
    assert data.images.name(3).endswith("test/1.tar:s0000003")
    # end to end: the set's own templates are used when --templates is not given
    assert _zeroshot(model_dir, f"wds-benchmark:{root}", tmp_path / "out") == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["info"]["classes"] == 3 and result["info"]["images"] == 4 and result["info"]["templates"] == 2


def test_wds_benchmark_retrieval_and_errors(tmp_path):
    root = tmp_path / "wds_flickr30k"
    _wds(root, [[("a dog runs\na brown dog", "WEBP"), ("a cat sleeps", "PNG")]], "txt", kind="retrieval")
    data = load_captioned(f"wds-benchmark:{root}")
    assert data.captions == ["a dog runs", "a brown dog", "a cat sleeps"] and data.caption_image == [0, 0, 1]
    with pytest.raises(ValueError, match="a retrieval set .* `clipworks eval retrieval`"):
        load_classification(f"wds-benchmark:{root}")
    with pytest.raises(ValueError, match=r"no train/nshards.txt \(splits found: test\)"):
        load_captioned(f"wds-benchmark:{root}?split=train")
    (root / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(FileNotFoundError, match="2 of the 3 shards named by .* are missing"):
        load_captioned(f"wds-benchmark:{root}")
    other = tmp_path / "nolabels"
    _wds(other, [[(1, "WEBP")]], "cls")
    with pytest.raises(ValueError, match="no class-name file .*classnames.txt"):
        load_classification(f"wds-benchmark:{other}")


# --- csv --------------------------------------------------------------------------------------------------------


def test_csv_quoted_fields_and_a_row_with_too_many_fields(tmp_path):
    _image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "pairs.csv").write_text('filepath,caption\na.png,"a cat, sitting"\na.png, "a dog, \'\'running\'\'"\n')
    assert load_captioned(f"csv:{tmp_path / 'pairs.csv'}").captions == ["a cat, sitting", "a dog, ''running''"]
    (tmp_path / "bad.csv").write_text("filepath,caption\na.png,a cat\na.png,a cat, sitting\n")
    with pytest.raises(ValueError) as e:
        load_captioned(f"csv:{tmp_path / 'bad.csv'}")
    message = str(e.value)
    assert "\n" not in message and "bad.csv line 3: 3 fields but 2 columns (filepath, caption)" in message
    assert 'quote a field that holds a comma, as "a cat, sitting"' in message
