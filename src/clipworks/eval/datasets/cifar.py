"""CIFAR-10 and CIFAR-100 in their binary distributions (cifar-10-binary.tar.gz, cifar-100-binary.tar.gz).

A record is its label byte(s) (CIFAR-100: coarse, then fine) and 3072 pixel bytes: the 32x32 red plane, then
green, then blue, each row by row. The Python versions of the sets are pickles and are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..images import ArrayImages
from ..sources import Classification, Spec
from .common import check_split, dataset_templates, read_names, spec_root

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Layout:
    """Where a CIFAR distribution keeps its files and what its records hold."""

    folder: str  # the folder the archive extracts to
    splits: dict[str, tuple[str, ...]]  # split -> its record files
    label_bytes: tuple[str, ...]  # what each leading byte of a record labels
    names: dict[str, str]  # label kind -> its class-name file


CIFAR10 = _Layout("cifar-10-batches-bin", {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                                           "test": ("test_batch.bin",)},
                  ("label",), {"label": "batches.meta.txt"})  # fmt: skip
CIFAR100 = _Layout("cifar-100-binary", {"train": ("train.bin",), "test": ("test.bin",)}, ("coarse", "fine"),
                   {"coarse": "coarse_label_names.txt", "fine": "fine_label_names.txt"})  # fmt: skip


def load_cifar10(spec: Spec) -> Classification:
    """`cifar10:DIR[?split=test|train]`: DIR is cifar-10-batches-bin or the folder holding it."""
    return _load(spec, CIFAR10, "label")


def load_cifar100(spec: Spec) -> Classification:
    """`cifar100:DIR[?split=test|train&labels=fine|coarse]`: DIR is cifar-100-binary or the folder holding it;
    the 100 fine classes, or with `labels=coarse` the 20 superclasses."""
    kind = spec.options["labels"]
    if kind not in CIFAR100.names:
        raise ValueError(f"cifar100:{spec.path}: ?labels={kind}: choose fine or coarse")
    return _load(spec, CIFAR100, kind)


def _load(spec: Spec, layout: _Layout, kind: str) -> Classification:
    what = f"{spec.scheme}:{spec.path}"
    files = layout.splits[check_split(spec, tuple(layout.splits))]
    root = spec_root(spec)
    if not (root / files[0]).is_file() and (root / layout.folder).is_dir():
        root = root / layout.folder
    paths = [root / f for f in files]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: no {', '.join(missing)} in {root} (expected the binary version, "
                                f"{layout.folder}/, extracted)")  # fmt: skip
    record = len(layout.label_bytes) + PIXELS
    parts = []
    for p in paths:
        raw = np.fromfile(p, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise ValueError(f"{what}: {p} holds {raw.size} bytes, not whole {record}-byte records: cut short?")
        parts.append(raw.reshape(-1, record))  # (N, record)
    records = np.concatenate(parts)
    labels = records[:, layout.label_bytes.index(kind)]
    pixels = records[:, len(layout.label_bytes) :].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    names = [n.replace("_", " ") for n in read_names(root / layout.names[kind], what)]  # "aquarium_fish"
    if int(labels.max()) >= len(names):
        raise ValueError(f"{what}: label {int(labels.max())} but {layout.names[kind]} names {len(names)} classes")
    images = ArrayImages(pixels, paths, f"{spec.scheme}/{spec.options['split']}")
    return Classification(images, labels.tolist(), names, dataset_templates("cifar"))
