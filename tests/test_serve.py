"""The search service through FastAPI's test client: every endpoint, image files, the page, the CLI."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_helpers import COLOURS, collection, make_app, png_bytes  # noqa: F401 (collection is a fixture)

from clipworks.data.decode import load_image
from clipworks.serve.service import Encoder


@pytest.fixture(scope="module")
def client(collection):  # noqa: F811
    from fastapi.testclient import TestClient

    with TestClient(make_app(collection)) as c:
        yield c


def _check_ranking(index, query: np.ndarray, results: list[dict], k: int) -> None:
    """Results are the k best stored vectors for `query`, with their true scores, best first."""
    vectors = np.asarray(index.vectors(), dtype=np.float32)
    scores = vectors @ (query.reshape(-1) / np.linalg.norm(query))
    assert len(results) == min(k, len(vectors))
    got = [r["score"] for r in results]
    assert got == sorted(got, reverse=True)
    np.testing.assert_allclose(got, np.sort(scores)[::-1][:k], atol=1e-4)
    for r in results:
        np.testing.assert_allclose(r["score"], scores[index.row(r["key"])], atol=1e-4)


def test_health(client, collection):  # noqa: F811
    body = client.get("/api/health").json()
    assert body["status"] == "ok" and body["model"] == "tiny"
    assert body["images"] == len(collection.index) and body["captions"] == len(collection.captions)
    assert body["dim"] == collection.index.dim and body["max_k"] == 100 and body["allow_urls"] is False
    assert body["int8"] is False


def test_text_search_ranks_the_index_by_the_query_embedding(client, collection):  # noqa: F811
    r = client.post("/api/search/text", json={"query": "a red square", "k": 5})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    query = Encoder(collection.model, collection.preprocess, collection.tokenizer).text(["a red square"])
    _check_ranking(collection.index, query, results, 5)
    assert all(set(x) == {"key", "score", "caption", "image", "full_image", "aesthetic", "metadata"} for x in results)
    by_key = {x["key"]: x for x in client.post("/api/search/text", json={"query": "x", "k": 100}).json()["results"]}
    assert by_key["red"]["image"] == "/api/image/red" and by_key["red"]["caption"] == "a red square"
    assert by_key["sub/dir key"]["image"] == "/api/image/sub%2Fdir%20key"
    assert by_key["nofile"]["image"] is None  # no path stored: no image URL, and no server path is ever shown
    assert all(by_key[k]["image"] is None for k in ("escape", "outside", "notes", "missing"))  # files not served


def test_image_search_by_upload_and_by_key_finds_the_image_itself(client, collection):  # noqa: F811
    upload = client.post("/api/search/image", files={"file": ("q.png", png_bytes(COLOURS["blue"]), "image/png")},
                         data={"k": "3"})  # fmt: skip
    assert upload.status_code == 200, upload.text
    top = upload.json()["results"][0]
    assert top["key"] == "blue" and top["score"] == pytest.approx(1.0, abs=2e-3)  # the index stores float16
    by_key = client.post("/api/search/image", data={"key": "green", "k": "4"}).json()["results"]
    _check_ranking(collection.index, collection.index.vector("green"), by_key, 4)
    assert by_key[0]["key"] == "green"


def test_image_to_text_searches_the_caption_bank(client, collection):  # noqa: F811
    r = client.post("/api/search/image-to-text", data={"key": "yellow", "k": "6"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    _check_ranking(collection.captions, collection.index.vector("yellow"), results, 6)
    assert {x["caption"] for x in results} == {f"a {c} square" for c in COLOURS}
    assert all(x["image"] is None for x in results)  # caption keys are not image keys
    upload = client.post("/api/search/image-to-text", files={"file": ("q.png", png_bytes(COLOURS["red"]))})
    assert upload.status_code == 200 and len(upload.json()["results"]) == 6


def test_image_to_text_without_a_caption_bank_is_404(collection):  # noqa: F811
    from fastapi.testclient import TestClient

    r = TestClient(make_app(collection, captions=False)).post("/api/search/image-to-text", data={"key": "red"})
    assert r.status_code == 404 and "--captions" in r.json()["error"]


def test_embed_text_and_image(client, collection):  # noqa: F811
    encoder = Encoder(collection.model, collection.preprocess, collection.tokenizer)
    text = client.post("/api/embed", data={"text": "a dog"}).json()
    assert text["modality"] == "text" and text["model"] == "tiny"
    np.testing.assert_allclose(text["embedding"], encoder.text(["a dog"])[0], atol=1e-5)
    image = client.post("/api/embed", files={"file": ("x.png", png_bytes(COLOURS["white"]))}).json()
    assert image["modality"] == "image" and len(image["embedding"]) == collection.index.dim
    np.testing.assert_allclose(image["embedding"], collection.index.vector("white"), atol=2e-3)
    photo = io.BytesIO()  # a JPEG photo takes EvalTransform.load's route: the same embedding as load_image's
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8)).save(photo, "JPEG")
    jpeg = client.post("/api/embed", files={"file": ("x.jpg", photo.getvalue())}).json()
    want = encoder.image([load_image(photo.getvalue())])[0]
    np.testing.assert_allclose(jpeg["embedding"], want, atol=1e-6)
    both = client.post("/api/embed", data={"text": "a dog"}, files={"file": ("x.png", png_bytes((0, 0, 0)))})
    assert both.status_code == 422 and "not both" in both.json()["error"]
    assert client.post("/api/embed").status_code == 422  # nothing given


def test_image_file_is_served(client, collection):  # noqa: F811
    r = client.get("/api/image/red")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (collection.images / "red.png").read_bytes()
    assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/api/image/sub%2Fdir%20key").content == r.content  # keys with slashes and spaces


@pytest.mark.parametrize(
    "key, status",
    [("escape", 403), ("dotdot", 403), ("outside", 403), ("notes", 403), ("missing", 404), ("nofile", 404),
     ("no-such-key", 404), ("../outside/secret.png", 404), ("..%2F..%2Fetc%2Fpasswd", 404)],
)  # fmt: skip
def test_image_files_outside_the_roots_are_refused(client, key, status):
    r = client.get(f"/api/image/{key}")
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and r.json()["error"]
    assert b"secret" not in r.content and b"\x01\x02\x03" not in r.content


def test_explicit_image_root_narrows_what_is_served(collection, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    client = TestClient(make_app(collection, image_roots=(tmp_path,)))  # a root the collection is not under
    assert client.get("/api/image/red").status_code == 403
    with pytest.raises(ValueError, match="filesystem root"):
        make_app(collection, image_roots=("/",))


def test_openapi_schema_lists_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/health", "/api/search/text", "/api/search/image", "/api/search/image-to-text", "/api/embed",
            "/api/image/{key}"} <= set(schema["paths"])  # fmt: skip
    assert "ErrorResponse" in schema["components"]["schemas"]


def test_page_and_its_files_load_nothing_from_outside(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    texts = [page.text] + [client.get(f"/static/{name}").text for name in ("app.js", "style.css")]
    assert 'id="query"' in page.text and "/api/search/text" in texts[1]
    for text in texts:  # no CDN, no remote font or script: the page works offline
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), text[:200]
    assert client.get("/static/../app.py").status_code == 404


def test_model_dimension_mismatch_is_refused(collection):  # noqa: F811
    from clipworks.serve.app import create_app

    class Other:
        class config:
            embed_dim = collection.index.dim + 1

    with pytest.raises(ValueError, match="dimensions"):
        create_app(collection.index, Other(), collection.preprocess, collection.tokenizer)


def test_a_symlink_swapped_in_after_the_check_is_refused(tmp_path, monkeypatch):
    # The race needs a writer inside the collection: simulate it by letting the path check pass on a path
    # that, by the time the file is opened, is a link out of the root (last component, or a folder above it).
    from clipworks.serve import files
    from clipworks.serve.limits import ServeError

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    (root / "real" / "ok.png").write_bytes(b"fine")
    (root / "swapped.png").symlink_to(outside / "secret.png")
    (root / "folder").symlink_to(outside)
    monkeypatch.setattr(files, "resolve_image_file", lambda path, roots: (Path(path), "image/png"))
    file, media_type, size = files.open_image_file(str(root / "real" / "ok.png"), (root,))
    with file:
        assert (file.read(), media_type, size) == (b"fine", "image/png", 4)
    for path in (root / "swapped.png", root / "folder" / "secret.png"):
        with pytest.raises(ServeError) as caught:
            files.open_image_file(str(path), (root,))
        assert caught.value.status == 403, path


def test_webdataset_images_are_served_from_their_tars(tmp_path, monkeypatch):
    # embed a wds: source, index it, serve it: thumbnails come out of the tars (members named as stored,
    # upper-case extension included); only image members of tars inside the roots are served.
    import io
    import tarfile

    from fastapi.testclient import TestClient
    from test_serve_helpers import tiny_model

    from clipworks.search.embed import embed_collection
    from clipworks.search.index import build_index
    from clipworks.serve import files
    from clipworks.serve.app import create_app
    from clipworks.serve.limits import ServeError, ServeSettings

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    shards, outside = tmp_path / "shards", tmp_path / "outside"
    shards.mkdir()
    outside.mkdir()
    members = {"s0.png": png_bytes((255, 0, 0)), "dir/s1.PNG": png_bytes((0, 0, 255), (30, 20))}
    with tarfile.open(shards / "shard-0.tar", "w") as tar:
        for name, data in members.items():
            add(tar, name, data)
            add(tar, name.rpartition(".")[0] + ".txt", b"a square")
        add(tar, "notes.txt", b"not an image")
    model, preprocess, tokenizer = tiny_model()
    embed_collection(model, f"wds:{shards}/shard-0.tar", tmp_path / "emb", model_name="tiny", transform=preprocess,
                     progress=False, workers=0)  # fmt: skip
    index = build_index(tmp_path / "emb", tmp_path / "index", kind="flat")
    assert index.record("dir/s1")["member"] == "dir/s1.PNG"
    client = TestClient(create_app(index, model, preprocess, tokenizer, ServeSettings()))
    results = client.post("/api/search/text", json={"query": "a square", "k": 5}).json()["results"]
    assert {r["key"]: r["image"] for r in results} == {"s0": "/api/image/s0", "dir/s1": "/api/image/dir%2Fs1"}
    for key, name in (("s0", "s0.png"), ("dir%2Fs1", "dir/s1.PNG")):
        r = client.get(f"/api/image/{key}")
        assert (r.status_code, r.headers["content-type"], r.content) == (200, "image/png", members[name])

    roots = (shards.resolve(),)
    with tarfile.open(outside / "elsewhere.tar", "w") as tar:
        add(tar, "x.png", png_bytes((1, 2, 3)))
    tar_path = str(shards / "shard-0.tar")
    for path, member, status in ((tar_path, "notes.txt", 403), (tar_path, "gone.png", 404),
                                 (str(outside / "elsewhere.tar"), "x.png", 403), (None, "s0.png", 404)):  # fmt: skip
        with pytest.raises(ServeError) as caught:
            files.read_tar_member(path, member, roots)
        assert caught.value.status == status, (path, member)
    monkeypatch.setattr(files, "MAX_MEMBER_BYTES", 10)
    with pytest.raises(ServeError) as caught:
        files.read_tar_member(tar_path, "s0.png", roots)
    assert caught.value.status == 413
