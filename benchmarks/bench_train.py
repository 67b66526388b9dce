"""Training side by side: `clipworks train` and OpenCLIP's `open_clip_train` on the same CSV, model, batch and steps.

Writes synthetic shapes scenes (`ShapesDataset`, split train, 64 px) as image files plus a CSV, then trains the
"tiny" CLIP (8,047,105 parameters in both libraries) with each trainer in its own subprocess: fp32 on the CPU,
the same batch, steps, AdamW (betas 0.9/0.98, eps 1e-6), weight decay, warmup-then-cosine schedule, gradient
clipping and number of DataLoader workers, context length 20, no evaluation.

- samples/s: both trainers log every step (clipworks `metrics.csv`, OpenCLIP's `out.log`); the first `--skip`
  steps are left out, and the rate is the samples of the remaining steps over their summed step times (the
  median per-step rate is printed too: it shrugs off bursts of load from other processes).
- memory: the trainer process's peak RSS from `os.wait4` on its pid (exact), and the peak over 1 s samples of
  the summed PSS of the trainer and its DataLoader workers (PSS splits shared pages, so forked workers do not
  count the parent's pages twice; reading smaps_rollup costs milliseconds of CPU, hence the 1 s period).
- loss: the mean training loss of the last `--last` steps. It varies with the seed by more than the trainers
  differ at a few hundred steps; `--repeats N` runs seeds seed..seed+N-1 and the table shows medians.

Known differences left in: OpenCLIP applies weight decay to the token and positional embeddings (clipworks
does not), initialises its ViT image tower with PyTorch's defaults (clipworks: OpenAI's scaled normal; `--init
shared` starts both from OpenCLIP's initial weights), and `open_clip_train` imports pandas only to read the CSV
(without pandas installed, the driver in train_runs.py gives it a stdlib stand-in).

`--busy 1` runs a busy loop beside each trainer (a machine where another process holds a core), to compare how
much of its quiet speed each trainer keeps.

Beyond the default CPU comparison: `--model ViT-B-16` trains an OpenCLIP preset in both (from scratch, images at
its size), `--precision fp32,bf16` runs each precision (bf16: clipworks `run.precision bf16`, OpenCLIP
`amp_bf16`, both autocast), `--device cuda --nproc N` runs each trainer under torchrun on N GPUs (DDP; `--parallel
fsdp` shards clipworks' model, OpenCLIP has no FSDP), `--extra "--model.patch_dropout 0.5"` adds clipworks
overrides (a feature's cost), and the table gains model FLOPs utilisation (`train_flops.py`) and peak GPU memory.
The GPU run the issue asks for (H100/H200, ViT-B-16, bf16, 256 per GPU):

    python benchmarks/bench_train.py --device cuda --model ViT-B-16 --precision bf16 --batch-size 256 \
        --workers 8 --steps 60 --images 5120 --format jpg --repeats 2
    python benchmarks/bench_train.py --device cuda --model ViT-B-16 --precision bf16 --batch-size 256 \
        --workers 8 --steps 60 --images 5120 --format jpg --only clipworks --parallel fsdp

Usage: python benchmarks/bench_train.py [--steps 200] [--batch-size 128] [--workers 1] [--repeats 1] [--init own]
       [--busy 0] [--model tiny] [--precision fp32] [--device cpu] [--nproc 1] [--parallel ddp] [--extra ARGS]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_runs import (  # noqa: E402
    OPEN_CLIP_MODEL, ChildRun, StepRecord, parameter_counts, read_clipworks_metrics, read_open_clip_log, run_child,
    write_open_clip_config, write_open_clip_init, write_shapes_csv,
)  # fmt: skip
from train_flops import GpuMemoryPoller, forward_flops, gpu_peak_flops  # noqa: E402

TRAINERS = ("clipworks", "open_clip")


@dataclass
class Summary:
    """One trainer run, reduced to the figures of the table."""

    trainer: str
    precision: str
    samples_per_s: float  # steady state: samples over the steps after the skipped ones / their summed step times
    median_step_rate: float  # median of the per-step samples/s over the same steps (robust to bursts of load)
    max_rss_mb: float
    peak_tree_pss_mb: float
    final_loss: float  # mean loss of the last `last` steps
    steps: int
    wall_s: float
    gpu_mem_mb: float = float("nan")  # peak device memory over the run (nvidia-smi), GPU runs only
    mfu: float = float("nan")  # model FLOPs utilisation, where the device's peak is known


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="optimiser steps per trainer")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes, both trainers")
    p.add_argument("--images", type=int, default=None,
                   help="images written (default steps x batch: one epoch); must make steps a whole number of epochs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default steps // 10)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--skip", type=int, default=None,
                   help="first steps left out of samples/s (start-up, allocator warm-up); default max(5, steps // 10)")
    p.add_argument("--last", type=int, default=None, help="final loss = mean of the last N steps (default steps // 10)")
    p.add_argument("--init", choices=("own", "shared"), default="own",
                   help="own: each trainer initialises its model; shared: both load OpenCLIP's initial weights")
    p.add_argument("--seed", type=int, default=0,
                   help="both trainers' seed (data order, augmentation, initial weights); repeat i uses seed + i")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="image file format")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per trainer, each with the next seed, alternating which trainer goes first")
    p.add_argument("--clipworks-script", default=None,
                   help="run this Python script with clipworks.cli's arguments instead of `-m clipworks.cli` (A/B a "
                        "patched trainer)")
    p.add_argument("--only", default=",".join(TRAINERS), help=f"comma-separated subset of {TRAINERS}")
    p.add_argument("--busy", type=int, default=0,
                   help="processes spinning in a busy loop beside each trainer run (a machine shared with other "
                        "work: 1 holds one core)")  # fmt: skip
    p.add_argument("--model", default="tiny", help="tiny (the default run's model) or an OpenCLIP preset name")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16 (each run for each trainer)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--nproc", type=int, default=1, help="processes per trainer under torchrun (GPUs with cuda)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="clipworks' run.parallel with --nproc")
    p.add_argument("--extra", default="", help="more clipworks train overrides, e.g. \"--model.patch_dropout 0.5\"")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: the data-sheet bf16 peak of a known GPU)")
    p.add_argument("--work-dir", default=None, help="keep data, logs and runs here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the per-run figures to this JSON file")
    args = p.parse_args(argv)
    args.images = args.images or args.steps * args.batch_size
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    args.skip = max(5, args.steps // 10) if args.skip is None else args.skip
    args.last = max(1, args.steps // 10) if args.last is None else args.last
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    if not args.precisions or set(args.precisions) - {"fp32", "bf16"}:
        p.error(f"--precision {args.precision}: choose from fp32, bf16 (comma-separated)")
    if args.init == "shared" and args.model != "tiny":
        p.error("--init shared needs --model tiny")
    batches = args.images // (args.batch_size * args.nproc)
    if batches < 1 or args.steps % batches:
        p.error(f"--images {args.images} gives {batches} global batches of {args.batch_size} x {args.nproc} per epoch; "
                f"--steps {args.steps} must be a multiple of that (OpenCLIP trains whole epochs)")  # fmt: skip
    if not 0 <= args.skip < args.steps or not 1 <= args.last <= args.steps:
        p.error(f"--skip {args.skip} and --last {args.last} must leave steps to measure out of {args.steps}")
    for name in args.only.split(","):
        if name not in TRAINERS:
            p.error(f"--only: unknown trainer {name!r}; choose from {TRAINERS}")
    return args


def _launcher(args, module: str | None = None) -> list[str]:
    """The interpreter, or torchrun with `--nproc` processes on this node."""
    if args.nproc == 1:
        return [sys.executable] + (["-m", module] if module else [])
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    return run + (["-m", module] if module else [])


def clipworks_argv(args, csv: Path, run_dir: Path, seed: int, init: Path | None, precision: str) -> list[str]:
    """`clipworks train` with the benchmark's settings, from weights `init`."""
    opts = {"model.name": args.model, "data.train": f"csv:{csv}", "data.batch_size": args.batch_size, "data.workers": args.workers,
            "data.eval_size": 0, "optim.lr": args.lr, "optim.weight_decay": args.wd, "optim.betas": "0.9,0.98",
            "optim.eps": 1e-6, "optim.warmup_steps": args.warmup, "optim.schedule": "cosine",
            "optim.grad_clip": args.grad_clip, "run.steps": args.steps, "run.seed": seed, "run.precision": precision,
            "run.device": args.device, "run.out_dir": run_dir, "run.log_every": 1, "run.eval_every": 0,
            "run.save_every": 0, "run.progress": "false", "run.parallel": args.parallel,
            "loss.local_loss": str(args.nproc > 1).lower()}  # fmt: skip
    if init is not None:
        opts["model.pretrained"] = init
    entry = _launcher(args) + [args.clipworks_script] if args.clipworks_script else _launcher(args, "clipworks.cli")
    return [*entry, "train"] + [x for k, v in opts.items() for x in (f"--{k}", str(v))] + shlex.split(args.extra)


