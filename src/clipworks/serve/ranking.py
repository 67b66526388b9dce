"""One search of a collection as the API asks for it: metadata filters, the safety filter, de-duplication,
aesthetic weighting and paging ("load more").

Metadata filters run inside the store's search (k results come back when k rows match). The safety filter,
de-duplication and aesthetic weighting judge the hits themselves, so the search fetches more than it shows and
fetches again, four times deeper each time, until the page is full, the collection has no more matching rows or
`max_fetch` hits were judged (a page cut short there says `more: false`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..search.filters import Condition

__all__ = ["DEFAULT_DEDUP", "SearchOptions", "Page", "ranked", "dedup_hits", "AESTHETIC_SCALE", "AESTHETIC_POOL"]

DEFAULT_DEDUP = 0.95
"""The cosine similarity at or above which `dedup: true` counts two results as the same image."""
AESTHETIC_SCALE = 10.0
"""LAION's aesthetic scores run from 1 to 10: the ranking adds `aesthetic_weight * aesthetic / 10` to the cosine."""
_FIRST_FETCH = 64  # hits judged at once when the page needs judging (safety, dedup)
AESTHETIC_POOL = 1000
"""Aesthetic weighting reorders the best 1,000 hits by cosine (or more when filters drop some): a fixed pool, so
that the pages of one query never show a hit twice."""


@dataclass(frozen=True)
class SearchOptions:
    """What a search request asks beyond its query.

    Attributes:
        k: results on the page; `offset` how many of the ranking come before it.
        where: metadata conditions (`search.filters`), applied inside the store's search.
        dedup: drop a hit whose cosine to a better hit kept is at least this (None: keep all).
        safe: drop hits the safety filter flags (when the server has one).
        aesthetic_weight: rank by `cosine + aesthetic_weight * aesthetic / 10` (0: by cosine alone).
    """

    k: int
    offset: int = 0
    where: tuple[Condition, ...] = ()
    dedup: float | None = None
    safe: bool = True
    aesthetic_weight: float = 0.0


@dataclass(frozen=True)
class Page:
    """The hits of one page, best first, and whether the ranking goes on past it."""

    hits: list
    more: bool


def dedup_hits(hits: list, threshold: float, vectors: np.ndarray | None = None) -> list:
    """The hits (with vectors, best first) without any whose cosine to an earlier hit kept reaches `threshold`;
    `vectors`: the hits' vectors stacked (N, D), when the caller has them already."""
    if not hits:
        return []
    if vectors is None:
        vectors = _stacked(hits)
    kept = np.empty_like(vectors)  # the kept hits' vectors, in order: each hit is compared with a view of them
    kept_rows: list[int] = []
    for i, v in enumerate(vectors):
        if kept_rows and float(np.max(kept[: len(kept_rows)] @ v)) >= threshold - 1e-6:
            continue
        kept[len(kept_rows)] = v
        kept_rows.append(i)
    return [hits[i] for i in kept_rows]


def _stacked(hits: list) -> np.ndarray:
    return np.stack([np.asarray(h.vector, dtype=np.float32) for h in hits])  # (N, D)


def _aesthetic(hit) -> float:
    value = (hit.metadata or {}).get("aesthetic")
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else 0.0


def ranked(store, query: np.ndarray, options: SearchOptions, unsafe: Callable[[np.ndarray], np.ndarray] | None,
           max_fetch: int = 10_000) -> Page:  # fmt: skip
    """The page of `store`'s ranking for a (1, D) query that `options` ask for.

    Args:
        unsafe: maps (N, D) vectors to a boolean array, True for the ones to hide (the safety filter); None or
            `options.safe=False`: nothing is hidden.
        max_fetch: the most hits judged for one page (safety, dedup and weighting need the hits themselves).
    """
    want = options.offset + options.k + 1  # one past the page: is there more?
    unsafe = unsafe if options.safe else None
    judged = unsafe is not None or options.dedup is not None or options.aesthetic_weight != 0
    size = len(store)
    if not judged:
        hits = store.search(query, min(want, max(size, 1)), where=options.where)[0]
        return Page(hits[options.offset : options.offset + options.k], len(hits) == want)
    first = max(want * 2, AESTHETIC_POOL if options.aesthetic_weight else _FIRST_FETCH)
    fetch = min(first, max_fetch, max(size, 1))
    while True:
        hits = store.search(query, fetch, where=options.where, with_vectors=True)[0]
        kept = hits
        vectors = _stacked(kept) if kept and (unsafe is not None or options.dedup is not None) else None
        if unsafe is not None and kept:
            shown = ~np.asarray(unsafe(vectors), dtype=bool)
            kept, vectors = [h for h, keep in zip(kept, shown) if keep], vectors[shown]
        if options.dedup is not None:
            kept = dedup_hits(kept, options.dedup, vectors)
        exhausted = len(hits) < fetch  # every matching row was judged
        if len(kept) >= want or exhausted or fetch >= min(max_fetch, size):
            break
        fetch = min(fetch * 4, max_fetch, size)
    if options.aesthetic_weight:
        w = options.aesthetic_weight / AESTHETIC_SCALE
        kept = sorted(kept, key=lambda h: -(h.score + w * _aesthetic(h)))  # stable: ties keep the cosine order
    return Page(kept[options.offset : options.offset + options.k], len(kept) > options.offset + options.k)
