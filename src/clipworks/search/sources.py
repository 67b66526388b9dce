"""What an embed job reads: a `--data` source split into numbered shards, and the datasets that decode them.

folder and csv/tsv sources are listed up front and cut into shards of `shard_size` items in a fixed order;
a wds source has one output shard per input tar. Decoding happens in DataLoader worker processes; each
loader element is a `Chunk` of up to `batch_size` decoded images of one shard, with the inputs that could
not be read listed (never fatal). `draft_size` opts into reduced-size JPEG decoding (`load_image`); `raw_jpegs`
leaves plain JPEGs undecoded (their bytes travel in `Chunk.jpegs`, for `embed --gpu-decode` to decode on the GPU).

Inputs carry metadata columns into their records: a csv/tsv source its other columns (typed per column, see
`_typed_columns`), a WebDataset sample the scalar fields of its `.json` (img2dataset's width, height, url,
similarity, ...); a folder source has none. `store.records_table` checks the names when the shard is written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tarfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..data.datasets import FOLDER_EXTENSIONS, parse_data_spec
from ..data.decode import ImageDecodeError, load_image
from ..data.shards import is_local
from ..data.wds import expand_sources, shard_samples
from ..transforms import preprocess_file
from .store import RECORD_FIELDS, metadata_names, warn_dropped

IMAGE_SCHEMES = ("folder", "csv", "tsv", "wds")


@dataclass(frozen=True)
class Item:
    """One input: its key, the image file (None for a caption-only row; for WebDataset the tar, with the
    image's `member` name in it) and its caption."""

    key: str
    path: str | None
    caption: str | None = None
    member: str | None = None
    stamp: str | None = None  # "size:mtime_ns" of a listed file, to tell a changed file at `embed --update`
    metadata: dict = field(default_factory=dict, hash=False)  # column -> str, int, float, bool or None


@dataclass
class Plan:
    """An embed job's inputs: `shards[i]` lists shard i's items (folder, csv) or names its tar (wds)."""

    scheme: str
    shards: list  # list[list[Item]] or list[str] (tar paths)
    roots: list[str]
    fingerprint: str  # sha256 of the inputs' names, to refuse resuming over a changed source


@dataclass
class Chunk:
    """Decoded images of part `part` of one shard (parts number a shard's batches in input order); `end`
    marks the shard's last part. Parts may arrive out of order (the DataLoader hands work to idle workers)."""

    shard: int
    records: list[dict] = field(default_factory=list)
    images: torch.Tensor | None = None  # (B, 3, S, S)
    skipped: list[str] = field(default_factory=list)  # "key<TAB>reason"
    end: bool = False
    part: int = 0
    embeddings: np.ndarray | None = None  # (B, D) when the worker encoded the images itself (`encoder`)
    dropped: set[str] = field(default_factory=set)  # `.json` fields left out for their names (warned about once)
    encode_seconds: float = 0.0  # time the worker spent encoding this chunk (`encoder`)
    # With `raw_jpegs`: the undecoded JPEG files of the records at `jpeg_rows`;
    # `images` then holds the other records' pixels, in record order.
    jpegs: list[bytearray] = field(default_factory=list)
    jpeg_rows: list[int] = field(default_factory=list)

    def pin_memory(self) -> Chunk:
        """Pin the images for a faster copy to the GPU (DataLoader calls this with pin_memory=True)."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def _fingerprint(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode("utf-8", "surrogatepass")).hexdigest()


def file_stamp(path: str | os.PathLike) -> str | None:
    """"size:mtime_ns" of a file (None if it cannot be read): what `embed --update` compares."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def _folder_items(root: Path) -> list[Item]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file())
    items = []
    for p in files:
        text = p.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else None
        items.append(Item(p.relative_to(root).as_posix(), str(p.resolve()), caption or None, stamp=file_stamp(p)))
    return items


_INT = re.compile(r"[+-]?(0|[1-9][0-9]*)")  # no leading zeros: "00123" (an id, a postcode) stays text
_FLOAT = re.compile(r"[+-]?((0|[1-9][0-9]*)(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _typed_columns(columns: dict[str, list[str]]) -> dict[str, list]:
    """A csv's metadata columns typed as a whole: int when every non-empty value is an integer, else float when
    every one is a number, else bool when every one is true/false (any case), else text; "" is missing (None)."""
    typed = {}
    for name, values in columns.items():
        present = [v.strip() for v in values if v.strip()]
        if all(_INT.fullmatch(v) for v in present):
            convert = int
        elif all(_FLOAT.fullmatch(v) for v in present):
            convert = float
        elif all(v.lower() in ("true", "false") for v in present):
            convert = lambda v: v.lower() == "true"  # noqa: E731
        else:
            convert = str
        typed[name] = [convert(v.strip()) if convert is not str and v.strip() else v if v.strip() else None
                       for v in values]  # fmt: skip
    return typed


def _table_items(file: Path, delimiter: str, image_col: str, caption_col: str, need_images: bool) -> list[Item]:
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        found = reader.fieldnames or []
        wanted = image_col if need_images else caption_col
        if wanted not in found:
            raise ValueError(f"{file}: no column {wanted!r} (columns found: {found}); name the columns with "
                             "?image=COL&caption=COL")  # fmt: skip
        table = list(reader)
    rows = [(row.get(image_col) or "", (row.get(caption_col) or "").strip() or None) for row in table]
    names, metadata = [c for c in found if c not in (image_col, caption_col)], None
    if need_images:  # the other columns are the rows' metadata (a caption bank keeps only captions)
        kept, dropped = metadata_names(names)
        warn_dropped(dropped + [c for c in names if c in RECORD_FIELDS])
        typed = _typed_columns({c: [row.get(c) or "" for row in table] for c in kept})
        metadata = [dict(zip(typed, values)) for values in zip(*typed.values())] if typed else None
    items, seen = [], {}
    for j, (image, caption) in enumerate(rows):
        if need_images and not image:
            continue
        key = image or f"row-{len(items)}"
        seen[key] = seen.get(key, 0) + 1
        key = key if seen[key] == 1 else f"{key}#{seen[key] - 1}"  # a file listed twice (several captions)
        path = str((file.parent / image).resolve()) if image else None
        items.append(Item(key, path, caption, stamp=file_stamp(path) if path else None,
                          metadata=metadata[j] if metadata else {}))  # fmt: skip
    return items


def plan_images(data: str, shard_size: int) -> Plan:
    """List an image source and cut it into shards.

    Raises:
        ValueError: a bad spec, a scheme embed does not read, or a source with no images.
        FileNotFoundError: the folder, file or a tar shard does not exist.
    """
    if shard_size < 1:
        raise ValueError(f"shard size {shard_size}: expected a positive integer")
    spec = parse_data_spec(data)
    if spec.scheme not in IMAGE_SCHEMES:
        raise ValueError(f"embed reads {', '.join(s + ':' for s in IMAGE_SCHEMES)} sources; got {data!r}")
    if spec.scheme == "wds":
        tars = _tars(spec.path)
        roots = sorted({str(Path(t).parent) for t in tars if is_local(t)})  # streamed shards are not served
        return Plan("wds", tars, roots, _fingerprint(tars))
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{spec.scheme} source not found: {spec.path!r}")
    if spec.scheme == "folder":
        if not path.is_dir():
            raise ValueError(f"folder:{spec.path}: not a directory")
        items, root = _folder_items(path), path.resolve()
    else:
        delimiter = "," if spec.scheme == "csv" else "\t"
        items = _table_items(path, delimiter, spec.option("image"), spec.option("caption"), need_images=True)
        root = path.resolve().parent
    if not items:
        raise ValueError(f"{data}: no images found (extensions read: {', '.join(FOLDER_EXTENSIONS)})")
    shards = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    return Plan(spec.scheme, shards, [str(root)], _fingerprint([i.key for i in items]))


def _tars(pattern: str) -> list[str]:
    """The shards of a `wds:` pattern (`::`-joined sources, braces); local ones resolved and checked up front,
    streamed ones (URLs, `pipe:`) kept as given and read through `shard_samples` (with retries)."""
    names = [p for source in expand_sources(pattern) for p in source]
    tars = [str(Path(p).expanduser().resolve()) if is_local(p) else p for p in names]
    missing = [t for t in tars if is_local(t) and not Path(t).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(tars)} shards not found: {missing[:3]}")
    return tars


def _tar_captions(tars: list[str]) -> list[Item]:
    """The captions (`.txt`, or a `.json` "caption") of every sample of the tars, in order; a cut or
    unreadable tar gives what was read before the damage, with a warning (as training reads it)."""
    rows = []
    for tar in tars:
        try:
            for key, files in shard_samples(tar):
                if caption := _caption(files):
                    rows.append(Item(key, None, caption))
        except (tarfile.TarError, OSError, EOFError) as e:
            warnings.warn(f"shard {tar}: read stopped early: {type(e).__name__}: {e}", stacklevel=2)
    return rows


def _sample_json(files: dict) -> dict:
    """A sample's `.json` object ({} when it has none or it is not an object)."""
    try:
        obj = json.loads(files["json"]) if "json" in files else {}
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _caption(files: dict, meta: dict | None = None) -> str | None:
    caption = files["txt"].decode("utf-8", errors="replace").strip() if "txt" in files else None
    if caption is None:
        caption = (_sample_json(files) if meta is None else meta).get("caption")
    return caption.strip() if isinstance(caption, str) and caption.strip() else None


def _json_metadata(meta: dict) -> tuple[dict, list[str]]:
    """(the scalar fields of a sample's `.json` as metadata, the names left out): nested values are skipped, and
    so are "caption" (the caption) and "key" (img2dataset's copy of the sample key) without a word."""
    scalar = (str, int, float, type(None))
    fields = {k: v for k, v in meta.items() if k not in ("caption", "key") and isinstance(v, scalar)}
    kept, dropped = metadata_names(fields)
    return {k: fields[k] for k in kept}, dropped + [k for k in fields if k in RECORD_FIELDS]


def plan_texts(data: str, shard_size: int) -> Plan:
    """List the distinct captions of a source (csv/tsv column, folder `.txt` files, WebDataset shards'
    `.txt`/`.json` captions, or a plain text file with one caption per line) and cut them into shards. Each
    caption is embedded once.

    Raises:
        ValueError: a bad spec or no captions.
        FileNotFoundError: the source does not exist.
    """
    if shard_size < 1:
        raise ValueError(f"shard size {shard_size}: expected a positive integer")
    scheme = data.partition(":")[0]
    if scheme == "wds":
        rows = _tar_captions(_tars(parse_data_spec(data).path))
    elif scheme in ("csv", "tsv", "folder"):
        spec = parse_data_spec(data)
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{scheme} source not found: {spec.path!r}")
        if scheme == "folder":
            rows = [i for i in _folder_items(path) if i.caption]
        else:
            delimiter = "," if scheme == "csv" else "\t"
            rows = _table_items(path, delimiter, spec.option("image"), spec.option("caption"), need_images=False)
    else:
        path = Path(data).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"caption file not found: {data!r} (or use a csv:, tsv: or folder: source)")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        rows = [Item("", None, line.strip()) for line in lines if line.strip()]
    unique: dict[str, Item] = {}
    for item in rows:
        if item.caption and item.caption not in unique:
            unique[item.caption] = Item(f"text-{len(unique)}", item.path, item.caption)
    items = list(unique.values())
    if not items:
        raise ValueError(f"{data}: no captions found")
    shards = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    return Plan("text", shards, [], _fingerprint([i.caption for i in items]))


def _record(item: Item) -> dict:
    fixed = {"key": item.key, "path": item.path, "caption": item.caption, "member": item.member, "stamp": item.stamp}
    return {**item.metadata, **fixed}


def _decode_into(chunk: Chunk, item: Item, source, transform, images: list, draft_size: int | None,
                 raw_jpegs: bool = False) -> None:  # fmt: skip
    if raw_jpegs:
        from ..data.jpeg import gpu_decodable

        data = source if isinstance(source, bytes) else _read_bytes(source)
        if data is not None and gpu_decodable(data):
            chunk.jpeg_rows.append(len(chunk.records))
            chunk.jpegs.append(bytearray(data))  # pickled inline to the main process (a tensor each would cost a
            # shared-memory segment and a file descriptor)
            chunk.records.append(_record(item))
            return
    try:
        if draft_size is None:
            images.append(preprocess_file(transform, source))
        else:
            images.append(transform(load_image(source, draft_size=draft_size)))
        chunk.records.append(_record(item))
    except ImageDecodeError as e:
        chunk.skipped.append(f"{item.key}\t{e}".replace("\n", " "))


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None  # decoded (and reported) by the exact route


def _file_bytes(item: Item) -> int:
    return int(item.stamp.partition(":")[0]) if item.stamp else 0


def to_uint8(images: torch.Tensor, cfg) -> torch.Tensor:
    """The uint8 pixels an evaluation transform normalised into `images` (B, 3, S, S), exactly: its float32
    steps ((x / 255 - mean) / std) are undone to within far less than half a level, then rounded. A quarter of
    the bytes to hand from a worker to the process feeding a GPU, which normalises them again there
    (`normalise`, the same float32 operations: the same values)."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
    return images.mul(std).add_(mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def normalise(pixels: torch.Tensor, cfg) -> torch.Tensor:
    """float32 (B, 3, S, S) model input from uint8 pixels, on their device: `EvalTransform`'s operations."""
    # copied without waiting (`non_blocking`): a GPU stays busy with the batch before
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1).to(pixels.device, non_blocking=True)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1).to(pixels.device, non_blocking=True)
    return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)


