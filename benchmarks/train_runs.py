"""Helpers for bench_train.py: the shared CSV data set, the OpenCLIP model config, child runs and their logs.

Run as a script, this module is the OpenCLIP child: `python train_runs.py CONFIG.json ARGS...` registers the
model config with `open_clip.add_model_config` and calls `open_clip_train.main.main(ARGS)` in this process.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

OPEN_CLIP_MODEL = "clipworks-tiny"  # the name the config JSON registers under (its file stem)


@dataclass
class StepRecord:
    """One logged training step: its throughput and loss."""

    step: int
    samples_per_s: float
    loss: float


@dataclass
class ChildRun:
    """How a trainer subprocess went.

    Attributes:
        returncode: the exit status.
        wall_s: seconds from start to exit, start-up, data set-up and final saving included.
        max_rss_mb: peak resident set of the trainer process itself (`wait4` rusage, exact, not sampled).
        peak_tree_pss_mb: highest sampled (every 1 s) sum of proportional set sizes over the trainer and its DataLoader
            workers (shared pages split between the processes that map them, so nothing counts twice).
        log: the file holding the child's stdout and stderr.
    """

    returncode: int
    wall_s: float
    max_rss_mb: float
    peak_tree_pss_mb: float
    log: Path
    samples: list[StepRecord] = field(default_factory=list)


def write_shapes_csv(out_dir: Path, n: int, image_size: int = 64, seed: int = 0, fmt: str = "png") -> Path:
    """Write `n` train-split synthetic scenes as image files plus `data.csv` (filepath, caption); returns the CSV.

    Image paths in the CSV are absolute: OpenCLIP opens them as given, clipworks joins them to the CSV's folder
    (which leaves an absolute path unchanged).
    """
    from clipworks.data.synthetic import ShapesConfig, ShapesDataset

    if fmt not in ("png", "jpg"):
        raise ValueError(f"image format {fmt!r}: expected png or jpg")
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset("train", n, ShapesConfig(image_size=image_size, seed=seed))
    path = out_dir / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for i in range(n):
            image, caption = data[i]
            file = images / f"{i:07d}.{fmt}"
            image.save(file, quality=95) if fmt == "jpg" else image.save(file)
            writer.writerow([str(file.resolve()), caption])
    return path


def open_clip_config(model) -> dict:
    """The OpenCLIP model config JSON (as a dict) of a clipworks `ModelConfig` with `name: tiny`."""
    return {
        "embed_dim": model.embed_dim,
        "vision_cfg": {"image_size": model.image_size, "layers": model.vision_layers, "width": model.vision_width,
                       "patch_size": model.patch_size, "head_width": model.vision_width // model.vision_heads},
        "text_cfg": {"context_length": model.context_length, "vocab_size": 49408, "width": model.text_width,
                     "heads": model.text_heads, "layers": model.text_layers},
    }  # fmt: skip


def write_open_clip_config(model, out_dir: Path) -> Path:
    """Write the config as `OPEN_CLIP_MODEL.json` in `out_dir`; returns its path."""
    path = out_dir / f"{OPEN_CLIP_MODEL}.json"
    path.write_text(json.dumps(open_clip_config(model), indent=2))
    return path


def parameter_counts(model, config_path: Path) -> tuple[int, int]:
    """(clipworks, OpenCLIP) parameter counts of the same tiny model, and a check that both tokenize to one length."""
    import open_clip

    from clipworks.train.loop import build_model

    ours, tokenizer = build_model(model)
    open_clip.add_model_config(config_path)
    theirs = open_clip.create_model(OPEN_CLIP_MODEL)
    their_tokens = open_clip.get_tokenizer(OPEN_CLIP_MODEL)(["a small red circle"])
    if tuple(their_tokens.shape) != tuple(tokenizer(["a small red circle"]).shape):
        raise RuntimeError(f"context lengths differ: OpenCLIP {tuple(their_tokens.shape)}, clipworks "
                           f"{tuple(tokenizer(['a small red circle']).shape)}")  # fmt: skip
    return sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in theirs.parameters())


def write_open_clip_init(config_path: Path, out: Path, seed: int = 0) -> Path:
    """Save the OpenCLIP model's initial weights (torch seed `seed`) as a state dict file both trainers can load.

    OpenCLIP leaves its ViT image tower at PyTorch's default initialisation while clipworks gives it OpenAI's
    depth-scaled normal init, so with their own inits the two runs start from differently distributed weights.
    """
    import open_clip
    import torch

    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(OPEN_CLIP_MODEL).state_dict(), out)
    return out


# --- running a trainer in a subprocess ----------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (through /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # the process ended meanwhile
            continue
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class _PssPoller(threading.Thread):
    """Samples the summed PSS of a process tree every `interval` seconds, keeping the peak."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in _descendants(self.pid)))
            self.done.wait(self.interval)


