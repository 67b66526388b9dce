"""Safe reading of weight files and all-or-nothing loading into a model."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A weight file that cannot be read safely, or whose tensors do not fit the model."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from `.safetensors`, or from a pickled file through `torch.load(weights_only=True)`.

    Pickled files are never unpickled with arbitrary code: `weights_only=True` is the only attempt, and a
    file it rejects is an error. TorchScript archives (OpenAI's original `.pt` releases) are read by a
    restricted reader that takes their tensors and never runs their code. Training checkpoints that nest the
    weights under "state_dict" or "model" are unwrapped.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: the file is unreadable, unsafe, a TorchScript archive, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights format {suffix!r}; expected .safetensors or {PICKLE_SUFFIXES}")
    from .torchscript import is_torchscript, load_torchscript_state_dict

    if is_torchscript(path):
        return load_torchscript_state_dict(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types; all mean "not a safe plain checkpoint"
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
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
