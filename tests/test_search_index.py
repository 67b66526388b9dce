"""Embeddings directories and the FAISS index: exact and approximate search, checksums, model checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipworks.search import ann
from clipworks.search.index import Hit, IndexLoadError, build_index, load_index
from clipworks.search.store import model_id, read_embeddings, write_embeddings


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    # faiss's OpenMP k-means slows down many-fold on a shared, busy CPU; one thread keeps the tests quick.
    faiss = ann.import_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _clustered(n: int, d: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _records(n: int) -> list[dict]:
    return [{"key": f"img-{i}", "path": f"/photos/{i}.jpg", "caption": f"caption {i}"} for i in range(n)]


@pytest.fixture
def small_index(tmp_path):
    x = _clustered(300, 16)
    write_embeddings(tmp_path / "emb", x, _records(300), model="tiny:weights", dtype="float32")
    return build_index(tmp_path / "emb", tmp_path / "index"), x, tmp_path


def test_model_id():
    assert model_id("ViT-B-32") == "ViT-B-32"
    assert model_id("ViT-B-32", "openai") == "ViT-B-32:openai"


def test_embeddings_round_trip(tmp_path):
    x = _clustered(10, 8) * 3.0
    recs = _records(10)
    recs[3] = {"key": "no-meta"}
    write_embeddings(tmp_path / "e", x, recs, model="m", dtype="float16")
    y, back, manifest = read_embeddings(tmp_path / "e")
    assert y.dtype == np.float32 and y.shape == (10, 8)
    np.testing.assert_allclose(y, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-3)
    assert back[3] == {"key": "no-meta", "path": None, "caption": None, "member": None, "stamp": None}
    assert back[0]["caption"] == "caption 0"
    assert (manifest["model"], manifest["dim"], manifest["count"], manifest["modality"]) == ("m", 8, 10, "image")


def test_write_embeddings_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        write_embeddings(tmp_path / "e", np.ones((2, 4)), [{"key": "a"}, {"key": "a"}], model="m")
    with pytest.raises(ValueError, match="one row per record"):
        write_embeddings(tmp_path / "e", np.ones((3, 4)), [{"key": "a"}], model="m")
    with pytest.raises(ValueError, match="dtype"):
        write_embeddings(tmp_path / "e", np.ones((1, 4)), [{"key": "a"}], model="m", dtype="int8")
    with pytest.raises(ValueError, match="no manifest"):
        read_embeddings(tmp_path)


def test_flat_index_is_exact_and_returns_keys(small_index):
    index, x, _ = small_index
    assert index.manifest["kind"] == "flat" and index.manifest["recall_at_10"] == 1.0
    assert (len(index), index.dim, index.model, index.manifest["metric"]) == (300, 16, "tiny:weights", "ip")
    queries = _clustered(5, 16, seed=1) * 7.0  # not unit norm: normalised inside
    hits = index.search(queries, 10)
    exact = np.argsort(-(x @ (queries / np.linalg.norm(queries, axis=1, keepdims=True)).T), axis=0)[:10].T
    for row, ids in zip(hits, exact):
        assert [h.key for h in row] == [f"img-{i}" for i in ids]
        assert all(isinstance(h, Hit) and -1.0 <= h.score <= 1.0 + 1e-5 for h in row)
        assert row[0].path.endswith(".jpg") and row[0].caption.startswith("caption")
    top = index.search(x[7], 1)[0][0]
    assert top.key == "img-7" and top.score == pytest.approx(1.0, abs=1e-5)
    assert len(index.search(x[:2], 1000)[0]) == 300  # k past the size gives everything


def test_record_and_vector(small_index):
    index, x, _ = small_index
    assert index.record("img-4") == {"key": "img-4", "path": "/photos/4.jpg", "caption": "caption 4", "member": None}
    np.testing.assert_allclose(index.vector("img-4"), x[4], atol=1e-6)
    with pytest.raises(KeyError, match="nope"):
        index.record("nope")
    with pytest.raises(KeyError):
        index.vector("nope")


def test_search_rejects_bad_queries(small_index):
    index, _, _ = small_index
    with pytest.raises(ValueError, match=r"expected \(Q, 16\)"):
        index.search(np.ones((2, 5)), 3)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 16), np.nan), 3)
    with pytest.raises(ValueError, match="positive integer"):
        index.search(np.ones((1, 16)), 0)


def test_load_verifies_checksums_and_model(small_index):
    index, _, tmp = small_index
    again = load_index(tmp / "index", model="tiny:weights")
    assert again.manifest["checksums"] == index.manifest["checksums"]
    with pytest.raises(IndexLoadError, match="built with model 'tiny:weights', not 'other'"):
        load_index(tmp / "index", model="other")
    data = bytearray((tmp / "index" / "vectors.npy").read_bytes())
    data[-3] ^= 0xFF  # flip one byte of one vector
    (tmp / "index" / "vectors.npy").write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match="vectors.npy: checksum mismatch"):
        load_index(tmp / "index")
    (tmp / "index" / "index.faiss").unlink()
    with pytest.raises(IndexLoadError, match="index.faiss is missing"):
        load_index(tmp / "index")
    (tmp / "index" / "manifest.json").write_text("{not json")
    with pytest.raises(IndexLoadError, match="unreadable manifest"):
        load_index(tmp / "index")
    with pytest.raises(IndexLoadError, match="no index directory"):
        load_index(tmp / "missing")


def test_rebuild_replaces_index_and_refuses_foreign_folder(small_index):
    index, _, tmp = small_index
    rebuilt = build_index(tmp / "emb", tmp / "index", kind="ivf")
    assert rebuilt.manifest["kind"] == "ivf"
    assert json.loads((tmp / "index" / "manifest.json").read_text())["kind"] == "ivf"
    (tmp / "photos").mkdir()
    (tmp / "photos" / "me.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="refusing to replace"):
        build_index(tmp / "emb", tmp / "photos")
    assert (tmp / "photos" / "me.jpg").read_bytes() == b"precious"


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_index_measures_recall(tmp_path, kind):
    x = _clustered(4200, 32, clusters=50)
    base, fresh = x[:4000], x[4000:]  # fresh: queries from the same distribution, not in the index
    write_embeddings(tmp_path / "emb", base, _records(4000), model="m", dtype="float32")
    index = build_index(tmp_path / "emb", tmp_path / "idx", kind=kind, recall_target=0.9, recall_queries=200)
    m = index.manifest
    assert m["kind"] == kind and m["search_param_name"] in ("nprobe", "efSearch") and m["recall_queries"] == 200
    assert len(index) == 4000 and "img-123" in [h.key for h in index.search(base[123], 10)[0]]
    # the recorded recall is what new queries get from the loaded index
    exact = ann.exact_neighbours(base, fresh, 10)
    loaded = load_index(tmp_path / "idx")
    found = [[int(h.key[4:]) for h in hits] for hits in loaded.search(fresh, 10)]
    assert ann.recall_at_k(np.array(found), exact, np.full(len(fresh), -1), 10) == pytest.approx(m["recall_at_10"], abs=0.06)
    assert m["recall_at_10"] >= 0.9 and index.search(base[123], 1)[0][0].key == "img-123"
    if kind == "ivfpq":  # candidates re-scored with the exact vectors: scores are true cosines
        hit = index.search(base[7], 1)[0][0]
        assert m["params"]["rerank"] > 1 and hit.score == pytest.approx(1.0, abs=1e-5)


def test_auto_kind_follows_size_and_budget():
    assert ann.plan_index(1000, 512).kind == "flat"
    assert ann.plan_index(1_000_000, 512).kind == "ivf"
    plan = ann.plan_index(1_000_000, 512, memory_budget_mb=200)
    assert plan.kind == "ivfpq" and plan.bytes <= 200 * 2**20 and 512 % plan.params["m"] == 0
    with pytest.raises(ValueError, match="fits 5 MB"):
        ann.plan_index(1_000_000, 512, memory_budget_mb=5)
    with pytest.raises(ValueError, match="choose from"):
        ann.plan_index(10, 4, kind="lsh")


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_dedup_finds_each_near_duplicate_pair_once(tmp_path, kind):
    from clipworks.search.dedup import find_duplicates

    x = _clustered(400, 32, clusters=400, seed=3)  # well spread: no pair is close by chance
    x[10], x[200] = x[5], x[300] + 0.01  # an exact and a near duplicate
    write_embeddings(tmp_path / "emb", x, _records(400), model="m", dtype="float32")
    index = build_index(tmp_path / "emb", tmp_path / "idx", kind=kind)
    pairs = find_duplicates(index, 0.99)
    assert {(p.a, p.b) for p in pairs} | {(p.b, p.a) for p in pairs} >= {("img-5", "img-10"), ("img-200", "img-300")}
    assert len(pairs) == 2 and pairs[0].score == pytest.approx(1.0, abs=1e-5) and pairs[1].score >= 0.99
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates(index, 1.5)


def test_dedup_on_hnsw_lists_more_duplicates_than_its_first_k(tmp_path):
    from clipworks.search.dedup import find_duplicates

    x = _clustered(300, 32, clusters=300, seed=4)
    x[1:31] = x[0]  # 31 copies of one vector: 465 pairs, far more than 5 neighbours per query
    write_embeddings(tmp_path / "emb", x, _records(300), model="m", dtype="float32")
    index = build_index(tmp_path / "emb", tmp_path / "idx", kind="hnsw")
    pairs = find_duplicates(index, 0.99, neighbours=5)
    want = {frozenset((f"img-{a}", f"img-{b}")) for a in range(31) for b in range(a + 1, 31)}
    assert len(pairs) == len(want) == 465 and {frozenset((p.a, p.b)) for p in pairs} == want
    assert all(p.score == pytest.approx(1.0, abs=1e-5) for p in pairs)


def test_build_refuses_duplicate_keys_and_bad_targets(tmp_path):
    from clipworks.search.store import embeddings_manifest, write_json, write_shard

    (tmp_path / "emb").mkdir()
    recs = [{"key": "a"}, {"key": "b"}, {"key": "a"}]  # e.g. two tar shards that reuse a sample key
    checksums = write_shard(tmp_path / "emb", 0, np.eye(3, dtype=np.float32), recs, "float32")
    write_json(tmp_path / "emb" / "manifest.json", embeddings_manifest(
        model="m", modality="image", dtype="float32", dim=3, shard_counts=[3], roots=[], skipped=0,
        checksums=checksums))  # fmt: skip
    with pytest.raises(ValueError, match="duplicate keys \\(e.g. 'a'\\)"):
        build_index(tmp_path / "emb", tmp_path / "idx")
    with pytest.raises(ValueError, match="recall target"):
        build_index(tmp_path / "emb", tmp_path / "idx", recall_target=1.5)
    assert not (tmp_path / "idx").exists()


def test_files_written_before_the_member_column_still_load(tmp_path):
    # Embeddings and indexes from before "member" existed (session 2) have no such column: it reads as None.
    import pyarrow.parquet as pq

    x = _clustered(6, 8)
    write_embeddings(tmp_path / "e", x, _records(6), model="m")
    meta = tmp_path / "e" / "meta-000000.parquet"
    pq.write_table(pq.read_table(meta).drop(["member"]), meta)
    _as_version_1(tmp_path / "e")  # and from before shard checksums
    with pytest.warns(UserWarning, match="sealed its manifests"):
        _, back, _ = read_embeddings(tmp_path / "e")
    assert all(r["member"] is None for r in back) and back[2]["path"] == _records(6)[2]["path"]
    with pytest.warns(UserWarning, match="sealed its manifests"):
        build_index(tmp_path / "e", tmp_path / "idx", kind="flat")
    records = tmp_path / "idx" / "records.parquet"
    pq.write_table(pq.read_table(records).drop(["member"]), records)
    index = load_index(tmp_path / "idx", verify=False)  # the checksum is of the file as written
    assert index.record("img-2")["member"] is None and index.search(x[2], 1)[0][0].member is None


# Manifests sealed by their own sha256, embeddings shards by theirs (issue 16, item 5)


def _flip(file, old: bytes, new: bytes) -> None:
    """Change one byte of `file`: the first `old` (a few bytes around the target, for a unique match) to `new`."""
    data = file.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new) and sum(a != b for a, b in zip(old, new)) == 1
    file.write_bytes(data.replace(old, new))


def _as_version_1(directory) -> None:
    """Rewrite a manifest as clipworks wrote it before manifests were sealed and shards checksummed."""
    file = directory / "manifest.json"
    manifest = json.loads(file.read_text())
    for key in ("manifest_sha256", *(("checksums",) if manifest["format"] == "clipworks-embeddings" else ())):
        del manifest[key]
    file.write_text(json.dumps({**manifest, "version": 1}, indent=2, sort_keys=True))


def test_changed_index_manifest_is_refused(tmp_path):
    x = _clustered(40, 8)
    write_embeddings(tmp_path / "e", x, _records(40), model="m", roots=["/photos/cats"])
    build_index(tmp_path / "e", tmp_path / "idx", kind="flat")
    manifest = tmp_path / "idx" / "manifest.json"
    good = manifest.read_bytes()
    load_index(tmp_path / "idx")
    for old, new in [(b'"/photos/cats"', b'"/photos/cata"'), (b'"recall_at_10": 1.0', b'"recall_at_10": 1.1')]:
        manifest.write_bytes(good)
        _flip(manifest, old, new)
        with pytest.raises(IndexLoadError, match=r"manifest.json: manifest checksum mismatch .* rebuild") as e:
            load_index(tmp_path / "idx")
        assert "\n" not in str(e.value)
        assert load_index(tmp_path / "idx", verify=False).manifest["roots"] in (["/photos/cats"], ["/photos/cata"])
    manifest.write_bytes(good)
    _flip(manifest, b'"model": "m"', b'"model": "o"')  # corruption, not another model
    with pytest.raises(IndexLoadError, match="manifest checksum mismatch"):
        load_index(tmp_path / "idx", model="m")
    manifest.write_text(json.dumps(json.loads(good)))  # the same content, formatted differently: still sealed
    assert len(load_index(tmp_path / "idx")) == 40
    _flip(manifest, b'"manifest_sha256"', b'"manifest_sha257"')  # a version 2 manifest without its seal
    with pytest.raises(IndexLoadError, match="it has no manifest_sha256"):
        load_index(tmp_path / "idx")


def test_index_from_before_sealed_manifests_loads_with_a_warning(tmp_path):
    x = _clustered(20, 8)
    write_embeddings(tmp_path / "e", x, _records(20), model="m")
    build_index(tmp_path / "e", tmp_path / "idx", kind="flat")
    _as_version_1(tmp_path / "idx")
    with pytest.warns(UserWarning, match=r"manifest.json: written before .* rebuild the index"):
        index = load_index(tmp_path / "idx")
    assert index.search(x[3], 1)[0][0].key == "img-3"
    data = bytearray((tmp_path / "idx" / "vectors.npy").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "idx" / "vectors.npy").write_bytes(bytes(data))
    with pytest.warns(UserWarning), pytest.raises(IndexLoadError, match="vectors.npy: checksum mismatch"):
        load_index(tmp_path / "idx")  # its files are still checked


@pytest.mark.parametrize("name", ["emb-000000.npy", "meta-000000.parquet"])
def test_index_build_refuses_a_changed_embeddings_shard(tmp_path, name):
    x = _clustered(30, 8)
    write_embeddings(tmp_path / "e", x, _records(30), model="m", dtype="float32")
    file = tmp_path / "e" / name
    data = bytearray(file.read_bytes())
    data[-200 if name.endswith(".npy") else data.index(b"parquet-cpp")] ^= 0x01  # a vector's bit; the writer's name
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name}: checksum mismatch .* embed the collection again"):
        build_index(tmp_path / "e", tmp_path / "idx", kind="flat")
    assert not (tmp_path / "idx").exists()
    assert len(read_embeddings(tmp_path / "e", verify=False)[1]) == 30  # readable: only the checksum tells


def test_changed_embeddings_manifest_is_refused(tmp_path):
    write_embeddings(tmp_path / "e", _clustered(10, 8), _records(10), model="m", roots=["/photos/cats"])
    _flip(tmp_path / "e" / "manifest.json", b'"/photos/cats"', b'"/photos/cata"')
    with pytest.raises(ValueError, match="manifest.json: manifest checksum mismatch"):
        build_index(tmp_path / "e", tmp_path / "idx", kind="flat")
