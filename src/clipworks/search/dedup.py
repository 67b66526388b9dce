"""Near-duplicates: pairs of stored vectors whose cosine similarity reaches a threshold, found through the index."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .index import SearchIndex

__all__ = ["Pair", "find_duplicates", "write_pairs"]

# float32 rounding can put an exact duplicate a hair under 1.0 (and a pair at the threshold just below it)
_MARGIN = 1e-6


@dataclass(frozen=True)
class Pair:
    """Two keys (in index order: `a` was stored before `b`) and their cosine similarity."""

    a: str
    b: str
    score: float


def find_duplicates(index: SearchIndex, threshold: float = 0.95, *, neighbours: int = 20,
                    batch_size: int = 1024) -> list[Pair]:  # fmt: skip
    """Every pair of stored vectors with similarity >= `threshold`, each pair once, most similar first.

    Each stored vector is a query: exact and IVF indexes answer a range search (all neighbours above the
    threshold, within the index's accuracy); other kinds (HNSW) answer a k-NN search of `neighbours` results,
    widened (doubling k) for every vector whose last result still reaches the threshold, so a vector with
    more near-duplicates than `neighbours` still lists them all (within the index's recall).

    Raises:
        ValueError: a threshold outside [-1, 1] or neighbours < 1.
    """
    if not -1.0 <= threshold <= 1.0 or neighbours < 1:
        raise ValueError(f"threshold={threshold}, neighbours={neighbours}: expected a cosine similarity in [-1, 1] "
                         "and neighbours >= 1")  # fmt: skip
    vectors, n = index.vectors(), len(index)
    best: dict[tuple[int, int], float] = {}
    ranged = index.manifest["kind"] in ("flat", "ivf", "ivfpq")
    for start in range(0, n, batch_size):
        q = np.ascontiguousarray(vectors[start : start + batch_size], dtype=np.float32)
        for i, (rows, scores) in enumerate(_neighbours(index, q, threshold, neighbours, ranged)):
            for j, s in zip(rows, scores):
                a, b = start + i, int(j)
                if a != b and j >= 0 and s >= threshold - _MARGIN:
                    pair = (min(a, b), max(a, b))
                    best[pair] = max(best.get(pair, -2.0), float(s))
    pairs = [Pair(index.keys[a], index.keys[b], min(s, 1.0)) for (a, b), s in best.items()]
    return sorted(pairs, key=lambda p: (-p.score, p.a, p.b))


def _neighbours(index: SearchIndex, q: np.ndarray, threshold: float, k: int, ranged: bool):
    if ranged:
        lims, scores, rows = index.faiss_index.range_search(q, threshold - _MARGIN)
        return [(rows[lims[i] : lims[i + 1]], scores[lims[i] : lims[i + 1]]) for i in range(len(q))]
    n, k = len(index), min(k + 1, len(index))
    scores, rows = index.faiss_index.search(q, k)
    found = list(zip(rows, scores))
    while k < n:  # a full result list whose last hit is still a duplicate may have cut some off: ask for more
        full = [i for i, (r, s) in enumerate(found) if r[-1] >= 0 and s[-1] >= threshold - _MARGIN]
        if not full:
            break
        k = min(2 * k, n)
        scores, rows = index.faiss_index.search(np.ascontiguousarray(q[full]), k)
        for t, i in enumerate(full):
            found[i] = (rows[t], scores[t])
    return found


def write_pairs(pairs: list[Pair], path: str | os.PathLike) -> Path:
    """Write pairs as CSV (columns a, b, score) to `path`, replacing it atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "score"])
        writer.writerows([p.a, p.b, f"{p.score:.6f}"] for p in pairs)
    os.replace(tmp, path)
    return path
