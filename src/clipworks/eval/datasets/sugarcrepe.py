"""SugarCrepe (Hsieh et al. 2023), hard negatives over COCO val2017 images, as its repository ships them: one
JSON file per kind of negative (add_att.json, add_obj.json, replace_att.json, replace_obj.json,
replace_rel.json, swap_att.json, swap_obj.json), each

    {"0": {"filename": "000000391895.jpg", "caption": "...", "negative_caption": "..."}, ...}

Every entry is one image with its caption and one negative; the file's stem names the kind, and accuracy is
reported per kind (the overall accuracy is over all entries).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..images import FileImages
from ..sources import Spec, WithNegatives


def load_with_negatives(spec: Spec) -> WithNegatives:
    """`sugarcrepe:PATH[?images=DIR]`: PATH is one of the JSON files or the folder holding them (all its *.json);
    images are read from DIR (COCO's val2017 folder; default: the JSON files' folder)."""
    what = f"sugarcrepe:{spec.path}"
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {spec.path!r} (expected SugarCrepe's JSON files or their "
                                "folder)")  # fmt: skip
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{what}: no .json files in the folder (expected add_att.json, swap_obj.json, ...)")
    folder = Path(spec.options["images"] or (path if path.is_dir() else path.parent)).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: image folder not found: {str(folder)!r}; name COCO's val2017 with "
                                "?images=DIR")  # fmt: skip
    kinds = [f.stem for f in files]
    paths, captions, negatives = [], [], []
    for m, file in enumerate(files):
        try:
            entries = json.loads(file.read_text(encoding="utf-8")).values()
            rows = [(e["filename"], e["caption"].strip(), e["negative_caption"].strip()) for e in entries]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{what}: {file.name} is not a SugarCrepe file ({{id: {{filename, caption, "
                             f"negative_caption}}}}): {type(e).__name__}: {e}") from e  # fmt: skip
        for filename, caption, negative in rows:
            paths.append(folder / filename)
            captions.append(caption)
            negatives.append([negative if k == m else "" for k in range(len(files))])  # one column per kind
    if not paths:
        raise ValueError(f"{what}: no entries in {', '.join(f.name for f in files)}")
    if not paths[0].is_file():  # the folder is likely wrong; unreadable images later are skipped and counted
        raise FileNotFoundError(f"{what}: no image {paths[0]}; name COCO's val2017 folder with ?images=DIR")
    return WithNegatives(FileImages(paths), captions, negatives, kinds)
