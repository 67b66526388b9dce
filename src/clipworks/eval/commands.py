"""Subcommands of `clipworks` for this package (registered by `clipworks.cli`): classify, score and eval."""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import (
    CommandFailed, UsageError, add_device_flag, add_quiet_flag, add_seed_flag, default_device, examples,
)  # fmt: skip
from ..search.commands import add_precision_flag, add_random_init_flag, prepare_for_inference, refuse_random_weights

EVAL_TASKS = ("zeroshot", "retrieval", "linear-probe", "compositional", "clipscore", "fit-score")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset, NAME:TAG, local-dir:DIR or hf-hub:ORG/REPO")
    p.add_argument("--pretrained", default=None, help="registry tag, weights file or checkpoint directory")
    add_device_flag(p)
    add_seed_flag(p, help="seed for random initialisation (with --random-init), data splits and fitting")
    add_random_init_flag(p)
    add_precision_flag(p)


def _eval_args(p: argparse.ArgumentParser, out_help: str = "write results.json, results.md and a figure here") -> None:
    _model_args(p)
    p.add_argument("--data", required=True,
                   help="evaluation data: folder:DIR, csv:FILE?..., coco:FILE, synthetic:shapes; published sets as "
                        "distributed: imagenet:DIR (also -V2, -Sketch, -R, -A), cifar10:DIR, cifar100:DIR, mnist:DIR, "
                        "fashion-mnist:DIR, stl10:DIR, wds-benchmark:DIR (CLIP_benchmark's WebDataset export), "
                        "karpathy:FILE?images=DIR (Flickr8k/30k, COCO; retrieval), sugarcrepe:DIR?images=DIR, "
                        "winoground:DIR (compositional)")  # fmt: skip
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes decoding images")
    p.add_argument("--cache-dir", default="~/.cache/clipworks/features", help="feature cache directory")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    add_quiet_flag(p)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `classify`, `score` and `eval` to the `clipworks` parser."""
    p = sub.add_parser("classify", help="zero-shot classify images among class names, or rank a caption bank",
                       epilog=examples('clipworks classify --model ViT-B-32:openai --labels "cat,dog,car" photo.jpg',
                                       "clipworks classify --model ViT-B-32:openai --captions bank.txt *.jpg"))  # fmt: skip
    _model_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--labels", help='comma-separated class names, e.g. "cat,dog,car"')
    group.add_argument("--captions", help="a file of captions, one a line, to rank for each image")
    p.add_argument("--top", type=int, default=5, help="how many classes or captions to print per image")
    p.add_argument("--templates", default="imagenet",
                   help="prompt templates: imagenet (OpenAI's 80), simple (their best 7), photo, or a FILE")  # fmt: skip
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("score", help="score images with a head fit by `clipworks eval fit-score` (or LAION's)",
                       epilog=examples("clipworks score --head quality.safetensors photos/*.jpg",
                                       "clipworks score --head sac+logos+ava1-l14-linearMSE.pth --model "
                                       "ViT-L-14:openai photo.jpg"))  # fmt: skip
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--head", required=True,
                   help="a .safetensors head from `clipworks eval fit-score`, or a state dict (.pth, read with "
                        "weights_only=True, or .safetensors) of linear layers applied in turn: LAION's improved "
                        "aesthetic predictor MLP (sac+logos+ava1-l14-linearMSE.pth) or its linear head "
                        "(sa_0_4_vit_l_14_linear.pth), both on ViT-L-14:openai embeddings (then name --model); "
                        "a pickled module is refused")  # fmt: skip
    p.add_argument("--model", default=None, help="the embedding model (default: the one the head was fit on)")
    p.add_argument("--pretrained", default=None, help="registry tag, weights file or checkpoint directory")
    add_device_flag(p)
    add_seed_flag(p, help="seed for random initialisation (when the head was fit on a random model)")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("eval", help="evaluate a model: " + ", ".join(EVAL_TASKS),
                       epilog=examples("clipworks eval zeroshot --model ViT-B-32:openai --data folder:val",
                                       "clipworks eval retrieval --model ViT-B-32:openai --data coco:captions.json "
                                       "--images val2017", "clipworks eval TASK --help"))  # fmt: skip
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    m = "clipworks eval {} --model ViT-B-32:openai --data {}"
    t = tasks.add_parser("zeroshot", help="zero-shot classification: top-1, top-5, mean per-class recall",
                         epilog=examples(m.format("zeroshot", "folder:val --templates simple --out results"),
                                         m.format("zeroshot", "imagenet:ILSVRC2012?split=val")))  # fmt: skip
    _eval_args(t)
    t.add_argument("--templates", default=None,
                   help="imagenet, simple, photo, or a FILE of templates (default: the data's own, as CIFAR's and "
                        "wds-benchmark's, else imagenet)")  # fmt: skip
    t = tasks.add_parser("retrieval", help="image-text retrieval recall@1/5/10 in both directions",
                         epilog=examples(m.format("retrieval", "coco:captions_val2017.json --images val2017"),
                                         m.format("retrieval", "csv:pairs.csv")))  # fmt: skip
    _eval_args(t)
    t.add_argument("--images", default=None, help="image folder for coco: and karpathy: caption files")
    t = tasks.add_parser("linear-probe", help="logistic regression on features, L2 chosen on a validation split",
                         epilog=examples(m.format("linear-probe", "folder:train --test-data folder:test"),
                                         m.format("linear-probe", "folder:train --test-data folder:test --method "
                                                  "adamw --fewshot-k 16")))  # fmt: skip
    _eval_args(t)
    t.add_argument("--test-data", required=True, help="labelled test data (classes matched by name)")
    t.add_argument("--l2", type=float, nargs="+", default=None, help="L2 strengths to try (default 1e-6..10)")
    t.add_argument("--method", choices=("lbfgs", "adamw"), default="lbfgs",
                   help="lbfgs: logistic regression, L2 swept (default); adamw: CLIP_benchmark's protocol, AdamW with "
                        "its weight decay searched on a validation split (--fewshot-k, --epochs, --lr; the batch is "
                        "--batch-size)")  # fmt: skip
    t.add_argument("--fewshot-k", type=int, default=None, help="adamw: training images per class (default -1: all)")
    t.add_argument("--epochs", type=int, default=None, help="adamw: training epochs (default 10)")
    t.add_argument("--lr", type=float, default=None, help="adamw: peak learning rate, cosine schedule (default 0.1)")
    t = tasks.add_parser("compositional", help="true caption vs hard negatives (swapped attributes/relations)",
                         epilog=examples(m.format("compositional", "'csv:pairs.csv?negatives=neg1,neg2'")))
    _eval_args(t)
    t = tasks.add_parser("clipscore", help="CLIP score 100*max(cos, 0) of image-caption pairs",
                         epilog=examples(m.format("clipscore", "csv:generated.csv --out clipscore")))
    _eval_args(t)
    t.add_argument("--images", default=None, help="image folder for coco: and karpathy: caption files")
    t = tasks.add_parser("fit-score", help="fit a scoring head on embeddings from csv:FILE?score=COL",
                         epilog=examples(m.format("fit-score", "'csv:rated.csv?score=rating' --out q.safetensors")))
    _eval_args(t, out_help="the head to write (.safetensors)")
    t.add_argument("--hidden", type=int, default=0, help="MLP hidden width (0: a linear head)")
    t.add_argument("--epochs", type=int, default=300)
    p.set_defaults(func=_cmd_eval)


def _init_distributed(device) -> None:
    """Join the process group `torchrun` describes (WORLD_SIZE > 1), unless already joined."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)  # NCCL gathers through the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _load_model(args: argparse.Namespace):
    import torch

    from ..factory import create_model_and_transforms, get_tokenizer

    if hasattr(args, "random_init"):  # classify and eval (score's model is the one its head was fit on)
        refuse_random_weights(args)
    device = default_device(args.device)
    torch.manual_seed(args.seed)  # random weights are the same on every rank and every run
    model, _, preprocess = create_model_and_transforms(args.model, args.pretrained, device=device)
    prepare_for_inference(args, model)  # `score` has no --precision: fp32
    return model, preprocess, get_tokenizer(model), device


