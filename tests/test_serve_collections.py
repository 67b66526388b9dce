"""Several collections on one server: each searched with its own model, by text, image, key or raw vector, with
metadata filters inside the search, paging, de-duplication, aesthetic weighting and the safety filter."""

from __future__ import annotations

import numpy as np
import pytest
from test_serve_helpers import build_collection, serving

from clipworks.search.filters import Condition

N = 300
SOURCES = ("laion", "coyo", None)


class Docs:
    """The second collection: random vectors with metadata, embedded "by" a second tiny model."""

    def __init__(self, root):
        import torch
        from reference import tiny_config

        import clipworks
        from clipworks.presets import get_preset
        from clipworks.search.index import build_index
        from clipworks.search.store import write_embeddings

        torch.manual_seed(1)
        cfg = tiny_config(get_preset("RN50"))
        self.model, _, self.preprocess = clipworks.create_model_and_transforms(cfg)
        self.tokenizer = clipworks.get_tokenizer(cfg)
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((N, cfg.embed_dim)).astype(np.float32)
        vectors[N - 2] = vectors[N - 1] = vectors[0]  # two exact duplicates of r0
        records = []
        for i in range(N):
            record = {"key": f"r{i}", "caption": f"item {i}", "source": SOURCES[i % 3], "year": 2018 + i % 6,
                      "aesthetic": None if i % 10 == 9 else float(1 + (i * 7) % 9)}  # fmt: skip
            records.append(record)
        self.records = records
        write_embeddings(root / "docs-emb", vectors, records, model="tiny-rn", dtype="float32")
        self.index = build_index(root / "docs-emb", root / "docs-index", kind="flat")
        self.vectors = np.asarray(self.index.vectors(), dtype=np.float32)
        self.keys = list(self.index.keys)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastapi.testclient import TestClient

    from clipworks.serve.app import create_app
    from clipworks.serve.limits import ServeSettings
    from clipworks.serve.service import Collection

    root = tmp_path_factory.mktemp("collections")
    colours, docs = build_collection(root), Docs(root)
    collections = [Collection("colours", colours.index, colours.model, colours.preprocess, colours.tokenizer,
                              colours.captions),
                   Collection("docs", docs.index, docs.model, docs.preprocess, docs.tokenizer)]  # fmt: skip
    app = create_app(collections=collections, settings=ServeSettings(max_depth=40))
    with TestClient(app) as client:
        yield client, colours, docs


def _ranking(docs: Docs, query: np.ndarray, rows=None) -> list[str]:
    scores = docs.vectors @ (query / np.linalg.norm(query))
    rows = range(N) if rows is None else rows
    return [docs.keys[i] for i in sorted(rows, key=lambda i: (-scores[i], i))]


def _keys(r) -> list[str]:
    assert r.status_code == 200, r.text
    return [x["key"] for x in r.json()["results"]]


def test_collections_are_listed_with_their_models_and_columns(setup):
    client, colours, docs = setup
    listed = client.get("/api/collections").json()["collections"]
    assert [c["name"] for c in listed] == ["colours", "docs"]
    assert [c["default"] for c in listed] == [True, False]
    assert listed[1]["model"] == "tiny-rn" and listed[1]["images"] == N and listed[1]["captions"] is None
    assert listed[1]["columns"] == {"source": "string", "year": "number", "aesthetic": "number"}
    assert listed[1]["aesthetic"] and not listed[0]["aesthetic"]
    health = client.get("/api/health").json()
    assert health["collections"] == ["colours", "docs"] and health["models"] == ["tiny", "tiny-rn"]
    assert health["model"] == "tiny" and health["images"] == len(colours.index)


def test_each_collection_is_searched_with_its_own_model(setup):
    from clipworks.serve.service import Encoder

    client, colours, docs = setup
    query = Encoder(docs.model, docs.preprocess, docs.tokenizer).text(["a red square"])[0]
    r = client.post("/api/search/text", json={"query": "a red square", "k": 7, "collection": "docs"})
    assert _keys(r) == _ranking(docs, query)[:7]
    assert r.json()["collection"] == "docs"
    scores = docs.vectors @ (query / np.linalg.norm(query))
    got = {x["key"]: x["score"] for x in r.json()["results"]}
    assert all(abs(got[k] - scores[docs.keys.index(k)]) < 1e-5 for k in got)
    default = client.post("/api/search/text", json={"query": "a red square", "k": 3})
    assert default.json()["collection"] == "colours"


