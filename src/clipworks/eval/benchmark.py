"""`clipworks benchmark`: a resumable suite of models x datasets, with results.csv, results.md and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import (
    CommandFailed, UsageError, add_device_flag, add_quiet_flag, add_seed_flag, default_device, examples,
)  # fmt: skip
from ..search.commands import (
    add_precision_flag, add_random_init_flag, inference_precision, prepare_for_inference, refuse_random_weights,
)  # fmt: skip

COLLECTIONS = "vtab, vtab+, retrieval, imagenet_robustness"  # assets/benchmark/datasets.json's, for --help


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `benchmark` to the `clipworks` parser."""
    p = sub.add_parser(
        "benchmark", help="evaluate models on a suite of datasets (CLIP_benchmark's collections), resumably",
        description="Evaluate every (model, dataset, task) cell once: a rerun (after a kill, or with more models) "
                    "computes only the cells without a result under OUT/cells. Writes OUT/results.csv, "
                    "OUT/results.md and a plot per collection (OUT/plots).",
        epilog=examples("clipworks benchmark --models ViT-B-32:openai,ViT-B-16:openai --datasets vtab,retrieval "
                        "--dataset-root ~/clip_benchmark_datasets --out bench",
                        "clipworks benchmark --models local-dir:runs/mine/model --datasets "
                        "cifar10=cifar10:/data/cifar-10-batches-bin,pets=folder:/data/pets --task auto,linear_probe "
                        "--out bench",
                        "clipworks benchmark --models coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k --datasets "
                        "mscoco_captions --task captioning --download --out bench"))  # fmt: skip
    p.add_argument("--models", default=None,
                   help="comma-separated models: NAME:TAG, NAME:WEIGHTS_FILE, local-dir:DIR, hf-hub:ORG/REPO")
    p.add_argument("--datasets", default=None,
                   help=f"comma-separated: a collection of CLIP_benchmark's ({COLLECTIONS}), a dataset by "
                        "CLIP_benchmark's name (vtab/caltech101, mscoco_captions, ...: its WebDataset export under "
                        "--dataset-root, or from the hub with --download), or a data spec as `clipworks eval` takes (NAME=SPEC names it in the "
                        "tables); the task follows the dataset (captions: retrieval, labels: zero-shot)")  # fmt: skip
    p.add_argument("--task", default="auto",
                   help="comma-separated tasks: auto (each dataset's own: zero-shot classification, retrieval or "
                        "image_caption_selection), linear_probe (a classification set's train split: CLIP_benchmark's "
                        "protocol), captioning (a captioned set, CoCa models: BLEU, ROUGE-L, CIDEr), "
                        "zeroshot_classification, zeroshot_retrieval, image_caption_selection")  # fmt: skip
    p.add_argument("--dataset-root", default=None, metavar="DIR",
                   help="where CLIP_benchmark's WebDataset exports are: DIR/wds_NAME, '/' in NAME written '-' "
                        "(DIR/wds_vtab-caltech101), as the hub's clip-benchmark/wds_NAME")  # fmt: skip
    p.add_argument("--download", action="store_true",
                   help="fetch the exports not under --dataset-root from the hub (hf-hub:clip-benchmark/wds_NAME, "
                        "the test split) into the Hugging Face cache, each when its first cell runs")  # fmt: skip
    p.add_argument("--out", default=None, help="the suite's folder: cells/, cache/, results.csv, results.md, plots/")
    p.add_argument("--list", action="store_true", help="list the collections and the datasets known by name")
    p.add_argument("--skip-missing", action="store_true",
                   help="run the datasets whose data is there, skipping (with a line each) those whose is not")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes decoding images")
    add_device_flag(p)
    add_seed_flag(p, help="seed for random initialisation (with --random-init)")
    add_random_init_flag(p)
    add_precision_flag(p)
    add_quiet_flag(p, help="no progress bars (the line per cell stays)")
    p.set_defaults(func=_cmd_benchmark)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from . import suite

    if args.list:
        return _list(args.dataset_root)
    missing = [f for f in ("models", "datasets", "out") if not getattr(args, f)]
    if missing:
        raise UsageError(f"give {', '.join('--' + f for f in missing)} (or --list)")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError(f"--batch-size {args.batch_size} --workers {args.workers}: expected >= 1 and >= 0")
    from ..hardware import resolve_precision

    # the cells' precision: "auto" made concrete for this machine (for a model too narrow for bf16 the record says
    # the fp32 it then runs in)
    precision = resolve_precision(inference_precision(args), default_device(args.device).type)
    models = [suite.SuiteModel(m, precision) for m in dict.fromkeys(m.strip() for m in args.models.split(",")) if m]
    for model in models:  # before any data is read: presets without weights need --random-init
        refuse_random_weights(argparse.Namespace(model=model.spec, pretrained=None, random_init=args.random_init))
    plan = suite.plan_datasets([d for d in args.datasets.split(",") if d.strip()], args.dataset_root,
                               args.download)
    for line in plan.unsupported:
        print(f"clipworks benchmark: skipped {line}", file=sys.stderr)
    if plan.missing and not args.skip_missing:
        others = "; or pass --skip-missing to run the others" if plan.datasets else ""
        raise FileNotFoundError(suite.missing_data(plan.missing, args.dataset_root) + others)
    for missing in plan.missing:
        print(f"clipworks benchmark: skipped: {suite.missing_data([missing], args.dataset_root)}", file=sys.stderr)
    if not models or not plan.datasets:
        raise CommandFailed("nothing to run: " + ("no models" if not models else "no dataset has its data"))
    try:
        cells, skipped = suite.plan_cells(models, plan.datasets, [t.strip() for t in args.task.split(",") if t.strip()])
    except ValueError as e:
        raise UsageError(f"--task {args.task}: {e}") from e
    for line in skipped:
        print(f"clipworks benchmark: skipped {line}", file=sys.stderr)
    if not cells:
        raise CommandFailed(f"nothing to run: no dataset runs --task {args.task}")
    out = Path(args.out).expanduser()
    tasks = len({c.task for c in cells})
    print(f"clipworks benchmark: {len(models)} model(s) x {len(plan.datasets)} dataset(s)"
          f"{f' x {tasks} tasks' if tasks > 1 else ''} = {len(cells)} cells in {out}")  # fmt: skip
    try:
        run = suite.run_suite(cells, out / "cells", lambda m: _embedder(args, m, out / "cache"))
    except KeyboardInterrupt:
        print(f"clipworks benchmark: interrupted; the finished cells are in {out / 'cells'}: run the same command "
              "again to compute the rest", file=sys.stderr)  # fmt: skip
        return 130
    _write_reports(out, cells, plan)
    na = f", {run.not_applicable} not applicable to their model" if run.not_applicable else ""
    print(f"clipworks benchmark: {run.computed} cell(s) computed, {run.done_before} done before{na}, "
          f"{len(run.failed)} failed; wrote {out / 'results.csv'} and results.md")  # fmt: skip
    if run.failed:
        raise CommandFailed(f"{len(run.failed)} of {len(cells)} cells failed (their lines above say why); a rerun "
                            "computes only the missing cells")  # fmt: skip
    return 0


