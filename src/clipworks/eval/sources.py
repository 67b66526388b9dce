"""Evaluation sets named by a `--data` string: labelled, captioned, negative-captioned or scored images.

A spec is `SCHEME:PATH[?key=value&...]`:

- `folder:DIR`: classification with one sub-folder per class (the class name is the folder name with "_" as
  a space; ImageNet WordNet-id folders such as `n01440764` are named as `imagenet:` names them); every image
  under a class folder, recursively.
- `csv:FILE` / `tsv:FILE`: image paths (column `filepath`, relative to the file) with `label`, `caption`,
  negative-caption or `score` columns, renamed with `?image=COL&label=COL&caption=COL&negatives=A,B&score=COL`.
  For retrieval an image may repeat on several rows, one caption each. Labels are class names (classes sorted
  by name), or with `?classes=FILE` (one name a line, in class-index order; `classes=imagenet` for OpenAI's
  1000) class indices or names from that list, whose names may repeat (ImageNet's do).
- `coco:FILE`: a COCO caption JSON (`images[{id, file_name}]`, `annotations[{image_id, caption}]`); images
  are read from `?images=DIR` (default: the JSON's folder).
- `synthetic:shapes[?size=N&seed=S&image_size=64&split=heldout]`: the built-in generator's held-out scenes.

Published sets in their distributed layouts (adapters in `eval/datasets/`, one module per format):
`imagenet:DIR[?split=val]` (ImageNet-1k, -V2, -Sketch, -R, -A), `cifar10:DIR` / `cifar100:DIR[?labels=coarse]`
(the binary versions), `mnist:DIR` / `fashion-mnist:DIR` (idx files), each with `?split=test|train`, and
`wds-benchmark:DIR[?split=test]` (CLIP_benchmark's WebDataset export, as on the hub's clip-benchmark/wds_*),
`stl10:DIR[?split=test|train]` (the binary version); for retrieval `karpathy:FILE[?images=DIR&split=test]`
(Karpathy's Flickr8k, Flickr30k and COCO splits); for compositional probes `sugarcrepe:PATH[?images=DIR]` and
`winoground:DIR[?images=DIR]` (a `Paired` set: text, image and group scores); as CLIP_benchmark reads them,
`objectnet:DIR` (its 113 classes that map to ImageNet-1k), `voc2007:DIR[?split=test|train]` (VOC 2007's objects
cropped out) and `voc2007-multilabel:DIR[?split=test|train]` (a `MultiLabel` set: whole images, multi-hot).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.datasets import parse_data_spec
from .images import FileImages, ImageSet, SyntheticImages  # noqa: F401 (ImageSet: re-exported)
from .prompts import check_unique

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
OPTIONS: dict[str, dict[str, str]] = {
    "folder": {},
    "csv": {"image": "filepath", "label": "label", "caption": "caption", "negatives": "", "score": "score",
            "classes": ""},
    "tsv": {"image": "filepath", "label": "label", "caption": "caption", "negatives": "", "score": "score",
            "classes": ""},
    "coco": {"images": ""},
    "synthetic": {"size": "500", "seed": "0", "image_size": "64", "split": "heldout"},
    "imagenet": {"split": ""},
    "cifar10": {"split": "test"},
    "cifar100": {"split": "test", "labels": "fine"},
    "mnist": {"split": "test"},
    "fashion-mnist": {"split": "test"},
    "wds-benchmark": {"split": "test"},
    "stl10": {"split": "test"},
    "karpathy": {"images": "", "split": "test"},
    "sugarcrepe": {"images": ""},
    "winoground": {"images": ""},
    "objectnet": {},
    "voc2007": {"split": "test"},
    "voc2007-multilabel": {"split": "test"},
}
# Schemes read by an adapter in eval/datasets/ (the rest are read here).
ADAPTED = ("imagenet", "cifar10", "cifar100", "mnist", "fashion-mnist", "wds-benchmark", "stl10", "objectnet",
           "voc2007")  # fmt: skip


@dataclass(frozen=True)
class Spec:
    """A parsed evaluation data string."""

    scheme: str
    path: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.scheme}:{self.path}" + (f"?{query}" if query else "")


def parse_spec(text: str, allowed: tuple[str, ...] = tuple(OPTIONS)) -> Spec:
    """Parse `SCHEME:PATH[?key=value&...]` with SCHEME among `allowed`; the scheme's defaults filled in.

    Raises:
        ValueError: an unknown scheme or option.
    """
    spec = parse_data_spec(text, {scheme: OPTIONS[scheme] for scheme in allowed})
    return Spec(spec.scheme, spec.path, dict(spec.options))


# --- tasks --------------------------------------------------------------------------------------------------


@dataclass
class Classification:
    """Images with class labels (indices into `class_names`, whose names may repeat: classes are indices).

    `templates`: the prompt templates published with the set (each with one "{}"), or None.
    """

    images: ImageSet
    labels: list[int]
    class_names: list[str]
    templates: list[str] | None = None


@dataclass
class MultiLabel:
    """Images with any number of classes each: `labels` (N, C) bool, True where image i shows class c;
    `templates` as `Classification`'s."""

    images: ImageSet
    labels: torch.Tensor
    class_names: list[str]
    templates: list[str] | None = None


