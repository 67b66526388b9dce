"""A saved FAISS index over an embeddings directory: build, load with checksum and model checks, search by key.

An index directory holds `index.faiss`, `vectors.npy` (the unit-norm vectors, memory-mapped on load),
`records.parquet` (key, path, caption, member per row, and the collection's metadata columns) and
`manifest.json`: model, dim, count, kind, metric "ip", search parameters, the measured recall@10 against exact
search, the image roots and the sha256 of each file, sealed by a sha256 of its own content
(`store.seal_manifest`). Search answers with the stored keys, never
bare row positions.

A search may be filtered on the metadata columns (`filters.Condition`s): the conditions become a row mask, built
with numpy over columns held as arrays (text columns dictionary-encoded, so equality is a vector compare) and
kept for the next query with the same conditions. A flat index, and any filter matching at most `EXACT_ROWS`
rows, is searched exactly over the matching rows; an approximate index with a broader filter searches with a
FAISS ID selector, its nprobe/efSearch widened by the inverse of the matching fraction, and falls back to exact
search for a query that got fewer than k hits, so k hits come back whenever k rows match.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import ann, filters
from .store import (MANIFEST_VERSION, RECORD_FIELDS, check_manifest_seal, normalize_rows, read_embeddings,
                    records_table, replace_directory, seal_manifest, sha256_file, write_json)  # fmt: skip

__all__ = ["INDEX_FORMAT", "Hit", "IndexLoadError", "SearchIndex", "build_index", "load_index"]

INDEX_FORMAT = "clipworks-index"
FILES = ("index.faiss", "vectors.npy", "records.parquet")
SMALL_BATCH = 16  # fewer queries than this are searched on one thread
EXACT_ROWS = 20_000  # a filter matching at most this many rows is searched exactly (a few ms at D = 768)
EXACT_BLOCK = 65_536  # rows gathered at a time by exact search over matching rows
MAX_EF = 4096  # the widest HNSW search of a filtered query (then exact search takes over if it comes back short)
MASKS_KEPT = 16  # row masks of the latest distinct filters, kept for the next query with the same ones


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
    metadata: dict = field(default_factory=dict, compare=False)  # the row's metadata columns (None where missing)
    vector: np.ndarray | None = field(default=None, compare=False)  # (D,) float32, with `with_vectors=True`


@dataclass(frozen=True)
class _Match:
    """The rows a filter keeps: how many, their positions when few (`EXACT_ROWS`), and a bitmap of them (bit i
    of byte i // 8, least significant first: what `faiss.IDSelectorBitmap` reads)."""

    count: int
    rows: np.ndarray | None
    bitmap: np.ndarray

    def mask(self, n: int) -> np.ndarray:
        return np.unpackbits(self.bitmap, count=n, bitorder="little").view(bool)


@contextmanager
def _threads_for(queries: int):
    """One faiss (OpenMP) thread for fewer than `SMALL_BATCH` queries, in the calling thread only.

    A few queries cannot keep several OpenMP threads busy: the idle ones spin and slow the search down (3x for
    one query at 100k vectors on 2 cores)."""
    if queries >= SMALL_BATCH:
        yield
        return
    faiss = ann.import_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class _WithParams:
    """A faiss index whose searches pass `params` (an ID selector), for `ann.search`."""

    def __init__(self, index, params):
        self.index, self.params, self.ntotal = index, params, index.ntotal

    def search(self, q: np.ndarray, k: int):
        return self.index.search(q, k, params=self.params)


class SearchIndex:
    """A loaded index: `search` maps query vectors to `Hit`s (filtered on metadata with `where`); `record` and
    `vector` look keys up.

    Attributes:
        manifest: the manifest dict (model, dim, count, kind, metric, checksums, recall_at_10, roots, ...).
        dim: vector dimension.
        model: the model identity the vectors were made with.
        faiss_index: the underlying faiss index (row i is `keys[i]`).
        keys: the stored keys in row order.
        column_kinds: the metadata columns a search may filter on -> "number", "bool" or "string".
    """

    def __init__(self, manifest: dict, faiss_index, vectors: np.ndarray, columns: dict[str, list],
                 metadata: dict | None = None):  # fmt: skip
        """`columns`: the fixed record fields (lists in row order); `metadata`: column name -> pyarrow array."""
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
        self.column_kinds: dict[str, str] = {}
        self._values: dict[str, list] = {}  # column -> its values in row order (None where missing)
        self._arrays: dict[str, np.ndarray] = {}  # column -> what `filters.row_mask` compares
        self._codes: dict[str, dict[str, float]] = {}  # text column -> {value: its code in `_arrays`}
        for name, array in (metadata or {}).items():
            self._add_column(name, array)
        self._masks: OrderedDict[tuple, _Match] = OrderedDict()
        self._masks_lock = threading.Lock()  # a server searches from several threads

    def _add_column(self, name: str, array) -> None:
        """Hold a metadata column: its values, and an array to filter on: numbers as float64 with NaN where
        missing (int64 when none is), booleans as bool (0/1/NaN floats when some are missing), text as float32
        codes into its dictionary of distinct values (NaN where missing), so that equality is a vector compare."""
        import pyarrow as pa
        import pyarrow.compute as pc

        array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
        kind = "bool" if pa.types.is_boolean(array.type) else "number" if (
            pa.types.is_integer(array.type) or pa.types.is_floating(array.type)) else "string"  # fmt: skip
        self.column_kinds[name] = kind
        self._values[name] = array.to_pylist()
        if kind == "string":
            encoded = pc.dictionary_encode(array.cast(pa.string()))
            codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.float64)  # NaN where missing
            dtype = np.float32 if len(encoded.dictionary) < 2**24 else np.float64  # codes exact in float32
            self._arrays[name] = codes.astype(dtype)
            self._codes[name] = {v: float(i) for i, v in enumerate(encoded.dictionary.to_pylist())}
        elif kind == "number" and array.null_count == 0 and pa.types.is_integer(array.type):
            self._arrays[name] = array.to_numpy().astype(np.int64)
        elif kind == "bool" and array.null_count == 0:
            self._arrays[name] = array.to_numpy(zero_copy_only=False).astype(bool)
        else:  # booleans with gaps compare as 0/1 (numpy: 1.0 == True); NaN is missing
            self._arrays[name] = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)

    def add_column(self, name: str, values) -> None:
        """Hold one more metadata column, in memory only (the index files are not changed): `values` in row order
        (None where missing). `serve --aesthetic-head` adds the scores of an index embedded without them.

        Raises:
            ValueError: a name the collection already has, or not one value per row.
        """
        import pyarrow as pa

        if name in self.column_kinds:
            raise ValueError(f"the index already has a column {name!r}")
        if len(values) != len(self):
            raise ValueError(f"{len(values)} values for a column of an index of {len(self)} rows")
        self._add_column(name, pa.array(list(values)))
        with self._masks_lock:
            self._masks.clear()

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        m = self.manifest
        return f"SearchIndex({m['kind']}, {len(self)} x {self.dim}, model={self.model!r}, recall@10={m['recall_at_10']})"

    def search(self, queries: np.ndarray, k: int, *, where: tuple[filters.Condition, ...] = (),
               with_vectors: bool = False) -> list[list[Hit]]:  # fmt: skip
        """The `k` most similar stored vectors for each query, best first.

        Args:
            queries: (Q, D) or (D,) float features; they are normalised here.
            k: results per query (fewer when the index, or the rows matching `where`, hold fewer vectors).
            where: conditions on the metadata columns (`filters.parse_filters`); only rows meeting all of them
                are searched. k hits come back whenever at least k rows match (an approximate index may miss a
                few true neighbours among them); a missing value matches no condition.
            with_vectors: fill each hit's `vector` with the stored vector.

        Raises:
            filters.FilterError: a condition on an unknown column or of the wrong kind (a ValueError).
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
        conditions = filters.check_conditions(tuple(where), self.column_kinds) if where else ()
        if len(self) == 0 or len(q) == 0:
            return [[] for _ in q]
        q = np.ascontiguousarray(normalize_rows(q))
        if conditions:
            scores, rows = self._filtered_search(q, int(k), self._match(conditions))
        else:
            scores, rows = self._faiss_search(q, min(int(k), len(self)))
        return [[self._hit(int(r), float(s), with_vectors) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]  # fmt: skip

    def _faiss_search(self, q: np.ndarray, k: int, index=None,
                      rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        rerank = self.manifest.get("params", {}).get("rerank", 0) if rerank is None else rerank
        index = self.faiss_index if index is None else index
        with _threads_for(len(q)):
            return ann.search(index, q, k, self._vectors, rerank)

    def _match(self, conditions: tuple[filters.Condition, ...]) -> _Match:
        """The rows meeting `conditions` (checked), from the cache of recent filters or computed now."""
        with self._masks_lock:
            found = self._masks.get(conditions)
            if found is not None:
                self._masks.move_to_end(conditions)
                return found
        mask = filters.row_mask(tuple(self._encoded(c) for c in conditions), self._arrays)
        count = int(np.count_nonzero(mask))
        found = _Match(count, np.flatnonzero(mask) if count <= EXACT_ROWS else None,
                       np.packbits(mask, bitorder="little"))  # fmt: skip
        with self._masks_lock:
            self._masks[conditions] = found
            while len(self._masks) > MASKS_KEPT:
                self._masks.popitem(last=False)
        return found

    def _encoded(self, c: filters.Condition) -> filters.Condition:
        """A condition on a text column as one on its codes (a value the column never holds: code -1)."""
        codes = self._codes.get(c.column)
        if codes is None:
            return c
        if c.op == "in":
            return filters.Condition(c.column, "in", tuple(codes.get(v, -1.0) for v in c.value))
        return filters.Condition(c.column, c.op, codes.get(c.value, -1.0))

    def _filtered_search(self, q: np.ndarray, k: int, match: _Match) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, match.count)
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        kind = self.manifest["kind"]
        if kind == "flat" or match.rows is not None:
            return self._exact(q, k, match)
        faiss = ann.import_faiss()
        selector = faiss.IDSelectorBitmap(len(self), faiss.swig_ptr(match.bitmap))
        # A filter keeping a fraction f of the rows leaves f of the candidates the tuned setting scans: scanning
        # 1/f times as many keeps about as many matching candidates, and so about the tuned recall.
        widen = len(self) / match.count
        param = int(self.manifest.get("search_param") or 1)
        if kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(max(min(param * widen, MAX_EF), k)))
        else:
            nlist = int(self.manifest.get("params", {}).get("nlist", param))
            params = faiss.SearchParametersIVF(sel=selector, nprobe=int(min(np.ceil(param * widen), nlist)))
        scores, rows = self._faiss_search(q, k, _WithParams(self.faiss_index, params))
        short = np.flatnonzero((rows >= 0).sum(axis=1) < k)  # the selector starved the search: exact for these
        if len(short):
            scores[short], rows[short] = self._exact(q[short], k, match)
        return scores, rows

    def _exact(self, q: np.ndarray, k: int, match: _Match) -> tuple[np.ndarray, np.ndarray]:
        """The exact top k among the matching rows (k <= match.count): a broad filter on an index holding its
        float32 vectors in row order (flat, HNSW) scans them skipping the other rows (an ID selector); otherwise
        the matching rows' vectors (the index's own, else `vectors.npy`) are gathered and searched."""
        faiss = ann.import_faiss()
        storage = self._flat_storage()
        if match.rows is None and storage is not None:
            selector = faiss.IDSelectorBitmap(len(self), faiss.swig_ptr(match.bitmap))
            params = faiss.SearchParameters(sel=selector)
            return self._faiss_search(q, k, _WithParams(storage, params), rerank=0)
        rows = match.rows if match.rows is not None else np.flatnonzero(match.mask(len(self)))
        stored = self._vectors if storage is None else faiss.rev_swig_ptr(
            storage.get_xb(), len(self) * self.dim).reshape(len(self), self.dim)  # a view of the index's vectors
        found_s, found_r = [], []
        with _threads_for(len(q)):
            for start in range(0, len(rows), EXACT_BLOCK):  # a block at a time: a bounded copy
                block = rows[start : start + EXACT_BLOCK]
                vectors = np.ascontiguousarray(stored[block], dtype=np.float32)  # (M, D)
                s, j = faiss.knn(q, vectors, min(k, len(block)), faiss.METRIC_INNER_PRODUCT)
                found_s.append(s)
                found_r.append(block[j])
        scores, rows = np.concatenate(found_s, axis=1), np.concatenate(found_r, axis=1)
        if len(found_s) > 1:
            best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, rows = np.take_along_axis(scores, best, axis=1), np.take_along_axis(rows, best, axis=1)
        return scores, rows

    def _flat_storage(self):
        """The faiss IndexFlat holding the vectors in row order as float32 (flat, HNSW), or None (IVF kinds)."""
        kind = self.manifest["kind"]
        if kind == "flat":
            return self.faiss_index
        if kind == "hnsw":
            return ann.import_faiss().downcast_index(self.faiss_index.storage)
        return None

    def _metadata(self, row: int) -> dict:
        return {name: values[row] for name, values in self._values.items()}

    def _hit(self, row: int, score: float, with_vector: bool = False) -> Hit:
        vector = np.array(self._vectors[row], dtype=np.float32) if with_vector else None
        return Hit(self.keys[row], score, self._paths[row], self._captions[row], self._members[row],
                   self._metadata(row), vector)  # fmt: skip

    def row(self, key: str) -> int:
        """The row of `key`; KeyError if absent."""
        try:
            return self._rows[key]
        except KeyError:
            raise KeyError(f"no key {key!r} in the index") from None

    def record(self, key: str) -> dict:
        """The stored record of `key`: {"key", "path", "caption", "member", then every metadata column (None where
        missing)}; KeyError if absent."""
        i = self.row(key)
        fixed = {"key": key, "path": self._paths[i], "caption": self._captions[i], "member": self._members[i]}
        return {**fixed, **self._metadata(i)}

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
    import pyarrow.parquet as pq

    faiss = ann.import_faiss()
    faiss.write_index(index, str(tmp / "index.faiss"))
    np.save(tmp / "vectors.npy", vectors.astype(np.dtype(dtype)))
    pq.write_table(records_table(records), tmp / "records.parquet")


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
        table = pq.read_table(path / "records.parquet")
        columns = {name: table.column(name).to_pylist() for name in table.column_names if name in RECORD_FIELDS}
        metadata = {name: table.column(name) for name in table.column_names if name not in RECORD_FIELDS}
    except (OSError, ValueError, RuntimeError) as e:  # faiss raises RuntimeError on bad files
        raise IndexLoadError(f"{path}: unreadable index files ({type(e).__name__}: {e})") from e
    n, d = int(manifest["count"]), int(manifest["dim"])
    sizes = {"index.faiss": (index.ntotal, index.d), "vectors.npy": vectors.shape, "records": (len(columns.get("key", [])), d)}
    bad = {name: tuple(s) for name, s in sizes.items() if tuple(s) != (n, d)}
    if bad or any(f not in columns for f in ("key", "path", "caption")):
        raise IndexLoadError(f"{path}: files disagree with the manifest ({n} x {d}): {bad or 'records lack columns'}")
    return SearchIndex(manifest, index, vectors, columns, metadata)
