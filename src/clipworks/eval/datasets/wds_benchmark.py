"""CLIP_benchmark's WebDataset export, as published on the hub (clip-benchmark/wds_*) and copied to a folder:

    DIR/classnames.txt                          class names, one a line, in label order (classification)
    DIR/zeroshot_classification_templates.txt   prompt templates with "{c}" (classification; optional)
    DIR/dataset_type.txt                        "retrieval" or "multilabel" (absent: classification)
    DIR/SPLIT/nshards.txt                       the number of shards, n
    DIR/SPLIT/0.tar ... DIR/SPLIT/{n-1}.tar     samples `{key}.webp|png|jpg|jpeg` with `{key}.cls` (the label
                                                as decimal text), `{key}.npy` (multilabel: a multi-hot vector
                                                as a NumPy file, read without unpickling) or `{key}.txt`
                                                (captions, one a line)

The shards (uncompressed tar) are indexed once; an image is read by seeking to its member's data.

DIR may be `hf-hub:ORG/NAME[@REVISION]` (CLIP_benchmark's are clip-benchmark/wds_NAME): the metadata files and the
split's shards are fetched into the Hugging Face hub cache once, checked against the hub's SHA-256, and read there.
DIR may also be a URL (`s3://bucket/wds_NAME`, `https://host/wds_NAME`, any fsspec protocol): the same files are
fetched once into ~/.cache/clipworks/wds-benchmark (transient errors retried as training's shard reader retries
them, each file written under a temporary name and renamed when whole) and read there.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from ...data.decode import load_image
from ...hub import HubUnavailableError
from ...transforms import preprocess_file
from ..images import ImageSet, files_fingerprint
from ..sources import Captioned, Classification, MultiLabel, Spec
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
        use = "`clipworks eval retrieval`" if kind == "retrieval" else "`clipworks benchmark` (mean average precision)"
        raise ValueError(f"{what}: a {kind} set (dataset_type.txt); evaluate it with {use}")
    names = read_names(root / "classnames.txt", what)
    images, targets = _index(what, shards, "cls")
    try:
        labels = [int(t.decode("utf-8")) for t in targets]
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
        for line in filter(None, (c.strip() for c in text.decode("utf-8").splitlines())):
            captions.append(line)
            caption_image.append(i)
    if not captions:
        raise ValueError(f"{what}: every .txt is empty")
    return Captioned(images, captions, caption_image)


def load_multilabel(spec: Spec) -> MultiLabel:
    """`wds-benchmark:DIR[?split=test]`, a multilabel export (voc2007_multilabel): each image's `.npy` holds a
    multi-hot vector over classnames.txt."""
    import numpy as np
    import torch

    root, shards, kind = _layout(spec)
    what = f"wds-benchmark:{spec.path}"
    if kind != "multilabel":
        raise ValueError(f"{what}: a {kind} set (dataset_type.txt does not say multilabel)")
    names = read_names(root / "classnames.txt", what)
    images, targets = _index(what, shards, "npy")
    rows = []
    for k, data in enumerate(targets):
        try:
            row = np.load(io.BytesIO(data), allow_pickle=False)  # arrays only: never unpickle
        except ValueError as e:
            raise ValueError(f"{what}: {images.name(k)}.npy is not a NumPy array file: {e}") from e
        if row.shape != (len(names),) or not np.isin(row, (0, 1)).all():
            raise ValueError(f"{what}: {images.name(k)}.npy holds {row.dtype}{list(row.shape)}; expected a multi-hot "
                             f"vector of the {len(names)} classes in classnames.txt")  # fmt: skip
        rows.append(torch.from_numpy(row.astype(bool)))
    return MultiLabel(images, torch.stack(rows), names, _templates(root / "zeroshot_classification_templates.txt", what))


def dataset_type(spec: Spec) -> str:
    """The export's dataset_type.txt: classification, retrieval or multilabel."""
    return _layout(spec)[2]


HUB_PREFIX = "hf-hub:"
METADATA = ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt")


def fetch_command(repo_id: str, split: str, local_dir: str = "DIR") -> str:
    """The command that fetches an export's split by hand (what to run where this machine cannot reach the hub)."""
    include = " ".join(f"'{f}'" for f in (*METADATA, f"{split}/*"))
    return f"huggingface-cli download {repo_id} --repo-type dataset --include {include} --local-dir {local_dir}"


