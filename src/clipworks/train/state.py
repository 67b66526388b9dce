"""Training run state: checkpoints of model, optimiser, schedule, step, data position and RNG, written atomically,
checked against their SHA-256 checksums when read back, and the old ones removed as `run.keep_checkpoints` says."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..checkpoints.io import atomic_directory, one_line

STATE_FILE = "state.pt"
# Written last, inside the temporary directory: a checkpoint without it was never finished. It holds the step and
# the SHA-256 of every other file, as JSON (checkpoints written before issue 16 hold just the step).
COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# What `atomic_directory` leaves behind when a save dies: `.step_NNNNNNNN.<random>` and `.step_NNNNNNNN.old`; and
# `remove_old_checkpoints` when a removal dies: `.step_NNNNNNNN.removed`.
_TEMP_DIR = re.compile(r"^\.(step_\d{8})\.(\w+)$")


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files are missing, unreadable, or differ from the checksums written with them."""


class Resumed(NamedTuple):
    """The checkpoint a run resumes from and the state read from it."""

    path: Path
    state: dict[str, Any]


@dataclass
class DataPosition:
    """Where the data stream is: the epoch, and the batches of it already consumed."""

    epoch: int = 0
    step_in_epoch: int = 0


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors, lists and numbers (loadable with `weights_only=True`)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """`run_dir/checkpoints/step_{step:08d}`."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict, optimizer_state: dict,
                    scheduler_state: dict, position: DataPosition) -> Path:  # fmt: skip
    """Write the run state after `step` optimiser steps; returns the checkpoint directory.

    The states are whole (unsharded) state dicts; `clipworks.train.distributed` gathers them under FSDP.

    The files go into a temporary sibling directory, which is renamed into place only once complete, so a
    process killed mid-save leaves the previous checkpoints as they were. The completion marker, written last,
    holds each file's SHA-256, which `load_checkpoint` checks.
    """
    path = checkpoint_dir(run_dir, step)
    state = {
        "step": step,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "data": {"epoch": position.epoch, "step_in_epoch": position.step_in_epoch},
        "rng": rng_state(),
    }
    with atomic_directory(path, replaceable=_ours) as tmp:  # a run resumed from an earlier step saves it again
        torch.save(state, tmp / STATE_FILE)
        sums = {}
        for p in sorted(tmp.iterdir()):
            sums[p.name] = _sha256(p)
            _fsync(p)  # on disk before the rename makes the checkpoint visible
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "sha256": sums}) + "\n")
        _fsync(tmp / COMPLETE_MARKER)
    return path


def _ours(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) and {p.name for p in path.iterdir()} <= {STATE_FILE, COMPLETE_MARKER}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def is_complete(path: str | os.PathLike) -> bool:
    """A finished checkpoint: named `step_NNNNNNNN` and holding its state file and completion marker."""
    path = Path(path)
    return bool(_STEP_DIR.match(path.name)) and _has_files(path)


def _has_files(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / COMPLETE_MARKER).is_file()


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run's complete checkpoints, newest first; half-written and temporary directories are left out."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), reverse=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None (its files are not checked: see `load_resume`)."""
    return next(iter(complete_checkpoints(run_dir)), None)


def remove_old_checkpoints(run_dir: str | os.PathLike, keep: int, keep_every: int = 0,
                           written: Path | None = None) -> list[Path]:  # fmt: skip
    """Remove the complete checkpoints older than the newest `keep` (`run.keep_checkpoints`; 0 keeps all); returns
    the directories removed. Call it on the main process only, once a checkpoint is complete.

    Kept whatever their age: the checkpoint just `written`, milestones (steps that are multiples of `keep_every`,
    when positive), links, and directories holding files that are not ours. Each removal first renames the directory
    to a temporary name (atomic), then deletes it: a process killed mid-removal leaves no `step_NNNNNNNN` that
    "latest" could resume from, only a temporary that `remove_stale_temporaries` clears at the next start. A removal
    that fails is warned about and skipped: the run goes on.
    """
    removed = []
    for path in complete_checkpoints(run_dir)[keep:] if keep > 0 else []:
        step = int(_STEP_DIR.match(path.name).group(1))
        kept = (keep_every > 0 and step % keep_every == 0) or (written is not None and path.name == written.name)
        if kept or path.is_symlink() or not _ours(path):
            continue
        try:
            _remove_checkpoint(path)
        except OSError as e:
            warnings.warn(f"could not remove old checkpoint {path}: {one_line(e)}", stacklevel=2)
            continue
        removed.append(path)
    return removed