def test_raw_vector_query(setup):
    client, _, docs = setup
    query = np.random.default_rng(5).standard_normal(docs.vectors.shape[1])
    r = client.post("/api/search/vector", json={"vector": query.tolist(), "k": 10, "collection": "docs"})
    assert _keys(r) == _ranking(docs, query)[:10]
    wrong = client.post("/api/search/vector", json={"vector": [1.0, 2.0], "collection": "docs"})
    assert wrong.status_code == 422 and "2 values" in wrong.json()["error"]
    zero = client.post("/api/search/vector", json={"vector": [0.0] * docs.vectors.shape[1], "collection": "docs"})
    assert zero.status_code == 422
    unknown = client.post("/api/search/vector", json={"vector": query.tolist(), "collection": "nope"})
    assert unknown.status_code == 404 and "colours, docs" in unknown.json()["error"]


@pytest.mark.parametrize("filters, keep", [
    ({"source": "laion"}, lambda r: r["source"] == "laion"),
    ("source=coyo;year>=2021", lambda r: r["source"] == "coyo" and r["year"] >= 2021),
    ({"year": {"in": [2018, 2023]}, "aesthetic": {"lt": 3}},
     lambda r: r["year"] in (2018, 2023) and r["aesthetic"] is not None and r["aesthetic"] < 3),
    ("source!=laion", lambda r: r["source"] is not None and r["source"] != "laion"),
])  # fmt: skip
def test_filters_apply_inside_the_search(setup, filters, keep):
    client, _, docs = setup
    query = np.random.default_rng(6).standard_normal(docs.vectors.shape[1])
    rows = [i for i, rec in enumerate(docs.records) if keep(rec)]
    rows = [docs.keys.index(docs.records[i]["key"]) for i in rows]
    assert len(rows) >= 12
    r = client.post("/api/search/vector", json={"vector": query.tolist(), "k": 12, "collection": "docs",
                                                "filters": filters})  # fmt: skip
    assert _keys(r) == _ranking(docs, query, rows)[:12]  # k results although most top rows do not match
    assert all(keep(x["metadata"]) for x in r.json()["results"])


def test_bad_filters_are_422(setup):
    client, _, _ = setup
    for filters, words in ((("colour=red"), "no such column"), ({"year": {"gte": "x"}}, "needs a number"),
                           ("year~3", "expected COLUMN=VALUE"), ({"source": {"gte": 3}}, "numeric column")):
        r = client.post("/api/search/text", json={"query": "x", "collection": "docs", "filters": filters})
        assert r.status_code == 422 and words in r.json()["error"], (filters, r.text)


def test_pages_follow_the_ranking_without_repeats(setup):
    client, _, docs = setup
    query = np.random.default_rng(7).standard_normal(docs.vectors.shape[1]).tolist()
    pages = [client.post("/api/search/vector", json={"vector": query, "k": 5, "offset": o, "collection": "docs"})
             for o in (0, 5, 10)]  # fmt: skip
    keys = sum((_keys(p) for p in pages), [])
    assert keys == _ranking(docs, np.asarray(query))[:15]
    assert all(p.json()["more"] for p in pages) and pages[1].json()["offset"] == 5
    deep = client.post("/api/search/vector", json={"vector": query, "k": 5, "offset": 36, "collection": "docs"})
    assert deep.status_code == 422 and "max_depth" not in deep.json()["error"] and "40" in deep.json()["error"]
    # the last page of a filtered ranking says there is no more
    few = client.post("/api/search/vector", json={"vector": query, "k": 10, "collection": "docs",
                                                  "filters": "year=2019;source=laion"})  # fmt: skip
    matching = [r for r in docs.records if r["year"] == 2019 and r["source"] == "laion"]
    assert len(_keys(few)) == min(10, len(matching)) and few.json()["more"] == (len(matching) > 10)