def open_clip_argv(args, csv: Path, config: Path, logs: Path, name: str, seed: int, init: Path | None,
                   precision: str) -> list[str]:  # fmt: skip
    """`open_clip_train.main` through the driver in train_runs.py, which registers the model config first."""
    epochs = args.steps // (args.images // (args.batch_size * args.nproc))
    model = OPEN_CLIP_MODEL if args.model == "tiny" else args.model
    flags = ["--train-data", csv, "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath",
             "--csv-caption-key", "caption", "--model", model, "--batch-size", args.batch_size,
             "--workers", args.workers, "--epochs", epochs, "--lr", args.lr, "--wd", args.wd, "--beta1", 0.9,
             "--beta2", 0.98, "--eps", 1e-6, "--warmup", args.warmup, "--lr-scheduler", "cosine",
             "--precision", {"fp32": "fp32", "bf16": "amp_bf16"}[precision], "--device", args.device, "--seed", seed,
             "--logs", logs, "--name", name, "--log-every-n-steps", 1, "--report-to", "", "--zeroshot-frequency", 0,
             "--val-frequency", 0]  # fmt: skip
    if init is not None:
        flags += ["--pretrained", init]
    if args.grad_clip > 0:
        flags += ["--grad-clip-norm", args.grad_clip]
    if args.nproc > 1:  # OpenCLIP's recommended multi-GPU loss settings, as clipworks' loss.local_loss
        flags += ["--local-loss", "--gather-with-grad"]
    driver = Path(__file__).resolve().parent / "train_runs.py"
    return [*_launcher(args), str(driver), str(config)] + [str(f) for f in flags]


