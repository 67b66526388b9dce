"""Subcommands of `clipworks` for this package (registered by `clipworks.cli`): `clipworks serve`."""

from __future__ import annotations

import argparse
import sys

from ..cli import add_device_flag, add_seed_flag, examples, port_number
from ..search.commands import add_int8_flag, add_random_init_flag, prepare_for_inference
from .limits import MIB, ServeSettings

__all__ = ["add_commands", "settings_from_args"]


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `clipworks` parser."""
    d = ServeSettings()
    p = sub.add_parser("serve", help="serve an index over HTTP: JSON search API and a web page",
                       description="Text-to-image, image-to-image and image-to-text search over an index built by\n"
                                   "`clipworks index`, with a web page at /. Binds to loopback by default.",
                       epilog=examples("clipworks serve --index photos-index --model ViT-B-32:openai",
                                       "clipworks serve --index photos-index --model ViT-B-32:openai --captions "
                                       "caps-index --host 0.0.0.0 --port 8080"))  # fmt: skip
    p.add_argument("--index", required=True, help="the image index directory (from `clipworks index`)")
    p.add_argument("--model", required=True, help="the model the index was embedded with (preset, NAME:TAG, local-dir:DIR)")
    p.add_argument("--pretrained", default=None, help="the weights the index was embedded with, if --model names none")
    add_random_init_flag(p)
    add_seed_flag(p)
    add_device_flag(p, default="cpu")
    p.add_argument("--captions", default=None, help="an index of caption embeddings for image-to-text search")
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
    add_int8_flag(p)
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
                         image_roots=tuple(args.image_root or ()))  # fmt: skip


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from ..factory import create_model_and_transforms, get_tokenizer
    from ..search.commands import refuse_random_weights
    from ..search.index import load_index
    from ..search.store import model_id
    from .app import create_app
    from .observability import configure_access_log
    from .server import bind, run_server

    settings = settings_from_args(args)
    identity = model_id(args.model, args.pretrained)
    index = load_index(args.index, model=identity, verify=args.verify)
    captions = None if args.captions is None else load_index(args.captions, model=identity, verify=args.verify)
    refuse_random_weights(args)
    sock = bind(args.host, args.port)  # a port in use fails here, before the model loads and before any announcement
    try:
        torch.manual_seed(args.seed)
        model, _, preprocess = create_model_and_transforms(args.model, args.pretrained, device=args.device)
        prepare_for_inference(args, model)
        app = create_app(index, model, preprocess, get_tokenizer(model), settings, captions=captions)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"clipworks serve: {len(index)} images ({identity}) on http://{host}:{sock.getsockname()[1]}/",
              file=sys.stderr)  # fmt: skip
        if args.access_log:
            configure_access_log(sys.stderr)
        run_server(app, sock, settings)
    finally:
        sock.close()
    return 0
