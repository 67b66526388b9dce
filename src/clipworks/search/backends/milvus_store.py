"""A collection in Milvus (a server, or Milvus Lite on a local folder): write, open, search with filters.

Fields: "key" (the primary key), "vector" (float32, unit norm, inner-product metric), "path", "caption",
"member", and each metadata column as a nullable field "m_NAME" (INT64, DOUBLE, BOOL or VARCHAR): the prefix keeps
a column named like a keyword of Milvus's expressions ("in", "like") or like a field of Milvus Lite's own
("_seq") out of harm's way. The sealed manifest is the collection property "clipworks.manifest" (JSON).
"""

from __future__ import annotations

import json
import os
import secrets

import numpy as np

from ..filters import Condition
from ..index import IndexLoadError
from . import FIXED, MAX_TEXT_BYTES, CollectionSpec, VectorStore, check_manifest, import_backend, scalar_literal

__all__ = ["MilvusStore", "write", "expression", "literal", "INDEXES"]

MANIFEST_PROPERTY = "clipworks.manifest"
PREFIX = "m_"
INDEXES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}  # --kind -> Milvus index type
MAX_QUERY_ROWS = 16_384  # Milvus's limit on the rows one query returns
# A filtered search on HNSW / IVF whose filter keeps at most this many rows fetches them and scores them here,
# exactly: small enough to move (2 MB of 512-d vectors); a broader filter is searched inside Milvus, made broader.
EXACT_ROWS = 1_024
_SYMBOLS = {"eq": "==", "ne": "!=", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def literal(value) -> str:
    """A value as a Milvus expression literal: true/false, a number written out in full (no exponent), or a
    double-quoted string with \\, ", newline, CR and tab escaped."""
    plain = scalar_literal(value)
    return plain if plain is not None else '"' + "".join(_ESCAPES.get(ch, ch) for ch in str(value)) + '"'


def expression(conditions: tuple[Condition, ...]) -> str:
    """The Milvus boolean expression of checked conditions ("" for none). A null never matches: Milvus compares a
    null as false, and "ne" also says `is not null` so that holds whatever the server version."""
    parts = []
    for c in conditions:
        field = PREFIX + c.column
        if c.op == "in":
            parts.append(f"{field} in [{', '.join(literal(v) for v in c.value)}]")
        elif c.op == "ne":
            parts.append(f"({field} is not null and {field} != {literal(c.value)})")
        else:
            parts.append(f"{field} {_SYMBOLS[c.op]} {literal(c.value)}")
    return " and ".join(parts)


def _client(spec: CollectionSpec):
    pymilvus = import_backend("pymilvus", "pymilvus[milvus_lite]")
    try:
        return pymilvus.MilvusClient(uri=spec.location, token=os.environ.get("MILVUS_TOKEN", ""))
    except pymilvus.MilvusException as e:
        raise IndexLoadError(f"{spec}: cannot reach Milvus ({e.message})") from e


def _manifest(client, name: str) -> dict | None:
    properties = client.describe_collection(name).get("properties") or {}
    try:
        return json.loads(properties[MANIFEST_PROPERTY])
    except (KeyError, TypeError, ValueError):
        return None


def _schema(pymilvus, dim: int, types: dict[str, str]):
    dt = pymilvus.DataType
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", dt.VARCHAR, is_primary=True, max_length=MAX_TEXT_BYTES)
    schema.add_field("vector", dt.FLOAT_VECTOR, dim=dim)
    for name in FIXED[1:]:
        schema.add_field(name, dt.VARCHAR, max_length=MAX_TEXT_BYTES, nullable=True)
    kinds = {"int": (dt.INT64, {}), "float": (dt.DOUBLE, {}), "bool": (dt.BOOL, {}),
             "string": (dt.VARCHAR, {"max_length": MAX_TEXT_BYTES})}  # fmt: skip
    for name, kind in types.items():
        datatype, extra = kinds[kind]
        schema.add_field(PREFIX + name, datatype, nullable=True, **extra)
    return schema


def _index_params(client, index_type: str, count: int):
    params = client.prepare_index_params()
    build = {"HNSW": {"M": 16, "efConstruction": 200},
             "IVF_FLAT": {"nlist": int(min(max(4 * count**0.5, 1), 65536))}}.get(index_type, {})  # fmt: skip
    params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=build)
    return params