def _finish(chunk: Chunk, images: list, encoder=None, uint8_cfg=None) -> Chunk:
    chunk.images = torch.stack(images) if images else None  # (B, 3, S, S)
    if uint8_cfg is not None and chunk.images is not None:
        chunk.images = to_uint8(chunk.images, uint8_cfg)
    if encoder is not None and chunk.images is not None:
        start = time.perf_counter()
        chunk.embeddings, chunk.images = encoder(chunk.images), None
        chunk.encode_seconds = time.perf_counter() - start
    return chunk


class ListedImages(Dataset):
    """Map-style: element j decodes the j-th batch of the pending shards (folder, csv) into a `Chunk`; with
    an `encoder` (images -> embeddings), the chunk carries the batch's embeddings instead of its pixels; with
    `raw_jpegs`, its plain JPEGs' bytes (`Chunk.jpegs`) instead of theirs; with `uint8_cfg` (the transform's
    `PreprocessConfig`), its pixels as uint8 (`to_uint8`)."""

    def __init__(self, shards: dict[int, list[Item]], transform, batch_size: int, draft_size: int | None = None,
                 encoder=None, raw_jpegs: bool = False, uint8_cfg=None):  # fmt: skip
        self.transform, self.draft_size, self.encoder, self.raw_jpegs = transform, draft_size, encoder, raw_jpegs
        self.uint8_cfg = uint8_cfg
        self.batches = []  # (shard, items, last, part)
        for shard, items in sorted(shards.items()):
            starts = range(0, len(items), batch_size)
            batches = [(shard, items[s : s + batch_size], s == starts[-1], p) for p, s in enumerate(starts)]
            # Within a shard, the batches of most bytes (the slowest to decode) go first, so that a job does not
            # end with one worker on a batch of large photos while the others idle (shards still finish in turn).
            self.batches += sorted(batches, key=lambda b: -sum(_file_bytes(i) for i in b[1]))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> Chunk:
        shard, items, last, part = self.batches[j]
        chunk, images = Chunk(shard, end=last, part=part), []
        for item in items:
            _decode_into(chunk, item, item.path, self.transform, images, self.draft_size, self.raw_jpegs)
        return _finish(chunk, images, self.encoder, self.uint8_cfg)


