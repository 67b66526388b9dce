"""Karpathy's caption splits of Flickr8k, Flickr30k and COCO (dataset_flickr8k.json, dataset_flickr30k.json,
dataset_coco.json), the files retrieval results are usually reported on:

    {"images": [{"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": "Two young guys ..."}, ...],
                 "filepath": "val2014"  (COCO only: the image's sub-folder)}, ...]}

Flickr's test splits have 1000 images and COCO's 5000, each with (about) 5 captions.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..images import FileImages
from ..sources import Captioned, Spec

SPLITS = ("train", "restval", "val", "test")


def load_captioned(spec: Spec, images_dir: str | None = None) -> Captioned:
    """`karpathy:FILE[?images=DIR&split=test]`: the split's images with all their captions; images are read from
    DIR/[filepath/]filename (DIR: `images_dir` (`--images`), else `?images=`, else the JSON's folder, as
    `coco:`)."""
    what = f"karpathy:{spec.path}"
    split = spec.options["split"]
    if split not in SPLITS:
        raise ValueError(f"{what}: ?split={split}: choose {', '.join(SPLITS)}")
    file = Path(spec.path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"caption file not found: {spec.path!r} (expected Karpathy's dataset_*.json)")
    folder = Path(images_dir or spec.options["images"] or file.parent).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: image folder not found: {str(folder)!r}; name it with ?images=DIR")
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))["images"]
        chosen = [e for e in entries if e["split"] == split]
        paths = [folder / e.get("filepath", "") / e["filename"] for e in chosen]
        sentences = [[s["raw"].strip() for s in e["sentences"]] for e in chosen]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{what}: not a Karpathy split file (images[{{filename, split, sentences[{{raw}}]}}]): "
                         f"{type(e).__name__}: {e}") from e  # fmt: skip
    if not chosen:
        found = sorted({e.get("split") for e in entries if isinstance(e, dict)} - {None})
        raise ValueError(f"{what}: no {split!r} images (splits found: {', '.join(found) or 'none'})")
    if not paths[0].is_file():  # the folder is likely wrong; unreadable images later are skipped and counted
        raise FileNotFoundError(f"{what}: no image {paths[0]}; name the folder holding the images with ?images=DIR "
                                "(Flickr30k: flickr30k-images, COCO: the folder holding val2014/)")  # fmt: skip
    captions, caption_image = [], []
    for i, texts in enumerate(sentences):
        for text in filter(None, texts):
            captions.append(text)
            caption_image.append(i)
    return Captioned(FileImages(paths), captions, caption_image)
