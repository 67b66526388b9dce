"""A saved FAISS index over an embeddings directory: build, load with checksum and model checks, search by key.

An index directory holds `index.faiss`, `vectors.npy` (the unit-norm vectors, memory-mapped on load),
`records.parquet` (key, path, caption, member per row) and `manifest.json`: model, dim, count, kind, metric "ip",
search parameters, the measured recall@10 against exact search, the image roots and the sha256 of each
file, sealed by a sha256 of its own content (`store.seal_manifest`). Search answers with the stored keys, never
bare row positions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ann
from .store import (MANIFEST_VERSION, RECORD_FIELDS, check_manifest_seal, normalize_rows, read_embeddings,
                    replace_directory, seal_manifest, sha256_file, write_json)  # fmt: skip

__all__ = ["INDEX_FORMAT", "Hit", "IndexLoadError", "SearchIndex", "build_index", "load_index"]

INDEX_FORMAT = "clipworks-index"
FILES = ("index.faiss", "vectors.npy", "records.parquet")
SMALL_BATCH = 16  # fewer queries than this are searched on one thread


class IndexLoadError(ValueError):
    """An index directory that is missing files, corrupt (checksum mismatch) or built for another model."""


@dataclass(frozen=True)
class Hit:
    """One search result: the stored key, its cosine similarity to the query, and its metadata."""

    key: str
    score: float
    path: str | None = None
    caption: str | None = None
    member: str | None = None  # the image inside the tar `path` (WebDataset collections)


class SearchIndex:
    """A loaded index: `search` maps query vectors to `Hit`s; `record` and `vector` look keys up.

    Attributes:
        manifest: the manifest dict (model, dim, count, kind, metric, checksums, recall_at_10, roots, ...).
        dim: vector dimension.
        model: the model identity the vectors were made with.
        faiss_index: the underlying faiss index (row i is `keys[i]`).
        keys: the stored keys in row order.
    """

    def __init__(self, manifest: dict, faiss_index, vectors: np.ndarray, columns: dict[str, list]):
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.model = str(manifest["model"])
        self.faiss_index = faiss_index
        self.keys: list[str] = columns["key"]
        self._paths: list[str | None] = columns["path"]
        self._captions: list[str | None] = columns["caption"]
        self._members: list[str | None] = columns.get("member") or [None] * len(self.keys)  # older indexes: none
        self._vectors = vectors
        self._rows = {k: i for i, k in enumerate(self.keys)}
        ann.set_search_param(faiss_index, manifest["kind"], manifest.get("search_param"))

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        m = self.manifest
        return f"SearchIndex({m['kind']}, {len(self)} x {self.dim}, model={self.model!r}, recall@10={m['recall_at_10']})"

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The `k` most similar stored vectors for each query, best first.

        Args:
            queries: (Q, D) or (D,) float features; they are normalised here.
            k: results per query (fewer when the index holds fewer vectors).

        Raises:
            ValueError: a query of the wrong dimension, non-finite values, or k < 1.
        """
        q = np.asarray(queries, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries of shape {np.shape(queries)}: expected (Q, {self.dim}) for this index")
        if not np.isfinite(q).all():
            raise ValueError("queries hold NaN or infinite values")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k={k!r}: expected a positive integer")
        if len(self) == 0 or len(q) == 0:
            return [[] for _ in q]
        scores, rows = self._faiss_search(np.ascontiguousarray(normalize_rows(q)), min(int(k), len(self)))
        return [[self._hit(int(r), float(s)) for s, r in zip(srow, rrow) if r >= 0] for srow, rrow in zip(scores, rows)]

    def _faiss_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        rerank = self.manifest.get("params", {}).get("rerank", 0)
        if len(q) >= SMALL_BATCH:
            return ann.search(self.faiss_index, q, k, self._vectors, rerank)
        # A few queries cannot keep several OpenMP threads busy: the idle ones spin and slow the search down
        # (3x for one query at 100k vectors on 2 cores). The setting applies to the calling thread only.
        faiss = ann.import_faiss()
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return ann.search(self.faiss_index, q, k, self._vectors, rerank)
        finally:
            faiss.omp_set_num_threads(before)

    def _hit(self, row: int, score: float) -> Hit:
        return Hit(self.keys[row], score, self._paths[row], self._captions[row], self._members[row])

    def row(self, key: str) -> int:
        """The row of `key`; KeyError if absent."""
        try:
            return self._rows[key]
        except KeyError:
            raise KeyError(f"no key {key!r} in the index") from None

    def record(self, key: str) -> dict:
        """The stored metadata of `key`: {"key", "path", "caption", "member"}; KeyError if absent."""
        i = self.row(key)
        return {"key": key, "path": self._paths[i], "caption": self._captions[i], "member": self._members[i]}

    def vector(self, key: str) -> np.ndarray:
        """The stored unit-norm vector of `key` as float32 (D,); KeyError if absent."""
        return np.array(self._vectors[self.row(key)], dtype=np.float32)

    def vectors(self) -> np.ndarray:
        """All stored vectors (N, D) in row order, memory-mapped (not copied)."""
        return self._vectors


def build_index(
    embeddings_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    kind: str = "auto",
    memory_budget_mb: float | None = None,
    recall_target: float = 0.95,
    recall_queries: int = ann.RECALL_QUERIES,
) -> SearchIndex:
    """Build an index over an embeddings directory and write it to `out` atomically.

    The kind is chosen (or checked) for the memory budget (see `ann.plan_index`). An approximate index is
    built without a random sample of up to `recall_queries` vectors (at most a tenth), tuned to the smallest
    search setting whose recall@10 against exact search, with those vectors as queries, reaches
    `recall_target`, and then given the held-out vectors too. The measured recall is stored in the
    manifest as "recall_at_10" (1.0 for exact search), with the number of queries as "recall_queries".

    Every embeddings shard is checked against the sha256 its manifest records (and the manifest against its
    seal) before anything goes into the index.

    Raises:
        ValueError: an unreadable, corrupt (a checksum mismatch, naming the file) or empty embeddings directory,
            duplicate keys, a bad kind, a budget no index fits, or a recall target outside (0, 1].
    """
    if not 0 < recall_target <= 1:
        raise ValueError(f"recall target {recall_target}: expected a number in (0, 1]")
    vectors, records, emb_manifest = read_embeddings(embeddings_dir)
    if len(records) == 0:
        raise ValueError(f"{embeddings_dir}: holds no embeddings; nothing to index")
    seen: set[str] = set()
    dup = next((r["key"] for r in records if r["key"] in seen or seen.add(r["key"])), None)
    if dup is not None:
        raise ValueError(f"{embeddings_dir}: duplicate keys (e.g. {dup!r}); every key must name one vector")
    plan = ann.plan_index(*vectors.shape, kind=kind, memory_budget_mb=memory_budget_mb)
    start = time.perf_counter()
    order, held = ann.holdout_order(len(records), recall_queries) if plan.kind != "flat" else (None, 0)
    if order is not None:  # rows are stored in this order; search answers with keys, so it does not show
        vectors, records = vectors[order], [records[i] for i in order]
    vectors = np.ascontiguousarray(normalize_rows(vectors))
    base = vectors[: len(records) - held]
    index = ann.build_faiss(plan, base)
    param, recall = ann.tune(index, plan, base, vectors[len(base) :], recall_target)
    if held:
        index.add(vectors[len(base) :])
    manifest = {
        "format": INDEX_FORMAT, "version": MANIFEST_VERSION, "model": emb_manifest["model"],
        "modality": emb_manifest["modality"], "dim": int(vectors.shape[1]), "count": len(records), "kind": plan.kind,
        "metric": "ip", "params": plan.params,
        "search_param_name": ann.search_param_name(plan.kind), "search_param": param,
        "recall_at_10": round(float(recall), 4), "recall_target": recall_target, "recall_queries": held,
        "estimated_bytes": plan.bytes, "build_seconds": round(time.perf_counter() - start, 2),
        "roots": emb_manifest.get("roots", []), "embeddings": str(Path(embeddings_dir).resolve()),
    }  # fmt: skip
    with replace_directory(out, (INDEX_FORMAT,)) as tmp:
        _write_files(tmp, index, vectors, records, emb_manifest.get("dtype", "float16"))
        manifest["checksums"] = {name: sha256_file(tmp / name) for name in FILES}
        manifest["index_bytes"] = (tmp / "index.faiss").stat().st_size
        write_json(tmp / "manifest.json", seal_manifest(manifest))  # over every field, so last
    return load_index(out, verify=False)


def _write_files(tmp: Path, index, vectors: np.ndarray, records: list[dict], dtype: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    faiss = ann.import_faiss()
    faiss.write_index(index, str(tmp / "index.faiss"))
    np.save(tmp / "vectors.npy", vectors.astype(np.dtype(dtype)))
    cols = {f: pa.array([r.get(f) for r in records], type=pa.string()) for f in RECORD_FIELDS}
    pq.write_table(pa.table(cols), tmp / "records.parquet")


def _read_manifest(path: Path) -> dict:
    file = path / "manifest.json"
    if not path.is_dir():
        raise IndexLoadError(f"{path}: no index directory there (build one with `clipworks index`)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise IndexLoadError(f"{path}: not an index directory: no manifest.json") from e
    except (OSError, ValueError) as e:
        raise IndexLoadError(f"{file}: unreadable manifest ({type(e).__name__}: {e})") from e
    required = ("model", "dim", "count", "kind", "checksums")
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT or any(k not in manifest for k in required):
        raise IndexLoadError(f"{file}: not a clipworks index manifest (needs format {INDEX_FORMAT!r} and {required})")
    return manifest


def _verify_files(path: Path, manifest: dict) -> None:
    for name in FILES:
        file = path / name
        if not file.is_file():
            raise IndexLoadError(f"{path}: index file {name} is missing; rebuild the index")
        expected = manifest["checksums"].get(name)
        actual = sha256_file(file)
        if expected != actual:
            raise IndexLoadError(f"{file}: checksum mismatch (sha256 {actual[:12]}..., manifest says "
                                 f"{str(expected)[:12]}...): the file is corrupt or was changed; rebuild the index")  # fmt: skip


def load_index(path: str | os.PathLike, *, model: str | None = None, verify: bool = True) -> SearchIndex:
    """Load an index directory, checking the manifest against its seal and every file's sha256 (unless
    `verify=False`), and the model.

    An index built before manifests were sealed loads with a warning (its files are still checked): refusing
    it would break every index built before, and rebuilding one adds the seal.

    Args:
        path: the index directory written by `build_index`.
        model: the identity of the model that will make the queries (see `store.model_id`); None skips the check.
        verify: check the checksums (reads every byte once); False also accepts a hand-edited manifest.

    Raises:
        IndexLoadError: missing or corrupt files (the manifest included), an unreadable manifest, or a different
            model.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if verify:  # first: a corrupt "model" field is reported as corruption, not as another model
        check_manifest_seal(manifest, path / "manifest.json", error=IndexLoadError,
                            remedy="rebuild the index (or load it with verify=False, `serve --no-verify`, to "
                                   "accept an edited manifest)",
                            unsealed="its fields (model, roots, recall) are not verified; rebuild the index with "
                                     "`clipworks index` to add the check")  # fmt: skip
    if model is not None and model != manifest["model"]:
        raise IndexLoadError(f"{path}: the index was built with model {manifest['model']!r}, not {model!r}; "
                             "serve it with the same --model (and --pretrained) it was embedded with")  # fmt: skip
    if verify:
        _verify_files(path, manifest)
    try:
        import pyarrow.parquet as pq

        faiss = ann.import_faiss()
        index = faiss.read_index(str(path / "index.faiss"))
        vectors = np.load(path / "vectors.npy", mmap_mode="r", allow_pickle=False)
        columns = pq.read_table(path / "records.parquet").to_pydict()
    except (OSError, ValueError, RuntimeError) as e:  # faiss raises RuntimeError on bad files
        raise IndexLoadError(f"{path}: unreadable index files ({type(e).__name__}: {e})") from e
    n, d = int(manifest["count"]), int(manifest["dim"])
    sizes = {"index.faiss": (index.ntotal, index.d), "vectors.npy": vectors.shape, "records": (len(columns.get("key", [])), d)}
    bad = {name: tuple(s) for name, s in sizes.items() if tuple(s) != (n, d)}
    if bad or any(f not in columns for f in ("key", "path", "caption")):
        raise IndexLoadError(f"{path}: files disagree with the manifest ({n} x {d}): {bad or 'records lack columns'}")
    return SearchIndex(manifest, index, vectors, columns)
