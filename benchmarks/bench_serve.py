"""Load test of `clipworks serve` on loopback: searches, a fixed number at each of several concurrencies.

Builds two random collections in a temporary folder ("photos" and "art", each with metadata columns source,
year and aesthetic), starts `clipworks serve` on both in a subprocess (random weights, no download; the safety
filter on, as by default) with its default limits (concurrency 4 and a wait queue, unless
`--concurrency`/`--queue` say otherwise), sends `--requests` searches (text queries, or with `--endpoint image`
uploaded 256x256 PNGs) from each count of `--clients` threads (each with its own keep-alive connection),
alternating the two collections and, unless `--no-filters`, metadata filters (a range on year, an equality on
source, both), and prints p50/p90/p99 latency of the answered ones, requests/s, the refusals (503: the server
too busy) and the errors (any other non-200 answer, a page short of k, a result breaking its filter, or a
failed request). `--queue 0` refuses at once past the concurrency limit (no waiting).

`--endpoint embeddings` posts `--batch` texts per request to `/v1/embeddings` (OpenAI's shape) instead, and
first times a plain in-process loop of `encode_text` on batches of the same size in this process (the server
idle), printing texts/s of both and their ratio.

Usage: python benchmarks/bench_serve.py [--model ViT-B-32|tiny] [--endpoint text|image|embeddings]
                                        [--requests 2000] [--clients 16,64] [--concurrency N] [--queue N]
                                        [--items 10000] [--k 10] [--batch 32] [--no-filters] [--quick]
                                        [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle", "star")
TEMPLATES = ("a {c} {s}", "a photo of a small {c} {s} on a plain background", "{s}, {c}",
             "a drawing of a large {c} {s} next to a smaller one, seen from above in soft light")  # fmt: skip


def queries(n: int) -> list[str]:
    """`n` text queries of varied length (cycling through colours, shapes and templates)."""
    combos = [t.format(c=c, s=s) for t in TEMPLATES for c in COLOURS for s in SHAPES]
    return [combos[i % len(combos)] for i in range(n)]


def images(n: int) -> list[bytes]:
    """`n` PNG files (256x256, 16 distinct ones cycled: noise over a colour) to upload."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(min(n, 16)):
        pixels = np.clip(rng.normal(40 * (i % 6), 30, (256, 256, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return [files[i % len(files)] for i in range(n)]


def model_args(name: str, work: Path) -> tuple[str, int]:
    """(the --model argument for `clipworks serve`, embed_dim); "tiny" writes a small random checkpoint."""
    import clipworks
    from clipworks.presets import get_preset

    if name != "tiny":
        return name, get_preset(name).embed_dim
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference import tiny_config

    cfg = tiny_config(get_preset("ViT-B-32"))
    clipworks.save_pretrained(clipworks.create_model(cfg), work / "model")
    return f"local-dir:{work / 'model'}", cfg.embed_dim


SOURCES = ("laion", "coyo", "cc12m", "wit")
# (filter string, test of a result's metadata): none, a range, an equality, both (about 1/4 to 1/8 of rows match)
FILTERS = ((None, lambda m: True), ("year>=2020", lambda m: m["year"] >= 2020),
           ("source=laion", lambda m: m["source"] == "laion"),
           ("source=coyo;aesthetic>=5", lambda m: m["source"] == "coyo" and m["aesthetic"] >= 5))  # fmt: skip


def build_random_index(work: Path, model: str, dim: int, items: int, name: str = "index", seed: int = 0) -> Path:
    """An exact index over `items` random unit vectors with metadata (source, year, aesthetic), recorded as made
    by `model`."""
    from clipworks.search.index import build_index
    from clipworks.search.store import write_embeddings

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((items, dim)).astype(np.float32)
    years, scores = rng.integers(2016, 2024, items), rng.uniform(1, 10, items).round(2)
    records = [{"key": f"item-{i:07d}", "caption": f"item {i}", "source": SOURCES[i % len(SOURCES)],
                "year": int(years[i]), "aesthetic": float(scores[i])} for i in range(items)]  # fmt: skip
    write_embeddings(work / f"{name}-emb", vectors, records, model=model)
    build_index(work / f"{name}-emb", work / name, kind="flat")
    return work / name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(indexes: dict[str, Path], model: str, port: int, limits: list[str]) -> subprocess.Popen:
    """`clipworks serve` over the named indexes in a subprocess (with the extra options `limits`), returned once
    /api/health answers."""
    import httpx

    named = [arg for name, index in indexes.items() for arg in ("--index", f"{name}={index}")]
    cmd = [sys.executable, "-m", "clipworks.cli", "serve", *named, "--model", model, "--no-access-log",
           "--port", str(port), "--max-k", "100", "--random-init", *limits]  # fmt: skip
    server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not answer /api/health within 300 s")


def _post(client, query: str | bytes | list, k: int, i: int, filters: bool) -> tuple:
    """Send request `i` (its collection and filter chosen by i); (response, test of a result's metadata)."""
    if isinstance(query, list):  # /v1/embeddings
        body = {"model": client.model_name, "input": query, "encoding_format": "base64"}  # the openai client's default
        return client.post("/v1/embeddings", json=body), None
    collection = ("photos", "art")[i % 2]
    where, keep = FILTERS[(i // 2) % len(FILTERS)] if filters else FILTERS[0]
    options = {"collection": collection, **({"filters": where} if where else {})}
    if isinstance(query, bytes):
        files = {"file": ("q.png", query, "image/png")}
        return client.post("/api/search/image", files=files, data={"k": str(k), **options}), keep
    return client.post("/api/search/text", json={"query": query, "k": k, **options}), keep


def _problem(r, keep, k: int, want: int) -> str | None:
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    body = r.json()
    if keep is None:
        return None if len(body["data"]) == want else f"{len(body['data'])} embeddings for {want} inputs"
    if len(body["results"]) != k:
        return f"{len(body['results'])} results, not {k}"
    broken = [x["key"] for x in body["results"] if not keep(x["metadata"])]
    return f"results breaking the filter: {broken[:3]}" if broken else None


def load(url: str, texts: list, clients: int, k: int, filters: bool = True,
         model_name: str | None = None) -> tuple[list[float], int, list[str], float]:  # fmt: skip
    """Send one request per text (image bytes, or list of texts for /v1/embeddings) from `clients` threads;
    (latencies in s of successes, refusals (503), other errors, wall seconds)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    refused = 0
    lock = threading.Lock()
    next_item = iter(range(len(texts)))

    def worker() -> None:
        nonlocal refused
        with httpx.Client(base_url=url, timeout=60) as client:
            client.model_name = model_name
            while True:
                with lock:
                    i = next(next_item, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    r, keep = _post(client, texts[i], k, i, filters)
                    want = len(texts[i]) if isinstance(texts[i], list) else k
                    problem = _problem(r, keep, k, want)
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    problem = f"{type(e).__name__}: {e}"
                elapsed = time.perf_counter() - start
                with lock:
                    if problem and problem.startswith("HTTP 503"):
                        refused += 1
                    else:
                        (errors.append(problem) if problem else latencies.append(elapsed))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, refused, errors, time.perf_counter() - start


def summarize(latencies: list[float], refused: int, errors: list[str], wall: float, clients: int,
              args: argparse.Namespace) -> dict:  # fmt: skip
    """The figures of one run."""
    ms = np.array(latencies) * 1000
    pct = (lambda q: round(float(np.percentile(ms, q)), 2)) if len(ms) else (lambda q: None)
    row = {"model": args.model, "endpoint": args.endpoint, "items": args.items, "requests": args.requests,
           "clients": clients, "concurrency": args.concurrency, "queue": args.queue, "k": args.k,
           "filters": args.filters, "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
           "max_ms": round(float(ms.max()), 2) if len(ms) else None,
           "mean_ms": round(statistics.fmean(ms), 2) if len(ms) else None,
           "requests_per_s": round(len(latencies) / wall, 1), "refused": refused, "errors": len(errors),
           "wall_s": round(wall, 2)}  # fmt: skip
    if args.endpoint == "embeddings":
        row["texts_per_s"] = round(len(latencies) * args.batch / wall, 1)
    return row


def in_process_texts_per_s(model: str, texts: list[list[str]]) -> float:
    """Texts/s of a plain loop of `encode_text(tokenizer(batch), normalize=True)` in this process."""
    import torch

    import clipworks

    net, _, _ = clipworks.create_model_and_transforms(model)
    tokenizer = clipworks.get_tokenizer(net)
    net.eval()
    with torch.inference_mode():
        for batch in texts[:4]:  # warm-up
            net.encode_text(tokenizer(batch), normalize=True)
        start = time.perf_counter()
        for batch in texts:
            net.encode_text(tokenizer(batch), normalize=True).numpy()
        wall = time.perf_counter() - start
    return sum(map(len, texts)) / wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help='a preset (random weights) or "tiny" (default ViT-B-32)')
    parser.add_argument("--endpoint", choices=("text", "image", "embeddings"), default="text",
                        help="what to send: text or image searches, or /v1/embeddings requests")  # fmt: skip
    parser.add_argument("--requests", type=int, default=2000, help="requests per client count (default 2000)")
    parser.add_argument("--clients", default="16,64", help="comma-separated counts of concurrent clients (default 16,64)")
    parser.add_argument("--concurrency", type=int, default=None, help="the server's --concurrency (default: its own)")
    parser.add_argument("--queue", type=int, default=None, help="the server's --queue (default: its own; 0: no waiting)")
    parser.add_argument("--items", type=int, default=10_000, help="vectors in each collection (default 10000)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="texts per /v1/embeddings request (default 32)")
    parser.add_argument("--no-filters", dest="filters", action="store_false", help="search without metadata filters")
    parser.add_argument("--server-args", default="", help='more `clipworks serve` options, e.g. "--no-safety"')
    parser.add_argument("--warmup", type=int, default=32, help="untimed requests first (default 32)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 1000 items, 300 requests")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.model, args.items, args.requests, args.warmup = "tiny", 1000, 300, 16
    counts = [int(c) for c in args.clients.split(",")]
    limits = [f"--{name}={value}" for name, value in (("concurrency", args.concurrency), ("queue", args.queue))
              if value is not None] + args.server_args.split()  # fmt: skip
    import torch

    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"server limits: {' '.join(limits) or 'defaults'}")  # fmt: skip
    rows, problems, loop_rate = [], [], None
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        model, dim = model_args(args.model, work)
        indexes = {name: build_random_index(work, model, dim, args.items, name, seed)
                   for seed, name in enumerate(("photos", "art"))}  # fmt: skip
        if args.endpoint == "embeddings":
            make = lambda n: [queries(args.batch * (i + 1))[-args.batch :] for i in range(n)]  # noqa: E731
            loop_rate = in_process_texts_per_s(model, make(min(args.requests, 200)))
            print(f"in-process encode_text loop, batch {args.batch}: {loop_rate:.1f} texts/s")
        else:
            make = queries if args.endpoint == "text" else images
        port = free_port()
        server = start_server(indexes, model, port, limits)
        try:
            url = f"http://127.0.0.1:{port}"
            for clients in counts:
                load(url, make(args.warmup), clients, args.k, args.filters, model)
                latencies, refused, errors, wall = load(url, make(args.requests), clients, args.k, args.filters, model)
                rows.append(summarize(latencies, refused, errors, wall, clients, args))
                problems += errors
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("| model | endpoint | collections | filters | requests | clients | p50 ms | p90 ms | p99 ms | max ms | "
          "requests/s | refused (503) | errors |" + (" texts/s | vs in-process loop |" if loop_rate else ""))
    print("|---" * (13 + 2 * bool(loop_rate)) + "|")
    for row in rows:
        extra = f" {row['texts_per_s']} | {row['texts_per_s'] / loop_rate:.2f}x |" if loop_rate else ""
        print(f"| {row['model']} | {row['endpoint']} | 2 x {row['items']:,} | {'on' if row['filters'] else 'off'} | "
              f"{row['requests']:,} | {row['clients']} | {row['p50_ms']} | {row['p90_ms']} | {row['p99_ms']} | "
              f"{row['max_ms']} | {row['requests_per_s']} | {row['refused']} | {row['errors']} |{extra}")  # fmt: skip
    for problem in sorted(set(problems))[:5]:
        print(f"error: {problem}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "in_process_texts_per_s": loop_rate}, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
