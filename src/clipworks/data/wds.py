"""WebDataset tar shards, read as streams with the stdlib: brace patterns, per-rank and per-worker shards."""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import re
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .decode import Sample, Transform, load_sample

# A shard is refused when more than this fraction of its samples fail, once it has at least this many.
SHARD_MAX_FAILED = 0.5
SHARD_MIN_SAMPLES = 20


class ShardError(ValueError):
    """A WebDataset shard in which most samples fail."""


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


class WebDataset(IterableDataset):
    """Samples streamed from WebDataset tar shards, split across ranks and DataLoader workers by shard.

    Each epoch the shard list is shuffled with `seed + epoch` (the same order on every rank); shard i goes
    to rank `i % world_size`, and that rank's j-th shard to worker `j % num_workers`. Samples then pass a
    shuffle buffer seeded by (seed, epoch, rank, worker). A shard with at least `SHARD_MIN_SAMPLES` samples
    of which more than `SHARD_MAX_FAILED` fail raises `ShardError` naming it.
    """

    def __init__(self, shards, transform, rank=0, world_size=1, seed=0, shuffle_buffer=1000, shuffle=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        missing = [s for s in shards if not Path(s).expanduser().is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards not found: {missing[:3]}")
        self.shards, self.transform = [str(Path(s).expanduser()) for s in shards], transform
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.shuffle = shuffle_buffer if shuffle else 0, shuffle
        self._epoch = multiprocessing.Value("l", 0)  # shared with persistent workers
        self._skip = multiprocessing.Value("l", 0)  # samples each worker discards first (resume)
        self.batch_size = 1

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Start the next pass at `epoch`, skipping its first `start_step` batches (see `make_loader`)."""
        self._epoch.value, self._skip.value = epoch, start_step

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start_step = self._epoch.value, self._skip.value
        # DataLoader takes batches round-robin from workers, from worker 0: batch k comes from worker k % workers.
        # Resumed at batch s, worker w plays the part worker (w + s) % workers had, past the batches it gave.
        role = (worker + start_step) % workers
        skip = len(range(role, start_step, workers)) * self.batch_size
        rng = random.Random(mix_seed(self.seed, epoch, self.rank, role))
        stream = _shuffled(_read_shards(self.worker_shards(epoch, role, workers)), self.shuffle_buffer, rng)
        stats: dict[str, list[int]] = {}  # shard -> [samples read, samples done, failed, read complete]
        for shard, files, total in stream:
            if files is None:
                _account(stats, shard, total, failed=False)
            elif skip > 0:
                skip -= 1
                _account(stats, shard, None, failed=False)
            else:
                sample = _decode(files, self.transform)
                _account(stats, shard, None, failed=sample is None)
                yield sample


def mix_seed(*values: int) -> int:
    """One 32-bit seed from several integers (seed, epoch, rank, worker), well mixed."""
    return int(np.random.SeedSequence([v % 2**32 for v in values]).generate_state(1)[0])


def _read_shards(shards: list[str]) -> Iterator[tuple]:
    """Raw samples (shard, {ext: bytes}, None), then the end-of-shard marker (shard, None, samples read)."""
    for shard in shards:
        count = 0
        for files in _tar_groups(shard):
            count += 1
            yield shard, files, None
        yield shard, None, count


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


def tar_samples(tar: str, names: bool = False) -> Iterator[tuple]:
    """(key, {extension: bytes}) for each sample of a WebDataset tar, in file order; the key is the member path
    without its extensions (`folder/stem`). With `names`, (key, {extension: bytes}, {extension: member name}).
    Raises tarfile/OS errors of a cut, corrupt or unreadable file as they come (a file that ends at a member
    header without the end-of-archive block is cut too), after yielding the members of the sample in progress
    that were read whole."""
    group, members, key = {}, {}, None
    try:
        with tarfile.open(tar, mode="r|*", tarinfo=_CheckedTarInfo) as archive:
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
    except (tarfile.TarError, OSError, EOFError):
        if group:  # what was read before the damage is kept; the caller still hears of the damage
            yield (key, group, members) if names else (key, group)
        raise
    if group:
        yield (key, group, members) if names else (key, group)


def _tar_groups(shard: str) -> Iterator[dict[str, bytes]]:
    """The shard's samples as {extension: bytes}; a shard cut short is read up to the cut, with a warning."""
    started = False
    try:
        for _, group in tar_samples(shard):
            started = True
            yield group
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


def _account(stats: dict[str, list[int]], shard: str, total: int | None, failed: bool) -> None:
    """Count a sample (total None) or a shard's end; raise once a finished shard is known to have mostly failed."""
    s = stats.setdefault(shard, [0, 0, 0, 0])
    if total is not None:
        s[0], s[3] = total, 1
    else:
        s[1] += 1
        s[2] += failed
    if s[3] and s[1] == s[0]:
        del stats[shard]
        if s[0] >= SHARD_MIN_SAMPLES and s[2] > SHARD_MAX_FAILED * s[0]:
            raise ShardError(f"shard {shard}: {s[2]} of {s[0]} samples failed (broken images, missing or empty "
                             f"captions); more than {SHARD_MAX_FAILED:.0%} - is the shard corrupt?")  # fmt: skip


