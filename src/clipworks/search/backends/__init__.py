"""Collections in a vector database (Milvus, LanceDB) behind the same store interface as a FAISS index.

A collection is named by a spec:

    milvus:http://127.0.0.1:19530?collection=photos     a Milvus server (MILVUS_TOKEN in the environment if it
                                                         needs one)
    milvus:/data/photos.db?collection=photos            Milvus Lite, in this process, on a local data folder
    lancedb:/data/lance?table=photos                    a LanceDB table in a local folder

`write_collection` copies an embeddings directory (checked against its checksums) into one, with the key, path,
caption, member and metadata columns of every row and a sealed manifest (model, dim, count, roots, columns, ...)
kept inside the database itself (Milvus: a collection property; LanceDB: the table's schema metadata).
`open_store` opens a spec, or a FAISS index directory, as a store: `search(queries, k, where=, with_vectors=)`,
`record(key)`, `vector(key)`, with the same filters (`filters.Condition`) and the same scores (inner products of
unit-norm float32 vectors: exact search gives FAISS flat's results to float rounding).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from ..filters import Condition, check_conditions
from ..index import Hit, IndexLoadError
from ..store import MANIFEST_VERSION, check_manifest_seal, normalize_rows, read_embeddings, seal_manifest

__all__ = ["BACKENDS", "COLLECTION_FORMAT", "CollectionSpec", "parse_spec", "is_spec", "write_collection",
           "open_store", "VectorStore"]  # fmt: skip

COLLECTION_FORMAT = "clipworks-collection"
BACKENDS = {"milvus": "collection", "lancedb": "table"}  # backend -> the query parameter naming the collection
FIXED = ("key", "path", "caption", "member")  # the record fields a collection keeps (not "stamp")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")
MAX_TEXT_BYTES = 65_535  # Milvus VARCHAR's limit; LanceDB has none, but a collection must load in either


@dataclass(frozen=True)
class CollectionSpec:
    """Where a collection lives: `backend` "milvus" or "lancedb", `location` (a Milvus URI or .db path, a LanceDB
    folder) and the collection's `name`."""

    backend: str
    location: str
    name: str

    def __str__(self) -> str:
        return f"{self.backend}:{self.location}?{BACKENDS[self.backend]}={self.name}"


def is_spec(text: str | os.PathLike) -> bool:
    """Whether `text` names a vector-database collection ("milvus:..." or "lancedb:...") rather than a directory."""
    return isinstance(text, str) and text.split(":", 1)[0] in BACKENDS and ":" in text


def parse_spec(text: str) -> CollectionSpec:
    """The `CollectionSpec` of "milvus:URI?collection=NAME" or "lancedb:DIR?table=NAME".

    Raises:
        ValueError: another prefix, no location, or a missing or bad collection name (letters, digits, _).
    """
    backend, _, rest = str(text).partition(":")
    if backend not in BACKENDS:
        raise ValueError(f"{text!r}: expected milvus:URI?collection=NAME or lancedb:DIR?table=NAME")
    param = BACKENDS[backend]
    location, _, query = rest.rpartition("?") if "?" in rest else (rest, "", "")
    values = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(values) - {param})
    names = values.get(param, [])
    if not location or unknown or len(names) != 1 or not _NAME.match(names[0]):
        raise ValueError(f"{text!r}: expected {backend}:{'URI' if backend == 'milvus' else 'DIR'}?{param}=NAME with a "
                         "NAME of letters, digits and _ (not a digit first)"
                         + (f"; unknown parameters {unknown}" if unknown else ""))  # fmt: skip
    return CollectionSpec(backend, location, names[0])


def _columns(records: list[dict]) -> tuple[dict[str, list], dict[str, str]]:
    """({column: values} for the fixed fields and the metadata columns, {metadata column: "int" | "float" | "bool"
    | "string"}), typed as the embeddings shards and the FAISS index type them (`store.records_table`)."""
    import pyarrow as pa

    from ..store import records_table

    table = records_table(records)
    types = {}
    for field in table.schema:
        if field.name in FIXED or field.name == "stamp":
            continue
        t = field.type
        types[field.name] = ("bool" if pa.types.is_boolean(t) else "int" if pa.types.is_integer(t)
                             else "float" if pa.types.is_floating(t) else "string")  # fmt: skip
    columns = {name: table.column(name).to_pylist() for name in (*FIXED, *types)}
    for name, values in columns.items():
        if name in FIXED or types[name] == "string":
            long = next((i for i, v in enumerate(values) if v is not None and len(v.encode()) > MAX_TEXT_BYTES), None)
            if long is not None:
                raise ValueError(f"record {columns['key'][long]!r}: its {name} is longer than {MAX_TEXT_BYTES} bytes, "
                                 "the most a Milvus text field holds")  # fmt: skip
        if name not in FIXED and types[name] == "float":  # NaN is a missing value, as in the FAISS index
            columns[name] = [None if v is None or math.isnan(v) else v for v in values]
    return columns, types


