"""Training run state: checkpoints of model, optimiser, schedule, step, data position and RNG, written atomically."""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints.io import atomic_directory

STATE_FILE = "state.pt"
# Written last, inside the temporary directory: a checkpoint without it was never finished.
COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


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
    process killed mid-save leaves the previous checkpoints as they were.
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
    with atomic_directory(path) as tmp:
        torch.save(state, tmp / STATE_FILE)
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
    return path


def is_complete(path: str | os.PathLike) -> bool:
    """A finished checkpoint: named `step_NNNNNNNN` and holding its state file and completion marker."""
    path = Path(path)
    return (bool(_STEP_DIR.match(path.name)) and (path / STATE_FILE).is_file()
            and (path / COMPLETE_MARKER).is_file())  # fmt: skip


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None; half-written and temporary directories are ignored."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return max(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


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
    """The run state saved at `path`, read with `weights_only=True`."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
