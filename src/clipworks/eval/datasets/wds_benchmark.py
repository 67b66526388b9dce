"""CLIP_benchmark's WebDataset export, as published on the hub (clip-benchmark/wds_*) and copied to a folder:

    DIR/classnames.txt                          class names, one a line, in label order (classification)
    DIR/zeroshot_classification_templates.txt   prompt templates with "{c}" (classification; optional)
    DIR/dataset_type.txt                        "retrieval" or "multilabel" (absent: classification)
    DIR/SPLIT/nshards.txt                       the number of shards, n
    DIR/SPLIT/0.tar ... DIR/SPLIT/{n-1}.tar     samples `{key}.webp|png|jpg|jpeg` with `{key}.cls` (the label
                                                as decimal text) or `{key}.txt` (captions, one a line)

The shards (uncompressed tar) are indexed once; an image is read by seeking to its member's data.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from PIL import Image

from ...data.decode import load_image
from ...transforms import preprocess_file
from ..images import ImageSet, files_fingerprint
from ..sources import Captioned, Classification, Spec
from .common import read_names, spec_root

IMAGE_TYPES = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference


class TarImages(ImageSet):
    """Images stored as members of tar files: (shard index, data offset, size, sample key) each."""

    def __init__(self, shards: list[Path], members: list[tuple[int, int, int, str]]):
        self.shards, self.members = shards, members

    def __len__(self) -> int:
        return len(self.members)

    def _bytes(self, i: int) -> bytes:
        shard, offset, size, _ = self.members[i]
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.name(i)}: the shard ends inside the image")
        return data

    def load(self, i: int) -> Image.Image:
        return load_image(self._bytes(i))

    def preprocess(self, i: int, transform):
        return preprocess_file(transform, self._bytes(i))

    def name(self, i: int) -> str:
        shard, _, _, key = self.members[i]
        return f"{self.shards[shard]}:{key}"

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{files_fingerprint(self.shards)}\0{len(self)}".encode()).hexdigest()


def load_classification(spec: Spec) -> Classification:
    """`wds-benchmark:DIR[?split=test]`, a classification export: labels from `.cls`, names from classnames.txt,
    and the set's own templates when it has them."""
    root, shards, kind = _layout(spec)
    what = f"wds-benchmark:{spec.path}"
    if kind != "classification":
        use = "`clipworks eval retrieval`" if kind == "retrieval" else "a single-label set"
        raise ValueError(f"{what}: a {kind} set (dataset_type.txt); zero-shot classification needs {use}")
    names = read_names(root / "classnames.txt", what)
    images, targets = _index(what, shards, "cls")
    try:
        labels = [int(t) for t in targets]
    except ValueError as e:
        raise ValueError(f"{what}: a .cls member is not an integer label: {e}") from e
    bad = next((k for k in labels if not 0 <= k < len(names)), None)
    if bad is not None:
        raise ValueError(f"{what}: label {bad} but classnames.txt names {len(names)} classes")
    return Classification(images, labels, names, _templates(root / "zeroshot_classification_templates.txt", what))


def load_captioned(spec: Spec) -> Captioned:
    """`wds-benchmark:DIR[?split=test]`, a retrieval export: each image's `.txt` holds its captions, one a line."""
    _, shards, kind = _layout(spec)
    what = f"wds-benchmark:{spec.path}"
    if kind != "retrieval":
        raise ValueError(f"{what}: a {kind} set (no dataset_type.txt saying retrieval); evaluate it with "
                         "`clipworks eval zeroshot`")  # fmt: skip
    images, targets = _index(what, shards, "txt")
    captions, caption_image = [], []
    for i, text in enumerate(targets):
        for line in filter(None, (c.strip() for c in text.splitlines())):
            captions.append(line)
            caption_image.append(i)
    if not captions:
        raise ValueError(f"{what}: every .txt is empty")
    return Captioned(images, captions, caption_image)


def _layout(spec: Spec) -> tuple[Path, list[Path], str]:
    """(DIR, the split's shards, the dataset type)."""
    root, split = spec_root(spec), spec.options["split"]
    what = f"wds-benchmark:{spec.path}"
    count_file = root / split / "nshards.txt"
    if not count_file.is_file():
        found = sorted(d.name for d in root.iterdir() if (d / "nshards.txt").is_file())
        raise ValueError(f"{what}: no {split}/nshards.txt (splits found: {', '.join(found) or 'none'}); "
                         "expected CLIP_benchmark's layout DIR/SPLIT/nshards.txt, DIR/SPLIT/0.tar, ...")  # fmt: skip
    try:
        count = int(count_file.read_text().strip())
    except ValueError as e:
        raise ValueError(f"{what}: {count_file} should hold the number of shards: {e}") from e
    shards = [root / split / f"{k}.tar" for k in range(count)]
    missing = [s for s in shards if not s.is_file()]
    if missing or not shards:
        raise FileNotFoundError(f"{what}: {len(missing)} of the {count} shards named by {count_file} are missing, "
                                f"first {missing[0] if missing else '0.tar'}")  # fmt: skip
    type_file = root / "dataset_type.txt"
    kind = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    return root, shards, kind or "classification"


def _index(what: str, shards: list[Path], target: str) -> tuple[TarImages, list[str]]:
    """The shards' images and, per image, the text of its `target` member (`cls` or `txt`)."""
    members, targets = [], []
    for j, shard in enumerate(shards):
        try:
            with tarfile.open(shard, mode="r:") as tar:  # plain tar: member offsets are file offsets
                samples: dict[str, dict[str, tarfile.TarInfo]] = {}
                for m in tar:
                    folder, _, base = m.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if m.isfile() and dot and stem:
                        samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = m
                for key, files in samples.items():
                    image = next((files[e] for e in IMAGE_TYPES if e in files), None)
                    if image is None or target not in files:
                        missing = f"a .{'/.'.join(IMAGE_TYPES)} image" if image is None else f"a .{target} member"
                        extra = " (.npy: a multilabel set, not supported)" if "npy" in files else ""
                        raise ValueError(f"{what}: {shard.name}: sample {key!r} has no {missing}{extra}")
                    members.append((j, image.offset_data, image.size, key))
                    targets.append(tar.extractfile(files[target]).read().decode("utf-8"))
        except (tarfile.TarError, EOFError) as e:
            raise ValueError(f"{what}: {shard} is not a readable uncompressed tar: {type(e).__name__}: {e}") from e
    return TarImages(shards, members), targets


def _templates(path: Path, what: str) -> list[str] | None:
    """The set's own prompt templates, CLIP_benchmark's "{c}" written "{}"; None when it has none."""
    if not path.is_file():
        return None
    templates = [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    bad = [t for t in templates if t.count("{c}") != 1 or t.count("{") != 1]
    if bad:
        raise ValueError(f"{what}: {path.name}: each template needs exactly one {{c}} for the class name; bad: "
                         f"{bad[:3]}")  # fmt: skip
    return [t.replace("{c}", "{}") for t in templates] or None
