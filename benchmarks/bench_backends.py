"""Collection backends compared: FAISS flat and HNSW, Milvus (Milvus Lite's server) and LanceDB, on N clustered
unit vectors with two metadata columns.

For each backend: build time; memory (the peak RSS of the building process above its RSS with the libraries
imported, and the RSS an open store adds once it has answered the queries, measured in a fresh process; for
Milvus, the server process's RSS growth, the client's added); single-query latency p50/p99 at k=10 unfiltered,
with a filter keeping 10% of the rows (a string equality) and 1% (an integer equality); recall@10 against exact
search over the matching rows. Also milvus-hnsw and lancedb-ivfpq with --backends.

Usage:
    python benchmarks/bench_backends.py [--n 100000] [--dim 512] [--queries 200] [--backends faiss-flat,...]
                                        [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKENDS = ("faiss-flat", "faiss-hnsw", "milvus", "lancedb")  # the default run; also milvus-hnsw, lancedb-ivfpq
FILTERS = {"none": {}, "10%": {"source": "s3"}, "1%": {"bucket": 7}}
K = 10


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process, MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_data(n: int, dim: int, queries: int, seed: int = 0):
    """Clustered unit vectors (CLIP embeddings cluster; uniform random ones are a needlessly hard case for graph
    and cluster indexes), their records with `bucket` (int 0..99) and `source` ("s0".."s9"), and queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 100, 10), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    q = centres[rng.integers(0, len(centres), queries)] + 0.7 * rng.standard_normal((queries, dim)).astype(np.float32)
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    records = [{"key": f"k{i}", "bucket": int(b), "source": f"s{i % 10}"}
               for i, b in enumerate(rng.integers(0, 100, n))]  # fmt: skip
    return norm(x), records, norm(q).astype(np.float32)


def exact_truth(x, records, q) -> dict[str, list[list[str]]]:
    """Top-10 keys per query, for each filter, by brute force over the matching rows."""
    truth = {}
    for name, spec in FILTERS.items():
        rows = np.array([all(r[c] == v for c, v in spec.items()) for r in records])
        idx = np.flatnonzero(rows)
        scores = q @ x[idx].T
        top = idx[np.argsort(-scores, axis=1)[:, :K]]
        truth[name] = [[records[i]["key"] for i in row] for row in top]
    return truth


def target(backend: str, tmp: Path, uri: str | None) -> str:
    name = backend.replace("-", "_")
    if backend.startswith("faiss"):
        return str(tmp / name)
    if backend.startswith("milvus"):
        return f"milvus:{uri}?collection={name}"
    return f"lancedb:{tmp / 'lance'}?table={name}"


def preload(backend: str) -> float:
    """Import what `backend` uses, so that the memory measured after is the data's, not the libraries'; the RSS
    then."""
    import pyarrow.parquet  # noqa: F401

    import clipworks.checkpoints.io  # noqa: F401  (torch: FAISS index directories are written through it)
    import clipworks.search.backends  # noqa: F401
    from clipworks.search import ann, index  # noqa: F401

    ann.import_faiss()
    if not backend.startswith("faiss"):
        __import__("pymilvus" if backend.startswith("milvus") else "lancedb")
    return rss_mb()


def child_build(backend: str, tmp: Path, uri: str | None) -> dict:
    from clipworks.search.backends import write_collection
    from clipworks.search.index import build_index

    base = preload(backend)
    start = time.perf_counter()
    if backend.startswith("faiss"):
        build_index(tmp / "emb", target(backend, tmp, uri), kind=backend.split("-")[1])
    else:
        index = backend.split("-")[1] if "-" in backend else "flat"
        write_collection(target(backend, tmp, uri), tmp / "emb", overwrite=True, index=index)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"build_s": time.perf_counter() - start, "build_peak_rss_mb": peak - base}


def child_query(backend: str, tmp: Path, uri: str | None) -> dict:
    from clipworks.search.backends import open_store
    from clipworks.search.filters import parse_filters

    q = np.load(tmp / "queries.npy")
    truth = json.loads((tmp / "truth.json").read_text())
    before = preload(backend)
    store = open_store(target(backend, tmp, uri), verify=False)
    out = {}
    for name, spec in FILTERS.items():
        where = parse_filters(spec)
        store.search(q[:3], K, where=where)  # warm-up
        times, hits = [], []
        for v in q:
            t = time.perf_counter()
            hits.append([h.key for h in store.search(v, K, where=where)[0]])
            times.append(time.perf_counter() - t)
        recall = np.mean([len(set(h) & set(t)) / K for h, t in zip(hits, truth[name])])
        out[name] = {"p50_ms": 1e3 * np.percentile(times, 50), "p99_ms": 1e3 * np.percentile(times, 99),
                     "recall_at_10": float(recall)}  # fmt: skip
    out["open_rss_mb"] = rss_mb() - before
    return out


def start_milvus(data: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL)  # fmt: skip
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("milvus-lite server did not start")


def run_child(mode: str, backend: str, tmp: Path, uri: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--backends", backend, "--dir", str(tmp), "--uri", uri or ""]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{backend} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=("build", "query"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = child_build if args.child == "build" else child_query
        print(json.dumps(fn(args.backends, Path(args.dir), args.uri or None)))
        return

    from clipworks.search.store import write_embeddings

    backends = args.backends.split(",")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as d:
        tmp = Path(d)
        x, records, q = make_data(args.n, args.dim, args.queries)
        write_embeddings(tmp / "emb", x, records, model="bench", dtype="float32")
        np.save(tmp / "queries.npy", q)
        (tmp / "truth.json").write_text(json.dumps(exact_truth(x, records, q)))
        del x, records
        server = uri = None
        try:
            for backend in backends:
                if backend.startswith("milvus") and server is None:
                    server, uri = start_milvus(tmp / "milvus")
                    server_before = rss_mb(server.pid)
                results[backend] = run_child("build", backend, tmp, uri)
                results[backend].update(run_child("query", backend, tmp, uri))
                if backend.startswith("milvus"):
                    results[backend]["server_rss_mb"] = rss_mb(server.pid) - server_before
                    server_before = rss_mb(server.pid)
                print(backend, json.dumps(results[backend]), file=sys.stderr)
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    print(f"\nN={args.n} x {args.dim}, {args.queries} single queries, k={K}; {os.cpu_count()} CPUs\n")
    print("| backend | build s | build peak RSS MiB | serving RSS MiB | filter | p50 ms | p99 ms | recall@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, r in results.items():
        serving = r["open_rss_mb"] + r.get("server_rss_mb", 0)
        for i, name in enumerate(FILTERS):
            head = (f"| {backend} | {r['build_s']:.1f} | {r['build_peak_rss_mb']:.0f} | {serving:.0f} |" if i == 0
                    else "| | | | |")  # fmt: skip
            f = r[name]
            print(f"{head} {name} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {f['recall_at_10']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "dim": args.dim, "results": results}, indent=2))


if __name__ == "__main__":
    main()
