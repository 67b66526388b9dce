"""FAISS index kinds: choosing one for a memory budget, building it, and tuning it to a recall target.

Vectors are unit-norm, so inner product (METRIC_INNER_PRODUCT) is cosine similarity. Kinds:

- "flat": exact search over all vectors; memory N * D * 4 bytes.
- "ivf": IVF-Flat, vectors in ~sqrt(N) k-means lists, `nprobe` of them scanned per query; about flat's memory.
- "ivfpq": IVF with product-quantised codes (m bytes per vector); the choice under a tight memory budget.
  Its best `rerank` x k candidates (tuned) are re-scored exactly against the stored vectors, which are
  memory-mapped from disk (paged in by the OS, not counted in the budget), so quantisation costs less recall.
- "hnsw": HNSW graph over full vectors (`efSearch` tunes recall); fastest queries, slowest build, most memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
AUTO_FLAT_MAX = 50_000  # up to this many vectors exact search is fast enough (a few ms per query)
HNSW_M = 32
RERANK = 10  # ivfpq: candidates per result re-scored with the exact vectors (tuned at build from _RERANKS)
_RERANKS = (2, 5, 10, 20, 50, 100)
RECALL_K = 10
RECALL_QUERIES = 1000
_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024)
_PQ_M = (64, 32, 16, 8, 4)  # bytes per vector, most accurate first (re-ranking makes up the rest)


def import_faiss():
    """The faiss module, or an ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the vector index needs FAISS: pip install 'clipworks[search]' (faiss-cpu)") from e
    return faiss


@dataclass
class Plan:
    """A chosen index kind with its build parameters and estimated memory."""

    kind: str
    params: dict = field(default_factory=dict)
    bytes: int = 0