def _kind(column_type: str) -> str:
    return {"int": "number", "float": "number"}.get(column_type, column_type)


def check_queries(queries: np.ndarray, k, dim: int) -> np.ndarray:
    """Queries as unit-norm float32 (Q, D) rows, checked as `SearchIndex.search` checks them.

    Raises:
        ValueError: a query of the wrong dimension, non-finite values, or k < 1.
    """
    q = np.asarray(queries, dtype=np.float32)
    q = q[None] if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries of shape {np.shape(queries)}: expected (Q, {dim}) for this index")
    if not np.isfinite(q).all():
        raise ValueError("queries hold NaN or infinite values")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k={k!r}: expected a positive integer")
    return np.ascontiguousarray(normalize_rows(q))


class VectorStore:
    """What a Milvus collection and a LanceDB table share: manifest, dim, model, len, column_kinds, and
    `search` checking its arguments before the backend's `_search`."""

    def __init__(self, spec: CollectionSpec, manifest: dict):
        self.spec = spec
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.model = str(manifest["model"])
        self.column_kinds: dict[str, str] = {c: _kind(t) for c, t in manifest["columns"].items()}

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        m = self.manifest
        return f"{type(self).__name__}({self.spec}, {len(self)} x {self.dim}, model={self.model!r}, index={m['index']})"

    def search(self, queries: np.ndarray, k: int, *, where: tuple[Condition, ...] = (),
               with_vectors: bool = False) -> list[list[Hit]]:  # fmt: skip
        """The `k` most similar stored vectors for each query, best first, among the rows where every condition
        of `where` holds (applied inside the database's search: k come back when k rows match).

        Raises:
            ValueError: bad queries or k; `filters.FilterError` for conditions the columns cannot take.
        """
        q = check_queries(queries, k, self.dim)
        conditions = check_conditions(tuple(where), self.column_kinds)
        if len(self) == 0 or len(q) == 0:
            return [[] for _ in q]
        return self._search(q, min(int(k), len(self)), conditions, with_vectors)

    def _search(self, q: np.ndarray, k: int, conditions: tuple[Condition, ...], with_vectors: bool):
        raise NotImplementedError

    def _hit(self, row: dict, score: float, with_vectors: bool) -> Hit:
        """A `Hit` of a row read back from the database (fixed fields, metadata columns, "vector")."""
        vector = np.asarray(row["vector"], dtype=np.float32) if with_vectors else None
        return Hit(key=row["key"], score=float(score), path=row.get("path"), caption=row.get("caption"),
                   member=row.get("member"), metadata=self._metadata(row), vector=vector)  # fmt: skip

    def _metadata(self, row: dict) -> dict:
        return {c: row.get(c) for c in self.column_kinds}

    def _record(self, row: dict) -> dict:
        return {**{f: row.get(f) for f in FIXED}, **self._metadata(row)}


def collection_manifest(spec: CollectionSpec, emb_manifest: dict, count: int, types: dict[str, str], index: str,
                        embeddings_dir) -> dict:  # fmt: skip
    """The sealed manifest stored with a collection; `index` is the database's index type ("FLAT": exact)."""
    return seal_manifest({
        "format": COLLECTION_FORMAT, "version": MANIFEST_VERSION, "kind": spec.backend, "collection": spec.name,
        "model": emb_manifest["model"], "modality": emb_manifest["modality"], "dim": int(emb_manifest["dim"]),
        "count": int(count), "metric": "ip", "index": index, "recall_at_10": 1.0 if index == "FLAT" else None,
        "columns": types, "roots": emb_manifest.get("roots", []), "embeddings": str(Path(embeddings_dir).resolve()),
    })  # fmt: skip