@dataclass
class Captioned:
    """Images with captions; caption j describes image `caption_image[j]` (an image may have several)."""

    images: ImageSet
    captions: list[str]
    caption_image: list[int]


@dataclass
class WithNegatives:
    """Images, each with its true caption and hard negatives; `kinds` names what each negative column swaps."""

    images: ImageSet
    captions: list[str]
    negatives: list[list[str]]
    kinds: list[str]


@dataclass
class Paired:
    """Winoground-style examples of two images and two captions: images 2n and 2n+1 are example n's, described
    by captions 2n and 2n+1 respectively; `tags` names each example's kind ("" when untagged)."""

    images: ImageSet
    captions: list[str]
    tags: list[str]


@dataclass
class Scored:
    """Images with a numeric score each (quality, aesthetics, ...)."""

    images: ImageSet
    scores: list[float]


def _exists(path: str, kind: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{kind} not found: {path!r}")
    return p


def read_table(spec: Spec, columns: list[str]) -> tuple[Path, list[dict[str, str]]]:
    """(the file's folder, its rows) of a csv/tsv spec, checking that `columns` are present."""
    file = _exists(spec.path, "data file")
    sep = "," if spec.scheme == "csv" else "\t"
    with open(file, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
        # skipinitialspace: `a.jpg, "a cat, sitting"` is two fields, as spreadsheets and pandas read it
        reader = csv.DictReader(f, delimiter=sep, skipinitialspace=spec.scheme == "csv")
        found = reader.fieldnames or []
        missing = [c for c in columns if c not in found]
        if missing:
            raise ValueError(f"{spec.path}: missing column(s) {', '.join(map(repr, missing))} (columns found: "
                             f"{', '.join(found) or 'none'}); name them with ?image=COL&label=COL&caption=COL...")  # fmt: skip
        rows = []
        for row in reader:
            if None in row:  # DictReader files the surplus fields under None
                raise ValueError(f"{spec.path} line {reader.line_num}: {len(found) + len(row[None])} fields but "
                                 f"{len(found)} columns ({', '.join(found)}); quote a field that holds a "
                                 f"{'comma' if sep == ',' else 'tab'}, as \"a cat, sitting\"")  # fmt: skip
            rows.append(row)
    if not rows:
        raise ValueError(f"{spec.path}: no rows")
    return file.parent, rows


def load_classification(text: str) -> Classification:
    """A labelled image set from `folder:DIR`, `csv:FILE`, `tsv:FILE` (classes sorted by name unless
    `?classes=` lists them), `synthetic:shapes` (single-object scenes labelled with their colour-shape pair
    among all 36) or a published set's adapter (`imagenet:`, `cifar10:`, ..., see the module docstring)."""
    spec = parse_spec(text, ("folder", "csv", "tsv", "synthetic", *ADAPTED))
    if spec.scheme in ADAPTED:
        from .datasets import CLASSIFICATION

        return CLASSIFICATION[spec.scheme](spec)
    if spec.scheme == "folder":
        return _class_folders(spec.path)
    if spec.scheme == "synthetic":
        from ..data.synthetic import zero_shot_task

        args = _synthetic_args(spec)
        task = zero_shot_task(spec.options["split"], args["size"], args["config"])
        return Classification(SyntheticImages(task.dataset), [label for _, label in task.samples], task.class_names)
    root, rows = read_table(spec, [spec.options["image"], spec.options["label"]])
    names = [(row[spec.options["label"]] or "").strip() for row in rows]
    if any(not n for n in names):
        raise ValueError(f"{spec.path}: {sum(not n for n in names)} row(s) with an empty {spec.options['label']!r}")
    paths = [root / row[spec.options["image"]] for row in rows]
    if spec.options["classes"]:
        class_names = _class_list(spec)
        return Classification(FileImages(paths), _labels(names, class_names, spec), class_names)
    class_names = sorted(set(names))  # labels are names here: one name, one class
    index = {n: k for k, n in enumerate(class_names)}
    return Classification(FileImages(paths), [index[n] for n in names], class_names)


def _class_list(spec: Spec) -> list[str]:
    """The class names `?classes=` gives: OpenAI's ImageNet 1000 (`imagenet`) or a file, one name a line."""
    value = spec.options["classes"]
    if value == "imagenet":
        from .prompts import imagenet_class_names

        return imagenet_class_names()
    from .datasets.common import read_names

    return read_names(_exists(value, "class-name file"), f"{spec.path}: ?classes={value}")


def _labels(cells: list[str], class_names: list[str], spec: Spec) -> list[int]:
    """Label cells as class indices: a cell of digits is an index into `class_names`, any other a name that
    occurs there once."""
    where: dict[str, list[int]] = {}
    for k, n in enumerate(class_names):
        where.setdefault(n, []).append(k)
    labels = []
    for cell in cells:
        found = [int(cell)] if cell.isdigit() else where.get(cell, [])
        if len(found) != 1 or found[0] >= len(class_names):
            why = ("is out of range for" if cell.isdigit() else "is not among" if not found
                   else f"names classes {found} of")  # fmt: skip
            raise ValueError(f"{spec.path}: label {cell!r} {why} the {len(class_names)} classes of ?classes="
                             f"{spec.options['classes']}; give a class index 0..{len(class_names) - 1}")  # fmt: skip
        labels.append(found[0])
    return labels


def class_folders(what: str, root: Path) -> list[Path]:
    """The class sub-folders of `root` (not hidden), sorted by name; `what` names the spec in errors."""
    if not root.is_dir():
        raise ValueError(f"{what}: not a directory")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"{what}: no class sub-folders (expected DIR/<class>/<image>)")
    return folders


def folder_images(what: str, folders: list[Path], labels: list[int]) -> tuple[list[Path], list[int]]:
    """(image paths, their labels): every image under each folder (recursively), labelled `labels[k]`."""
    paths, image_labels = [], []
    for d, k in zip(folders, labels):
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"{what}: class folder {d.name!r} holds no images "
                             f"(extensions read: {', '.join(IMAGE_EXTENSIONS)})")  # fmt: skip
        paths += files
        image_labels += [k] * len(files)
    return paths, image_labels


