"""Opening WebDataset shards wherever they are (local files, fsspec URLs, `pipe:` commands), with retries.

A shard is named by:

- a local path: opened directly (the fast path; a missing local shard is reported before training starts);
- a URL, read through fsspec: `s3://` (s3fs, `clipworks[s3]`), `gs://` (gcsfs, `clipworks[gcs]`), `http://` and
  `https://` (aiohttp, `clipworks[http]`), `hf://` (huggingface_hub's HfFileSystem, `clipworks[hub]`). An
  S3-compatible store is reached by setting `AWS_ENDPOINT_URL` (botocore) or `FSSPEC_S3_ENDPOINT_URL` (fsspec's
  configuration), credentials the usual AWS way. Whether a remote shard exists is not checked up front (listing
  thousands of objects is slow): a missing one fails when it is read, and is skipped and counted;
- `pipe:COMMAND`: the standard output of a shell command (`pipe:aws s3 cp s3://b/x.tar -`); a non-zero exit
  status is an error, as is a transient one.

Retries (`read_shard`): an error that may pass (connection reset or refused, a timeout, an HTTP 5xx, 408 or 429,
a stream that ends before its announced size, a command's non-zero exit) is retried up to `retries` times in a row
with exponential backoff, when opening the shard and when a read fails mid-shard. A retry opens the shard again
from its start and reads past (without yielding) the samples already yielded, so each sample is yielded once and
in order, whatever the store supports (a `pipe:` cannot seek); a sample cut by the failure is never yielded half.
The count of retries starts again after a retry that yielded a new sample. A shard still failing, or one failing
for good (missing, forbidden), raises `ShardUnavailable`; training skips it and counts it in `FailedShards`.
"""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from typing import BinaryIO

# Backoff before retry k (from 0): RETRY_DELAY_S * 2**k, at most RETRY_MAX_DELAY_S, times a random 0.5..1 (jitter,
# so that many workers do not retry in step).
RETRY_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 60.0
# HTTP statuses worth retrying besides 5xx: request timeout, too many requests.
RETRY_STATUSES = (408, 429)
# The extra that installs what each URL protocol needs.
EXTRA_OF_PROTOCOL = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http", "hf": "hub"}
# Modules whose errors without an HTTP status are network errors (connection, timeout, cut payload).
_NETWORK_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "httpx", "huggingface_hub",
                    "gcsfs", "google", "http.client", "ssl", "socket", "asyncio")  # fmt: skip
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class ShardError(ValueError):
    """A WebDataset shard that cannot be used: mostly failing samples, not a tar, or too many skipped shards."""


class TransientShardError(ConnectionError):
    """An error opening or reading a shard that may pass when tried again."""


class ShardUnavailable(OSError):
    """A shard that could not be read: missing or forbidden, or still failing after its retries."""


def is_local(shard: str) -> bool:
    """Whether `shard` is a local path (not a `pipe:` command nor a `PROTOCOL://` URL)."""
    return not shard.startswith("pipe:") and "://" not in shard


def is_transient(error: BaseException) -> bool:
    """Whether a remote read's `error` may pass when tried again (see the module docstring)."""
    if isinstance(error, TransientShardError):
        return True
    if isinstance(error, _PERMANENT):
        return False
    status = _status(error)
    if status is not None:
        return status >= 500 or status in RETRY_STATUSES
    if isinstance(error, (ConnectionError, TimeoutError, EOFError, OSError)):
        return True
    return type(error).__module__.startswith(_NETWORK_MODULES)


