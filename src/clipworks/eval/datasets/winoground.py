"""Winoground (Thrush et al. 2022) as the hub's facebook/winoground ships it, data/images.zip extracted:

    data/examples.jsonl   one example a line: {"id": 0, "caption_0": "...", "caption_1": "...",
                          "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "collapsed_tag": "Object", ...}
    data/images/          ex_0_img_0.png, ex_0_img_1.png, ...

The two captions hold the same words in a different order; caption k describes image k.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..images import FileImages
from ..sources import IMAGE_EXTENSIONS, Paired, Spec
from .common import spec_root


def load_paired(spec: Spec) -> Paired:
    """`winoground:DIR[?images=DIR]`: DIR holds examples.jsonl (or data/examples.jsonl); images are read from
    `?images=` (default: the images/ folder beside examples.jsonl)."""
    what = f"winoground:{spec.path}"
    root = spec_root(spec)
    file = next((f for f in (root / "examples.jsonl", root / "data" / "examples.jsonl") if f.is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{what}: no examples.jsonl or data/examples.jsonl (expected facebook/winoground's "
                                "files)")  # fmt: skip
    folder = Path(spec.options["images"] or file.parent / "images").expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: image folder not found: {str(folder)!r} (extract data/images.zip, or name "
                                "the folder with ?images=DIR)")  # fmt: skip
    names, captions, tags = [], [], []
    lines = file.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            names += [ex["image_0"], ex["image_1"]]
            captions += [ex["caption_0"].strip(), ex["caption_1"].strip()]
            tags.append(str(ex.get("collapsed_tag", "")))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{what}: {file.name} line {n}: not a Winoground example (caption_0, caption_1, "
                             f"image_0, image_1): {type(e).__name__}: {e}") from e  # fmt: skip
    if not names:
        raise ValueError(f"{what}: {file.name} holds no examples")
    # image_0 is named without its extension (the files are .png); take the extension the first one has on disk
    ext = next((e for e in ("", *IMAGE_EXTENSIONS) if (folder / f"{names[0]}{e}").is_file()), None)
    if ext is None:
        raise FileNotFoundError(f"{what}: no image {names[0]}.png (or .jpg, ...) in {folder}")
    return Paired(FileImages([folder / f"{name}{ext}" for name in names]), captions, tags)
