"""Subcommands of `clipworks` for this package (registered by `clipworks.cli`): `clipworks serve`."""

from __future__ import annotations

import argparse
import re
import sys

from ..cli import UsageError, add_device_flag, add_seed_flag, examples, port_number
from ..search.commands import add_precision_flag, add_random_init_flag, prepare_for_inference
from .limits import MIB, ServeSettings

__all__ = ["add_commands", "settings_from_args", "named_specs"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `clipworks` parser."""
    d = ServeSettings()
    p = sub.add_parser("serve", help="serve collections over HTTP: JSON search API, embeddings API and a web page",
                       description="Text-to-image, image-to-image and image-to-text search over indexes built by\n"
                                   "`clipworks index`, with a web page at /, and OpenAI-shaped embeddings at\n"
                                   "/v1/embeddings. Binds to loopback by default.",
                       epilog=examples("clipworks serve --index photos-index --model ViT-B-32:openai",
                                       "clipworks serve --index photos=photos-index --index art=art-index "
                                       "--captions photos=caps-index --host 0.0.0.0 --port 8080",
                                       "clipworks serve --model ViT-B-32:openai"))  # fmt: skip
    p.add_argument("--index", action="append", default=None, metavar="[NAME=]INDEX",
                   help="a collection: an index directory from `clipworks index` (or a milvus:/lancedb: spec), named "
                        "NAME (default: the directory's name); repeatable, the first is the default")  # fmt: skip
    p.add_argument("--model", default=None,
                   help="the model the indexes were embedded with (preset, NAME:TAG, local-dir:DIR); default: the "
                        "model each index's manifest names. Without --index: the model /v1/embeddings serves")  # fmt: skip
    p.add_argument("--pretrained", default=None, help="the weights the index was embedded with, if --model names none")
    add_random_init_flag(p)
    add_seed_flag(p)
    add_device_flag(p, default="cpu")
    p.add_argument("--captions", action="append", default=None, metavar="[NAME=]INDEX",
                   help="an index of caption embeddings for image-to-text search in collection NAME (default: the "
                        "first); repeatable")  # fmt: skip
    p.add_argument("--safety", action=argparse.BooleanOptionalAction, default=True,
                   help="hide results a concept list flags unless a request says safe: false (default on; see "
                        "docs/search.md for the concepts and the threshold)")  # fmt: skip
    p.add_argument("--safety-concepts", default=None, metavar="FILE",
                   help="the unsafe concepts: a text file (one per line) or JSON {\"unsafe\": [...], \"neutral\": [...]}")
    p.add_argument("--safety-threshold", type=float, default=None, metavar="P",
                   help="hide a result when its probability of an unsafe concept is at least P (default 0.5)")
    p.add_argument("--aesthetic-head", default=None, metavar="FILE",
                   help="score the images of collections embedded without aesthetic scores with this head (LAION's "
                        "improved-aesthetic-predictor .pth) at start, for min_aesthetic and aesthetic_weight")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000; 0: a free one)")
    p.add_argument("--max-k", type=int, default=d.max_k, help=f"most results per search (default {d.max_k})")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MIB,
                   help=f"largest request body and URL download in MiB (default {d.max_body_bytes // MIB})")  # fmt: skip
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"most pixels in an uploaded image (default {d.max_pixels})")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=d.concurrency,
                   help=f"requests doing model work at once; more wait in the queue (default {d.concurrency})")  # fmt: skip
    p.add_argument("--queue", type=int, default=d.queue,
                   help=f"requests that wait for a model slot; more get 503 (default {d.queue}; 0: no waiting)")  # fmt: skip
    p.add_argument("--queue-timeout", type=float, default=d.queue_timeout_s,
                   help=f"seconds a request may wait in the queue before a 503 (default {d.queue_timeout_s:g})")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"most queries encoded in one batch while the model is busy (default {d.max_batch})")  # fmt: skip
    p.add_argument("--allow-urls", action="store_true", help="let image requests name a public http(s) URL to fetch")
    p.add_argument("--url-timeout", type=float, default=d.url_timeout_s,
                   help=f"seconds a URL download may take (default {d.url_timeout_s:g})")  # fmt: skip
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help=f"seconds a request body may take to arrive; slower gets 408 (default {d.body_timeout_s:g})")  # fmt: skip
    p.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help=f"seconds a request line and headers may take to arrive; slower gets 408 and is closed "
                        f"(default {d.header_timeout_s:g})")  # fmt: skip
    p.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_s,
                   help=f"seconds an idle keep-alive connection stays open (default {d.keep_alive_s:g})")  # fmt: skip
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"most open connections; more get 503 and are closed (default {d.max_connections})")  # fmt: skip
    p.add_argument("--image-root", action="append", default=None, metavar="DIR",
                   help="folder image files may be served from (repeatable; default: the roots the index records)")  # fmt: skip
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="print a JSON line per request to stderr (default on)")  # fmt: skip
    add_precision_flag(p)
    p.add_argument("--max-inputs", type=int, default=d.max_inputs,
                   help=f"most inputs in one /v1/embeddings request (default {d.max_inputs})")  # fmt: skip
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the index checksum check at start")
    p.set_defaults(func=_cmd_serve)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The `ServeSettings` the command-line options describe."""
    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb {args.max_body_mb}: expected a positive number")
    return ServeSettings(max_k=args.max_k, max_body_bytes=int(args.max_body_mb * MIB), max_pixels=args.max_pixels,
                         concurrency=args.concurrency, queue=args.queue, queue_timeout_s=args.queue_timeout,
                         max_batch=args.max_batch, allow_urls=args.allow_urls, url_timeout_s=args.url_timeout,
                         body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
                         keep_alive_s=args.keep_alive_timeout, max_connections=args.max_connections,
                         max_inputs=args.max_inputs,
                         image_roots=tuple(args.image_root or ()))  # fmt: skip


def named_specs(values: list[str] | None) -> list[tuple[str | None, str]]:
    """(NAME, SPEC) of each `[NAME=]SPEC` value of a repeatable option (NAME None when not given)."""
    out = []
    for value in values or ():
        name, sep, spec = value.partition("=")
        if sep and _NAME.fullmatch(name) and spec:
            out.append((name, spec))
        else:
            out.append((None, value))
    return out


def _default_name(spec: str) -> str:
    """A collection's name from its index's location: the directory's (or table's) name, cleaned."""
    tail = spec.rstrip("/").replace("\\", "/").split("/")[-1].split("?")[0].split(":")[-1] or "collection"
    return re.sub(r"[^A-Za-z0-9._-]", "_", tail)[:64]


def _safety(args: argparse.Namespace):
    from .safety import DEFAULT_THRESHOLD, SafetyConcepts, SafetyFilter, load_concepts

    if not args.safety:
        if args.safety_concepts or args.safety_threshold is not None:
            raise UsageError("--safety-concepts and --safety-threshold need the safety filter (drop --no-safety)")
        return None
    threshold = DEFAULT_THRESHOLD if args.safety_threshold is None else args.safety_threshold
    try:
        concepts = load_concepts(args.safety_concepts, threshold) if args.safety_concepts else SafetyConcepts(threshold=threshold)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return SafetyFilter(concepts)


def add_aesthetic_scores(store, head_file: str, name: str) -> bool:
    """Add the column "aesthetic" to a FAISS collection embedded without it: the head of `head_file` applied to
    its stored unit-norm vectors (float16 on disk, so scores differ from `embed --aesthetic-head`'s in about the
    fourth digit); False when it has the column already.

    Raises:
        UsageError: a head that reads vectors of another size, or a collection in Milvus or LanceDB (score those
            at embed time).
    """
    from ..search.embed import AESTHETIC, head_scores, load_aesthetic_head

    if AESTHETIC in getattr(store, "column_kinds", {}):
        return False
    if not hasattr(store, "add_column"):
        raise UsageError(f"collection {name!r} is not a FAISS index: give its images aesthetic scores at embed time "
                         "(clipworks embed --aesthetic-head) and write it again")  # fmt: skip
    try:
        head = load_aesthetic_head(head_file, store.dim)
    except (OSError, ValueError) as e:
        raise UsageError(f"--aesthetic-head: {e}") from e
    store.add_column(AESTHETIC, head_scores(head, store.vectors()).tolist())
    return True


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from ..factory import create_model_and_transforms, get_tokenizer
    from ..search.commands import refuse_random_weights
    from ..search.store import model_id
    from ..search.backends import open_store
    from .app import create_app
    from .observability import configure_access_log
    from .server import bind, run_server
    from .service import Collection

    settings = settings_from_args(args)
    indexes = named_specs(args.index)
    if not indexes and args.model is None:
        raise UsageError("give --index (a collection to search) or --model (serve embeddings only), or both")
    if args.captions and not indexes:
        raise UsageError("--captions needs the --index it belongs to")
    identity = None if args.model is None else model_id(args.model, args.pretrained)
    stores, names = [], []
    for name, spec in indexes:
        name = name or _default_name(spec)
        stores.append(open_store(spec, model=identity, verify=args.verify))
        names.append(name)
    banks: dict[str, object] = {}
    for name, spec in named_specs(args.captions):
        name = name or names[0]
        if name not in names:
            raise UsageError(f"--captions {name}=...: no --index is named {name!r} (the collections: {', '.join(names)})")
        banks[name] = open_store(spec, model=stores[names.index(name)].model, verify=args.verify)
    safety = _safety(args)
    if args.aesthetic_head is not None:
        for name, store in zip(names, stores):
            add_aesthetic_scores(store, args.aesthetic_head, name)
    wanted = [identity] if identity is not None else list(dict.fromkeys(s.model for s in stores))
    for model_name in wanted:  # every model the collections name needs weights, or --random-init
        refuse_random_weights(argparse.Namespace(model=model_name, pretrained=None, random_init=args.random_init))
    sock = bind(args.host, args.port)  # a port in use fails here, before the model loads and before any announcement
    try:
        models = {}
        for model_name in wanted:
            torch.manual_seed(args.seed)
            spec = (args.model, args.pretrained) if identity is not None else (model_name, None)
            model, _, preprocess = create_model_and_transforms(*spec, device=args.device)
            prepare_for_inference(args, model)
            models[model_name] = (model, preprocess, get_tokenizer(model))
        collections = [Collection(name, store, *models[identity or store.model], banks.get(name))
                       for name, store in zip(names, stores)]  # fmt: skip
        if collections:
            app = create_app(settings=settings, collections=collections, safety=safety)
        else:
            app = create_app(None, *models[identity], settings=settings, model_name=identity)
        host = f"[{args.host}]" if ":" in args.host else args.host
        what = ", ".join(f"{c.name} ({len(c.index)} images)" for c in collections) or f"embeddings of {identity}"
        print(f"clipworks serve: {what} on http://{host}:{sock.getsockname()[1]}/", file=sys.stderr)
        if args.access_log:
            configure_access_log(sys.stderr)
        run_server(app, sock, settings)
    finally:
        sock.close()
    return 0
