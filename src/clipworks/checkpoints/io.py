"""Safe reading of weight files and all-or-nothing loading into a model."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A weight file that cannot be read safely, or whose tensors do not fit the model."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# What a weight file may ask of memory before any of its keys is checked (issue 16: a 1 MB zip inflating to 1 GiB,
# a safetensors header of 1.2 M empty tensors). A CLIP holds under 2,000 tensors.
MAX_TENSORS = 100_000
MAX_SAFETENSORS_HEADER = 32 * 2**20  # bytes of JSON; 100,000 tensors with long names fit
MAX_ZIP_RECORDS = 2 * MAX_TENSORS  # storages, plus a TorchScript archive's code and debug records
# torch writes zip records uncompressed; a compressed one (a re-zipped file) may inflate this much (plus 1 MiB)
MAX_INFLATION = 4
MAX_ARCHIVE_BYTES = 64 * 2**30  # all records of a zip archive, inflated


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from `.safetensors`, or from a pickled file through `torch.load(weights_only=True)`.

    Pickled files are never unpickled with arbitrary code: `weights_only=True` is the only attempt, and a
    file it rejects is an error. TorchScript archives (OpenAI's original `.pt` releases) are read by a
    restricted reader that takes their tensors and never runs their code. Training checkpoints that nest the
    weights under "state_dict" or "model" are unwrapped. Before any reader runs, the sizes a file declares are
    checked (`check_safetensors_header`, `check_zip_archive`), so a hostile file is refused before it costs memory.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: the file is unreadable, unsafe, a TorchScript archive, or holds no tensors.
    """
    path = Path(path)
    obj = read_weights_file(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def read_weights_file(path: str | os.PathLike, what: str = "weights") -> object:
    """What a `.safetensors` file (a dict of tensors) or a pickled file (through `torch.load(weights_only=True)`
    only; a TorchScript archive through the restricted reader) holds, its declared sizes checked first.

    Args:
        what: the kind of file, for messages ("weights", "embedding").

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: the file is unreadable or unsafe (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        check_safetensors_header(path)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(e)})") from e
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown {what} format {suffix!r}; expected .safetensors or {PICKLE_SUFFIXES}")
    from .torchscript import is_torchscript, load_torchscript_state_dict

    if zipfile.is_zipfile(path):
        check_zip_archive(path)
        if is_torchscript(path):
            return load_torchscript_state_dict(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types; all mean "not a safe plain file"
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {one_line(e)}") from e


def check_safetensors_header(path: Path) -> None:
    """Read a safetensors header as data and refuse it before `safetensors` parses it: a header longer than the file
    or `MAX_SAFETENSORS_HEADER`, more than `MAX_TENSORS` tensors, or data offsets outside the file.

    Raises:
        CheckpointError: one line naming the file and what is wrong.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 <= n <= min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{path}: not a readable safetensors file (header length {n} for a file of {size} "
                                  f"bytes; at most {MAX_SAFETENSORS_HEADER} read)")  # fmt: skip
        raw = f.read(n)
    # Each tensor is a JSON object, and "{" cannot be escaped: an upper bound on the count before any parsing.
    if raw.count(b"{") - 1 > MAX_TENSORS:
        raise CheckpointError(f"{path}: safetensors header lists up to {raw.count(b'{') - 1} tensors, more than "
                              f"{MAX_TENSORS} (a CLIP has under 2,000); refusing to read it")  # fmt: skip
    try:
        header = json.loads(raw)
    except ValueError as e:  # also UnicodeDecodeError
        raise CheckpointError(f"{path}: not a readable safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (header is not a JSON object)")
    data = size - 8 - n
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if name != "__metadata__" and not (isinstance(offsets, list) and len(offsets) == 2
                                           and all(type(o) is int for o in offsets)
                                           and 0 <= offsets[0] <= offsets[1] <= data):  # fmt: skip
            raise CheckpointError(f"{path}: not a readable safetensors file (tensor {name[:80]!r}: data_offsets "
                                  f"{str(offsets)[:80]} outside its {data} data bytes)")  # fmt: skip


def check_zip_archive(path: Path) -> None:
    """Refuse a zip archive (`torch.save` or TorchScript) before any record is inflated: more than `MAX_ZIP_RECORDS`
    records, a record reaching past the end of the file, one that inflates more than `MAX_INFLATION` times its
    stored size (a zip bomb: torch stores records uncompressed), or more than `MAX_ARCHIVE_BYTES` in all.

    Raises:
        CheckpointError: one line naming the file and the record.
    """
    size = path.stat().st_size
    records = _zip_record_count(path)  # before `zipfile` builds an object per record
    if records > MAX_ZIP_RECORDS:
        raise CheckpointError(f"{path}: zip archive of {records} records, more than {MAX_ZIP_RECORDS}; refusing to "
                              "read it")  # fmt: skip
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable zip archive: {one_line(e)}") from e
    if len(infos) > MAX_ZIP_RECORDS:
        raise CheckpointError(f"{path}: zip archive of {len(infos)} records, more than {MAX_ZIP_RECORDS}")
    total = 0
    for info in infos:
        if info.header_offset + info.compress_size > size:
            raise CheckpointError(f"{path}: zip record {info.filename[:80]!r} reaches past the end of the file")
        if info.file_size > MAX_INFLATION * info.compress_size + 2**20:
            raise CheckpointError(f"{path}: zip record {info.filename[:80]!r} inflates from {info.compress_size} to "
                                  f"{info.file_size} bytes (a zip bomb?); refusing to read it")  # fmt: skip
        total += info.file_size
    if total > MAX_ARCHIVE_BYTES:
        raise CheckpointError(f"{path}: zip archive inflates to {total} bytes, more than {MAX_ARCHIVE_BYTES}")


def _zip_record_count(path: Path) -> int:
    """The record count a zip's end-of-central-directory declares (zip64 too), read before `zipfile` builds its list;
    0 when the end record is not found (`zipfile` then reports the file)."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        f.seek(max(0, end - 22 - 65535))  # the end record: 22 bytes and a comment of at most 65535
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return 0
        count = struct.unpack_from("<H", tail, at + 10)[0]
        locator = at - 20  # zip64: a locator just before the end record points at the zip64 end record
        if count == 0xFFFF and locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
            f.seek(struct.unpack_from("<Q", tail, locator + 8)[0])
            record = f.read(56)
            if len(record) == 56 and record[:4] == b"PK\x06\x06":
                count = struct.unpack_from("<Q", record, 32)[0]
        return count


def one_line(e: BaseException) -> str:
    """An exception's message as one line: torch's weights-only refusals are a page, with the reason inside."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    return (reason.split(" Please use ")[0] or type(e).__name__)[:300]


def load_weights(model: nn.Module, sd: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy `sd` into `model`, all or nothing: every mismatch is named before any tensor is touched.

    A model built on the meta device (no memory, no random initialisation to throw away) takes the
    checkpoint's tensors in place, cast to the model's dtypes.

    Raises:
        CheckpointError: missing keys, unexpected keys or shape mismatches, each listed.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_clip(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_clip(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_clip(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    if any(v.is_meta for v in expected.values()):
        sd = {k: sd[k].to(v.dtype) if v.is_floating_point() else sd[k] for k, v in expected.items()}
        model.load_state_dict(sd, strict=True, assign=True)
    else:
        model.load_state_dict(sd, strict=True)


def _clip(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Write a directory all at once: files go into the yielded temporary sibling, renamed to `path` on success.

    A failure inside the block removes the temporary directory and leaves an existing `path` untouched. An
    existing `path` is replaced only if it is empty or a checkpoint directory (or `replaceable(path)` says it is
    another directory of ours), never another folder of files.

    Raises:
        ValueError: `path` is a file, or a non-empty directory holding no checkpoint.
    """
    path = Path(path)
    if not (replaceable is not None and path.is_dir() and not path.is_symlink() and replaceable(path)):
        check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_unique_directory(path.parent, prefix=f".{path.name}.")
    try:
        yield tmp
        apply_umask(tmp)  # some writers (safetensors) make 0600 files; the result gets the user's usual modes
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process's file-creation mask, read from /proc without changing it; elsewhere set and put back at once
    (`os.umask` is the only portable reader, and for that instant a file created by another thread gets mode 0o022's).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path`, and everything under it if it is a directory, the mode a plain `open()` or `mkdir` would give
    under the current umask: 0o666 & ~umask for files, 0o777 & ~umask for directories (0644 and 0755 under umask
    022; 0600 and 0700 under 077). Links are left alone.

    Why: some writers create restrictive files whatever the umask (`safetensors.torch.save_file` makes 0600 ones),
    which left weights other users of a shared machine could not read (issue 17).
    """
    mask = current_umask()
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                os.chmod(child, (0o777 if name in dirs else 0o666) & ~mask)


def make_unique_directory(parent: str | os.PathLike, prefix: str) -> Path:
    """Create a new directory `parent/<prefix><8 random hex digits>` and return it.

    Unlike `tempfile.mkdtemp`, whose directories are 0700 (and keep that mode when renamed into place, so a
    checkpoint other users of a shared machine cannot read: issue 17), it gets the mode a plain `mkdir` gives under
    the user's umask (0755 under umask 022). Every directory clipworks writes atomically is made by it.
    """
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()  # mode 0o777, less the umask
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name {prefix}XXXXXXXX in {parent} after 100 tries")


# Files that mark a directory as a checkpoint one may overwrite: clipworks/transformers, and OpenCLIP configs.
# (transformers and clipworks, OpenCLIP, clipworks ONNX exports)
_CHECKPOINT_MARKERS = ("config.json", "open_clip_config.json", "onnx_config.json")


def check_replaceable(path: Path) -> None:
    """Raise ValueError unless `path` is free, an empty directory, or a checkpoint directory a save may replace."""
    if path.is_file() or path.is_symlink():
        raise ValueError(f"{path} is a file or a link; a checkpoint is written as a directory: pass a directory path")
    if path.is_dir() and any(path.iterdir()) and not any((path / m).is_file() for m in _CHECKPOINT_MARKERS):
        raise ValueError(f"{path} is a non-empty directory holding no checkpoint (no {' or '.join(_CHECKPOINT_MARKERS)}"
                         "); refusing to replace it: pass a new or checkpoint directory")  # fmt: skip
