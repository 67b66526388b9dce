"""Filtered search in the FAISS index: the ranking over the matching rows, k hits whenever k rows match, the
metadata columns of records.parquet and their kinds (issue 21)."""

from __future__ import annotations

import operator
import warnings

import numpy as np
import pytest

from test_search_index import _one_faiss_thread  # noqa: F401 (an autouse fixture: one OpenMP thread)

from clipworks.search import ann, index as index_module
from clipworks.search.filters import Condition, FilterError, parse_filter_string, parse_filters
from clipworks.search.index import Hit, build_index, load_index
from clipworks.search.store import forget_dropped, read_embeddings, records_table, write_embeddings

N, D = 3000, 32
SOURCES = ("laion", "coyo", "cc12m", None)


def _vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d))
    x = centres[rng.integers(0, 20, n)] + 0.7 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _records(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        r = {"key": f"img-{i}", "path": f"/p/{i}.jpg", "caption": f"caption {i}",
             "source": SOURCES[int(rng.integers(0, 4))], "aesthetic": float(rng.uniform(2, 9)),
             "width": int(rng.integers(100, 1000)) if i % 10 else None, "nsfw": bool(rng.random() < 0.2)}  # fmt: skip
        if i % 200 == 7:  # 0.5% of the rows
            r["rare"] = True
        records.append(r)
    return records


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("filters")
    x, records = _vectors(N, D), _records(N)
    write_embeddings(tmp / "emb", x, records, model="m", dtype="float32")
    indexes = {kind: build_index(tmp / "emb", tmp / kind, kind=kind, recall_target=1.0)
               for kind in ("flat", "ivf", "hnsw")}  # fmt: skip
    return indexes, x, records


OPS = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "lte": operator.le, "gt": operator.gt,
       "gte": operator.ge, "in": lambda v, values: v in values}  # fmt: skip


def _matches(record: dict, c: Condition) -> bool:
    v = record.get(c.column)
    return v is not None and OPS[c.op](v, c.value)  # missing matches nothing, "ne" included


def _brute_force(x, records, q, conditions, k) -> list[str]:
    rows = [i for i, r in enumerate(records) if all(_matches(r, c) for c in conditions)]
    scores = x[rows] @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [records[rows[j]]["key"] for j in order]


