"""ImageNet and its test sets as distributed: class folders named by WordNet id (ImageNet-1k train/val,
ImageNet-Sketch, ImageNet-R, ImageNet-A) or by class index 0..999 (ImageNet-V2).

Classes are the class folders present, in class-index order (ImageNet-R and -A have 200 of the 1000), named
with OpenAI's 1000 ImageNet class names. Two of those names repeat ("missile", "sunglasses"): the classes stay
distinct, as classes are indices.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..prompts import ASSETS, imagenet_class_names
from ..sources import Classification, FileImages, Spec, class_folders, folder_images
from .common import spec_root


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (which is their sorted order)."""
    wnids = tuple((ASSETS / "imagenet_wnids.txt").read_text(encoding="utf-8").split())
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids), "imagenet_wnids.txt is damaged"
    return wnids


@lru_cache(maxsize=1)
def _wnid_index() -> dict[str, int]:
    return {w: k for k, w in enumerate(imagenet_wnids())}


def is_wnid_layout(folders: list[Path]) -> bool:
    """Whether every folder is named by an ImageNet-1k WordNet id."""
    index = _wnid_index()
    return bool(folders) and all(d.name in index for d in folders)


def from_wnid_folders(what: str, folders: list[Path]) -> Classification:
    """The images of WordNet-id class folders, classes named by OpenAI's names for their ids."""
    index = _wnid_index()
    return _classification(what, folders, [index[d.name] for d in folders])


def _classification(what: str, folders: list[Path], classes: list[int]) -> Classification:
    names = imagenet_class_names()
    paths, labels = folder_images(what, folders, list(range(len(folders))))
    return Classification(FileImages(paths), labels, [names[k] for k in classes])


def load_classification(spec: Spec) -> Classification:
    """`imagenet:DIR[?split=NAME]`: DIR's class folders, or those of DIR/NAME (default: DIR/val when DIR has
    one, else DIR itself)."""
    what = f"imagenet:{spec.path}"
    root = spec_root(spec)
    split = spec.options["split"] or ("val" if (root / "val").is_dir() else "")
    folder = root / split if split else root
    if not folder.is_dir():
        raise ValueError(f"{what}?split={split}: no folder {folder}")
    if not any(d.is_dir() for d in folder.iterdir()):
        raise ValueError(f"{what}: no class folders in {folder}; ImageNet's validation images ship in one flat "
                         "folder: sort them into WordNet-id folders (n01440764/, ...) first")  # fmt: skip
    folders = class_folders(what, folder)
    if is_wnid_layout(folders):
        return from_wnid_folders(what, folders)
    indices = [int(d.name) if d.name.isdigit() else -1 for d in folders]
    if all(0 <= k < 1000 for k in indices) and len(set(indices)) == len(indices):  # ImageNet-V2
        order = sorted(range(len(folders)), key=indices.__getitem__)
        return _classification(what, [folders[i] for i in order], [indices[i] for i in order])
    index = _wnid_index()
    bad = [d.name for d, k in zip(folders, indices) if d.name not in index and not 0 <= k < 1000]
    bad = bad or [folders[0].name, folders[-1].name]  # both kinds, or one index twice ("7", "007")
    hint = "" if split else " (or name the split folder with ?split=train)"
    found = ", ".join(map(repr, bad[:3]))
    raise ValueError(f"{what}: class folders must be ImageNet-1k WordNet ids (n01440764, ...) or class indices "
                     f"0..999 (ImageNet-V2), all of one kind; found {found}{hint}")  # fmt: skip
