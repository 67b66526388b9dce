"""ObjectNet 1.0 as unzipped (objectnet-1.0/images/<folder>/*.png and objectnet-1.0/mappings/), read as
CLIP_benchmark 1.6.2's `objectnet` reads it.

The classes are CLIP_benchmark's `ObjectNetDataset`'s 113: the ObjectNet labels listed in
`objectnet_to_imagenet_1k.json` (those that map to ImageNet-1k classes), ordered by their image folder's name
and named by the lower-cased ObjectNet label (`folder_to_objectnet_label.json`); only the images in those
folders are read. The ImageNet names each label maps to (a "; "-joined list) must be lines of
`imagenet_to_label_2012_v2`, as CLIP_benchmark requires, though they do not change the classes.

Images are used whole: ObjectNet's images carry a 1-pixel red border that wise-ft crops off, but
CLIP_benchmark's copy of that loader does not crop it, and neither do we. The prompts are OpenAI's 80 ImageNet
templates, CLIP_benchmark's fallback for a set without templates of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..prompts import load_templates
from ..sources import Classification, FileImages, Spec
from .common import spec_root

MAPPINGS = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json", "pytorch_to_imagenet_2012_id.json",
            "imagenet_to_label_2012_v2")  # fmt: skip
# What torchvision's ImageFolder (CLIP_benchmark's base class) reads, case-insensitively.
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_classification(spec: Spec) -> Classification:
    """`objectnet:DIR`: DIR holds objectnet-1.0/ (with the mapping files in it or copied beside it, as
    CLIP_benchmark's builder copies them) or is objectnet-1.0/ itself."""
    what = f"objectnet:{spec.path}"
    images, mappings = _locate(what, spec_root(spec))
    folder_label = _read_json(what, mappings / MAPPINGS[0])
    to_imagenet = _read_json(what, mappings / MAPPINGS[1])
    _check_imagenet_names(what, mappings, to_imagenet)
    label_folder = {label: folder for folder, label in folder_label.items()}
    unknown = [label for label in to_imagenet if label not in label_folder]
    if unknown:
        raise ValueError(f"{what}: {MAPPINGS[1]} maps {unknown[0]!r}, which no folder of {MAPPINGS[0]} is labelled")
    folders = sorted(label_folder[label] for label in to_imagenet)
    paths: list[Path] = []
    labels: list[int] = []
    for k, folder in enumerate(folders):
        files = _folder_files(images / folder)
        if not files:
            raise ValueError(f"{what}: class folder {images / folder} holds no images "
                             f"(extensions read: {', '.join(FOLDER_EXTENSIONS)})")  # fmt: skip
        paths += files
        labels += [k] * len(files)
    names = [folder_label[f].lower() for f in folders]
    return Classification(FileImages(paths), labels, names, load_templates("imagenet"))


def _locate(what: str, root: Path) -> tuple[Path, Path]:
    """(the images folder, the folder holding the mapping files)."""
    base = root / "objectnet-1.0" if (root / "objectnet-1.0" / "images").is_dir() else root
    if not (base / "images").is_dir():
        raise ValueError(f"{what}: no objectnet-1.0/images/ (expected DIR/objectnet-1.0/images/<folder>/*.png "
                         "from objectnet-1.0.zip, or DIR = objectnet-1.0 itself)")  # fmt: skip
    # CLIP_benchmark reads the copies its builder puts beside objectnet-1.0/; the zip keeps them in mappings/
    for mappings in (root, base / "mappings"):
        if (mappings / MAPPINGS[0]).is_file():
            break
    missing = [name for name in MAPPINGS if not (mappings / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: no mapping file {missing[0]} in {mappings} (expected "
                                f"objectnet-1.0/mappings/{missing[0]}, or a copy beside objectnet-1.0/)")  # fmt: skip
    return base / "images", mappings


def _read_json(what: str, path: Path) -> dict[str, str]:
    """A mapping file: a JSON object of strings to strings."""
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not JSON: {e}") from e
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()) or not table:
        raise ValueError(f"{what}: {path} must be a non-empty JSON object of names to names, as in objectnet-1.0")
    return table


def _check_imagenet_names(what: str, mappings: Path, to_imagenet: dict[str, str]) -> None:
    """Every ImageNet name mapped to is a line of imagenet_to_label_2012_v2 with a PyTorch index (where
    CLIP_benchmark fails with a KeyError)."""
    try:
        pytorch = json.loads((mappings / MAPPINGS[2]).read_text(encoding="utf-8"))
        line_ids = {int(v) for v in pytorch.values()}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{what}: {mappings / MAPPINGS[2]} must be a JSON object of PyTorch indices to "
                         f"line numbers of {MAPPINGS[3]}: {e}") from e  # fmt: skip
    lines = (mappings / MAPPINGS[3]).read_text(encoding="utf-8").splitlines()
    known = {name.strip() for i, name in enumerate(lines) if i in line_ids}
    for label, joined in to_imagenet.items():
        bad = [name for name in joined.split("; ") if name not in known]
        if bad:
            raise ValueError(f"{what}: {MAPPINGS[1]} maps {label!r} to {bad[0]!r}, which is not a line of "
                             f"{MAPPINGS[3]} with an index in {MAPPINGS[2]}")  # fmt: skip


def _folder_files(folder: Path) -> list[Path]:
    """The images under `folder` in ImageFolder's order: walked top-down, directories and names sorted."""
    if not folder.is_dir():
        return []
    files = []
    for root, _, names in sorted(os.walk(folder, followlinks=True)):
        files += [Path(root) / n for n in sorted(names) if n.lower().endswith(FOLDER_EXTENSIONS)]
    return files