def test_dedup_drops_near_identical_results(setup):
    client, _, docs = setup
    query = docs.vectors[docs.keys.index("r0")].tolist()
    plain = _keys(client.post("/api/search/vector", json={"vector": query, "k": 5, "collection": "docs"}))
    assert set(plain[:3]) == {"r0", f"r{N - 2}", f"r{N - 1}"}
    deduped = _keys(client.post("/api/search/vector", json={"vector": query, "k": 5, "collection": "docs",
                                                           "dedup": True}))  # fmt: skip
    assert deduped[0] in plain[:3] and not set(deduped[1:]) & set(plain[:3])
    assert deduped[1:] == [k for k in _ranking(docs, np.asarray(query)) if k not in plain[:3]][:4]


def test_aesthetic_filter_and_weighting(setup):
    client, _, docs = setup
    query = np.random.default_rng(8).standard_normal(docs.vectors.shape[1])
    r = client.post("/api/search/vector", json={"vector": query.tolist(), "k": 10, "collection": "docs",
                                                "min_aesthetic": 7})  # fmt: skip
    assert all(x["aesthetic"] >= 7 for x in r.json()["results"]) and len(_keys(r)) == 10
    weighted = client.post("/api/search/vector", json={"vector": query.tolist(), "k": 10, "collection": "docs",
                                                       "aesthetic_weight": 2.0})  # fmt: skip
    scores = docs.vectors @ (query / np.linalg.norm(query))
    aesthetic = {r["key"]: r["aesthetic"] or 0.0 for r in docs.records}
    expected = sorted(range(N), key=lambda i: (-(scores[i] + 0.2 * aesthetic[docs.keys[i]]), -scores[i], i))
    assert _keys(weighted) == [docs.keys[i] for i in expected[:10]]
    assert weighted.json()["results"][0]["score"] == pytest.approx(float(scores[expected[0]]), abs=1e-5)
    none = client.post("/api/search/text", json={"query": "x", "aesthetic_weight": 1.0})  # colours has no scores
    assert none.status_code == 422 and "aesthetic" in none.json()["error"]


def test_safety_filter_hides_flagged_results_unless_asked(setup, tmp_path):
    from fastapi.testclient import TestClient

    from clipworks.serve.app import create_app
    from clipworks.serve.safety import SafetyFilter
    from clipworks.serve.service import Collection

    _, _, docs = setup
    query = np.random.default_rng(9).standard_normal(docs.vectors.shape[1])
    top = _ranking(docs, query)[:6]
    flagged_vectors = docs.vectors[[docs.keys.index(k) for k in top[::2]]]  # the 1st, 3rd and 5th best

    class Flags(SafetyFilter):
        def unsafe(self, encoder, vectors):
            return (np.asarray(vectors) @ flagged_vectors.T).max(axis=1) > 0.9999

    app = create_app(collections=[Collection("docs", docs.index, docs.model, docs.preprocess, docs.tokenizer)],
                     safety=Flags())  # fmt: skip
    with TestClient(app) as client:
        body = {"vector": query.tolist(), "k": 6}
        safe = _keys(client.post("/api/search/vector", json=body))
        assert safe == [k for k in _ranking(docs, query) if k not in top[::2]][:6]  # still 6 results
        assert _keys(client.post("/api/search/vector", json={**body, "safe": False})) == top
        assert client.get("/api/health").json()["safety"] is True


def test_safety_probabilities_are_a_softmax_over_both_concept_lists(setup, tmp_path):
    from clipworks.serve.safety import SafetyConcepts, SafetyFilter, load_concepts
    from clipworks.serve.service import Encoder

    _, colours, _ = setup
    encoder = Encoder(colours.model, colours.preprocess, colours.tokenizer)
    concepts = SafetyConcepts(("red", "blue"), ("green", "white", "black"), threshold=0.4)
    vectors = np.asarray(colours.index.vectors(), dtype=np.float32)
    features = encoder.text([f"a photo of {c}" for c in concepts.unsafe + concepts.neutral])
    logits = encoder.logit_scale() * vectors @ features.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True))[:, :2].sum(1)
    got = SafetyFilter(concepts).probabilities(encoder, vectors)
    np.testing.assert_allclose(got, p, atol=1e-6)
    assert (SafetyFilter(concepts).unsafe(encoder, vectors) == (p >= 0.4)).all()

    (tmp_path / "c.txt").write_text("# concepts\nblood\n\nweapons  # both\n")
    assert load_concepts(tmp_path / "c.txt").unsafe == ("blood", "weapons")
    (tmp_path / "c.json").write_text('{"unsafe": ["a"], "neutral": ["b", "c"], "template": "{}"}')
    assert load_concepts(tmp_path / "c.json", 0.7) == SafetyConcepts(("a",), ("b", "c"), 0.7, "{}")
    (tmp_path / "bad.json").write_text('{"unsafe": [1]}')
    with pytest.raises(ValueError, match="list of non-empty strings"):
        load_concepts(tmp_path / "bad.json")