def _cmd_classify(args: argparse.Namespace) -> int:
    from .classify import classify, rank_captions, read_captions
    from .prompts import load_templates, parse_labels

    if args.top < 1:
        raise UsageError(f"--top {args.top}: expected at least 1")
    labels = parse_labels(args.labels) if args.labels else None
    templates = load_templates(args.templates) if labels else None
    captions = read_captions(args.captions) if args.captions else None
    model, preprocess, tokenizer, device = _load_model(args)
    if labels:
        result = classify(model, preprocess, tokenizer, args.images, labels, templates, args.top, device)
    else:
        result = rank_captions(model, preprocess, tokenizer, args.images, captions, args.top, device)
    if result.rankings:
        print("\n".join(r.format() for r in result.rankings))
    _report_unreadable("classify", result.failed, len(args.images))
    return 0


def _report_unreadable(command: str, failed: list[tuple[str, str]], total: int) -> None:
    """One stderr line per unreadable image (path and reason) and a count, as `embed` skips and lists them;
    CommandFailed (exit 1) when not one of the `total` images could be read."""
    for path, reason in failed:
        print(f"clipworks {command}: skipped {path}: {reason}", file=sys.stderr)
    if len(failed) == total:
        raise CommandFailed(f"none of the {total} image(s) could be read")
    if failed:
        print(f"clipworks {command}: {len(failed)} of {total} images unreadable (skipped); "
              f"{total - len(failed)} done", file=sys.stderr)  # fmt: skip


