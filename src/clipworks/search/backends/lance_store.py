"""A collection as a LanceDB table in a local folder: write, open, search with filters.

Columns: key, vector (fixed-size list of float32, unit norm; searched with the "dot" distance, 1 - cosine),
path, caption, member, and each metadata column under its own name (int64, float64, bool or string; null where
missing). The sealed manifest is the table schema's metadata entry "clipworks.manifest" (JSON).
"""

from __future__ import annotations

import json

import numpy as np

from ..filters import Condition
from ..index import IndexLoadError
from . import FIXED, CollectionSpec, VectorStore, check_manifest, import_backend, scalar_literal

__all__ = ["LanceStore", "write", "where_sql", "literal", "INDEXES", "MIN_IVFPQ_ROWS"]

MANIFEST_KEY = b"clipworks.manifest"
INDEXES = ("flat", "ivfpq")
MIN_IVFPQ_ROWS = 10_000  # below this an exact scan takes milliseconds, and PQ training has too few rows
_SYMBOLS = {"eq": "=", "ne": "!=", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}


def literal(value) -> str:
    """A value as a LanceDB (DataFusion) SQL literal: true/false, a number written out in full (no exponent), or a
    single-quoted string with ' doubled (a backslash is an ordinary character in SQL strings)."""
    plain = scalar_literal(value)
    return plain if plain is not None else "'" + str(value).replace("'", "''") + "'"


def where_sql(conditions: tuple[Condition, ...]) -> str:
    """The SQL `where` string of checked conditions ("" for none). Column names are quoted with backticks (a
    column may be named like an SQL keyword); a comparison with NULL is not true, so missing values never match."""
    parts = []
    for c in conditions:
        column = f"`{c.column}`"  # names are [A-Za-z_][A-Za-z0-9_]*: no backtick inside
        if c.op == "in":
            parts.append(f"{column} IN ({', '.join(literal(v) for v in c.value)})")
        else:
            parts.append(f"{column} {_SYMBOLS[c.op]} {literal(c.value)}")
    return " AND ".join(parts)


def _arrow_schema(dim: int, types: dict[str, str], manifest: dict | None = None):
    import pyarrow as pa

    kinds = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "string": pa.string()}
    fields = [pa.field("key", pa.string(), nullable=False), pa.field("vector", pa.list_(pa.float32(), dim)),
              *(pa.field(f, pa.string()) for f in FIXED[1:]), *(pa.field(c, kinds[t]) for c, t in types.items())]  # fmt: skip
    return pa.schema(fields, metadata={MANIFEST_KEY: json.dumps(manifest)} if manifest else None)


def _manifest(table) -> dict | None:
    try:
        return json.loads(table.schema.metadata[MANIFEST_KEY])
    except (KeyError, TypeError, ValueError):
        return None


def _connect(spec: CollectionSpec):
    lancedb = import_backend("lancedb", "lancedb")
    return lancedb.connect(spec.location)


def write(spec: CollectionSpec, vectors: np.ndarray, columns: dict[str, list], types: dict[str, str],
          make_manifest, *, overwrite: bool, index: str, batch_size: int) -> None:  # fmt: skip
    """Write the table `spec.name` as one commit: the rows stream in as record batches and Lance makes them the
    table's new version only when every batch is written, so a write that fails leaves the previous version as
    the table (the unreferenced data files it wrote stay until `table.cleanup_old_versions`). LanceDB has no
    table rename outside its cloud service; the atomic commit is the swap. Replaced versions stay on disk, and
    readable by version, until cleaned up the same way. An IVF_PQ index (index="ivfpq") is built after the
    commit: if that fails, the table is complete and searched exactly.

    Raises:
        ValueError: an unknown index, ivfpq on fewer than `MIN_IVFPQ_ROWS` rows, or a table already there (not
            ours, or without `overwrite`).
    """
    import pyarrow as pa

    if index not in INDEXES:
        raise ValueError(f"index {index!r} for LanceDB: choose one of {', '.join(INDEXES)}")
    if index == "ivfpq" and len(vectors) < MIN_IVFPQ_ROWS:
        raise ValueError(f"index ivfpq on {len(vectors)} rows: needs at least {MIN_IVFPQ_ROWS}; below that use flat "
                         "(an exact scan)")  # fmt: skip
    db = _connect(spec)
    existing = spec.name in _table_names(db)
    if existing and _manifest(db.open_table(spec.name)) is None:
        raise ValueError(f"{spec}: a table that clipworks did not write is there; choose another name")
    if existing and not overwrite:
        raise ValueError(f"{spec}: the table exists; pass overwrite=True to replace it")
    dim = vectors.shape[1]
    schema = _arrow_schema(dim, types, make_manifest("IVF_PQ" if index == "ivfpq" else "FLAT"))

    def batches():
        for start in range(0, len(vectors), batch_size):
            stop = min(start + batch_size, len(vectors))
            flat = pa.array(vectors[start:stop].reshape(-1), type=pa.float32())
            arrays = [pa.array(columns["key"][start:stop], pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim),
                      *(pa.array(columns[c][start:stop], type=schema.field(c).type) for c in (*FIXED[1:], *types))]  # fmt: skip
            yield pa.record_batch(arrays, schema=schema)

    reader = pa.RecordBatchReader.from_batches(schema, batches())
    table = db.create_table(spec.name, data=reader, schema=schema, mode="overwrite" if existing else "create")
    if index == "ivfpq":
        from lancedb.index import IvfPq

        config = IvfPq(distance_type="dot", num_partitions=int(max(1, len(vectors) ** 0.5)),
                       num_sub_vectors=_sub_vectors(dim))  # fmt: skip
        table.create_index("vector", config=config)  # with a config, the first argument names the column