def _class_folders(path: str) -> Classification:
    from .datasets.imagenet import from_wnid_folders, is_wnid_layout

    folders = class_folders(f"folder:{path}", _exists(path, "data folder"))
    if is_wnid_layout(folders):  # ImageNet-style: named like `imagenet:` names them, not "n01440764"
        return from_wnid_folders(f"folder:{path}", folders)
    paths, labels = folder_images(f"folder:{path}", folders, list(range(len(folders))))
    names = check_unique([d.name.replace("_", " ") for d in folders], f"folder:{path}")
    return Classification(FileImages(paths), labels, names)


def load_captioned(text: str, images_dir: str | None = None) -> Captioned:
    """Captioned images from `csv:`/`tsv:` (an image may repeat, one caption a row), `coco:`, synthetic,
    `wds-benchmark:` (a retrieval export) or `karpathy:` (Flickr8k, Flickr30k, COCO in Karpathy's splits)."""
    spec = parse_spec(text, ("csv", "tsv", "coco", "synthetic", "wds-benchmark", "karpathy"))
    if spec.scheme == "coco":
        return _coco(spec, images_dir)
    if spec.scheme == "karpathy":
        from .datasets.karpathy import load_captioned as load_karpathy

        return load_karpathy(spec, images_dir)
    if spec.scheme == "wds-benchmark":
        from .datasets.wds_benchmark import load_captioned as load_wds

        return load_wds(spec)
    if spec.scheme == "synthetic":
        from ..data.synthetic import ShapesDataset

        dataset = ShapesDataset(spec.options["split"], **_synthetic_args(spec))
        return Captioned(SyntheticImages(dataset), [dataset.scene(i).caption for i in range(len(dataset))],
                         list(range(len(dataset))))  # fmt: skip
    image_key, caption_key = spec.options["image"], spec.options["caption"]
    root, rows = read_table(spec, [image_key, caption_key])
    index: dict[str, int] = {}
    captions, caption_image = [], []
    for row in rows:
        caption = (row[caption_key] or "").strip()
        if caption:
            captions.append(caption)
            caption_image.append(index.setdefault(row[image_key], len(index)))
    if not captions:
        raise ValueError(f"{spec.path}: every {caption_key!r} is empty")
    return Captioned(FileImages([root / p for p in index]), captions, caption_image)


