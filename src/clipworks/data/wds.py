"""WebDataset tar shards, read as streams with the stdlib: brace patterns, `::`-joined sources, per-rank and per-worker
shards, resampling, epochs of a set size; local, URL and `pipe:` shards (`shards`)."""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import multiprocessing
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .decode import Sample, Transform, load_sample
from .shards import FailedShards, ShardError, ShardUnavailable, TransientShardError, is_local, read_shard

# A shard is refused when more than this fraction of its samples fail, once it has at least this many.
SHARD_MAX_FAILED = 0.5
SHARD_MIN_SAMPLES = 20


# --- ---------------------------------------------------------------------------------------

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a..b}` integer ranges (zero-padded when either end is) and `{x,y}` lists, left to right."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced braces in {pattern!r}")
    body, head, tail = pattern[start + 1 : end], pattern[:start], pattern[end + 1 :]
    match = _RANGE.match(body)
    if match:
        a, b = match.groups()
        width = max(len(a), len(b)) if a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0") else 0
        step = 1 if int(b) >= int(a) else -1
        choices = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        choices, depth, last = [], 0, 0
        for i, c in enumerate(body):
            depth += {"{": 1, "}": -1}.get(c, 0)
            if c == "," and depth == 0:
                choices.append(body[last:i])
                last = i + 1
        choices = [x for part in choices + [body[last:]] for x in expand_braces(part)]
    return [head + c + t for c in choices for t in expand_braces(tail)]


@dataclass(frozen=True)
class StreamOptions:
    """How a `wds:` source is drawn and read: the `data.*` config keys of the same names.

    Attributes:
        resampled: draw shards with replacement, forever, each with its weight (OpenCLIP's --dataset-resampled);
            needs `train_num_samples`.
        train_num_samples: samples in one epoch, rounded up to whole batches on every rank and worker (OpenCLIP's
            --train-num-samples); without `resampled` each worker passes over its shards again (in a new order)
            until it has its share. None: an epoch is one pass over the shards.
        upsampling_factors: one factor per `::`-joined source, `::`-joined (`1::2`); needs `resampled`.
        shard_retries: retries of a streamed shard after transient errors (`shards.read_shard`).
        max_failed_shards: skipped shards allowed; one more stops the run with `ShardError` naming them.
        retry_delay_s: the first retry's backoff, doubling after each (None: `shards.RETRY_DELAY_S`).
    """

    resampled: bool = False
    train_num_samples: int | None = None
    upsampling_factors: str | None = None
    shard_retries: int = 3
    max_failed_shards: int = 10
    retry_delay_s: float | None = None


def expand_sources(pattern: str) -> list[list[str]]:
    """The shards of each `::`-joined source of a `wds:` pattern, braces expanded (`a/{0..9}.tar::b/{0..3}.tar`); a
    `::` inside brackets (an IPv6 host, `http://[::1]:80/a.tar`) does not split."""
    parts = re.split(r"::(?![^\[\]]*\])", pattern)
    sources = [expand_braces(part) for part in parts]
    if not all(parts):
        raise ValueError(f"{pattern!r}: an empty source between '::' separators")
    return sources


def shard_weights(sources: list[list[str]], factors: str | None, resampled: bool) -> dict[str, float] | None:
    """Each shard's sampling weight from `::`-joined upsampling `factors` (`"1::2"`), as OpenCLIP weighs them: every
    shard of source i weighs factor i, so source i is drawn with probability factor_i x shards_i / sum_j factor_j x
    shards_j (a shard in two sources adds up). None without factors: every shard listed weighs 1.

    Raises:
        ValueError: factors without `resampled`, not one positive number per source.
    """
    if factors is None:
        return None
    if not resampled:
        raise ValueError("upsampling_factors need resampled shards (sampling with replacement)")
    parts = str(factors).split("::")
    try:
        values = [float(f) for f in parts]
    except ValueError:
        values = []
    if len(values) != len(sources) or not all(v >= 0 for v in values) or not any(values):
        raise ValueError(f"upsampling_factors={factors!r}: expected {len(sources)} non-negative numbers joined with "
                         f"'::', one per source (not all 0)")  # fmt: skip
    weights: dict[str, float] = {}
    for source, factor in zip(sources, values):
        for shard in source:
            weights[shard] = weights.get(shard, 0.0) + factor
    return weights


