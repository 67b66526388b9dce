"""Load test of `clipworks serve` on loopback: searches, a fixed number at a fixed concurrency.

Builds a random index in a temporary folder, starts `clipworks serve` on it in a subprocess (random weights,
no download), sends `--requests` searches (text queries, or with `--endpoint image` uploaded 256x256 PNGs)
from `--clients` threads (each with its own keep-alive connection), and prints p50/p90/p99 latency,
requests/s and the error count (any non-200 answer or failed request). The server's concurrency limit is
set to the number of clients, so no request should see a 503.

Usage: python benchmarks/bench_serve.py [--model ViT-B-32|tiny] [--endpoint text|image] [--requests 2000]
                                        [--clients 16] [--items 10000] [--k 10] [--json OUT]
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


def build_random_index(work: Path, model: str, dim: int, items: int) -> Path:
    """An exact index over `items` random unit vectors, recorded as made by `model`."""
    from clipworks.search.index import build_index
    from clipworks.search.store import write_embeddings

    vectors = np.random.default_rng(0).standard_normal((items, dim)).astype(np.float32)
    records = [{"key": f"item-{i:07d}", "caption": f"item {i}"} for i in range(items)]
    write_embeddings(work / "emb", vectors, records, model=model)
    build_index(work / "emb", work / "index", kind="flat")
    return work / "index"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, model: str, port: int, concurrency: int) -> subprocess.Popen:
    """`clipworks serve` in a subprocess, returned once /api/health answers."""
    import httpx

    cmd = [sys.executable, "-m", "clipworks.cli", "serve", "--index", str(index), "--model", model,
           "--port", str(port), "--concurrency", str(concurrency), "--max-k", "100", "--random-init"]  # fmt: skip
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


def _post(client, query: str | bytes, k: int):
    if isinstance(query, bytes):
        return client.post("/api/search/image", files={"file": ("q.png", query, "image/png")}, data={"k": str(k)})
    return client.post("/api/search/text", json={"query": query, "k": k})


def load(url: str, texts: list, clients: int, k: int) -> tuple[list[float], list[str], float]:
    """Send one search per text (or image bytes) from `clients` threads; (latencies in s of successes, errors,
    wall seconds)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_item = iter(range(len(texts)))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                with lock:
                    i = next(next_item, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    r = _post(client, texts[i], k)
                    ok = r.status_code == 200 and len(r.json()["results"]) == k
                    problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    problem = f"{type(e).__name__}: {e}"
                elapsed = time.perf_counter() - start
                with lock:
                    (errors.append(problem) if problem else latencies.append(elapsed))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def summarize(latencies: list[float], errors: list[str], wall: float, args: argparse.Namespace) -> dict:
    """The figures of one run."""
    ms = np.array(latencies) * 1000
    pct = (lambda q: round(float(np.percentile(ms, q)), 2)) if len(ms) else (lambda q: None)
    return {"model": args.model, "endpoint": args.endpoint, "items": args.items, "requests": args.requests, "clients": args.clients,
            "k": args.k, "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": round(float(ms.max()), 2) if len(ms) else None,
            "mean_ms": round(statistics.fmean(ms), 2) if len(ms) else None,
            "requests_per_s": round(len(latencies) / wall, 1), "errors": len(errors), "wall_s": round(wall, 2)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help='a preset (random weights) or "tiny" (default ViT-B-32)')
    parser.add_argument("--endpoint", choices=("text", "image"), default="text", help="what to search with")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16, help="concurrent requests (default 16)")
    parser.add_argument("--items", type=int, default=10_000, help="vectors in the index (default 10000)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=32, help="untimed requests first (default 32)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    import torch

    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        model, dim = model_args(args.model, work)
        index = build_random_index(work, model, dim, args.items)
        port = free_port()
        server = start_server(index, model, port, concurrency=args.clients)
        try:
            url = f"http://127.0.0.1:{port}"
            make = queries if args.endpoint == "text" else images
            load(url, make(args.warmup), args.clients, args.k)
            latencies, errors, wall = load(url, make(args.requests), args.clients, args.k)
        finally:
            server.terminate()
            server.wait(timeout=30)
    row = summarize(latencies, errors, wall, args)
    print("| model | search | index | requests | clients | p50 ms | p90 ms | p99 ms | max ms | requests/s | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['model']} | {row['endpoint']} | {row['items']:,} | {row['requests']:,} | {row['clients']} | {row['p50_ms']} | "
          f"{row['p90_ms']} | {row['p99_ms']} | {row['max_ms']} | {row['requests_per_s']} | {row['errors']} |")  # fmt: skip
    for problem in sorted(set(errors))[:5]:
        print(f"error: {problem}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