def _coco(spec: Spec, images_dir: str | None) -> Captioned:
    file = _exists(spec.path, "caption file")
    folder = _exists(images_dir or spec.options["images"] or str(file.parent), "image folder")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        ids = {im["id"]: k for k, im in enumerate(data["images"])}
        paths = [folder / im["file_name"] for im in data["images"]]
        pairs = [(ids[a["image_id"]], a["caption"].strip()) for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{spec.path}: not a COCO caption file (images[{{id, file_name}}], "
                         f"annotations[{{image_id, caption}}]): {type(e).__name__}: {e}") from e  # fmt: skip
    if not pairs:
        raise ValueError(f"{spec.path}: no annotations")
    return Captioned(FileImages(paths), [c for _, c in pairs], [i for i, _ in pairs])


def _synthetic_args(spec: Spec) -> dict:
    from ..data.synthetic import ShapesConfig

    if spec.path != "shapes":
        raise ValueError(f"synthetic:{spec.path}: unknown generator; choose shapes")
    try:
        size, seed, image_size = (int(spec.options[k]) for k in ("size", "seed", "image_size"))
    except ValueError as e:
        raise ValueError(f"synthetic:{spec.path}: size, seed and image_size must be integers: {e}") from e
    return {"size": size, "config": ShapesConfig(image_size=image_size, seed=seed)}


def load_with_negatives(text: str) -> WithNegatives:
    """Images with a true caption and hard negatives: `synthetic:shapes` (colour and relation swaps of
    two-object scenes), `csv:FILE?negatives=COL1,COL2` (empty negative cells are ignored) or `sugarcrepe:`."""
    spec = parse_spec(text, ("csv", "tsv", "synthetic", "sugarcrepe"))
    if spec.scheme == "sugarcrepe":
        from .datasets.sugarcrepe import load_with_negatives as load_sugarcrepe

        return load_sugarcrepe(spec)
    if spec.scheme == "synthetic":
        from ..data.synthetic import compositional_task

        args = _synthetic_args(spec)
        task = compositional_task(spec.options["split"], args["size"], args["config"])
        kinds = sorted({p.kind for p in task.pairs})
        by_image: dict[int, dict[str, str]] = {}
        captions: dict[int, str] = {}
        for p in task.pairs:
            by_image.setdefault(p.index, {})[p.kind] = p.negative
            captions[p.index] = p.caption
        order = sorted(by_image)
        return WithNegatives(SyntheticImages(task.dataset), [captions[i] for i in order],
                             [[by_image[i][k] for k in kinds] for i in order], kinds)  # fmt: skip
    neg_cols = [c.strip() for c in spec.options["negatives"].split(",") if c.strip()]
    if not neg_cols:
        raise ValueError(f"{text}: name the negative-caption columns with ?negatives=COL1,COL2")
    image_key, caption_key = spec.options["image"], spec.options["caption"]
    root, rows = read_table(spec, [image_key, caption_key, *neg_cols])
    rows = [r for r in rows if (r[caption_key] or "").strip()]
    negatives = [[(r[c] or "").strip() for c in neg_cols] for r in rows]
    if not rows or not all(any(n) for n in negatives):
        raise ValueError(f"{spec.path}: every row needs a caption and at least one negative in {neg_cols}")
    return WithNegatives(FileImages([root / r[image_key] for r in rows]), [r[caption_key].strip() for r in rows],
                         negatives, neg_cols)  # fmt: skip


def load_multilabel(text: str) -> MultiLabel:
    """A multi-label image set from a published set's adapter: `voc2007-multilabel:DIR[?split=test|train]`."""
    from .datasets import MULTILABEL

    spec = parse_spec(text, tuple(MULTILABEL))
    return MULTILABEL[spec.scheme](spec)


def load_paired(text: str) -> Paired:
    """Pairs of images with a pair of captions each: `winoground:DIR`."""
    from .datasets.winoground import load_paired as load_winoground

    return load_winoground(parse_spec(text, ("winoground",)))


def load_scored(text: str) -> Scored:
    """Images with a numeric score column: `csv:FILE?score=COL`."""
    spec = parse_spec(text, ("csv", "tsv"))
    image_key, score_key = spec.options["image"], spec.options["score"]
    root, rows = read_table(spec, [image_key, score_key])
    try:
        scores = [float(r[score_key]) for r in rows]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{spec.path}: column {score_key!r} must hold numbers: {e}") from e
    return Scored(FileImages([root / r[image_key] for r in rows]), scores)