def _embedder(args: argparse.Namespace, model, cache_dir: Path):
    """An Embedder of one suite model, its features cached under OUT/cache."""
    import torch

    from ..factory import create_model_and_transforms, get_tokenizer
    from .embed import Embedder, model_identity

    device = default_device(args.device)
    torch.manual_seed(args.seed)  # a random init (--random-init) is the same on every run
    net, _, preprocess = create_model_and_transforms(model.spec, None, device=device)
    precision = prepare_for_inference(args, net)
    embedder = Embedder(net, preprocess, get_tokenizer(net), identity=model_identity(model.spec, None),
                        cache_dir=cache_dir, batch_size=args.batch_size, workers=args.workers, device=device,
                        show_progress=not args.quiet)  # fmt: skip
    embedder.precision = precision  # what the cells' records say they ran in
    return embedder


def _write_reports(out: Path, cells: list, plan) -> None:
    from .suite import read_cell
    from .suite_report import plot_groups, write_results_csv, write_results_md

    records = [r for r in (read_cell(out / "cells" / c.file_name()) for c in cells) if r is not None]
    write_results_csv(out / "results.csv", records)
    write_results_md(out / "results.md", records, cells)
    plots = plot_groups(out / "plots", records, cells, plan.groups)
    if plots:
        print(f"clipworks benchmark: plots: {', '.join(str(p) for p in plots if p.suffix == '.png')}")


def _list(root: str | None) -> int:
    from .suite import collections, export_dir_name, known_datasets

    print("collections (CLIP_benchmark's; --datasets NAME runs all of one):")
    for name, names in collections().items():
        print(f"  {name} ({len(names)}): {', '.join(names)}")
    where = f"under {root}" if root else "under --dataset-root DIR"
    print(f"\ndatasets by name: their WebDataset export {where}, as DIR/wds_NAME:")
    base = Path(root).expanduser() if root else None
    for name, entry in known_datasets().items():
        folder = export_dir_name(name)
        if "unsupported" in entry:
            state = "not supported: " + entry["unsupported"]
        elif base is None:
            state = folder
        else:
            state = f"{folder} " + ("found" if (base / folder / "test" / "nshards.txt").is_file() else "missing")
        print(f"  {name:<38} {entry['task']:<24} {state}")
    return 0