class WebDataset(IterableDataset):
    """Samples streamed from WebDataset tar shards (local, URLs or `pipe:`, see `shards`), split across ranks and
    DataLoader workers by shard.

    Not resampled, each epoch the shard list is shuffled with `seed + epoch` (the same order on every rank); shard i
    goes to rank `i % world_size`, and that rank's j-th shard to worker `j % num_workers`. With `train_num_samples`,
    a worker that finished its shards starts a further pass (pass p shuffled by (seed, epoch, p)) until it has its
    share of the epoch. Resampled, each worker draws shards with replacement, with probability proportional to
    `weights[shard]`, from a generator seeded by (seed, epoch, rank, worker). Samples then pass a shuffle buffer
    seeded by (seed, epoch, rank, worker).

    Resume (`set_epoch(epoch, start_step)`) is exact in both modes: what a worker yields is a function of (seed,
    epoch, rank, worker) and the shards' contents, so reading past the samples the interrupted run consumed
    (without decoding them) gives the same following samples, provided `num_workers` is the same and the same
    shards are readable (a shard skipped in one run and read in the other shifts what follows). Without
    `train_num_samples`, a worker that ran out of shards before `start_step` makes it inexact.

    A local shard with at least `SHARD_MIN_SAMPLES` samples of which more than `SHARD_MAX_FAILED` fail, or one that is
    not a tar, raises `ShardError` naming it. A streamed shard that cannot be read (see `shards.read_shard`) is
    skipped with a warning and counted in `failed` (shared by the workers); more than `max_failed_shards` raise.
    """

    def __init__(self, shards, transform, rank=0, world_size=1, seed=0, shuffle_buffer=1000, shuffle=True,
                 stream: StreamOptions | None = None, weights: dict[str, float] | None = None):  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        stream = stream or StreamOptions()
        if stream.resampled and not stream.train_num_samples:
            raise ValueError("resampled shards need train_num_samples (the samples in one epoch)")
        missing = [s for s in shards if is_local(s) and not Path(s).expanduser().is_file()]
        if missing:  # streamed shards are not looked up front: listing thousands of objects is slow
            raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards not found: {missing[:3]}")
        self.shards = [str(Path(s).expanduser()) if is_local(s) else s for s in shards]
        self.weights = {} if weights is None else dict(weights)
        if weights is None:
            for s in self.shards:  # a shard listed twice is drawn twice as often
                self.weights[s] = self.weights.get(s, 0.0) + 1.0
        self.transform, self.stream, self.failed = transform, stream, FailedShards(stream.max_failed_shards)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.shuffle = shuffle_buffer if shuffle else 0, shuffle
        self._epoch = multiprocessing.Value("l", 0)  # shared with persistent workers
        self._skip = multiprocessing.Value("l", 0)  # samples each worker discards first (resume)
        self.batch_size = 1

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Start the next pass at `epoch`, skipping its first `start_step` batches (see `make_loader`)."""
        self._epoch.value, self._skip.value = epoch, start_step

    def worker_shards(self, epoch: int, worker: int, num_workers: int, pass_: int = 0) -> list[str]:
        """The shards `worker` reads in pass `pass_` of `epoch`, not resampled."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + epoch if pass_ == 0 else mix_seed(self.seed, epoch, pass_)).shuffle(order)
        return order[self.rank :: self.world_size][worker::num_workers]

    def worker_samples(self, num_workers: int) -> int | None:
        """Samples each worker yields in an epoch (None: all of its shards): `train_num_samples` rounded up to whole
        batches of every rank and worker, as OpenCLIP rounds it."""
        if not self.stream.train_num_samples:
            return None
        batches = math.ceil(self.stream.train_num_samples / (self.batch_size * self.world_size))  # per rank
        return math.ceil(batches / num_workers) * self.batch_size

    def draws(self, epoch: int, worker: int, num_workers: int) -> Iterator[str]:
        """The shards `worker` reads in `epoch`, in order: endless when resampled or given `train_num_samples`."""
        if self.stream.resampled:
            names = list(dict.fromkeys(self.shards))
            cumulative = list(itertools.accumulate(self.weights.get(s, 1.0) for s in names))
            rng = random.Random(mix_seed(self.seed, epoch, self.rank, worker, 1))
            while True:
                yield from rng.choices(names, cum_weights=cumulative, k=64)
        for pass_ in itertools.count():
            order = self.worker_shards(epoch, worker, num_workers, pass_)
            if not order:
                return
            yield from order
            if not self.stream.train_num_samples:
                return

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start_step = self._epoch.value, self._skip.value
        # DataLoader takes batches round-robin from workers, from worker 0: batch k comes from worker k % workers.
        # Resumed at batch s, worker w plays the part worker (w + s) % workers had, past the batches it gave.
        role = (worker + start_step) % workers
        skip = len(range(role, start_step, workers)) * self.batch_size
        quota = self.worker_samples(workers)
        rng = random.Random(mix_seed(self.seed, epoch, self.rank, role))
        endless = quota is not None
        raw = _read_shards(self.draws(epoch, role, workers), self._groups, len(set(self.shards)) if endless else 0)
        stats: dict[tuple, list[int]] = {}  # shard read -> [samples read, samples done, failed, read complete]
        taken = 0
        for tag, files, total in _shuffled(raw, self.shuffle_buffer, rng):
            if files is None:
                _account(stats, tag, total, failed=False)
                continue
            taken += 1
            if skip > 0:
                skip -= 1
                _account(stats, tag, None, failed=False)
            else:
                sample = _decode(files, self.transform)
                _account(stats, tag, None, failed=sample is None)
                yield sample
            if quota is not None and taken >= quota:
                return

    def _groups(self, shard: str) -> Iterator[dict[str, bytes]]:
        return _tar_groups(shard, self.stream, self.failed)


