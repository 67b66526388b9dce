"""PASCAL VOC 2007 (VOCdevkit/VOC2007/{JPEGImages, Annotations, ImageSets/Main}) as CLIP_benchmark 1.6.2 reads
it: `voc2007` (`PASCALVoc2007Cropped`, one crop per annotated object) and `voc2007_multilabel` (`PASCALVoc2007`,
whole images with the classes of their objects).

As CLIP_benchmark does:

- A split's images are the ids of `ImageSets/Main/aeroplane_<split>.txt` (its first column), in file order.
- Every `<object>` of an image's annotation counts, "difficult" and "truncated" ones included; an object's
  parts (`<part>`, on some persons) are not objects.
- A crop is Pillow's `crop((xmin, ymin, xmax, ymax))` of the annotation's 1-based, inclusive box, taken as
  0-based with right and bottom exclusive: the box VOC means less its leftmost column and top row.
- A multi-label image is positive for each class it has an object of, difficult or not (the -1/0/1 columns of
  the per-class ImageSets files, where 0 marks "only difficult objects", are not read).
- The 20 classes are VOC's own names ("diningtable", "pottedplant", "tvmonitor") with one template, "a photo of
  a {}.".

The annotations are parsed by `xml.etree`, refusing any DTD (`<!DOCTYPE`, `<!ENTITY`): VOC's annotations have
none, and with none there are no entities to expand. Boxes are read by tag name where CLIP_benchmark reads
`<bndbox>`'s children by position; VOC's files list them as xmin, ymin, xmax, ymax, so the two agree.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from ..images import CroppedImages, FileImages
from ..prompts import load_templates
from ..sources import Classification, MultiLabel, Spec
from .common import check_split, spec_root

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")  # fmt: skip
SPLITS = ("test", "train")  # what CLIP_benchmark's builder allows
Box = tuple[int, int, int, int]


def load_classification(spec: Spec) -> Classification:
    """`voc2007:DIR[?split=test|train]`: each annotated object cropped out, labelled with its class."""
    what = f"{spec.scheme}:{spec.path}"
    root, ids = _split_ids(spec)
    paths, boxes, labels = [], [], []
    for image_id in ids:
        for c, box in _objects(what, root / "Annotations" / f"{image_id}.xml"):
            paths.append(root / "JPEGImages" / f"{image_id}.jpg")
            boxes.append(box)
            labels.append(c)
    if not labels:
        raise ValueError(f"{what}: the {len(ids)} images of ?split={spec.options['split']} have no annotated objects")
    images = CroppedImages(paths, boxes, f"voc2007/{spec.options['split']}")
    return Classification(images, labels, list(CLASSES), load_templates("photo"))


def load_multilabel(spec: Spec) -> MultiLabel:
    """`voc2007-multilabel:DIR[?split=test|train]`: whole images, each with the classes of its objects."""
    what = f"{spec.scheme}:{spec.path}"
    root, ids = _split_ids(spec)
    labels = torch.zeros(len(ids), len(CLASSES), dtype=torch.bool)  # (N, C)
    for i, image_id in enumerate(ids):
        for c, _ in _objects(what, root / "Annotations" / f"{image_id}.xml"):
            labels[i, c] = True
    paths = [root / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
    return MultiLabel(FileImages(paths), labels, list(CLASSES), load_templates("photo"))


def find_voc2007(spec: Spec) -> Path:
    """The VOC2007 folder: DIR/VOCdevkit/VOC2007, DIR/VOC2007 or DIR itself."""
    root = spec_root(spec)
    for folder in (root / "VOCdevkit" / "VOC2007", root / "VOC2007", root):
        if (folder / "Annotations").is_dir() and (folder / "ImageSets" / "Main").is_dir():
            return folder
    raise ValueError(f"{spec.scheme}:{spec.path}: no VOC2007/Annotations and VOC2007/ImageSets/Main (expected "
                     "DIR = the folder holding VOCdevkit/, VOCdevkit/ or VOC2007/, as VOC's tars extract)")  # fmt: skip


def _split_ids(spec: Spec) -> tuple[Path, list[str]]:
    """(the VOC2007 folder, the split's image ids)."""
    split = check_split(spec, SPLITS)
    root = find_voc2007(spec)
    listing = root / "ImageSets" / "Main" / f"{CLASSES[0]}_{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{spec.scheme}:{spec.path}: no {listing} (?split={split} lists its images there; "
                                "the test split ships in VOCtest_06-Nov-2007.tar)")  # fmt: skip
    ids = []
    for n, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if fields and len(fields) != 2:
            raise ValueError(f"{spec.scheme}:{spec.path}: {listing} line {n}: {len(fields)} fields; expected "
                             "'<image id> <-1|0|1>'")  # fmt: skip
        ids += fields[:1]
    if not ids:
        raise ValueError(f"{spec.scheme}:{spec.path}: {listing} lists no images")
    return root, ids


def _objects(what: str, path: Path) -> list[tuple[int, Box]]:
    """(class index, box) of each `<object>` in an annotation file, in file order."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"{what}: cannot read annotation {path}: {e.strerror or e}") from e
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise ValueError(f"{what}: {path}: refusing an annotation with a DTD (VOC annotations have none)")
    try:
        tree = ET.fromstring(data)
    except ET.ParseError as e:
        raise ValueError(f"{what}: {path}: not XML: {e}") from e
    objects = []
    for obj in tree.findall("object"):
        name, box = obj.findtext("name", "").strip(), obj.find("bndbox")
        if name not in CLASSES:
            raise ValueError(f"{what}: {path}: object name {name!r}; VOC's classes are {', '.join(CLASSES)}")
        try:
            xmin, ymin, xmax, ymax = (int(box.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, ValueError) as e:
            raise ValueError(f"{what}: {path}: a {name!r} object without an integer "
                             "<bndbox><xmin/><ymin/><xmax/><ymax/></bndbox>") from e  # fmt: skip
        objects.append((CLASSES.index(name), (xmin, ymin, xmax, ymax)))
    return objects
