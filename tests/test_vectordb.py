"""Milvus and LanceDB collections: the same keys, scores, filters and lookups as the exact FAISS index.

Milvus runs as Milvus Lite's gRPC server (`python -m milvus_lite server`) in a child process on 127.0.0.1, reached
over the network protocol as a Milvus server would be; nothing leaves the machine.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytest.importorskip("lancedb")

from clipworks.search.backends import lance_store, milvus_store, open_store, parse_spec, write_collection  # noqa: E402
from clipworks.search.filters import FilterError, check_conditions, parse_filters  # noqa: E402
from clipworks.search.index import IndexLoadError, build_index  # noqa: E402
from clipworks.search.store import normalize_rows, write_embeddings  # noqa: E402

N, D = 400, 16
ODD = 'it\'s "quoted" \\ back\\slash'  # a string value with both quote kinds and backslashes
SOURCES = ["laion", "coco", ODD, None]


def _records(n: int) -> list[dict]:
    recs = []
    for i in range(n):
        r = {"key": f"img-{i}", "path": f"/photos/{i}.jpg", "caption": f"caption {i}", "year": 2015 + i % 8,
             "aesthetic": round(3 + (i * 37 % 70) / 10, 1), "source": SOURCES[i % 4], "nsfw": i % 5 == 0}  # fmt: skip
        if i % 7 == 0:
            r["year"] = None
        if i % 11 == 0:
            r["aesthetic"] = None
        if i % 13 == 0:
            r["nsfw"] = None
        recs.append(r)
    recs[3]["key"] = 'img-"3\'\\'  # a key that needs escaping in a lookup
    return recs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    port = _free_port()
    data = tmp_path_factory.mktemp("milvus")
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"milvus-lite server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def built(tmp_path_factory, milvus_uri):
    """(records, unit vectors, {"faiss", "milvus", "lancedb": store}, tmp dir)."""
    tmp = tmp_path_factory.mktemp("vdb")
    x = normalize_rows(np.random.default_rng(0).standard_normal((N, D)))
    recs = _records(N)
    write_embeddings(tmp / "emb", x, recs, model="tiny:weights", dtype="float32", roots=["/photos"])
    stores = {
        "faiss": build_index(tmp / "emb", tmp / "index", kind="flat"),
        "milvus": write_collection(f"milvus:{milvus_uri}?collection=photos", tmp / "emb", batch_size=150),
        "lancedb": write_collection(f"lancedb:{tmp / 'lance'}?table=photos", tmp / "emb", batch_size=150),
    }
    return recs, x, stores, tmp


def _truth(recs, conds) -> np.ndarray:
    """Which rows match, computed here from the records (a missing value matches nothing)."""
    ops = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
           "lte": lambda a, b: a <= b, "gt": lambda a, b: a > b, "gte": lambda a, b: a >= b,
           "in": lambda a, b: a in b}  # fmt: skip
    return np.array([all(r.get(c.column) is not None and ops[c.op](r[c.column], c.value) for c in conds) for r in recs])


def test_manifests_and_columns(built):
    _, _, stores, _ = built
    for name in ("milvus", "lancedb"):
        s = stores[name]
        assert (s.manifest["kind"], s.manifest["index"], s.manifest["metric"]) == (name, "FLAT", "ip")
        assert (len(s), s.dim, s.model, s.manifest["roots"]) == (N, D, "tiny:weights", ["/photos"])
        assert s.column_kinds == {"year": "number", "aesthetic": "number", "source": "string", "nsfw": "bool"}
        assert s.column_kinds == stores["faiss"].column_kinds


def test_unfiltered_search_matches_faiss_flat(built):
    recs, x, stores, _ = built
    q = np.random.default_rng(1).standard_normal((6, D)).astype(np.float32) * 3  # not unit norm: normalised inside
    exact = normalize_rows(q) @ x.T
    want = stores["faiss"].search(q, 10)
    for name in ("milvus", "lancedb"):
        got = stores[name].search(q, 10)
        for i, (g, w) in enumerate(zip(got, want)):
            assert [h.key for h in g] == [h.key for h in w], name
            np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)
            np.testing.assert_allclose([h.score for h in g], np.sort(exact[i])[::-1][:10], atol=1e-5)
            assert [(h.path, h.caption, h.metadata) for h in g] == [(h.path, h.caption, h.metadata) for h in w]


FILTERS = [
    {"year": 2020},
    {"year": {"gte": 2017, "lt": 2020}},
    {"year": {"ne": 2020}},  # rows without a year do not match
    {"year": {"in": [2015, 2022]}},
    {"aesthetic": {"gt": 7.5}},
    {"aesthetic": {"lte": 3.15}},  # a float bound
    {"source": ODD},
    {"source": {"in": ["coco", ODD]}},
    {"source": {"ne": "laion"}},
    {"nsfw": False},
    {"nsfw": True, "year": {"lte": 2016}},  # 5 rows: fewer than k
]


@pytest.mark.parametrize("spec", FILTERS, ids=[str(f) for f in FILTERS])
def test_filtered_search_matches_exact(built, spec):
    recs, x, stores, _ = built
    conds = parse_filters(spec)
    mask = _truth(recs, check_conditions(conds, stores["faiss"].column_kinds))
    q = np.random.default_rng(2).standard_normal((3, D)).astype(np.float32)
    k = 10
    results = {name: s.search(q, k, where=conds) for name, s in stores.items()}
    rows = np.flatnonzero(mask)
    for i, qi in enumerate(normalize_rows(q)):
        scores = x[rows] @ qi
        best = rows[np.argsort(-scores)[:k]]
        for name, got in results.items():
            assert len(got[i]) == min(k, len(rows)), name
            assert [h.key for h in got[i]] == [recs[r]["key"] for r in best], name
            np.testing.assert_allclose([h.score for h in got[i]], np.sort(scores)[::-1][:k], atol=1e-5)


def test_records_vectors_and_with_vectors(built):
    recs, x, stores, _ = built
    for i in (0, 3, 7, 11, 13):  # missing year, a key with quotes, missing aesthetic, missing nsfw
        want = stores["faiss"].record(recs[i]["key"])
        assert want["key"] == recs[i]["key"]
        for name in ("milvus", "lancedb"):
            assert stores[name].record(recs[i]["key"]) == want, name
            np.testing.assert_allclose(stores[name].vector(recs[i]["key"]), x[i], atol=1e-6)
    for name in ("milvus", "lancedb"):
        hits = stores[name].search(x[:2], 3, with_vectors=True)
        assert hits[0][0].key == recs[0]["key"] and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(hits[1][0].vector, x[1], atol=1e-6)
        assert all(h.vector is None for h in stores[name].search(x[:1], 3)[0])
        with pytest.raises(KeyError):
            stores[name].record("no-such-key")
        with pytest.raises(KeyError):
            stores[name].vector('no"such\\key')


def test_bad_filters_and_queries(built):
    _, _, stores, _ = built
    for name in ("milvus", "lancedb"):
        with pytest.raises(FilterError, match="no such column"):
            stores[name].search(np.ones(D), 5, where=parse_filters({"colour": "red"}))
        with pytest.raises(FilterError, match="numeric"):
            stores[name].search(np.ones(D), 5, where=parse_filters({"source": {"gt": 1}}))
        with pytest.raises(ValueError, match="expected"):
            stores[name].search(np.ones(D + 1), 5)


def test_open_checks_model_and_spec(built, milvus_uri):
    _, _, stores, tmp = built
    for spec in (f"milvus:{milvus_uri}?collection=photos", f"lancedb:{tmp / 'lance'}?table=photos"):
        assert len(open_store(spec, model="tiny:weights")) == N
        with pytest.raises(IndexLoadError, match="built with model 'tiny:weights', not 'other'"):
            open_store(spec, model="other")
    with pytest.raises(IndexLoadError, match="no such"):
        open_store(f"lancedb:{tmp / 'lance'}?table=absent")
    with pytest.raises(IndexLoadError, match="no such"):
        open_store(f"milvus:{milvus_uri}?collection=absent")
    assert open_store(tmp / "index").manifest["kind"] == "flat"  # a directory stays FAISS
    for bad in ("milvus:http://x", "lancedb:dir?table=1bad", "lancedb:dir?table=a&x=1", "pg:x?table=a"):
        with pytest.raises(ValueError, match="expected"):
            parse_spec(bad)


@pytest.mark.parametrize("exact_rows", [None, 0], ids=["selective-filters-exact", "always-approximate"])
def test_approximate_indexes_return_k_when_k_match(built, milvus_uri, tmp_path, monkeypatch, exact_rows):
    if exact_rows is not None:  # the index's own filtered search, and the broader retries when it comes back short
        monkeypatch.setattr(milvus_store, "EXACT_ROWS", exact_rows)
    recs, x, stores, tmp = built
    q = np.random.default_rng(3).standard_normal((20, D)).astype(np.float32)
    hnsw = write_collection(f"milvus:{milvus_uri}?collection=photos_hnsw", tmp / "emb", index="hnsw", overwrite=True)
    for spec in FILTERS:
        conds = parse_filters(spec)
        mask = _truth(recs, check_conditions(conds, hnsw.column_kinds))
        got = hnsw.search(q, 10, where=conds)
        assert [len(h) for h in got] == [min(10, int(mask.sum()))] * len(q), spec
        if exact_rows is None:  # exact: the same neighbours as FAISS flat
            assert [[h.key for h in row] for row in got] == [[h.key for h in row] for row in
                                                            stores["faiss"].search(q, 10, where=conds)]  # fmt: skip
    # LanceDB's IVF_PQ (10,000 rows at least) with a filter keeping 0.5% of them: every partition searched, and
    # the 50 matching rows all re-ranked exactly (refine_factor 10 x k)
    n = lance_store.MIN_IVFPQ_ROWS
    big = normalize_rows(np.random.default_rng(4).standard_normal((n, 8)))
    write_embeddings(tmp_path / "emb", big, [{"key": f"k{i}", "rare": i % 200 == 0} for i in range(n)], model="m")
    ivfpq = write_collection(f"lancedb:{tmp_path / 'lance'}?table=big", tmp_path / "emb", index="ivfpq")
    assert ivfpq.manifest["index"] == "IVF_PQ"
    hits = ivfpq.search(q[:, :8], 10, where=parse_filters({"rare": True}))
    assert [len(h) for h in hits] == [10] * len(q)
    assert all(int(h.key[1:]) % 200 == 0 for row in hits for h in row)
    rare = np.arange(0, n, 200)
    best = rare[np.argsort(-(normalize_rows(q[:, :8]) @ big[rare].T), axis=1)[:, :10]]
    assert [[h.key for h in row] for row in hits] == [[f"k{i}" for i in row] for row in best]


class _FailingList(list):
    """A column that breaks after `good` rows have been read: a write that fails half-way."""

    def __init__(self, values, good):
        super().__init__(values)
        self.good = good

    def __getitem__(self, item):
        if isinstance(item, slice) and (item.start or 0) >= self.good:
            raise RuntimeError("disk full")
        return super().__getitem__(item)


@pytest.mark.parametrize("backend", ["milvus", "lancedb"])
def test_failed_write_keeps_previous_collection(built, milvus_uri, backend):
    recs, x, stores, tmp = built
    spec = parse_spec(f"milvus:{milvus_uri}?collection=photos" if backend == "milvus" else
                      f"lancedb:{tmp / 'lance'}?table=photos")  # fmt: skip
    before = stores[backend].search(x[:3], 5)
    columns = {"key": _FailingList([f"new-{i}" for i in range(N)], good=200), "path": [None] * N,
               "caption": [None] * N, "member": [None] * N}  # fmt: skip
    module = milvus_store if backend == "milvus" else lance_store
    with pytest.raises(Exception, match="disk full"):
        module.write(spec, x, columns, {}, lambda index: {"format": "x"}, overwrite=True, index="flat", batch_size=100)
    after = open_store(str(spec), model="tiny:weights")
    assert len(after) == N and after.search(x[:3], 5) == before
    assert after.record("img-5")["year"] == recs[5]["year"]
    if backend == "milvus":
        assert [c for c in after.client.list_collections() if "__writing_" in c] == []


def test_overwrite_and_foreign_collections(built, milvus_uri):
    _, _, _, tmp = built
    for spec in (f"milvus:{milvus_uri}?collection=photos", f"lancedb:{tmp / 'lance'}?table=photos"):
        with pytest.raises(ValueError, match="exists; pass overwrite=True"):
            write_collection(spec, tmp / "emb")
    import lancedb
    import pyarrow as pa

    lancedb.connect(tmp / "lance").create_table("theirs", data=pa.table({"a": [1]}))
    with pytest.raises(ValueError, match="did not write"):
        write_collection(f"lancedb:{tmp / 'lance'}?table=theirs", tmp / "emb", overwrite=True)
    with pytest.raises(IndexLoadError, match="not a clipworks collection"):
        open_store(f"lancedb:{tmp / 'lance'}?table=theirs")
    with pytest.raises(ValueError, match="choose one of flat, hnsw, ivf"):
        write_collection(f"milvus:{milvus_uri}?collection=other", tmp / "emb", index="ivfpq")
    with pytest.raises(ValueError, match="at least 10000"):
        write_collection(f"lancedb:{tmp / 'lance'}?table=other", tmp / "emb", index="ivfpq")


def test_cli_index_writes_collections(built, milvus_uri, capsys):
    from clipworks.cli import main

    recs, x, stores, tmp = built
    for spec in (f"milvus:{milvus_uri}?collection=cli", f"lancedb:{tmp / 'lance'}?table=cli"):
        for _ in range(2):  # the second run replaces the first collection, as it replaces an index directory
            assert main(["index", "--embeddings", str(tmp / "emb"), "--out", spec]) == 0
        assert f"{N} x {D}" in capsys.readouterr().out
        store = open_store(spec, model="tiny:weights")
        assert [h.key for h in store.search(x[:2], 4)[1]] == [h.key for h in stores["faiss"].search(x[:2], 4)[1]]
    hnsw = f"milvus:{milvus_uri}?collection=cli_hnsw"
    assert main(["index", "--embeddings", str(tmp / "emb"), "--out", hnsw, "--kind", "hnsw"]) == 0
    store = open_store(hnsw)
    assert store.manifest["index"] == "HNSW"
    assert len(store.search(x[:1], 10, where=parse_filters({"source": ODD}))[0]) == 10