def _cmd_score(args: argparse.Namespace) -> int:
    from .classify import encode_image_files
    from .scoring import load_head

    loaded = load_head(args.head)
    if args.model is None:
        if loaded.model is None:
            raise UsageError(f"{args.head} does not say which model's embeddings it reads: name it with --model "
                             "(LAION's aesthetic predictors read ViT-L-14:openai's)")  # fmt: skip
        args.model, args.pretrained = loaded.model, loaded.pretrained
    model, preprocess, _, device = _load_model(args)
    if model.config.embed_dim != loaded.head[0].in_features:
        fit_on = f" (it was fit on {loaded.model})" if loaded.model else ""
        raise UsageError(f"{args.head} reads {loaded.head[0].in_features}-d embeddings; {args.model} gives "
                         f"{model.config.embed_dim}-d{fit_on}")  # fmt: skip
    images = encode_image_files(model, preprocess, args.images, device)
    scores = loaded.head(images.features).tolist() if images.paths else []
    for path, s in zip(images.paths, scores):
        print(f"{s:10.4f}  {path}")
    _report_unreadable("score", images.failed, len(args.images))
    return 0


def _embedder(args: argparse.Namespace):
    from .embed import Embedder, model_identity

    model, preprocess, tokenizer, device = _load_model(args)
    _init_distributed(device)
    identity = model_identity(args.model, args.pretrained)
    cache = None if args.no_cache else args.cache_dir
    return Embedder(model, preprocess, tokenizer, identity=identity, cache_dir=cache, batch_size=args.batch_size,
                    workers=args.workers, device=device, show_progress=not args.quiet)  # fmt: skip


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import sources

    if args.batch_size < 1 or args.workers < 0:
        raise UsageError(f"--batch-size {args.batch_size} --workers {args.workers}: expected >= 1 and >= 0")
    # Read the data first: a bad path or spec fails before a model is built.
    if args.task == "zeroshot":
        from .prompts import load_templates
        from .suite_tasks import is_multilabel

        multi = is_multilabel(args.data)  # voc2007-multilabel, a multilabel export: mean average precision
        labelled = sources.load_multilabel(args.data) if multi else sources.load_classification(args.data)
        own = None if args.templates else labelled.templates
        data = (labelled, own or load_templates(args.templates or "imagenet"))
    elif args.task == "linear-probe":
        data = (sources.load_classification(args.data), sources.load_classification(args.test_data), _adamw(args))
    elif args.task in ("retrieval", "clipscore"):
        data = (sources.load_captioned(args.data, args.images),)
    elif args.task == "compositional":
        paired = args.data.partition(":")[0] == "winoground"  # two images, two captions: scored both ways
        data = (sources.load_paired(args.data) if paired else sources.load_with_negatives(args.data),)
    else:
        if not args.out:
            raise UsageError("fit-score needs --out HEAD.safetensors")
        data = (sources.load_scored(args.data),)
    embedder = _embedder(args)
    return _RUNNERS[args.task](args, embedder, *data)


