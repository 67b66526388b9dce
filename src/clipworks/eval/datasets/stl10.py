"""STL-10 in its binary distribution (stl10_binary.tar.gz, extracted to stl10_binary/):

    test_X.bin / train_X.bin   uint8 images, each 3 planes (red, green, blue) of 96x96 stored column by column
    test_y.bin / train_y.bin   one label byte per image, 1..10
    class_names.txt            the 10 class names, one a line, in label order

The unlabelled split (unlabeled_X.bin) has no labels and is not read.
"""

from __future__ import annotations

import numpy as np

from ..images import ArrayImages
from ..sources import Classification, Spec
from .common import check_split, dataset_templates, read_names, spec_root

SIZE = 96
FOLDER = "stl10_binary"


def load_classification(spec: Spec) -> Classification:
    """`stl10:DIR[?split=test|train]`: DIR is stl10_binary or the folder holding it."""
    what = f"stl10:{spec.path}"
    split = check_split(spec, ("test", "train"))
    root = spec_root(spec)
    if not (root / f"{split}_X.bin").is_file() and (root / FOLDER).is_dir():
        root = root / FOLDER
    files = [root / f"{split}_X.bin", root / f"{split}_y.bin", root / "class_names.txt"]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: no {', '.join(missing)} in {root} (expected {FOLDER}/ extracted from "
                                "stl10_binary.tar.gz)")  # fmt: skip
    raw = np.fromfile(files[0], dtype=np.uint8)
    labels = np.fromfile(files[1], dtype=np.uint8).astype(np.int64) - 1  # 1..10 on disk
    record = 3 * SIZE * SIZE
    if raw.size == 0 or raw.size % record:
        raise ValueError(f"{what}: {files[0].name} holds {raw.size} bytes, not whole {record}-byte images: cut short?")
    # Each plane is column-major: byte x*96 + y is the pixel in row y, column x (torchvision transposes likewise).
    pixels = raw.reshape(-1, 3, SIZE, SIZE).transpose(0, 3, 2, 1)  # (N, C, X, Y) -> (N, Y, X, C) = (N, H, W, 3)
    if len(labels) != len(pixels):
        raise ValueError(f"{what}: {files[0].name} holds {len(pixels)} images, {files[1].name} {len(labels)} labels")
    names = read_names(files[2], what)
    if labels.min() < 0 or labels.max() >= len(names):
        raise ValueError(f"{what}: labels in {files[1].name} must be 1..{len(names)} (class_names.txt names "
                         f"{len(names)} classes); found {int(labels.min()) + 1}..{int(labels.max()) + 1}")  # fmt: skip
    images = ArrayImages(pixels, files[:2], f"stl10/{split}")
    return Classification(images, labels.tolist(), names, dataset_templates("stl10"))