class TarImages(IterableDataset):
    """Iterable: each DataLoader worker reads whole pending tar shards (shard j to worker j % workers) and
    yields `Chunk`s of up to `batch_size` samples in tar order; a shard's last chunk has `end=True`. `encoder`
    as for `ListedImages`."""

    def __init__(self, shards: dict[int, str], transform, batch_size: int, draft_size: int | None = None,
                 encoder=None, raw_jpegs: bool = False, uint8_cfg=None):  # fmt: skip
        self.shards, self.transform, self.batch_size = sorted(shards.items()), transform, batch_size
        self.draft_size, self.encoder, self.raw_jpegs, self.uint8_cfg = draft_size, encoder, raw_jpegs, uint8_cfg

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for shard, tar in self.shards[worker::workers]:
            yield from self._read(shard, tar)

    def _read(self, shard: int, tar: str):
        chunk, images = Chunk(shard), []
        try:
            for key, files, names in shard_samples(tar, names=True):
                if len(chunk.records) + len(chunk.skipped) >= self.batch_size:
                    yield _finish(chunk, images, self.encoder, self.uint8_cfg)
                    chunk, images = Chunk(shard, part=chunk.part + 1), []
                self._sample(chunk, tar, key, files, names, images)
        except (tarfile.TarError, OSError, EOFError) as e:  # a cut, unreadable or unreachable tar: what was read
            # is kept (a streamed one was retried first: `shard_samples`)
            chunk.skipped.append(f"{Path(tar).name}\tread stopped: {type(e).__name__}: {e}")
        chunk.end = True
        yield _finish(chunk, images, self.encoder, self.uint8_cfg)

    def _sample(self, chunk: Chunk, tar: str, key: str, files: dict, names: dict, images: list) -> None:
        ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        image = files[ext] if ext else None
        meta = _sample_json(files)
        metadata, dropped = _json_metadata(meta)
        chunk.dropped.update(dropped)
        item = Item(key, tar if ext else None, _caption(files, meta), names[ext] if ext else None, metadata=metadata)
        if image is None:
            chunk.skipped.append(f"{item.key}\tno .jpg/.jpeg/.png/.webp image in the sample")
        else:
            _decode_into(chunk, item, image, self.transform, images, self.draft_size, self.raw_jpegs)
