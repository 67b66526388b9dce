"""A run's metrics: rows of `metrics.csv`, and the same numbers as TensorBoard scalars and Weights & Biases history."""

from __future__ import annotations

import csv
import secrets
import warnings
from pathlib import Path
from typing import Any

# skipped: broken samples dropped by the data pipeline so far; skipped_steps: updates skipped for a non-finite loss.
# The evaluations' columns follow (`Evaluator.fields`): zero_shot_top1 on held-out synthetic attribute combinations,
# zero_shot_seen_top1 on unseen scenes of seen ones; eval_top1/5 on run.eval_data; val_* on data.val_size samples.
METRIC_FIELDS = ("step", "loss", "lr", "logit_scale", "samples_per_s", "skipped", "skipped_steps")
# The Weights & Biases run id, in the run directory: a resumed run continues the same W&B run.
WANDB_ID_FILE = "wandb_run_id"


def import_wandb():
    """The `wandb` module.

    Raises:
        ImportError: it is not installed; one line naming the extra that installs it.
    """
    try:
        import wandb
    except ImportError as e:
        raise ImportError("run.wandb needs the wandb package: pip install 'clipworks[wandb]'") from e
    return wandb


def start_wandb(run_dir: Path, project: str, config: dict[str, Any], resumed: bool):
    """A Weights & Biases run for the training run in `run_dir`, its files under `run_dir/wandb`, named after the
    directory, holding the resolved `config`. A `resumed` run continues the W&B run whose id `run_dir` holds; any
    other start makes a new one and stores its id there. W&B's own settings apply (`WANDB_MODE=offline` logs to
    files that `wandb sync` uploads later).

    Raises:
        ImportError: wandb is not installed (naming the extra).
        ValueError: W&B refused to start (not logged in, say), in one line.
    """
    wandb = import_wandb()
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    continuing = run_id is not None
    if run_id is None:
        run_id = secrets.token_hex(8)  # W&B ids: letters and digits
        id_file.write_text(run_id + "\n")
    try:
        return wandb.init(project=project, config=config, dir=str(run_dir), name=run_dir.resolve().name, id=run_id,
                          resume="allow" if continuing else None)  # fmt: skip
    except Exception as e:  # wandb raises its own errors (UsageError, CommError, ...) for a start it refuses
        message = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"run.wandb: Weights & Biases did not start: {message} (log in with `wandb login`, set "
                         "WANDB_MODE=offline, or pass --run.wandb false)") from e  # fmt: skip


class MetricsLog:
    """Rows of `metrics.csv` in the run directory, appended (a resumed run continues the same file), and the same
    numbers as TensorBoard scalars when `tensorboard_dir` is given and as W&B history when `wandb_run` is."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, fields: tuple[str, ...] = METRIC_FIELDS,
                 wandb_run=None):  # fmt: skip
        self.path, self.tensorboard, self.fields, self.wandb = path, None, fields, wandb_run
        if not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(fields)
        else:
            self._extend_header()
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("run.tensorboard is on but the tensorboard package is missing (pip install "
                              "'clipworks[train]'); metrics go to metrics.csv only", stacklevel=2)  # fmt: skip
            else:
                self.tensorboard = SummaryWriter(str(tensorboard_dir))

    def _extend_header(self) -> None:
        """A resumed run that evaluates more than its start did: the file's columns become both runs' columns."""
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))
        header = rows[0] if rows else []
        if header == list(self.fields):
            return
        self.fields = (*header, *(k for k in self.fields if k not in header))
        with self.path.open("w", newline="") as f:  # earlier rows get empty cells in the new columns
            csv.writer(f).writerows([self.fields, *(r + [""] * (len(self.fields) - len(r)) for r in rows[1:])])

    def write(self, **row) -> None:
        """Append one row: `step` and any of the log's fields (the others stay empty)."""
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k)) for k in self.fields])
        values = {k: row[k] for k in self.fields[1:] if row.get(k) is not None}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"train/{key}", value, row["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=row["step"])

    def close(self) -> None:
        """Flush and close the TensorBoard writer and finish the W&B run (once; a second call does nothing)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