def run_child(argv: list[str], log: Path, env: dict[str, str] | None = None) -> ChildRun:
    """Run `argv` with stdout and stderr to `log`; measure its wall time and memory.

    The exit is collected with `os.wait4` on this child's pid: its rusage holds this child's own peak RSS,
    while `getrusage(RUSAGE_CHILDREN)` would be the maximum over every child this process ever waited for, so
    the second trainer's figure could be the first one's.
    """
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        poller = _PssPoller(proc.pid)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    wall = time.perf_counter() - start
    poller.done.set()
    poller.join()
    return ChildRun(proc.returncode, wall, usage.ru_maxrss / 1024, poller.peak_kb / 1024, log)


# --- reading the trainers' logs -----------------------------------------------------------------------------------


def read_clipworks_metrics(path: Path) -> list[StepRecord]:
    """Per-step rows of a clipworks `metrics.csv` written with `run.log_every 1`."""
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"] and r["samples_per_s"]]
    return [StepRecord(int(r["step"]), float(r["samples_per_s"]), float(r["loss"])) for r in rows]


# "... Batch (t): 0.456, 140.351/s, 140.351/s/gpu LR: ... Contrastive_loss: 4.1589 (4.1589) Loss: 4.1589 (4.1589)"
_OPEN_CLIP_LINE = re.compile(r"Train Epoch: .*Batch \(t\): [0-9.]+, ([0-9.eE+-]+)/s,.* Loss: ([0-9.eE+-]+) \(")


def read_open_clip_log(path: Path) -> list[StepRecord]:
    """Per-step records of an `open_clip_train` log written with `--log-every-n-steps 1`.

    With logging every step, the logged samples/s is that step's (OpenCLIP resets its meters per log line)
    and the first "Loss: v (avg)" value is that step's total loss.
    """
    records = []
    for line in path.read_text(errors="replace").splitlines():
        m = _OPEN_CLIP_LINE.search(line)
        if m:
            records.append(StepRecord(len(records) + 1, float(m.group(1)), float(m.group(2))))
    return records


class _Column(list):
    def tolist(self) -> list:
        return list(self)


def _read_csv(path, sep: str = ",", **_) -> dict[str, _Column]:
    """The columns of a CSV file: all that `open_clip_train`'s `CsvDataset` asks of `pandas.read_csv`."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=sep))
    return {name: _Column(row[i] for row in rows[1:]) for i, name in enumerate(rows[0])}


def _stand_in_for_pandas() -> None:
    """`open_clip_train.data` imports pandas only to list the CSV (once, at start-up); without pandas installed,
    give it a module whose `read_csv` does that with the stdlib."""
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("pandas") is None:
        module = types.ModuleType("pandas")
        module.__spec__ = importlib.machinery.ModuleSpec("pandas", None)  # torch._dynamo asks find_spec of it
        module.read_csv = _read_csv
        sys.modules["pandas"] = module


def open_clip_child(argv: list[str]) -> None:
    """The OpenCLIP trainer with the model config `argv[0]` registered; `argv[1:]` are its flags."""
    _stand_in_for_pandas()
    import open_clip
    from open_clip_train.main import main

    open_clip.add_model_config(argv[0])
    main(argv[1:])


if __name__ == "__main__":
    open_clip_child(sys.argv[1:])