def summarize(trainer: str, precision: str, run: ChildRun, records: list[StepRecord], args) -> Summary:
    """Steady-state figures from the per-step records; raises if the run failed or logged too few steps."""
    if run.returncode != 0 or len(records) < args.steps:
        tail = "\n".join(run.log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{trainer}: exit status {run.returncode}, {len(records)} of {args.steps} steps "
                           f"logged; end of {run.log}:\n{tail}")  # fmt: skip
    steady = records[args.skip : args.steps]
    batch = args.batch_size * args.nproc  # both trainers log the global samples/s
    seconds = sum(batch / r.samples_per_s for r in steady)
    loss = statistics.fmean(r.loss for r in records[args.steps - args.last : args.steps])
    rate = len(steady) * batch / seconds
    return Summary(trainer, precision, rate, statistics.median(r.samples_per_s for r in steady), run.max_rss_mb,
                   run.peak_tree_pss_mb, loss, len(records), run.wall_s)  # fmt: skip


def run_trainer(trainer: str, precision: str, args, work: Path, csv: Path, config: Path, index: int) -> Summary:
    """Train once with `trainer` in a subprocess, with seed `args.seed + index`, and summarize the run."""
    seed = args.seed + index
    init = None
    if args.init == "shared":
        init = work / f"open_clip_init_seed{seed}.pt"
        if not init.exists():
            write_open_clip_init(config, init, seed=seed)
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # each trainer keeps its own OpenMP defaults
    gpu = GpuMemoryPoller() if args.device == "cuda" else None
    if gpu is not None:
        gpu.start()
    name = f"{trainer}-{precision}-{index}"
    if trainer == "clipworks":
        run_dir = work / name
        shutil.rmtree(run_dir, ignore_errors=True)  # clipworks refuses a run folder holding checkpoints
        with busy_loops(args.busy):
            run = run_child(clipworks_argv(args, csv, run_dir, seed, init, precision), work / f"{name}.log", env)
        records = read_clipworks_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
    else:
        shutil.rmtree(work / "open_clip_logs" / name, ignore_errors=True)  # OpenCLIP refuses an existing name
        argv = open_clip_argv(args, csv, config, work / "open_clip_logs", name, seed, init, precision)
        with busy_loops(args.busy):
            run = run_child(argv, work / f"{name}.log", env)
        log = work / "open_clip_logs" / name / "out.log"
        records = read_open_clip_log(log) if log.exists() else []
    summary = summarize(trainer, precision, run, records, args)
    if gpu is not None:
        summary.gpu_mem_mb = gpu.stop()
    if args.peak_flops:
        summary.mfu = summary.samples_per_s * 3 * args.flops_per_sample / (args.peak_flops * args.nproc)
    return summary