def _report(args: argparse.Namespace, embedder, evaluation, figure=None, **info) -> int:
    from .report import print_table, write_results

    if embedder.rank != 0:
        return 0
    details = {"model": args.model, "pretrained": args.pretrained, "data": args.data, "images": evaluation.images,
               "unreadable images skipped": evaluation.skipped, "processes": embedder.world_size, **info}  # fmt: skip
    done = embedder.embedded
    print(f"clipworks eval {args.task}: {args.model} on {args.data}: {evaluation.images} images, "
          f"{evaluation.skipped} unreadable (skipped); embedded {done['images']} images and {done['texts']} texts, "
          f"{embedder.cache_hits} feature set(s) read from the cache")  # fmt: skip
    print_table(evaluation.metrics)
    if args.out:
        out = write_results(args.out, args.task, evaluation.metrics, details)
        if figure is not None:
            figure(out)
        print(f"wrote {out}/results.json and results.md")
    return 0


def _run_zeroshot(args, embedder, data, templates) -> int:
    from .report import confusion_png
    from .sources import MultiLabel
    from .tasks import zeroshot, zeroshot_multilabel

    if isinstance(data, MultiLabel):
        ev = zeroshot_multilabel(embedder, data, templates)
        return _report(args, embedder, ev, None, classes=len(data.class_names), templates=len(templates))
    ev = zeroshot(embedder, data, templates)

    def figure(out):
        confusion_png(ev.extra["confusion"], data.class_names, out / "confusion.png")

    return _report(args, embedder, ev, figure, classes=len(data.class_names), templates=len(templates))


def _run_retrieval(args, embedder, data) -> int:
    from .report import retrieval_grid_png
    from .tasks import retrieval

    ev = retrieval(embedder, data)

    def figure(out):
        queries, hits, right, scores, ranks, right_scores = zip(*ev.extra["grid"])
        retrieval_grid_png(queries, hits, right, data.images.load, out / "retrieval.png", scores=scores,
                           correct_ranks=ranks, correct_scores=right_scores)  # fmt: skip

    return _report(args, embedder, ev, figure)


def _adamw(args: argparse.Namespace):
    """The AdamW protocol's settings for --method adamw (None for lbfgs), checked before a model is built."""
    from .linear_probe import AdamWProtocol

    given = {k: getattr(args, k) for k in ("fewshot_k", "epochs", "lr") if getattr(args, k) is not None}
    if args.method == "lbfgs":
        if given:
            raise UsageError(f"--{next(iter(given)).replace('_', '-')} is for --method adamw")
        return None
    if args.l2:
        raise UsageError("--l2 is for --method lbfgs (adamw searches CLIP_benchmark's weight decays)")
    return AdamWProtocol(batch_size=args.batch_size, seed=args.seed, **given)


def _run_linear_probe(args, embedder, train, test, adamw) -> int:
    from .linear_probe import DEFAULT_L2_GRID
    from .tasks import linear_probe_eval

    ev = linear_probe_eval(embedder, train, test, args.l2 or DEFAULT_L2_GRID, seed=args.seed, adamw=adamw)
    return _report(args, embedder, ev, test_data=args.test_data, classes=len(train.class_names), method=args.method)


def _run_compositional(args, embedder, data) -> int:
    from .sources import Paired
    from .tasks import compositional, paired

    if isinstance(data, Paired):
        return _report(args, embedder, paired(embedder, data))
    return _report(args, embedder, compositional(embedder, data), negative_kinds=", ".join(data.kinds))


def _run_clipscore(args, embedder, data) -> int:
    from .tasks import clipscore

    return _report(args, embedder, clipscore(embedder, data))


def _run_fit_score(args, embedder, data) -> int:
    import torch

    from .scoring import fit_head, save_head

    feats = embedder.images(data.images)
    scores = torch.tensor(data.scores)[feats.valid]
    result = fit_head(feats.features[feats.valid], scores, args.hidden, args.epochs, seed=args.seed)
    if embedder.rank == 0:
        save_head(result.head, args.out, args.model, args.pretrained)
        print(f"clipworks eval fit-score: {len(scores)} images ({feats.skipped} unreadable, skipped); "
              f"RMSE train {result.train_rmse:.4g}, validation {result.val_rmse:.4g} (predicting the mean: "
              f"{result.baseline_rmse:.4g}); wrote {args.out}")  # fmt: skip
    return 0


_RUNNERS = {"zeroshot": _run_zeroshot, "retrieval": _run_retrieval, "linear-probe": _run_linear_probe,
            "compositional": _run_compositional, "clipscore": _run_clipscore, "fit-score": _run_fit_score}  # fmt: skip