FILTERS = [
    "source=laion",  # about a quarter of the rows
    "width>=500;aesthetic<6",  # numeric ranges, a column with gaps
    "source!=coyo;nsfw=false",  # "ne" never matches a missing value
    "source=coyo|cc12m;width<300",
    "rare=true",  # 0.5% of the rows (15): k hits all the same
]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("spec", FILTERS)
def test_filtered_search_ranks_the_matching_rows_exactly(collection, kind, spec):
    indexes, x, records = collection
    index, conditions = indexes[kind], parse_filter_string(spec)
    queries = _vectors(4, D, seed=5)
    results = index.search(queries, 10, where=conditions)
    for q, hits in zip(queries, results):
        assert [h.key for h in hits] == _brute_force(x, records, q, conditions, 10)
        for h in hits:
            i = int(h.key[4:])  # the input row (an approximate index stores rows in another order)
            assert h.metadata == {c: records[i].get(c) for c in index.column_kinds}
            assert h.score == pytest.approx(float(x[i] @ q), abs=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_search_broad_filters_through_a_selector(collection, kind, monkeypatch):
    # With every filter past EXACT_ROWS the IVF/HNSW index searches with a FAISS ID selector (tuned to recall 1.0
    # here); the 0.5% filter starves HNSW's graph walk, and the exact fallback still gives k hits.
    indexes, x, records = collection
    index = indexes[kind]
    monkeypatch.setattr(index_module, "EXACT_ROWS", 0)
    index._masks.clear()
    queries = _vectors(6, D, seed=9)
    for spec in FILTERS:
        conditions = parse_filter_string(spec)
        for q, hits in zip(queries, index.search(queries, 10, where=conditions)):
            expected = _brute_force(x, records, q, conditions, 10)
            assert len(hits) == 10
            assert all(all(_matches(records[int(h.key[4:])], c) for c in conditions) for h in hits)
            assert len({h.key for h in hits} & set(expected)) >= 9
    index._masks.clear()


def test_a_starved_graph_search_falls_back_to_exact_search(collection, monkeypatch):
    # HNSW limited to efSearch = k walks its graph past the 0.5% of rows that match and comes back short: those
    # queries are searched exactly over the matching rows.
    indexes, x, records = collection
    index = indexes["hnsw"]
    monkeypatch.setattr(index_module, "EXACT_ROWS", 0)
    monkeypatch.setattr(index_module, "MAX_EF", 10)
    exact_queries = []
    exact = index_module.SearchIndex._exact
    monkeypatch.setattr(index_module.SearchIndex, "_exact", lambda self, q, k, m: exact_queries.append(len(q)) or
                        exact(self, q, k, m))  # fmt: skip
    index._masks.clear()
    conditions = parse_filter_string("rare=true")
    queries = _vectors(8, D, seed=11)
    for q, hits in zip(queries, index.search(queries, 10, where=conditions)):
        assert [h.key for h in hits] == _brute_force(x, records, q, conditions, 10)
    assert sum(exact_queries) > 0
    index._masks.clear()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_exact_search_over_many_matching_rows_goes_a_block_at_a_time(collection, kind, monkeypatch):
    # A broad filter on a flat index: its own scan skipping the other rows; on IVF (no float32 copy in row order)
    # the matching rows' vectors are gathered a block at a time (the last block shorter) and the results merged.
    indexes, x, records = collection
    index = indexes[kind]
    monkeypatch.setattr(index_module, "EXACT_BLOCK", 64)
    monkeypatch.setattr(index_module, "EXACT_ROWS", 0)  # rows not listed: found from the bitmap
    index._masks.clear()
    conditions = parse_filter_string("source=laion|coyo")
    queries = _vectors(3, D, seed=12)
    match = index._match(conditions)
    scores, rows = index._exact(queries, 10, match)
    for q, s, r in zip(queries, scores, rows):
        assert [index.keys[i] for i in r] == _brute_force(x, records, q, conditions, 10)
        assert list(s) == sorted(s, reverse=True)
    index._masks.clear()


def test_k_hits_when_k_rows_match_and_fewer_when_fewer_do(collection):
    indexes, x, records = collection
    index = indexes["hnsw"]
    q = _vectors(1, D, seed=3)
    rare = [r["key"] for r in records if r.get("rare")]
    assert len(rare) == 15
    hits = index.search(q, 50, where=parse_filters({"rare": True}))[0]
    assert sorted(h.key for h in hits) == sorted(rare)  # all 15, best first
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    two = parse_filters({"rare": True, "width": {"lt": 200}})
    few = [r["key"] for r in records if r.get("rare") and r["width"] is not None and r["width"] < 200]
    assert sorted(h.key for h in index.search(q, 10, where=two)[0]) == sorted(few)
    assert index.search(q, 5, where=parse_filters({"source": "nowhere"})) == [[]]
    assert index.search(q, 5, where=parse_filters({"aesthetic": {"gt": 100}})) == [[]]


def test_missing_values_never_match(collection):
    indexes, _, records = collection
    index = indexes["flat"]
    q = _vectors(1, D, seed=4)
    for spec in ("width>=0", "width!=123456", "source!=laion", "rare!=false"):
        hits = index.search(q, N, where=parse_filter_string(spec))[0]
        column = spec.split("!")[0].split(">")[0]
        expected = {r["key"] for r in records if r.get(column) is not None}
        expected -= {r["key"] for r in records if column == "source" and r["source"] == "laion"}
        assert {h.key for h in hits} == expected


def test_filter_errors(collection):
    index = collection[0]["flat"]
    q = _vectors(1, D, seed=2)
    for where, message in [(parse_filters({"colour": "red"}), "no such column"),
                           (parse_filters({"source": {"gte": 3}}), "needs a numeric column"),
                           (parse_filters({"width": "wide"}), "holds numbers, not strings"),
                           (parse_filters({"nsfw": 1}), "holds bools, not numbers")]:  # fmt: skip
        with pytest.raises(FilterError, match=message):
            index.search(q, 3, where=where)
    assert index.column_kinds == {"source": "string", "aesthetic": "number", "width": "number", "nsfw": "bool",
                                  "rare": "bool"}  # fmt: skip


def test_unfiltered_search_is_unchanged_and_vectors_come_back(collection):
    indexes, x, records = collection
    index = indexes["flat"]
    q = _vectors(3, D, seed=6)
    plain = index.search(q, 5)
    exact = ann.exact_neighbours(x, q, 5)
    assert [[h.key for h in hits] for hits in plain] == [[records[i]["key"] for i in row] for row in exact]
    assert all(h.vector is None for hits in plain for h in hits)
    with_vectors = index.search(q, 5, with_vectors=True)
    assert with_vectors == plain  # metadata and vector do not take part in comparisons
    hit = with_vectors[0][0]
    np.testing.assert_array_equal(hit.vector, index.vector(hit.key))
    np.testing.assert_allclose(hit.vector, x[index.row(hit.key)], atol=1e-6)
    assert hit.vector.dtype == np.float32 and hit.metadata["source"] == records[index.row(hit.key)]["source"]
    assert Hit("a", 1.0) == Hit("a", 1.0, metadata={"x": 1}) and Hit("a", 1.0).metadata == {}


def test_record_carries_metadata_and_masks_are_kept_per_filter(collection):
    indexes, _, records = collection
    index = indexes["ivf"]
    r = records[17]
    assert index.record(r["key"]) == {"key": r["key"], "path": r["path"], "caption": r["caption"], "member": None,
                                      "source": r["source"], "aesthetic": r["aesthetic"], "width": r["width"],
                                      "nsfw": r["nsfw"], "rare": None}  # fmt: skip
    index._masks.clear()
    where = parse_filter_string("source=laion;aesthetic>=5")
    first = index.search(_vectors(1, D, seed=7), 3, where=where)
    assert len(index._masks) == 1
    assert index.search(_vectors(1, D, seed=7), 3, where=where) == first and len(index._masks) == 1


def test_metadata_columns_types_and_names(tmp_path):
    records = [{"key": "a", "n": 1, "mixed_num": 1, "mixed": 1, "flag": True, "text": "x", "nan": float("nan"),
                "bad name": 1, "score": 2.0, "np": np.float32(0.5)},
               {"key": "b", "n": None, "mixed_num": 2.5, "mixed": "two", "flag": None, "text": None, "nan": 1.0,
                "np": np.int64(3)},
               {"key": "c", "n": 3, "mixed": True, "only_none": None, "big": 2**70}]  # fmt: skip
    forget_dropped()
    with pytest.warns(UserWarning, match=r"'bad name', 'score' left out") as caught:
        table = records_table(records)
    assert len(caught) == 1
    types = {f.name: str(f.type) for f in table.schema}
    assert types == {"key": "string", "path": "string", "caption": "string", "member": "string", "stamp": "string",
                     "n": "int64", "mixed_num": "double", "mixed": "string", "flag": "bool", "text": "string",
                     "nan": "double", "np": "double", "only_none": "string", "big": "string"}  # fmt: skip
    assert table.column("mixed").to_pylist() == ["1", "two", "true"]
    assert table.column("nan").to_pylist() == [None, 1.0, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named once per process
        records_table(records)
    x = _vectors(3, 8)
    write_embeddings(tmp_path / "e", x, records, model="m")
    _, back, _ = read_embeddings(tmp_path / "e")
    assert back[1]["mixed_num"] == 2.5 and back[0]["n"] == 1 and back[2]["flag"] is None and "score" not in back[0]
    index = build_index(tmp_path / "e", tmp_path / "i", kind="flat")
    assert index.column_kinds == {"n": "number", "mixed_num": "number", "mixed": "string", "flag": "bool",
                                  "text": "string", "nan": "number", "np": "number", "only_none": "string",
                                  "big": "string"}  # fmt: skip
    hits = index.search(x[0], 3, where=parse_filter_string("mixed=1"))[0]  # a number on a text column: its text
    assert [h.key for h in hits] == ["a"]
    assert [h.key for h in index.search(x[0], 3, where=parse_filter_string("n>=1"))[0]] == ["a", "c"]


def test_index_without_metadata_columns_filters_nothing(tmp_path):
    x = _vectors(20, 8)
    write_embeddings(tmp_path / "e", x, [{"key": f"k{i}"} for i in range(20)], model="m")
    index = build_index(tmp_path / "e", tmp_path / "i")
    assert index.column_kinds == {} and index.record("k3") == {"key": "k3", "path": None, "caption": None,
                                                               "member": None}  # fmt: skip
    assert index.search(x[3], 1)[0][0].metadata == {}
    with pytest.raises(FilterError, match=r"no such column \(this collection has: none\)"):
        index.search(x[3], 1, where=parse_filters({"year": 2020}))
    assert load_index(tmp_path / "i").column_kinds == {}
