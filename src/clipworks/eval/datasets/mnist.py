"""MNIST and Fashion-MNIST in their idx files, gzipped or not, as distributed and as torchvision keeps them.

An idx file is two zero bytes, a type byte (0x08: unsigned bytes), the number of dimensions, each dimension
as a big-endian uint32, then the data: t10k-images-idx3-ubyte (N, 28, 28), t10k-labels-idx1-ubyte (N,).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from ..images import ArrayImages
from ..sources import Classification, Spec
from .common import check_split, dataset_templates, spec_root

PREFIX = {"test": "t10k", "train": "train"}
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],  # zalandoresearch/fashion-mnist's README
}  # fmt: skip
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def load_classification(spec: Spec) -> Classification:
    """`mnist:DIR` / `fashion-mnist:DIR[?split=test|train]`: the idx files in DIR, DIR/raw or (torchvision's
    layout) DIR/MNIST/raw, DIR/FashionMNIST/raw."""
    prefix = PREFIX[check_split(spec, tuple(PREFIX))]
    images_file = _find(spec, f"{prefix}-images-idx3-ubyte")
    labels_file = _find(spec, f"{prefix}-labels-idx1-ubyte")
    pixels, labels = read_idx(images_file, 3), read_idx(labels_file, 1)  # (N, H, W), (N,)
    what = f"{spec.scheme}:{spec.path}"
    if len(pixels) != len(labels):
        raise ValueError(f"{what}: {images_file.name} holds {len(pixels)} images, {labels_file.name} "
                         f"{len(labels)} labels")  # fmt: skip
    names = CLASS_NAMES[spec.scheme]
    if len(labels) and int(labels.max()) >= len(names):
        raise ValueError(f"{what}: label {int(labels.max())} in {labels_file.name}; expected 0..{len(names) - 1}")
    templates = dataset_templates("mnist") if spec.scheme == "mnist" else None
    images = ArrayImages(pixels, [images_file, labels_file], f"{spec.scheme}/{spec.options['split']}")
    return Classification(images, labels.tolist(), list(names), templates)


def _find(spec: Spec, stem: str) -> Path:
    root = spec_root(spec)
    folders = (root, root / "raw", root / TORCHVISION_FOLDER[spec.scheme] / "raw")
    names = (stem, f"{stem}.gz", stem.replace("-idx", ".idx"), f"{stem.replace('-idx', '.idx')}.gz")
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"{spec.scheme}:{spec.path}: no {stem} or {stem}.gz in {', '.join(map(str, folders))}")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of an idx file (gzipped when its name ends in .gz) with `ndim` dimensions."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a whole gzip file: {type(e).__name__}: {e}") from e
    start = 4 + 4 * ndim
    if len(data) < start or data[:4] != bytes((0, 0, 0x08, ndim)):
        raise ValueError(f"{path}: not an idx file of {ndim}-d unsigned bytes (it starts {data[:4].hex()}, "
                         f"expected 000008{ndim:02x})")  # fmt: skip
    shape = struct.unpack(f">{ndim}I", data[4:start])
    body = np.frombuffer(data, dtype=np.uint8, offset=start)
    if body.size != math.prod(shape):
        raise ValueError(f"{path}: {body.size} data bytes for shape {shape} ({math.prod(shape)}): cut short?")
    return body.reshape(shape)