def _sub_vectors(dim: int) -> int:
    """PQ sub-vectors: 16 dimensions each (LanceDB's default for fast SIMD), dividing `dim`."""
    return next((dim // s for s in (16, 8, 4, 2, 1) if dim % s == 0), 1)


def _table_names(db) -> list[str]:
    listing = db.list_tables() if hasattr(db, "list_tables") else db.table_names()
    return list(getattr(listing, "tables", listing))


class LanceStore(VectorStore):
    """A LanceDB table written by `write_collection`, opened for search (the store interface)."""

    def __init__(self, spec: CollectionSpec, manifest: dict, table):
        super().__init__(spec, manifest)
        self.table = table
        self._columns = [*FIXED, *self.column_kinds]

    @classmethod
    def open(cls, spec: CollectionSpec, *, model: str | None = None, verify: bool = True) -> LanceStore:
        """Open the table `spec` (see `backends.open_store`)."""
        db = _connect(spec)
        if spec.name not in _table_names(db):
            raise IndexLoadError(f"{spec}: no such table (write one with `clipworks index --out`)")
        table = db.open_table(spec.name)
        return cls(spec, check_manifest(spec, _manifest(table), model, verify, table.count_rows), table)

    def _query(self, q: np.ndarray, k: int, where: str, columns: list[str], exact: bool,
               breadth: int = 1) -> list[dict]:  # fmt: skip
        query = self.table.search(q, vector_column_name="vector").distance_type("dot").limit(k)
        query = query.select([*columns, "_distance"])
        if exact:
            query = query.bypass_vector_index()  # a scan of every (matching) row
        else:
            # PQ distances are coarse: k x refine candidates are re-scored on the full vectors, more of them when a
            # filter leaves few rows per partition
            query = query.nprobes(20 * breadth).refine_factor(10 * min(breadth, 10))
        if where:
            query = query.where(where, prefilter=True)
        return query.to_arrow().to_pylist()

    def _search(self, q: np.ndarray, k: int, conditions: tuple[Condition, ...], with_vectors: bool):
        where = where_sql(conditions)
        columns = [*self._columns, "vector"] if with_vectors else self._columns
        exact, breadth = self.manifest["index"] == "FLAT", 1
        if where and not exact:  # a filter keeping 1 row in b: b times as many partitions searched
            breadth = min(4096, -(-len(self) // max(1, self.table.count_rows(where))))
        hits = []
        for v in q:
            rows = self._query(v, k, where, columns, exact, breadth)
            # IVF_PQ prefiltered searches only the probed partitions: too few matching rows there, search exactly
            if len(rows) < k and not exact and len(rows) < self.table.count_rows(where or None):
                rows = self._query(v, k, where, columns, exact=True)
            # "dot" distance is 1 - q.v; float32 rounding of it stays far below 1e-5 for unit vectors
            hits.append([self._hit(row, 1.0 - row["_distance"], with_vectors) for row in rows])
        return hits

    def _get(self, key: str, columns: list[str]) -> dict:
        rows = self.table.search().where(f"`key` = {literal(key)}").select(columns).limit(1).to_arrow().to_pylist()
        if not rows:
            raise KeyError(f"no key {key!r} in the collection")
        return rows[0]

    def record(self, key: str) -> dict:
        """The stored fields of `key`: key, path, caption, member and the metadata columns; KeyError if absent."""
        return self._record(self._get(key, self._columns))

    def vector(self, key: str) -> np.ndarray:
        """The stored unit-norm vector of `key` as float32 (D,); KeyError if absent."""
        return np.asarray(self._get(key, ["key", "vector"])["vector"], dtype=np.float32)
