"""Subcommands of `clipworks` for this package (registered by `clipworks.cli`): embed, index, dedup."""

from __future__ import annotations

import argparse
import sys

from ..cli import UsageError, add_device_flag, add_quiet_flag, add_seed_flag, default_device, examples


def _cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from ..factory import create_model_and_transforms, get_tokenizer
    from .embed import default_workers, describe, embed_collection
    from .store import model_id

    refuse_random_weights(args)
    if args.aesthetic_head and args.text:
        raise UsageError("--aesthetic-head scores images; it cannot be given with --text")
    device = default_device(args.device)  # under torchrun: LOCAL_RANK's GPU, one per process on a machine
    torch.manual_seed(args.seed)  # a --random-init model is the same on every rank and every run
    model, _, preprocess = create_model_and_transforms(args.model, args.pretrained, device=device)
    prepare_for_inference(args, model)
    tokenizer = get_tokenizer(model) if args.text else None
    result = embed_collection(
        model, args.data, args.out, model_name=model_id(args.model, args.pretrained), transform=preprocess,
        tokenizer=tokenizer, text=args.text, batch_size=args.batch_size, dtype=args.dtype,
        workers=default_workers(device) if args.workers is None else args.workers,
        shard_size=args.shard_size, fast_decode=args.fast_decode, progress=not args.quiet, update=args.update,
        aesthetic_head=args.aesthetic_head, encode_in=args.encode_in, gpu_decode=args.gpu_decode, compile=args.compile,
    )  # fmt: skip
    print(describe(result))
    if result.skipped:
        print(f"{result.skipped} unreadable inputs skipped; listed in {args.out}/skipped.txt", file=sys.stderr)
    return 0


def refuse_random_weights(args: argparse.Namespace) -> None:
    """Raise UsageError when --model/--pretrained name no weights and --random-init was not given: every command that
    prints or writes model outputs (embed, serve, classify, eval, demo) asks for the flag."""
    from ..factory import names_no_weights

    if names_no_weights(args.model, args.pretrained) and not args.random_init:
        raise UsageError(f"--model {args.model} with no --pretrained is a random initialisation, new on every run: "
                         "its outputs mean nothing (and match nothing another run embeds); name weights "
                         "(--pretrained TAG or FILE, NAME:TAG, local-dir:DIR, hf-hub:ORG/REPO) or pass --random-init "
                         "(e.g. to time a model or try a pipeline)")  # fmt: skip


def add_random_init_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-init", action="store_true",
                   help="accept a preset with no weights (randomly initialised, different on every run)")


def add_precision_flag(p: argparse.ArgumentParser) -> None:
    """`--precision` (the model's, for inference; `prepare_for_inference` applies it) and `--int8`, its old spelling."""
    from ..hardware import CHOICES, MIN_BF16_WIDTH, cpu_has_native_bf16

    here = (f"bf16 on this CPU (it has bf16 units; fp32 for models narrower than {MIN_BF16_WIDTH})"
            if cpu_has_native_bf16() else "fp32 on this CPU (no bf16 units)")  # fmt: skip
    p.add_argument("--precision", choices=CHOICES, default="fp32",
                   help="the model's precision (default fp32): bf16/fp16 run the matrix products in that dtype with "
                        "float32 norms (OpenCLIP's meaning), pure_bf16/pure_fp16 the whole model; int8: int8 matrix "
                        "products in the transformer blocks (CPU only, clipworks.quantize_int8); auto picks "
                        f"{here}, bf16 on a CUDA GPU that supports it. Every choice but fp32 changes the embeddings "
                        "slightly (cosine >= 0.999 to fp32's on the models measured)")  # fmt: skip
    p.add_argument("--int8", action=_Int8Alias, help="the old spelling of --precision int8")


