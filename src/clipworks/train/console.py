"""What `clipworks train` tells its user and how it stops: the plan at the start, a time estimate measured on the
first steps, Ctrl-C that saves a checkpoint, and no run directory left behind by a run that learnt nothing."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

from .config import TrainConfig

# Steps timed for the estimate, after the first (which includes the data workers' start and first allocations); a
# slow model gives its estimate sooner: after ESTIMATE_MIN_STEPS steps once ESTIMATE_MAX_S seconds have passed.
ESTIMATE_STEPS, ESTIMATE_MIN_STEPS, ESTIMATE_MAX_S = 20, 3, 60.0


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run at `step` (None: before training began). `checkpoint` is the one to resume from: saved
    at `step` when `saved`, else an older one (a second Ctrl-C quit without saving); None when there is none."""

    def __init__(self, run_dir: Path, step: int | None, checkpoint: Path | None, saved: bool, world_size: int = 1):
        self.run_dir, self.step, self.checkpoint = run_dir, step, checkpoint
        self.saved, self.world_size = saved, world_size
        super().__init__(self.message())

    def resume_command(self) -> str:
        """The command that continues the run from its newest checkpoint (its resolved config is in the run)."""
        args = ["--config", str(self.run_dir / "config.yaml"), "--run.out_dir", str(self.run_dir),
                "--run.resume", "latest"]  # fmt: skip
        if self.world_size > 1:
            return f"your torchrun command with train {shlex.join(args)}"
        return shlex.join(["clipworks", "train", *args])

    def message(self) -> str:
        """One line: where the run stopped, what was saved, and how to resume it."""
        when = "before training began" if self.step is None else f"at step {self.step}"
        if self.checkpoint is None:
            return f"interrupted {when}: nothing saved (no checkpoint yet)"
        if self.saved:
            return f"interrupted {when}: saved {self.checkpoint}; resume with: {self.resume_command()}"
        return (f"interrupted {when} without saving; the newest checkpoint is {self.checkpoint}; resume with: "
                f"{self.resume_command()}")  # fmt: skip


class StopRequest:
    """Within `with StopRequest() as stop:`, Ctrl-C sets `stop.requested` instead of raising, so that the loop
    stops between two steps and saves a consistent checkpoint (a KeyboardInterrupt could land between the
    optimiser's update and the step count, and a resumed run would repeat an update). A second Ctrl-C raises
    KeyboardInterrupt at once.

    Only in the main thread, and only where Ctrl-C would raise KeyboardInterrupt (not where it is ignored or handled
    by someone else). DataLoader workers forked meanwhile inherit the handler and ignore Ctrl-C: the main process
    decides when they stop.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous, self._pid = None, os.getpid()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # fmt: skip
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and os.getpid() == self._pid:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def batches(self, loader):
        """The loader's batches; ended early, rather than failing, when the Ctrl-C that asked the run to stop also
        ended a DataLoader worker (workers not forked from this process do not inherit the handler)."""
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception:
                if self.requested:
                    return
                raise
            yield batch

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker
            return
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            sys.stderr.write("\nstopping after this step to save a checkpoint (Ctrl-C again to quit without saving)\n")
            sys.stderr.flush()
        except (OSError, RuntimeError):  # a closed stream, or a write interrupted in the middle
            pass


def plan_lines(cfg: TrainConfig, run_dir: Path, params: tuple[int, int], samples: int | None, evals: list[str],
               start_step: int, device: str, held_out: int = 0, world_size: int = 1) -> list[str]:  # fmt: skip
    """The start of a run, in four lines: where it goes, the model, the data, the steps; then, for a run on real data
    that evaluates nothing, a note on how to get a sign of progress other than the training loss.

    Args:
        params: (all, trainable) parameter counts.
        samples: the samples training draws from, or None for a stream (WebDataset) of unknown size.
        evals: what each evaluation runs, one phrase each (empty: no evaluation).
        held_out: samples of the training source held out of training for validation.
        world_size: processes, each taking `data.batch_size` samples a step.
    """
    from ..hardware import resolve_precision

    m, d, r = cfg.model, cfg.data, cfg.run
    total, trainable = params
    weights = f"weights {m.pretrained}" if m.pretrained else "random init"
    frozen = f" ({trainable / 1e6:.1f}M trained)" if trainable != total else ""
    size = "a stream of unknown size" if samples is None else f"{samples:,} samples"
    if held_out:
        size += f" for training, {held_out:,} held out"
    held = "; ".join(evals) or "no held-out evaluation"
    batch = d.batch_size * world_size
    epochs = "" if not samples else f", {r.steps * batch / samples:.2g} epochs"
    per = f" ({world_size} processes x {d.batch_size})" if world_size > 1 else ""
    precision = resolve_precision(r.precision, device.split(":")[0])
    precision = f"{precision} (auto)" if r.precision == "auto" else precision
    left = f"{r.steps - start_step} of {r.steps} steps" if start_step else f"{r.steps} steps"
    saves = f"a checkpoint every {r.save_every} steps" if r.save_every else "a checkpoint at the end"
    every = f", evaluation every {r.eval_every}" if evals and r.eval_every else ""
    lines = [f"run: {run_dir}",
             f"model: {m.name}, {total / 1e6:.1f}M parameters{frozen}, {weights}",
             f"data: {d.train} ({size}); {held}",
             f"steps: {left} of {batch} samples{per}{epochs} on {device} in {precision}; {saves}{every}"]  # fmt: skip
    if not evals and not d.train.startswith("synthetic:"):
        lines.append("note: the training loss is this run's only sign of progress. For another, hold out training "
                     "samples for a validation loss and image-text recall (--data.val_size 500), or name a labelled "
                     "set for zero-shot accuracy (--run.eval_data folder:DIR with a sub-folder of images per class; "
                     "or imagenet:DIR, cifar10:DIR, csv:FILE)")  # fmt: skip
    return lines


class TimeEstimate:
    """The time a run's remaining steps will take, measured on its first steps on this machine (the first step,
    which includes start-up, is left out). `update` gives the line once, when enough steps were timed."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps, self.start, self.done = total_steps, None, False

    def update(self, step: int, train_s: float, samples: int) -> str | None:
        """Called after each step with the run's step and its training seconds and samples so far."""
        if self.done:
            return None
        if self.start is None:
            self.start = (step, train_s, samples)
            return None
        steps, seconds, n = step - self.start[0], train_s - self.start[1], samples - self.start[2]
        if steps < ESTIMATE_STEPS and (steps < ESTIMATE_MIN_STEPS or seconds < ESTIMATE_MAX_S):
            return None
        self.done = True
        left = self.total_steps - step
        if left <= 0 or seconds <= 0:
            return None
        return (f"time: about {_duration(left * seconds / steps)} for the {left} step{'s' if left > 1 else ''} left, "
                f"at {n / seconds:.0f} samples/s measured over the last {steps} steps on this machine (evaluations and "
                "checkpoints extra)")  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its ancestors that do not exist yet: what creating it makes, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def remove_created(dirs: list[Path]) -> None:
    """Remove what `missing_dirs` listed before a run that failed created it: the run directory with what the run
    wrote into it, then each ancestor it left empty."""
    if not dirs:
        return
    shutil.rmtree(dirs[0], ignore_errors=True)
    for parent in dirs[1:]:
        try:
            parent.rmdir()  # only if empty: something else may have been put there meanwhile
        except OSError:
            return