def write_collection(spec: str | CollectionSpec, embeddings_dir: str | os.PathLike, *, overwrite: bool = False,
                     index: str = "flat", batch_size: int = 2_000) -> VectorStore:  # fmt: skip
    """Copy an embeddings directory into a Milvus collection or a LanceDB table, and open it.

    The rows are written under a temporary name (Milvus) or as one uncommitted table version (LanceDB), so a
    write that fails leaves any previous collection of that name as it was (see the backends' `write`).

    Args:
        spec: "milvus:URI?collection=NAME" or "lancedb:DIR?table=NAME" (`parse_spec`).
        embeddings_dir: written by `clipworks embed`; every shard is checked against its checksum first.
        overwrite: replace a collection of ours already there (one without a clipworks manifest never is).
        index: "flat" (exact search, the default); Milvus also "hnsw", "ivf"; LanceDB also "ivfpq".
        batch_size: rows per insert call.

    Raises:
        ValueError: a bad spec or index, an unreadable or empty embeddings directory, duplicate keys, text too
            long for Milvus, or a collection already there (without `overwrite`, or not ours).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    vectors, records, emb_manifest = read_embeddings(embeddings_dir)
    if not records:
        raise ValueError(f"{embeddings_dir}: holds no embeddings; nothing to index")
    columns, types = _columns(records)
    if len(set(columns["key"])) != len(records):
        raise ValueError(f"{embeddings_dir}: duplicate keys; every key must name one vector")
    vectors = np.ascontiguousarray(normalize_rows(vectors))
    def make_manifest(index_type: str) -> dict:
        return collection_manifest(spec, emb_manifest, len(records), types, index_type, embeddings_dir)

    if spec.backend == "milvus":
        from .milvus_store import write
    else:
        from .lance_store import write
    write(spec, vectors, columns, types, make_manifest, overwrite=overwrite, index=index, batch_size=batch_size)
    return open_store(str(spec), verify=False)


def check_manifest(spec: CollectionSpec, manifest: dict | None, model: str | None, verify: bool, count) -> dict:
    """The manifest of an opened collection, checked: present, sealed (when `verify`), made with `model`, and
    holding as many rows as the collection (`count`, when `verify`).

    Raises:
        IndexLoadError: no clipworks manifest, a seal mismatch, another model, or a row count that differs.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != COLLECTION_FORMAT:
        raise IndexLoadError(f"{spec}: not a clipworks collection (no manifest; write one with `clipworks index "
                             "--out`)")  # fmt: skip
    if verify:
        check_manifest_seal(manifest, str(spec), error=IndexLoadError, remedy="write the collection again",
                            unsealed="")  # fmt: skip
    if model is not None and model != manifest["model"]:
        raise IndexLoadError(f"{spec}: the index was built with model {manifest['model']!r}, not {model!r}; "
                             "serve it with the same --model (and --pretrained) it was embedded with")  # fmt: skip
    if verify and int(count()) != int(manifest["count"]):
        raise IndexLoadError(f"{spec}: holds {count()} rows, its manifest says {manifest['count']}: it was changed "
                             "outside clipworks; write the collection again")  # fmt: skip
    return manifest


def open_store(spec_or_dir: str | os.PathLike, *, model: str | None = None, verify: bool = True):
    """A FAISS index directory (`index.load_index`), a Milvus collection or a LanceDB table, as a store.

    Args:
        spec_or_dir: a directory, or "milvus:URI?collection=NAME" / "lancedb:DIR?table=NAME".
        model: the model that will make the queries; None skips the check.
        verify: check the manifest's seal and row count (FAISS: every file's checksum).

    Raises:
        IndexLoadError: missing, unreadable, changed, or made with another model.
        ValueError: a malformed spec.
    """
    if not is_spec(spec_or_dir):
        from ..index import load_index

        return load_index(spec_or_dir, model=model, verify=verify)
    spec = parse_spec(str(spec_or_dir))
    if spec.backend == "milvus":
        from .milvus_store import MilvusStore as store_type
    else:
        from .lance_store import LanceStore as store_type
    return store_type.open(spec, model=model, verify=verify)


def scalar_literal(value) -> str | None:
    """A boolean or number as both backends' filter languages write it (true/false, a number in full, no exponent);
    None for a string, which each backend quotes its own way."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # finite: filters refuse NaN and infinity
        return np.format_float_positional(value, trim="0")
    return None


def import_backend(module: str, package: str):
    """Import an optional backend package, or say which to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this collection needs the {module} package: pip install '{package}'") from e