def write(spec: CollectionSpec, vectors: np.ndarray, columns: dict[str, list], types: dict[str, str],
          make_manifest, *, overwrite: bool, index: str, batch_size: int) -> None:  # fmt: skip
    """Write the collection `spec.name`: into a new collection "NAME__writing_<pid>_<hex>", which is dropped if
    anything fails (the previous collection is untouched); when complete, the previous collection is dropped and
    the new one renamed to NAME. Between those two calls (milliseconds) NAME is absent; if the rename itself
    fails, the error names the temporary collection, which then holds the complete new data. A process killed
    while writing leaves its temporary collection behind (drop it by name).

    Raises:
        ValueError: an index Milvus is not offered here, or a collection already there (not ours, or without
            `overwrite`).
    """
    pymilvus = import_backend("pymilvus", "pymilvus[milvus_lite]")
    if index not in INDEXES:
        raise ValueError(f"index {index!r} for Milvus: choose one of {', '.join(INDEXES)}")
    client = _client(spec)
    existing = client.has_collection(spec.name)
    if existing and _manifest(client, spec.name) is None:
        raise ValueError(f"{spec}: a collection that clipworks did not write is there; choose another name")
    if existing and not overwrite:
        raise ValueError(f"{spec}: the collection exists; pass overwrite=True to replace it")
    tmp = f"{spec.name}__writing_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        client.create_collection(tmp, schema=_schema(pymilvus, vectors.shape[1], types),
                                 index_params=_index_params(client, INDEXES[index], len(vectors)))  # fmt: skip
        names = {**{f: f for f in FIXED}, **{c: PREFIX + c for c in types}}
        for start in range(0, len(vectors), batch_size):
            stop = min(start + batch_size, len(vectors))
            rows = [{"vector": v} for v in vectors[start:stop].tolist()]
            for column, field in names.items():
                for row, value in zip(rows, columns[column][start:stop]):
                    row[field] = value
            client.insert(tmp, rows)
        client.flush(tmp)
        manifest = json.dumps(make_manifest(INDEXES[index]))
        client.alter_collection_properties(tmp, properties={MANIFEST_PROPERTY: manifest})
    except BaseException:
        try:
            client.drop_collection(tmp)
        finally:
            raise
    if existing:
        client.drop_collection(spec.name)
    try:
        client.rename_collection(tmp, spec.name)
    except pymilvus.MilvusException as e:
        raise RuntimeError(f"{spec}: the new collection is complete under the name {tmp!r}, but renaming it failed "
                           f"({e.message}); rename it by hand") from e  # fmt: skip