def test_images_and_keys_of_other_collections(setup):
    client, colours, _ = setup
    r = client.post("/api/search/image", data={"key": "green", "k": 2, "collection": "colours"})
    assert _keys(r)[0] == "green"
    hit = r.json()["results"][0]
    assert hit["image"] == "/api/image/green" and hit["full_image"] == hit["image"]
    assert client.get(hit["image"]).status_code == 200
    assert client.get("/api/image/red?collection=colours").content == client.get("/api/image/red").content
    missing = client.post("/api/search/image", data={"key": "red", "collection": "docs"})
    assert missing.status_code == 404 and "'docs'" in missing.json()["error"]
    by_key = client.post("/api/search/image", data={"key": "r3", "k": 3, "collection": "docs"})
    assert _keys(by_key)[0] == "r3" and by_key.json()["results"][0]["image"] is None
    bank = client.post("/api/search/image-to-text", data={"key": "r3", "collection": "docs"})
    assert bank.status_code == 404 and "caption bank" in bank.json()["error"]


def test_search_client_reaches_every_collection_option(setup):
    from clipworks.client import ClientError, SearchClient

    client, _, docs = setup
    query = np.random.default_rng(10).standard_normal(docs.vectors.shape[1])
    with serving(client.app) as url, SearchClient(url, retries=0) as sc:
        assert [c["name"] for c in sc.collections()] == ["colours", "docs"]
        page = sc.page("vector", query, 4, collection="docs", offset=4, filters={"source": "coyo"})
        rows = [docs.keys.index(r["key"]) for r in docs.records if r["source"] == "coyo"]
        assert [x["key"] for x in page["results"]] == _ranking(docs, query, rows)[4:8] and page["more"]
        by_key = sc.search_image(key="r3", k=2, collection="docs", filters="year>=2018", safe=False)
        assert by_key[0]["key"] == "r3"
        assert sc.search_text("a", k=2, collection="colours")[0]["key"]
        with pytest.raises(ClientError, match="no such column"):
            sc.search_vector(query, collection="docs", filters="nope=1")


def test_serve_scores_a_collection_embedded_without_aesthetic_scores(setup, tmp_path):
    import torch
    from test_search_metadata import _aesthetic_head

    from clipworks.cli import UsageError
    from clipworks.search.index import load_index
    from clipworks.serve.commands import add_aesthetic_scores

    _, colours, docs = setup
    index = load_index(colours.root / "index")  # a fresh copy: the column is added in memory
    head = _aesthetic_head(tmp_path / "head.pth", index.dim)
    assert add_aesthetic_scores(index, str(tmp_path / "head.pth"), "colours")
    with torch.inference_mode():
        expected = head(torch.from_numpy(np.asarray(index.vectors(), dtype=np.float32))).reshape(-1).numpy()
    got = np.array([index.record(k)["aesthetic"] for k in index.keys])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert index.column_kinds["aesthetic"] == "number"
    best = int(np.argmax(expected))
    hits = index.search(np.asarray(index.vectors()[best], dtype=np.float32), 3,
                        where=(Condition("aesthetic", "gte", float(expected[best])),))[0]  # fmt: skip
    assert {h.key for h in hits} == {k for k, score in zip(index.keys, expected) if score >= expected[best]}
    assert not add_aesthetic_scores(docs.index, str(tmp_path / "head.pth"), "docs")  # it has scores already
    _aesthetic_head(tmp_path / "wide.pth", index.dim + 8)
    with pytest.raises(UsageError, match=f"reads {index.dim + 8}-d embeddings; the model gives {index.dim}-d"):
        add_aesthetic_scores(load_index(colours.root / "index"), str(tmp_path / "wide.pth"), "colours")