def _nlist(n: int) -> int:
    # ~sqrt(N) lists (a power of two), each with >= 39 training points as faiss's k-means asks.
    return max(1, min(2 ** round(math.log2(max(1.0, math.sqrt(n)))), n // 39))


def estimate_bytes(kind: str, n: int, d: int, params: dict) -> int:
    """Approximate resident memory of an index of `n` vectors of dimension `d`."""
    if kind == "flat":
        return n * d * 4
    if kind == "ivf":
        return n * (d * 4 + 8) + params["nlist"] * d * 4
    if kind == "ivfpq":
        return n * (params["m"] + 8) + params["nlist"] * d * 4 + d * 2 ** params["nbits"] * 4
    if kind == "hnsw":
        return int(n * (d * 4 + params["M"] * 2 * 4 * 1.1))
    raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")


def _params(kind: str, n: int, d: int, budget: int | None) -> dict:
    if kind == "ivf":
        return {"nlist": _nlist(n)}
    if kind == "hnsw":
        return {"M": HNSW_M, "efConstruction": 80}
    if kind == "ivfpq":
        nbits = max(1, min(8, int(math.log2(max(2, n // 39)))))
        fitting = [m for m in _PQ_M if d % m == 0 and 4 * m <= d]  # sub-vectors of >= 4 dims
        for m in fitting:
            p = {"nlist": _nlist(n), "m": m, "nbits": nbits, "rerank": RERANK}
            if budget is None or estimate_bytes("ivfpq", n, d, p) <= budget:
                return p
        return {"nlist": _nlist(n), "m": fitting[-1] if fitting else 1, "nbits": nbits, "rerank": RERANK}
    return {}


def plan_index(n: int, d: int, kind: str = "auto", memory_budget_mb: float | None = None) -> Plan:
    """The index kind and parameters for `n` vectors of dimension `d` within `memory_budget_mb`.

    "auto" takes exact search up to `AUTO_FLAT_MAX` vectors, then IVF-Flat, then IVF-PQ when full vectors
    do not fit the budget.

    Raises:
        ValueError: unknown kind, or no index of that kind fits the budget.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    if memory_budget_mb is not None and memory_budget_mb <= 0:
        raise ValueError(f"memory budget {memory_budget_mb} MB: expected a positive number")
    budget = None if memory_budget_mb is None else int(memory_budget_mb * 2**20)
    if kind == "auto":
        candidates = ["flat", "ivf", "ivfpq"] if n <= AUTO_FLAT_MAX else ["ivf", "ivfpq"]
    else:
        candidates = [kind]
    for k in candidates:
        params = _params(k, n, d, budget)
        size = estimate_bytes(k, n, d, params)
        if budget is None or size <= budget:
            return Plan(k, params, size)
    need = min(estimate_bytes(k, n, d, _params(k, n, d, budget)) for k in candidates)
    raise ValueError(f"no {' or '.join(candidates)} index of {n} x {d} vectors fits {memory_budget_mb} MB; the "
                     f"smallest needs about {need / 2**20:.3g} MB: raise --memory-mb")  # fmt: skip


def build_faiss(plan: Plan, vectors: np.ndarray, seed: int = 0):
    """A trained faiss index of `plan`'s kind holding `vectors` (unit-norm float32 rows), in row order."""
    faiss = import_faiss()
    n, d = vectors.shape
    ip = faiss.METRIC_INNER_PRODUCT
    p = plan.params
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, p["M"], ip)
        index.hnsw.efConstruction = p["efConstruction"]
    else:
        quantizer = faiss.IndexFlatIP(d)
        if plan.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, p["nlist"], ip)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, p["nlist"], p["m"], p["nbits"], ip)
        index.cp.seed = seed
        points = max(p["nlist"] * 64, 2 ** p.get("nbits", 0) * 64)
        sample = np.random.default_rng(seed).choice(n, size=min(n, points), replace=False)
        index.train(vectors[np.sort(sample)])
    index.add(vectors)
    return index


def set_search_param(index, kind: str, value: int | None) -> None:
    """Set `nprobe` (IVF kinds) or `efSearch` (HNSW) on a faiss index; flat has none."""
    if value is None or kind == "flat":
        return
    if kind == "hnsw":
        index.hnsw.efSearch = int(value)
    else:
        index.nprobe = int(value)


def search_param_name(kind: str) -> str | None:
    """The name of the kind's recall/speed knob, or None."""
    return {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}.get(kind)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids (Q, k) of the exact top-k inner products of `queries` among `vectors`."""
    faiss = import_faiss()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, k)[1]


def recall_at_k(found: np.ndarray, exact: np.ndarray, self_ids: np.ndarray, k: int) -> float:
    """Mean |found top-k ∩ exact top-k| / k, leaving out each query's own id (queries come from the data)."""
    hits = 0
    for f, e, s in zip(found, exact, self_ids):
        e_top = [i for i in e if i != s and i >= 0][:k]
        f_top = [i for i in f if i != s and i >= 0][:k]
        hits += len(set(e_top) & set(f_top))
    return hits / (k * len(found))


def holdout_order(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """A permutation of `n` rows whose last `h` rows are a random held-out sample of about `queries` (at most a
    tenth of the collection): the index is built on the others, tuned with these as queries, then given them."""
    h = min(queries, n // 10) if n >= 20 else min(1, n - 1)
    held = np.random.default_rng(seed + 1).choice(n, size=h, replace=False) if h > 0 else np.zeros(0, np.int64)
    keep = np.ones(n, bool)
    keep[held] = False
    return np.concatenate([np.flatnonzero(keep), np.sort(held)]), h


def search(index, queries: np.ndarray, k: int, vectors: np.ndarray, rerank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) (Q, k) of `index.search`; with `rerank`, the top `rerank * k` candidates are re-scored
    exactly against `vectors` (the index's rows, e.g. memory-mapped) and the best k kept."""
    if not rerank:
        return index.search(queries, k)
    scores, rows = index.search(queries, min(rerank * k, index.ntotal))
    out_s, out_r = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    for i, (q, cand) in enumerate(zip(queries, rows)):
        cand = np.sort(cand[cand >= 0])  # sorted rows read a memory map front to back
        exact = np.asarray(vectors[cand], dtype=np.float32) @ q  # (C,)
        top = np.argsort(-exact, kind="stable")[:k]
        out_s[i, : len(top)], out_r[i, : len(top)] = exact[top], cand[top]
    return out_s, out_r


def tune(index, plan: Plan, base: np.ndarray, queries: np.ndarray, recall_target: float) -> tuple[int | None, float]:
    """Set the smallest search parameter whose measured recall@10 on `queries` reaches `recall_target`.

    `index` holds `base`, and `queries` are vectors of the collection held out of it, so the measurement
    sees the index as a new query does (a stored vector used as its own query finds its way more easily,
    which flatters graph indexes most). When no setting reaches the target the most accurate one tried
    is kept.

    Returns:
        (the parameter value, or None for flat, and its measured recall@10; 1.0 for flat).
    """
    k = min(RECALL_K, len(base))
    if plan.kind == "flat" or k < 1 or len(queries) == 0:
        return None, 1.0
    exact = exact_neighbours(base, queries, k)
    no_self = np.full(len(queries), -1)
    if plan.kind == "hnsw":
        values = list(_EF_SEARCH)
    else:
        values = [v for v in _NPROBES if v < plan.params["nlist"]] + [plan.params["nlist"]]

    def measure(value: int, rerank: int) -> float:
        set_search_param(index, plan.kind, value)
        return recall_at_k(search(index, queries, k, base, rerank)[1], exact, no_self, k)

    rerank = _RERANKS[-1] if "rerank" in plan.params else 0
    best = _smallest(values, lambda v: measure(v, rerank), recall_target)
    if rerank:  # then the fewest candidates that keep the recall at that nprobe
        reranks = [r for r in _RERANKS if r < rerank] + [rerank]
        fewest = _smallest(reranks, lambda r: measure(best[0], r), min(recall_target, best[1]))
        plan.params["rerank"] = fewest[0]
        best = (best[0], fewest[1])
    set_search_param(index, plan.kind, best[0])
    return best


def _smallest(values: list[int], recall_of, target: float) -> tuple[int, float]:
    """The first of `values` (ascending cost) whose recall reaches `target`, else the most accurate one."""
    best = (values[0], -1.0)
    for value in values:
        recall = recall_of(value)
        if recall > best[1] + 1e-9:
            best = (value, recall)
        if recall >= target - 1e-9:
            break
    return best