@contextlib.contextmanager
def busy_loops(n: int):
    """`n` processes spinning in a Python busy loop (each wants a whole core) while the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()


def _median(rows: list[Summary], trainer: str, precision: str) -> Summary | None:
    mine = [r for r in rows if r.trainer == trainer and r.precision == precision]
    if not mine:
        return None
    fields = [f for f in Summary.__dataclass_fields__ if f not in ("trainer", "precision")]
    return Summary(trainer, precision, **{f: statistics.median(getattr(r, f) for r in mine) for f in fields})


def format_table(rows: list[Summary], precision: str = "fp32") -> str:
    """Markdown table of the medians over repeats at one precision, with clipworks / OpenCLIP ratios and the
    targets."""
    ours, theirs = _median(rows, "clipworks", precision), _median(rows, "open_clip", precision)
    metrics = [("samples/s (steady state)", "samples_per_s", "{:,.1f}", ">= 1.2x"),
               ("median per-step samples/s", "median_step_rate", "{:,.1f}", ""),
               ("peak RSS, trainer process (MB)", "max_rss_mb", "{:,.0f}", "<= 1x"),
               ("peak PSS, trainer + workers (MB)", "peak_tree_pss_mb", "{:,.0f}", "<= 1x"),
               ("final loss (mean of last steps)", "final_loss", "{:.4f}", "<= open_clip"),
               ("wall time incl. start-up (s)", "wall_s", "{:,.1f}", ""),
               ("peak GPU memory (MB)", "gpu_mem_mb", "{:,.0f}", ""),
               ("model FLOPs utilisation", "mfu", "{:.1%}", ">= 45% (GPU)")]  # fmt: skip
    lines = [f"precision {precision}:", "",
             "| metric | clipworks | open_clip | clipworks / open_clip | target |", "|---|---|---|---|---|"]
    for label, attr, fmt, target in metrics:
        if all(s is None or getattr(s, attr) != getattr(s, attr) for s in (ours, theirs)):  # all NaN: not measured
            continue
        a, b = (fmt.format(getattr(s, attr)) if s else "-" for s in (ours, theirs))
        ratio = f"{getattr(ours, attr) / getattr(theirs, attr):.2f}x" if ours and theirs else "-"
        lines.append(f"| {label} | {a} | {b} | {ratio} | {target} |")
    return "\n".join(lines)


def _header(args, work: Path) -> str:
    import torch

    return (f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.machine()}; work folder {work}\n"
            f"# model {args.model}, device {args.device} x {args.nproc} ({args.parallel}), precision "
            f"{args.precision}, extra clipworks overrides {args.extra or 'none'}\n"
            f"# steps {args.steps}, batch {args.batch_size}, workers {args.workers}, busy loops {args.busy}, "
            f"images {args.images} "
            f"({args.format}), init {args.init}, seed {args.seed}, lr {args.lr}, warmup {args.warmup}, wd {args.wd}, "
            f"grad clip {args.grad_clip}; samples/s over steps {args.skip + 1}-{args.steps}, "
            f"loss over the last {args.last}")  # fmt: skip


def prepare(args, work: Path) -> tuple[Path, Path]:
    """(OpenCLIP model config, data CSV), written into `work`.

    A CSV already in `work` with the requested number of images in the requested format and size is reused.
    """
    from clipworks.train.config import ModelConfig

    model = ModelConfig()
    config = write_open_clip_config(model, work)  # registered by the OpenCLIP driver (used with --model tiny)
    size = model.image_size
    if args.model == "tiny":
        ours, theirs = parameter_counts(model, config)
        print(f"# parameters: clipworks {ours:,}, open_clip {theirs:,}")
        if ours != theirs:
            raise SystemExit("the two models differ in size; fix open_clip_config in train_runs.py")
    else:
        import clipworks

        vision = clipworks.get_preset(args.model).vision
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    csv, stamp = work / "data.csv", work / "data.txt"  # what the CSV holds: reused when it is what is asked
    wanted = f"{args.images} {args.format} {size}px"
    if not csv.exists() or not stamp.exists() or stamp.read_text() != wanted:
        csv = write_shapes_csv(work, args.images, size, fmt=args.format)
        stamp.write_text(wanted)
    return config, csv


def _set_peak(args) -> None:
    """args.flops_per_sample (the model's training FLOPs / 3) and args.peak_flops (None: no MFU) for the table."""
    args.flops_per_sample = forward_flops(args.model)
    args.peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else None
    if args.peak_flops is None and args.device == "cuda":
        peak, name = gpu_peak_flops(args.precisions[0])
        args.peak_flops = peak
        print(f"# {name}: peak {'unknown (give --peak-tflops)' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")
    print(f"# {args.model}: {args.flops_per_sample / 1e9:.2f} GFLOP per sample forward (x3 per training step)")


def _precision_lines(rows: list[Summary], precisions: list[str]) -> str:
    """Each trainer's speed and loss at each precision against its first precision's."""
    lines = []
    for trainer in TRAINERS:
        base = _median(rows, trainer, precisions[0])
        for precision in precisions[1:]:
            other = _median(rows, trainer, precision)
            if base and other:
                lines.append(f"{trainer}: {precision} / {precisions[0]}: samples/s {other.samples_per_s:,.1f} / "
                             f"{base.samples_per_s:,.1f} = {other.samples_per_s / base.samples_per_s:.2f}x, loss "
                             f"{other.final_loss:.4f} vs {base.final_loss:.4f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_train_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(_header(args, work))
        config, csv = prepare(args, work)
        _set_peak(args)
        rows = []
        order = [(t, p) for p in args.precisions for t in TRAINERS if t in args.only.split(",")]
        for i in range(args.repeats):
            for trainer, precision in order if i % 2 == 0 else order[::-1]:
                rows.append(run_trainer(trainer, precision, args, work, csv, config, i))
                r = rows[-1]
                gpu = f", GPU {r.gpu_mem_mb:,.0f} MB, MFU {r.mfu:.1%}" if args.device == "cuda" else ""
                print(f"# run {i} (seed {args.seed + i}) {trainer} {precision}: {r.samples_per_s:.1f} samples/s, "
                      f"RSS {r.max_rss_mb:.0f} MB, PSS {r.peak_tree_pss_mb:.0f} MB, loss {r.final_loss:.4f}, "
                      f"{r.wall_s:.0f} s{gpu}", flush=True)  # fmt: skip
        for precision in args.precisions:
            print(format_table(rows, precision), "\n", sep="")
        if len(args.precisions) > 1:
            print(_precision_lines(rows, args.precisions))
        if args.json:
            Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