def mix_seed(*values: int) -> int:
    """One 32-bit seed from several integers (seed, epoch, rank, worker), well mixed."""
    return int(np.random.SeedSequence([v % 2**32 for v in values]).generate_state(1)[0])


def _read_shards(shards: Iterator[str], groups: Callable[[str], Iterator], give_up: int = 0) -> Iterator[tuple]:
    """Raw samples (tag, {ext: bytes}, None), then the end-of-read marker (tag, None, samples read); the tag is
    (read number, shard), as a resampled shard may be read twice. With `give_up`, that many empty reads in a row
    (every shard failing or empty) raise `ShardError` rather than loop for ever."""
    empty = 0
    for n, shard in enumerate(shards):
        count = 0
        for files in groups(shard):
            count += 1
            yield (n, shard), files, None
        yield (n, shard), None, count
        empty = 0 if count else empty + 1
        if give_up and empty >= give_up:
            raise ShardError(f"{empty} shard reads in a row gave no sample (the last: {shard}): are the shards "
                             "empty or all unreadable?")  # fmt: skip


class _CheckedTarInfo(tarfile.TarInfo):
    """A tar member header that reports a file cut at (or inside) a header, or a corrupt header, as a
    `tarfile.ReadError`: `TarFile.next` takes a missing, partial or invalid header after the first member for
    the end of the archive, so a shard cut at a member boundary would read as complete (issue 16). A proper
    end is a block of zeros (`EOFHeaderError`), which still ends the archive quietly."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            if archive.offset == 0:  # not a tar at all, or empty: tarfile's own error says so
                raise
            if isinstance(e, tarfile.InvalidHeaderError):
                raise tarfile.ReadError(f"corrupt member header at byte {archive.offset} ({e})") from e
            raise tarfile.ReadError(f"cut at a member header at byte {archive.offset} ({e}; the file ends "
                                    "without tar's end-of-archive block)") from e  # fmt: skip


def tar_samples(tar: str | BinaryIO, names: bool = False) -> Iterator[tuple]:
    """(key, {extension: bytes}) for each sample of a WebDataset tar (a local path or a readable binary stream), in
    file order; the key is the member path without its extensions (`folder/stem`). With `names`, (key, {extension:
    bytes}, {extension: member name}). Raises tarfile/OS errors of a cut, corrupt or unreadable file as they come (a
    file that ends at a member header without the end-of-archive block is cut too), after yielding the members of the
    sample in progress that were read whole - except after a `TransientShardError`, which a retry reads again."""
    group, members, key = {}, {}, None
    source = {"name": tar} if isinstance(tar, (str, Path)) else {"fileobj": tar}
    try:
        with tarfile.open(mode="r|*", tarinfo=_CheckedTarInfo, **source) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or stem.startswith("."):
                    continue
                name = f"{folder}/{stem}" if folder else stem
                if name != key and group:
                    yield (key, group, members) if names else (key, group)
                    group, members = {}, {}
                key = name
                group[ext.lower()] = archive.extractfile(member).read()
                members[ext.lower()] = member.name
    except (tarfile.TarError, OSError, EOFError) as e:
        if group and not isinstance(e, TransientShardError):  # what was read before the damage is kept; the caller
            # still hears of the damage
            yield (key, group, members) if names else (key, group)
        raise
    if group:
        yield (key, group, members) if names else (key, group)


def shard_samples(shard: str, names: bool = False, retries: int = 3, delay_s: float | None = None) -> Iterator:
    """`tar_samples` of a local path, URL or `pipe:` command; streamed shards are retried (`shards.read_shard`,
    raising `ShardUnavailable` when they cannot be read)."""
    if is_local(shard):
        return tar_samples(shard, names)
    return read_shard(shard, functools.partial(tar_samples, names=names), retries, delay_s)


def _tar_groups(shard: str, stream: StreamOptions, failed: FailedShards | None = None) -> Iterator[dict[str, bytes]]:
    """The shard's samples as {extension: bytes}; a shard cut short is read up to the cut, with a warning; a streamed
    shard that cannot be read is counted in `failed` (which raises past its limit) and gives what it gave."""
    started = False
    try:
        for _, group in shard_samples(shard, retries=stream.shard_retries, delay_s=stream.retry_delay_s):
            started = True
            yield group
    except ShardUnavailable as e:
        if failed is None:
            raise ShardError(str(e)) from e
        failed.add(shard, e)
    except (tarfile.TarError, OSError, EOFError) as e:
        if not started:
            raise ShardError(f"shard {shard}: not readable as a tar file: {type(e).__name__}: {e}") from e
        warnings.warn(f"shard {shard}: read stopped early: {type(e).__name__}: {e}", stacklevel=2)


def _shuffled(stream: Iterator[tuple], size: int, rng: random.Random) -> Iterator[tuple]:
    buffer = []
    for item in stream:
        if item[1] is None or size <= 1:  # end markers pass straight through; so does everything unshuffled
            yield item
            continue
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _decode(files: dict[str, bytes], transform: Transform) -> Sample:
    image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
    caption = files["txt"].decode("utf-8", errors="replace") if "txt" in files else None
    if caption is None and "json" in files:
        try:
            caption = json.loads(files["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
    if image is None or not isinstance(caption, str):
        return None
    return load_sample(io.BytesIO(image), caption, transform)


def _account(stats: dict[tuple, list[int]], tag: tuple, total: int | None, failed: bool) -> None:
    """Count a sample (total None) or a shard read's end; raise once a finished read is known to have mostly
    failed."""
    s, shard = stats.setdefault(tag, [0, 0, 0, 0]), tag[1]
    if total is not None:
        s[0], s[3] = total, 1
    else:
        s[1] += 1
        s[2] += failed
    if s[3] and s[1] == s[0]:
        del stats[tag]
        if s[0] >= SHARD_MIN_SAMPLES and s[2] > SHARD_MAX_FAILED * s[0]:
            raise ShardError(f"shard {shard}: {s[2]} of {s[0]} samples failed (broken images, missing or empty "
                             f"captions); more than {SHARD_MAX_FAILED:.0%} - is the shard corrupt?")  # fmt: skip


