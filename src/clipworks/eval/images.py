"""The images of an evaluation set: image files, generated scenes, or pixel arrays read from a dataset file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..data.decode import load_image
from ..transforms import preprocess_file

if TYPE_CHECKING:
    import torch


class ImageSet:
    """The images of an evaluation set: `load(i)` decodes image i (raising `ImageDecodeError` when broken)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def preprocess(self, i: int, transform) -> torch.Tensor:
        """Image i through `transform`."""
        return transform(self.load(i))

    def name(self, i: int) -> str:
        """A short name of image i for reports."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash that changes when the images may have changed (paths, sizes, modification times)."""
        raise NotImplementedError


class FileImages(ImageSet):
    """Image files."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        return load_image(self.paths[i])

    def preprocess(self, i: int, transform) -> torch.Tensor:
        return preprocess_file(transform, self.paths[i])  # EvalTransform: JPEG photos by its faster route

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def fingerprint(self) -> str:
        return files_fingerprint(self.paths)


def files_fingerprint(paths: list[Path]) -> str:
    """A hash of the files' resolved paths, sizes and modification times."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


class SyntheticImages(ImageSet):
    """Images drawn by the `synthetic:shapes` generator (a `ShapesDataset`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int) -> Image.Image:
        return self.dataset[i][0]

    def name(self, i: int) -> str:
        return f"shapes/{self.dataset.split}/{i}"

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(self.dataset).encode()).hexdigest()


class ArrayImages(ImageSet):
    """Images held as uint8 pixels, (N, H, W) grey or (N, H, W, 3) RGB, as read from `files` (CIFAR, MNIST).

    Args:
        pixels: the images.
        files: the files they were read from (for the fingerprint).
        label: what the set is called in image names, e.g. "cifar10/test".
    """

    def __init__(self, pixels: np.ndarray, files: list[Path], label: str):
        assert pixels.dtype == np.uint8 and pixels.ndim in (3, 4), (pixels.dtype, pixels.shape)
        self.pixels, self.files, self.label = pixels, files, label

    def __len__(self) -> int:
        return len(self.pixels)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.pixels[i])).convert("RGB")

    def name(self, i: int) -> str:
        return f"{self.label}/{i}"

    def fingerprint(self) -> str:
        key = f"{files_fingerprint(self.files)}\0{self.label}\0{self.pixels.shape}"
        return hashlib.sha256(key.encode()).hexdigest()


class CroppedImages(ImageSet):
    """Boxes cut out of image files: image i is `paths[i]` cropped to `boxes[i]`, Pillow's (left, top, right,
    bottom) in pixels, right and bottom exclusive (a box past the edge is filled with black, as Pillow crops).

    Args:
        paths: the image file of each crop (a file may repeat, one crop each).
        boxes: one box per path.
        label: what the set is called in image names, e.g. "voc2007/test".
    """

    def __init__(self, paths: list[Path], boxes: list[tuple[int, int, int, int]], label: str):
        assert len(paths) == len(boxes), (len(paths), len(boxes))
        self.paths, self.boxes, self.label = paths, boxes, label

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        return load_image(self.paths[i]).crop(self.boxes[i])

    def name(self, i: int) -> str:
        return f"{self.paths[i]}@{','.join(map(str, self.boxes[i]))}"

    def fingerprint(self) -> str:
        key = f"{files_fingerprint(self.paths)}\0{self.label}\0{self.boxes}"
        return hashlib.sha256(key.encode()).hexdigest()