def fetch_export(repo: str, split: str = "test") -> Path:
    """The cached snapshot of a hub export (`ORG/NAME[@REVISION]`): its metadata files and one split's shards.

    Raises:
        HubUnavailableError: offline or unreachable and not (all) cached; the message says what to fetch.
    """
    from ...hub import download_dataset

    repo_id, _, revision = repo.partition("@")
    try:
        return download_dataset(repo_id, [*METADATA, f"{split}/*"], revision=revision or None)
    except HubUnavailableError as e:
        raise HubUnavailableError(f"{e}; elsewhere, fetch it with `{fetch_command(repo_id, split)}` and read "
                                  "wds-benchmark:DIR") from e  # fmt: skip


REMOTE_CACHE = Path("~/.cache/clipworks/wds-benchmark")
_CHUNK = 1 << 20


def fetch_remote_export(url: str, split: str = "test", cache: str | Path | None = None) -> Path:
    """A local copy of an export at a URL (its metadata files and one split's shards), fetched once.

    Raises:
        ShardUnavailable: a file that keeps failing, or a split without nshards.txt.
    """
    from ...data.shards import ShardUnavailable

    base = url.rstrip("/")
    key = hashlib.sha256(base.encode()).hexdigest()[:16]
    root = Path(cache or REMOTE_CACHE).expanduser() / key / base.rpartition("/")[2]
    done = root / f".fetched-{split}"  # written last: the metadata and the split are all there
    if done.is_file():
        return root
    for name in METADATA:  # optional: a classification export has no dataset_type.txt
        try:
            _fetch_file(f"{base}/{name}", root / name)
        except ShardUnavailable as e:
            if "FileNotFoundError" not in str(e):
                raise
    _fetch_file(f"{base}/{split}/nshards.txt", root / split / "nshards.txt")
    try:
        count = int((root / split / "nshards.txt").read_text().strip())
    except ValueError as e:
        raise ValueError(f"{base}/{split}/nshards.txt should hold the number of shards: {e}") from e
    for k in range(count):
        _fetch_file(f"{base}/{split}/{k}.tar", root / split / f"{k}.tar")
    done.touch()
    return root


def _fetch_file(url: str, dest: Path) -> None:
    """`url` into `dest` unless it is there (whole: files appear only by rename), retrying transient errors."""
    from ...data.shards import read_shard

    if dest.is_file():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    try:
        with open(part, "wb") as out:  # chunks of a fixed size: a retry reads past those already written
            for chunk in read_shard(url, _chunks):
                out.write(chunk)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)


def _chunks(f) -> Iterator[bytes]:
    """The stream in chunks of exactly `_CHUNK` bytes (the last one shorter), however the reads come back."""
    while True:
        chunk = bytearray()
        while len(chunk) < _CHUNK and (data := f.read(_CHUNK - len(chunk))):
            chunk += data
        if chunk:
            yield bytes(chunk)
        if len(chunk) < _CHUNK:
            return


def export_root(spec: Spec) -> Path:
    """The local folder of a spec's export: DIR itself, or the cached copy of a hub or URL export (fetched once)."""
    if spec.path.startswith(HUB_PREFIX):
        return fetch_export(spec.path[len(HUB_PREFIX) :], spec.options["split"])
    if "://" in spec.path:
        return fetch_remote_export(spec.path, spec.options["split"])
    return spec_root(spec)


def _layout(spec: Spec) -> tuple[Path, list[Path], str]:
    """(DIR, the split's shards, the dataset type)."""
    root, split = export_root(spec), spec.options["split"]
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


def _index(what: str, shards: list[Path], target: str) -> tuple[TarImages, list[bytes]]:
    """The shards' images and, per image, the content of its `target` member (`cls`, `npy` or `txt`)."""
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
                        extra = " (it has a .npy: a multilabel set without dataset_type.txt?)" if "npy" in files else ""
                        raise ValueError(f"{what}: {shard.name}: sample {key!r} has no {missing}{extra}")
                    members.append((j, image.offset_data, image.size, key))
                    targets.append(tar.extractfile(files[target]).read())
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