class _Int8Alias(argparse.Action):
    """`--int8`: says once what it maps to; `prepare_for_inference` turns it into --precision int8."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print("clipworks: --int8 is the old spelling of --precision int8", file=sys.stderr)
        setattr(namespace, self.dest, True)


def inference_precision(args: argparse.Namespace) -> str:
    """The precision a command's flags ask for: --precision, or "int8" for --int8 (alone or with --precision int8).

    Raises:
        UsageError: --int8 with another --precision.
    """
    precision = getattr(args, "precision", "fp32")
    if getattr(args, "int8", False):
        if precision not in ("fp32", "int8"):
            raise UsageError(f"--int8 is --precision int8; it cannot be given with --precision {precision}")
        precision = "int8"
    return precision


def prepare_for_inference(args: argparse.Namespace, model) -> str:
    """Ready a model that a command only runs forward, in place, and return its concrete precision: MobileCLIP's
    train-time branches fused (`clipworks.reparameterize`: the same features up to float rounding, 1.1-1.2x faster;
    nothing for other towers), a ResNet tower's batch norms folded into its convolutions and its weights stored
    channels-last (`clipworks.optimize_for_inference`: within 1e-7 of the unfolded features; the model can no longer
    train), then the precision of --precision/--int8 applied (`models.precision.apply_precision`; a command without
    the flags stays fp32; in bf16 on a CPU the transformer blocks' linears are prepacked for oneDNN with their
    LayerNorm affine, bias, GELU and residual fused, `models.fast.prepack_linears`). "auto" says on stderr what it
    picked.

    Raises:
        UsageError: int8 for a model off the CPU or without transformer blocks, or --int8 with another --precision.
    """
    from ..models.fold import optimize_for_inference
    from ..models.precision import apply_precision
    from ..models.timm_tower import reparameterize

    reparameterize(model)
    optimize_for_inference(model)  # before the cast: folding in fp32 (float64 arithmetic) is the more accurate order
    wanted = inference_precision(args)
    try:
        precision = apply_precision(model, wanted)
    except ValueError as e:
        raise UsageError(f"--precision {wanted}: {e}") from e
    if wanted == "auto":
        note = getattr(model, "precision_note", "")
        print(f"clipworks: --precision auto: {precision}{f' ({note})' if note.startswith('kept') else ''}",
              file=sys.stderr)  # fmt: skip
    if precision == "bf16" and next(model.parameters()).device.type == "cpu":
        from ..models.fast import packed_linears_available, prepack_linears

        if packed_linears_available():  # oneDNN weights laid out once, bias/GELU/residual fused (1.15-1.4x)
            prepack_linears(model)
    return precision


def _cmd_index(args: argparse.Namespace) -> int:
    import time

    from .backends import is_spec, write_collection
    from .index import build_index

    if is_spec(args.out):  # a Milvus or LanceDB collection: exact search unless --kind names an index
        if args.memory_mb is not None:
            raise UsageError("--memory-mb sizes a FAISS index; a milvus:/lancedb: collection takes --kind instead")
        start = time.perf_counter()
        store = write_collection(args.out, args.embeddings, overwrite=True,
                                 index="flat" if args.kind == "auto" else args.kind)  # fmt: skip
        m = store.manifest
        print(f"{args.out}: {m['kind']} collection of {m['count']} x {m['dim']} vectors ({m['model']}); index "
              f"{m['index']}{' (exact search)' if m['index'] == 'FLAT' else ''}; {len(store.column_kinds)} metadata "
              f"columns; written in {time.perf_counter() - start:.1f}s")  # fmt: skip
        return 0
    index = build_index(args.embeddings, args.out, kind=args.kind, memory_budget_mb=args.memory_mb,
                        recall_target=args.recall)  # fmt: skip
    m = index.manifest
    if m["search_param_name"]:
        recall = (f"{m['search_param_name']}={m['search_param']}; recall@10 vs exact search: {m['recall_at_10']:.4f} "
                  f"(target {m['recall_target']}, {m['recall_queries']} held-out queries)")  # fmt: skip
    else:
        recall = "exact search: recall@10 1.0"
    print(f"{args.out}: {m['kind']} index of {m['count']} x {m['dim']} vectors ({m['model']}); "
          f"{m['index_bytes'] / 2**20:.1f} MB index file; {recall}; built in {m['build_seconds']:.1f}s")
    if m["recall_at_10"] < args.recall:
        print(f"warning: recall@10 {m['recall_at_10']:.4f} is below the target {args.recall}; give more memory "
              "(--memory-mb) or choose --kind ivf/hnsw", file=sys.stderr)  # fmt: skip
    return 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    from .dedup import find_duplicates, write_pairs
    from .index import load_index

    index = load_index(args.index)
    pairs = find_duplicates(index, args.threshold, neighbours=args.neighbours)
    if args.out:
        write_pairs(pairs, args.out)
        print(f"{len(pairs)} pairs with similarity >= {args.threshold} written to {args.out}")
    else:
        print("a,b,score")
        for p in pairs:
            print(f"{p.a},{p.b},{p.score:.6f}")
        print(f"{len(pairs)} pairs with similarity >= {args.threshold}", file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `embed`, `index` and `dedup` to the `clipworks` parser."""
    p = sub.add_parser("embed", help="embed a collection of images (or captions, --text) into shards",
                       epilog=examples("clipworks embed --model ViT-B-32:openai --data folder:photos --out photos-emb",
                                       "clipworks embed --model ViT-B-32:openai --data bank.txt --text --out caps-emb",
                                       "clipworks embed --model ViT-L-14:openai --data 'wds:shards/{000..099}.tar' "
                                       "--out emb --batch-size 256"))  # fmt: skip
    p.add_argument("--model", required=True, help="preset, NAME:TAG, local-dir:DIR or hf-hub:ORG/REPO")
    p.add_argument("--pretrained", default=None, help="registry tag, weights file or checkpoint directory")
    p.add_argument("--data", required=True,
                   help="folder:DIR, csv:FILE, tsv:FILE or wds:PATTERN (with --text also a file of captions)")
    p.add_argument("--out", required=True, help="output directory; rerun the same command to resume")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 256 on a GPU, 64 on a CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding worker processes (0: decode in this one); default: one per core on a CPU job (each "
                        "then encodes its own batches), one per core but one on a GPU job")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="the dtype of the embeddings stored on disk (not the model's: that is --precision)")
    p.add_argument("--shard-size", type=int, default=10_000, help="items per output shard (wds: one per tar)")
    p.add_argument("--text", action="store_true", help="embed the distinct captions instead (a caption bank)")
    p.add_argument("--fast-decode", action="store_true",
                   help="reduced-size JPEG decoding: much faster on large photos, pixels not identical to exact preprocessing")
    p.add_argument("--gpu-decode", action="store_true",
                   help="decode JPEGs on the model's device (torchvision/nvJPEG) and resize there; the workers only read "
                        "files; close to the exact preprocessing, not equal (cosine in benchmarks/bench_embed_gpu.py)")
    p.add_argument("--compile", action="store_true",
                   help="run the image tower through torch.compile (CUDA graphs on a GPU); the first batches pay for it")
    p.add_argument("--encode-in", choices=("auto", "workers", "main"), default="auto",
                   help="CPU jobs: each worker encodes its own batches (workers), or this process encodes (main); "
                        "default auto: workers when there are as many as cores")
    add_precision_flag(p)
    p.add_argument("--update", action="store_true",
                   help="bring a finished --out up to date with its changed source (folder, csv, tsv): embed new and "
                        "changed files, drop the rows of deleted ones; rebuild the index afterwards")
    p.add_argument("--aesthetic-head", default=None, metavar="FILE",
                   help="score each image with this head (LAION's improved-aesthetic-predictor .pth, which reads "
                        "ViT-L-14:openai embeddings, or a `clipworks eval fit-score` head) into the metadata column "
                        "\"aesthetic\"")
    add_device_flag(p)
    add_quiet_flag(p, help="no progress bar")
    add_seed_flag(p)
    add_random_init_flag(p)
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("index", help="build a FAISS index (or a Milvus / LanceDB collection) over an embeddings directory",
                       epilog=examples("clipworks index --embeddings photos-emb --out photos-index",
                                       "clipworks index --embeddings emb --out 'milvus:http://127.0.0.1:19530?collection=photos'",
                                       "clipworks index --embeddings emb --out 'lancedb:lance-dir?table=photos'"))  # fmt: skip
    p.add_argument("--embeddings", required=True, help="directory written by `clipworks embed`")
    p.add_argument("--out", required=True,
                   help="index directory to write (an index there is replaced), or a vector database collection: "
                        "milvus:URI?collection=NAME (a server URI or a Milvus Lite .db folder) or "
                        "lancedb:DIR?table=NAME (a collection of ours there is replaced)")
    p.add_argument("--kind", choices=("auto", "flat", "ivf", "ivfpq", "hnsw"), default="auto",
                   help="auto: exact up to 50,000 vectors, else IVF-Flat, or IVF-PQ under a memory budget; for a "
                        "milvus:/lancedb: collection auto is exact (flat), Milvus also takes hnsw/ivf, LanceDB ivfpq")
    p.add_argument("--memory-mb", type=float, default=None, help="memory budget for the index")
    p.add_argument("--recall", type=float, default=0.95, help="recall@10 target for approximate indexes")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("dedup", help="list pairs of near-duplicate images in an index",
                       epilog=examples("clipworks dedup --index photos-index --threshold 0.97 --out duplicates.csv"))
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity at or above which a pair is listed")
    p.add_argument("--neighbours", type=int, default=20,
                   help="first k-NN width for HNSW indexes, doubled for an image whose k-th neighbour is still a duplicate")
    p.add_argument("--out", default=None, help="CSV file to write (a, b, score); default: print")
    p.set_defaults(func=_cmd_dedup)