def _remove_checkpoint(path: Path) -> None:
    doomed = path.with_name(f".{path.name}.removed")  # a name `remove_stale_temporaries` clears
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed)
    path.rename(doomed)
    shutil.rmtree(doomed)


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Clear what saves (or removals) killed mid-write left in `run_dir/checkpoints`; returns the directories removed.

    Only directories named as `atomic_directory` names its temporaries (`.step_NNNNNNNN.<suffix>`) are touched.
    A `.step_NNNNNNNN.old` whose `step_NNNNNNNN` is missing is the only copy of a checkpoint (the save died between
    the two renames that replace it): it is renamed back instead.
    """
    root = Path(run_dir) / "checkpoints"
    removed = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        match = _TEMP_DIR.match(p.name)
        if not match or p.is_symlink() or not p.is_dir():
            continue
        final = root / match.group(1)
        if match.group(2) == "old" and not final.exists() and _has_files(p):
            p.rename(final)
            continue
        shutil.rmtree(p)
        removed.append(p)
    return removed


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `--run.resume` names: "latest" (None when the run has none yet) or a path.

    Raises:
        ValueError: a path that is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not is_complete(path):
        raise ValueError(f"--run.resume {resume}: not a complete checkpoint directory (expected "
                         f"step_NNNNNNNN holding {STATE_FILE} and {COMPLETE_MARKER}); or pass 'latest'")  # fmt: skip
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The run state saved at `path`, its files checked against the checksums written with them, read with
    `weights_only=True`.

    Raises:
        CorruptCheckpointError: one line naming the checkpoint and the file that is missing, damaged or unreadable.
    """
    path = Path(path)
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable {COMPLETE_MARKER} marker: {one_line(e)}") from e
    if isinstance(marker, int):  # written before checksums were: only the load below checks it
        marker = {"step": marker, "sha256": {}}
    sums = marker.get("sha256") if isinstance(marker, dict) else None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CorruptCheckpointError(f"{path}: {COMPLETE_MARKER} marker holds no checksums")
    for name, digest in sums.items():
        file = path / name
        if Path(name).name != name or name.startswith(".") or not file.is_file():
            raise CorruptCheckpointError(f"{path}: {name[:80]!r} is missing")
        if _sha256(file) != digest:
            raise CorruptCheckpointError(f"{path}: {name} differs from the checksum written with it (damaged)")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or damaged zip raises whatever its reader meets first
        raise CorruptCheckpointError(f"{path}: {STATE_FILE} is unreadable: {one_line(e)}") from e
    if not isinstance(state, dict) or not {"step", "model", "optimizer", "scheduler", "data", "rng"} <= set(state):
        raise CorruptCheckpointError(f"{path}: {STATE_FILE} is not a run state")
    return state


def load_resume(resume: str | None, run_dir: str | os.PathLike) -> Resumed | None:
    """The checkpoint `--run.resume` names, loaded: "latest" (None when the run has no checkpoint yet) or a path.

    "latest" takes the newest intact checkpoint: each newer one that is damaged or unreadable is passed over with a
    warning naming it and why.

    Raises:
        ValueError: a path that is not a complete checkpoint, or is damaged; "latest" when every one is damaged.
    """
    path = resolve_resume(resume, run_dir)
    if path is None:
        return None
    if resume != "latest":
        return Resumed(path, load_checkpoint(path))
    damaged = []
    for path in complete_checkpoints(run_dir):
        try:
            return Resumed(path, load_checkpoint(path))
        except CorruptCheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint {e}", stacklevel=2)
            damaged.append(f"{path.name}: {str(e).removeprefix(f'{path}: ')}")
    raise ValueError(f"--run.resume latest: no intact checkpoint in {Path(run_dir) / 'checkpoints'} ("
                     f"{'; '.join(damaged)}); remove them to start over, or pass a new --run.out_dir")  # fmt: skip