def _status(error: BaseException) -> int | None:
    """The HTTP status an error of aiohttp, botocore, requests or httpx carries, if any."""
    status = getattr(error, "status", None) or getattr(getattr(error, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


class _Stream:
    """A remote shard's byte stream: `read` turns transient errors into `TransientShardError` and reports a stream
    that ends before its known size, or a command that exits non-zero, as one."""

    def __init__(self, name: str, file, process: subprocess.Popen | None = None):
        self.name, self.file, self.process = name, file, process
        self.size, self.pos = getattr(file, "size", None), 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.file.read(n)
        except Exception as e:
            if is_transient(e):
                raise TransientShardError(f"{self.name}: {type(e).__name__}: {e}") from e
            raise
        self.pos += len(data)
        if not data and n != 0:
            self._check_end()
        return data

    def _check_end(self) -> None:
        if self.process is not None:
            status = self.process.wait()
            if status != 0:
                raise TransientShardError(f"{self.name}: the command exited with status {status}")
        elif isinstance(self.size, int) and self.pos < self.size:
            raise TransientShardError(f"{self.name}: the stream ended at byte {self.pos} of {self.size}")

    def finish(self) -> None:
        """After a whole read: a command's exit status counts, even when tar stopped reading before its end."""
        if self.process is not None:
            while self.read(1 << 16):
                pass

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # the reader stopped early: the rest of the output is not wanted
        try:
            self.file.close()
        finally:
            if self.process is not None:
                self.process.wait()


def open_shard(shard: str) -> _Stream:
    """One attempt at opening a `pipe:` command or URL for reading (local paths are opened by `tarfile`).

    Raises:
        TransientShardError: an error that may pass.
        ImportError: the protocol's extra is not installed; the message names it.
        OSError, ValueError: a missing or forbidden shard, or an unknown protocol.
    """
    if shard.startswith("pipe:"):
        process = subprocess.Popen(shard[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
        return _Stream(shard, process.stdout, process)
    protocol = shard.partition("://")[0]
    extra = EXTRA_OF_PROTOCOL.get(protocol, "http")
    try:
        import fsspec
    except ImportError as e:
        raise ImportError(f"shard {shard}: URLs are read through fsspec: pip install 'clipworks[{extra}]'") from e
    try:
        fs, path = fsspec.core.url_to_fs(shard)
        if protocol in ("http", "https"):
            # one streamed GET: block_size=0 streams; a size given skips fsspec's HEAD, which reports any failure
            # (a 503 too) as a missing file
            return _Stream(shard, fs.open(path, "rb", block_size=0, size=1))
        return _Stream(shard, fs.open(path, "rb"))
    except ImportError as e:
        raise ImportError(f"shard {shard}: {e}: pip install 'clipworks[{extra}]'") from e
    except Exception as e:
        if is_transient(e):
            raise TransientShardError(f"{shard}: {type(e).__name__}: {e}") from e
        if _status(e) is not None:  # a 4xx other than 404, which fsspec reports as FileNotFoundError
            raise ShardUnavailable(f"shard {shard}: HTTP status {_status(e)}: {e}") from e
        raise


def read_shard(shard: str, parse: Callable[[BinaryIO], Iterator], retries: int = 3,
               delay_s: float | None = None) -> Iterator:  # fmt: skip
    """What `parse` yields from the stream of the remote or `pipe:` shard, retrying transient errors (see the
    module docstring): each item once, in order.

    Args:
        parse: reads a file object, yielding items (samples); it must not yield a sample that an error cut.
        retries: retries in a row after transient errors before giving up.
        delay_s: the first backoff, doubling after each retry (default `RETRY_DELAY_S`).

    Raises:
        ShardUnavailable: a missing or forbidden shard, or one still failing after `retries` retries.
    """
    delay_s = RETRY_DELAY_S if delay_s is None else delay_s
    done, failures, jitter = 0, 0, random.Random()
    while True:
        before = done
        try:
            stream = open_shard(shard)
            try:
                for i, item in enumerate(parse(stream)):
                    if i >= done:  # a retry reads past what an earlier attempt yielded
                        done += 1
                        yield item
                stream.finish()
            finally:
                stream.close()
            return
        except TransientShardError as e:
            failures = 1 if done > before else failures + 1
            if failures > retries:
                raise ShardUnavailable(f"shard {shard}: still failing after {retries} retries: {e}") from e
            time.sleep(min(delay_s * 2 ** (failures - 1), RETRY_MAX_DELAY_S) * jitter.uniform(0.5, 1))
        except _PERMANENT as e:
            raise ShardUnavailable(f"shard {shard}: {type(e).__name__}: {e}") from e


class FailedShards:
    """The shards skipped as unreadable, counted across a dataset's DataLoader workers (in shared memory).

    `add` warns; once more than `limit` distinct shards were skipped it raises `ShardError` naming them.
    """

    CAPACITY = 1 << 16  # bytes of shard names kept (the count goes on past it)

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError(f"max_failed_shards={limit}: expected at least 0")
        self.limit = limit
        self._names = multiprocessing.Array("c", self.CAPACITY)  # newline-separated; shared with the workers
        self._count = multiprocessing.Value("l", 0)

    def names(self) -> list[str]:
        """The skipped shards, in the order they failed (those that fit `CAPACITY`)."""
        return [n for n in self._names.value.decode("utf-8", "replace").split("\n") if n]

    def __len__(self) -> int:
        return self._count.value

    def add(self, shard: str, error: BaseException) -> None:
        """Count `shard` as skipped (once, however often it fails).

        Raises:
            ShardError: more than `limit` shards were skipped.
        """
        with self._names.get_lock():
            names = self.names()
            if shard not in names:
                self._count.value += 1
                text = "\n".join(names + [shard]).encode("utf-8", "replace")
                if len(text) < self.CAPACITY:
                    self._names.value = text
            count = self._count.value
        warnings.warn(f"{error}; skipped ({count} shards skipped so far, at most {self.limit} allowed)",
                      stacklevel=2)  # fmt: skip
        if count > self.limit:
            shown = self.names()
            listed = ", ".join(shown[:20]) + (f" and {count - 20} more" if count > 20 else "")
            raise ShardError(f"{count} shards could not be read, more than max_failed_shards={self.limit}: "
                             f"{listed}; the last error: {error}")  # fmt: skip