class MilvusStore(VectorStore):
    """A Milvus collection written by `write_collection`, loaded for search (the store interface)."""

    def __init__(self, spec: CollectionSpec, manifest: dict, client):
        super().__init__(spec, manifest)
        self.client = client
        self._fields = [*FIXED, *(PREFIX + c for c in self.column_kinds)]
        index = manifest["index"]
        # search breadth, x times the default for a filtered search (see _search)
        self._params = {"HNSW": lambda k, x=1: {"ef": min(max(64, k) * x, 32768)},
                        "IVF_FLAT": lambda k, x=1: {"nprobe": min(32 * x, 65536)}}.get(index, lambda k, x=1: {})  # fmt: skip

    @classmethod
    def open(cls, spec: CollectionSpec, *, model: str | None = None, verify: bool = True) -> MilvusStore:
        """Open and load the collection `spec` (see `backends.open_store`)."""
        client = _client(spec)
        if not client.has_collection(spec.name):
            raise IndexLoadError(f"{spec}: no such collection (write one with `clipworks index --out`)")
        count = lambda: client.get_collection_stats(spec.name)["row_count"]  # noqa: E731
        manifest = check_manifest(spec, _manifest(client, spec.name), model, verify, count)
        client.load_collection(spec.name)
        return cls(spec, manifest, client)

    def _row(self, entity: dict) -> dict:
        return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in entity.items()}

    def _search(self, q: np.ndarray, k: int, conditions: tuple[Condition, ...], with_vectors: bool):
        expr = expression(conditions)
        if not expr or self.manifest["index"] == "FLAT":
            return self._run(q, k, expr, with_vectors, self._params(k))
        matching = self._count(expr)
        if matching <= EXACT_ROWS:  # a filter this selective: score the matching rows here, exactly
            return self._exact(q, k, expr, with_vectors)
        # Milvus Lite's HNSW filters the candidates it visits: a filter keeping 1 row in b leaves about ef / b of
        # them, so the search is made b times as broad (without that, recall@10 was 0.46 with a filter keeping 1%
        # of 100k rows: bench_backends.py).
        breadth = min(512, -(-len(self) // matching))
        hits = self._run(q, k, expr, with_vectors, self._params(k, breadth))
        # Still fewer than k matching rows found: search those queries more broadly, then exactly.
        wanted = min(k, matching)
        for breadth in (8 * breadth, 64 * breadth, 0):
            short = [i for i, h in enumerate(hits) if len(h) < wanted]
            if not short:
                break
            redo = (self._run(q[short], k, expr, with_vectors, self._params(k, breadth)) if breadth else
                    self._exact(q[short], k, expr, with_vectors))  # fmt: skip
            for i, h in zip(short, redo):
                hits[i] = h if len(h) > len(hits[i]) else hits[i]
        return hits

    def _run(self, q: np.ndarray, k: int, expr: str, with_vectors: bool, params: dict) -> list[list]:
        fields = [*self._fields, "vector"] if with_vectors else self._fields
        results = self.client.search(self.spec.name, data=q.tolist(), limit=k, filter=expr, output_fields=fields,
                                     anns_field="vector", search_params={"metric_type": "IP", "params": params})  # fmt: skip
        return [[self._hit(self._row(h["entity"]), h["distance"], with_vectors) for h in hits] for hits in results]

    def _count(self, expr: str) -> int:
        return int(self.client.query(self.spec.name, filter=expr, output_fields=["count(*)"])[0]["count(*)"])

    def _exact(self, q: np.ndarray, k: int, expr: str, with_vectors: bool) -> list[list]:
        """Exact search over the rows matching `expr`, scored here (at most the first 16,384 of them: Milvus's
        limit on one query)."""
        rows = [self._row(r) for r in self.client.query(self.spec.name, filter=expr, limit=MAX_QUERY_ROWS,
                                                        output_fields=[*self._fields, "vector"])]  # fmt: skip
        if not rows:
            return [[] for _ in q]
        scores = q @ np.asarray([r["vector"] for r in rows], dtype=np.float32).T  # (Q, M)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[self._hit(rows[j], s[j], with_vectors) for j in t] for s, t in zip(scores, top)]

    def _get(self, key: str, fields: list[str]) -> dict:
        rows = self.client.query(self.spec.name, filter=f"key == {literal(key)}", output_fields=fields)
        if not rows:
            raise KeyError(f"no key {key!r} in the collection")
        return self._row(rows[0])

    def record(self, key: str) -> dict:
        """The stored fields of `key`: key, path, caption, member and the metadata columns; KeyError if absent."""
        return self._record(self._get(key, self._fields))

    def vector(self, key: str) -> np.ndarray:
        """The stored unit-norm vector of `key` as float32 (D,); KeyError if absent."""
        return np.asarray(self._get(key, ["key", "vector"])["vector"], dtype=np.float32)
