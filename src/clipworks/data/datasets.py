"""Training data sources: a `--data` string naming a csv/tsv file, image folder, WebDataset shards or synthetic data.

A spec is `SCHEME:PATH[?key=value&...]`:

- `csv:PATH` / `tsv:PATH`: columns `filepath` and `caption` (rename with `?image=COL&caption=COL`); image
  paths are relative to the file's directory.
- `folder:DIR`: every image under DIR (recursively) with a same-stem `.txt` caption beside it. Images with
  no caption file are left out of the dataset and counted (`FolderDataset.uncaptioned`, and a warning).
- `wds:PATTERN`: WebDataset tar shards, with brace patterns (`shard-{000000..000009}.tar`, `{a,b}`), read as
  streams with the stdlib `tarfile`. Shards are local paths, URLs read through fsspec (`s3://`, `gs://`,
  `https://`, `hf://`) or `pipe:COMMAND` (see `shards`); several sources are joined with `::`
  (`wds:a/{000..099}.tar::s3://b/{000..009}.tar`), weighted by `StreamOptions.upsampling_factors` when resampled.
  A URL or `pipe:` pattern keeps any `?` in it (wds takes no options). A sample is the files sharing a key:
  `{key}.jpg|jpeg|png|webp` with `{key}.txt`, or `{key}.json` holding a "caption".
- `synthetic:shapes[?size=N&seed=S&image_size=64&split=train]`: the built-in generator.

Every dataset yields `(image_tensor, caption)`, or `None` for a broken image or an empty caption; `collate`
drops the `None`s and counts them in `Batch.skipped`, so bad samples are skipped and reported, never fatal.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .decode import Sample, Transform, load_sample
from .wds import ShardError, StreamOptions, WebDataset, expand_braces, expand_sources, mix_seed, shard_weights

__all__ = [
    "SCHEMES", "Batch", "Collate", "DataSpec", "EpochSampler", "FolderDataset", "SeededSamples", "ShardError",
    "StreamOptions", "TableDataset", "WebDataset", "build_dataset", "collate", "expand_braces", "make_loader",
    "parse_data_spec", "set_epoch", "shard_weights",
]  # fmt: skip


# Options each scheme accepts after "?", with their defaults.
SCHEMES: dict[str, dict[str, str]] = {
    "csv": {"image": "filepath", "caption": "caption"},
    "tsv": {"image": "filepath", "caption": "caption"},
    "folder": {},
    "wds": {},
    "synthetic": {"size": "10000", "seed": "0", "image_size": "64", "split": "train"},
}
GENERATORS = ("shapes",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
FOLDER_EXTENSIONS = IMAGE_EXTENSIONS + (".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class DataSpec:
    """A parsed data string.

    Attributes:
        scheme: one of `SCHEMES`.
        path: the file, folder, shard pattern or generator name.
        options: (key, value) pairs, sorted, with the scheme's defaults filled in.
    """

    scheme: str
    path: str
    options: tuple[tuple[str, str], ...] = ()

    def option(self, key: str) -> str:
        """The value of option `key` (the scheme's default when not given)."""
        return dict(self.options).get(key, SCHEMES.get(self.scheme, {}).get(key, ""))


class Batch(NamedTuple):
    """A training batch: `skipped` counts the broken samples dropped from it (B excludes them; B may be 0)."""

    images: torch.Tensor  # (B, 3, S, S)
    tokens: torch.Tensor  # (B, L)
    skipped: int


def parse_data_spec(spec: str, schemes: dict[str, dict[str, str]] = SCHEMES) -> DataSpec:
    """Parse `SCHEME:PATH[?key=value&...]`; existence of the path is checked by `build_dataset`.

    `schemes` maps each accepted scheme to its options and their defaults (other commands take other sets).

    Raises:
        ValueError: unknown scheme, empty path, or an option the scheme does not take.
    """
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in schemes:
        raise ValueError(f"bad data spec {spec!r}: expected SCHEME:PATH with SCHEME one of {', '.join(schemes)}")
    path, _, query = rest.partition("?")
    if scheme == "wds" and ("://" in rest or rest.startswith("pipe:")):
        path, query = rest, ""  # a URL's query (a signed URL) or a command's "?" belongs to the shard names
    if not path:
        raise ValueError(f"bad data spec {spec!r}: no path after {scheme!r}")
    options = dict(schemes[scheme])
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in options or not eq:
            valid = ", ".join(f"{k}=..." for k in schemes[scheme]) or "none"
            raise ValueError(f"bad data spec {spec!r}: option {item!r}; {scheme!r} takes: {valid}")
        options[key] = value
    if scheme == "synthetic" and path not in GENERATORS:
        raise ValueError(f"bad data spec {spec!r}: unknown generator {path!r}; choose from {', '.join(GENERATORS)}")
    return DataSpec(scheme, path, tuple(sorted(options.items())))


def build_dataset(
    spec: str | DataSpec,
    transform: Transform,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    shuffle: bool = True,
    stream: StreamOptions | None = None,
) -> Dataset:
    """The dataset `spec` names, yielding `(transform(image), caption)` or `None` for a broken sample.

    csv, tsv, folder and synthetic give map-style datasets (ranks are split by the sampler, see
    `make_loader`); wds gives an iterable `WebDataset` that splits shards across `rank`s and workers itself, drawn
    and read as `stream` says (which only wds takes).

    Raises:
        ValueError: a bad spec, a table without the requested columns, or `stream` options that do not fit.
        FileNotFoundError: the file, folder or a local shard does not exist.
    """
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    stream = stream or StreamOptions()
    if spec.scheme != "wds" and (stream.resampled or stream.train_num_samples or stream.upsampling_factors):
        raise ValueError(f"resampled, train_num_samples and upsampling_factors apply to wds: sources, not "
                         f"{spec.scheme}:")  # fmt: skip
    if spec.scheme in ("csv", "tsv"):
        delimiter = "," if spec.scheme == "csv" else "\t"
        return TableDataset(spec.path, transform, spec.option("image"), spec.option("caption"), delimiter)
    if spec.scheme == "folder":
        return FolderDataset(spec.path, transform)
    if spec.scheme == "wds":
        sources = expand_sources(spec.path)
        weights = shard_weights(sources, stream.upsampling_factors, stream.resampled)
        return WebDataset([s for source in sources for s in source], transform, rank, world_size, seed,
                          shuffle_buffer, shuffle, stream, weights)  # fmt: skip
    return _synthetic(spec, transform)


def _check_exists(path: str, kind: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{kind} not found: {path!r}")
    return p


class TableDataset(Dataset):
    """Image-caption pairs listed in a csv or tsv file; image paths are relative to the file's directory."""

    def __init__(self, path: str, transform: Transform, image_key="filepath", caption_key="caption", delimiter=","):
        file = _check_exists(path, "data file")
        with open(file, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(f, delimiter=delimiter)
            found = reader.fieldnames or []
            missing = [k for k in (image_key, caption_key) if k not in found]
            if missing:
                raise ValueError(f"{path}: no column {missing} (columns found: {found}); name the columns with "
                                 f"?image=COL&caption=COL")  # fmt: skip
            rows = [(row[image_key] or "", row[caption_key] or "") for row in reader]
        self.root = file.parent
        self.rows = rows
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        image, caption = self.rows[i]
        if not image:
            return None
        return load_sample(self.root / image, caption, self.transform)


class FolderDataset(Dataset):
    """Images under a folder (recursively), each captioned by the same-stem `.txt` file beside it.

    Images without a caption file are left out, listed in `uncaptioned` and counted in a warning.
    """

    def __init__(self, root: str, transform: Transform):
        top = _check_exists(root, "data folder")
        if not top.is_dir():
            raise ValueError(f"folder:{root}: not a directory")
        self.items, self.uncaptioned = [], []
        for path in sorted(p for p in top.rglob("*") if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file()):
            text = path.with_suffix(".txt")
            if text.is_file():
                self.items.append((path, text))
            else:
                self.uncaptioned.append(path)
        if not self.items:
            raise ValueError(f"folder:{root}: no images with a same-stem .txt caption ({len(self.uncaptioned)} "
                             f"without one; extensions read: {', '.join(FOLDER_EXTENSIONS)})")  # fmt: skip
        if self.uncaptioned:
            warnings.warn(f"folder:{root}: {len(self.uncaptioned)} images have no .txt caption and are left out, "
                          f"e.g. {self.uncaptioned[0]}", stacklevel=2)  # fmt: skip
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        image, text = self.items[i]
        return load_sample(image, text.read_text(encoding="utf-8", errors="replace"), self.transform)


class _Generated(Dataset):
    """A dataset of (PIL image, caption) pairs, transformed."""

    def __init__(self, base, transform: Transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Sample:
        image, caption = self.base[i]
        return (self.transform(image), caption) if caption.strip() else None


def _synthetic(spec: DataSpec, transform: Transform) -> Dataset:
    from .synthetic import ShapesConfig, ShapesDataset

    try:
        size, seed, image_size = (int(spec.option(k)) for k in ("size", "seed", "image_size"))
    except ValueError as e:
        raise ValueError(f"synthetic:{spec.path}: size, seed and image_size must be integers: {e}") from e
    config = ShapesConfig(image_size=image_size, seed=seed)
    return _Generated(ShapesDataset(split=spec.option("split"), size=size, config=config), transform)


# --- batching and loading ------------------------------------------------------------------------------------


class Collate:
    """Stack samples into a `Batch`, dropping (and counting) the `None`s; picklable for DataLoader workers."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[Sample]) -> Batch:
        good = [s for s in samples if s is not None]
        if not good:
            return Batch(torch.empty(0, 3, 0, 0), self.tokenizer([]), len(samples))
        first = good[0][0]
        out = None
        if get_worker_info() is not None:  # stack straight into shared memory, which the main process maps as is
            storage = first.untyped_storage()._new_shared(len(good) * first.numel() * first.element_size())
            out = first.new(storage).resize_(len(good), *first.shape)
        images = torch.stack([s[0] for s in good], out=out)  # (B, 3, S, S)
        return Batch(images, self.tokenizer([s[1] for s in good]), len(samples) - len(good))


def collate(tokenizer: Callable[[list[str]], torch.Tensor]) -> Collate:
    """The collate function for `DataLoader`: samples -> `Batch(images, tokens, skipped)`."""
    return Collate(tokenizer)


class SeededSamples(Dataset):
    """A map-style dataset read at `(index, seed)` keys: each sample's random augmentation draws from torch's RNG
    seeded with its own `seed`, whatever worker process reads it and whatever it read before, so a run resumed
    mid-epoch (with fresh workers) augments every later sample exactly as the uninterrupted run did."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's share of a per-epoch permutation, like `DistributedSampler`, resumable at a batch.

    The permutation of all indices is drawn with `seed + epoch` (the same on every rank), trimmed (drop_last)
    or padded by wrapping around to a multiple of `world_size`, and rank r takes positions r, r + world, ...
    The first `start_step * batch_size` of those are sliced off, so a resumed epoch picks up where it stopped.
    It yields `(index, sample_seed)` keys for `SeededSamples`, the seed a function of (seed, epoch, index).
    """

    def __init__(self, size: int, *, batch_size: int, seed=0, rank=0, world_size=1, shuffle=True, drop_last=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: self.size - self.size % self.world_size]
        elif order and self.size % self.world_size:
            order += (order * self.world_size)[: self.world_size - self.size % self.world_size]
        return order[self.rank :: self.world_size][self.start_step * self.batch_size :]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # tuple hashes of ints are fixed across processes and runs (no hash randomisation for ints)
        return iter([(i, hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF) for i in self.indices()])

    def __len__(self) -> int:
        return len(self.indices())


def make_loader(
    spec: str | DataSpec,
    transform: Transform,
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    batch_size: int,
    workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start_step: int = 0,
    drop_last: bool = True,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    stream: StreamOptions | None = None,
) -> DataLoader:
    """A DataLoader of `Batch`es for this rank, positioned at `epoch`, `start_step` batches in.

    Map-style sources (csv, tsv, folder, synthetic) use an `EpochSampler`; wds splits shards across ranks
    and workers, drawn and read as `stream` says (resampling, epoch size, retries: `StreamOptions`). For later
    epochs reuse the loader (its workers persist) through `set_epoch`. Resuming wds reads past the skipped samples
    without decoding them; it is exact when `workers` is the same as in the interrupted run and, without
    `train_num_samples`, no worker ran out of shards before `start_step` (workers with fewer shards end first);
    with `train_num_samples` (resampled or not) every worker yields the same count, so it is exact.
    """
    if batch_size < 1 or workers < 0 or start_step < 0:
        raise ValueError(f"batch_size={batch_size}, workers={workers}, start_step={start_step}: expected "
                         f"batch_size >= 1, workers >= 0, start_step >= 0")  # fmt: skip
    dataset = build_dataset(spec, transform, rank=rank, world_size=world_size, seed=seed,
                            shuffle_buffer=shuffle_buffer, shuffle=shuffle, stream=stream)  # fmt: skip
    sampler = None
    if isinstance(dataset, WebDataset):
        dataset.batch_size = batch_size
    else:
        sampler = EpochSampler(len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                               shuffle=shuffle, drop_last=drop_last)  # fmt: skip
        dataset = SeededSamples(dataset)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate(tokenizer),
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
    )
    set_epoch(loader, epoch, start_step)
    return loader


def set_epoch(loader: DataLoader, epoch: int, start_step: int = 0) -> None:
    """Make the next pass over a `make_loader` loader be `epoch`, starting `start_step` batches in."""
    target = loader.dataset if isinstance(loader.dataset, WebDataset) else loader.sampler
    if not hasattr(target, "set_epoch"):
        raise ValueError("set_epoch needs a loader built by make_loader")
    target.set_epoch(epoch, start_step)
