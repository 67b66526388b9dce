"""LangChain, LlamaIndex and Chroma integrations, each driven through its framework's own machinery, in-process and
through a real clipworks service, against the model's own normalised `encode_text`/`encode_image`."""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image
from test_serve_helpers import CAPTIONS, COLOURS, free_port, png_bytes, serving, tiny_model

TOL = 1e-5
NAMES = list(COLOURS)


def _require(module: str, extra: str):
    """The framework module, or a skip (a failure under CI, where every framework must be installed)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        reason = f"{module} is not installed ({e}): pip install 'clipworks[{extra}]'"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def parts():
    return tiny_model()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Paths of solid-colour PNG files, by colour name."""
    root = tmp_path_factory.mktemp("integration-images")
    paths = {}
    for name, colour in COLOURS.items():
        paths[name] = root / f"{name}.png"
        paths[name].write_bytes(png_bytes(colour))
    return paths


@pytest.fixture(scope="module")
def reference(parts, images):
    """The model's own unit-norm features: of CAPTIONS, and of the images in NAMES order."""
    import torch

    from clipworks.data.decode import load_image

    model, preprocess, tokenizer = parts
    with torch.inference_mode():
        text = model.encode_text(tokenizer(CAPTIONS), normalize=True).numpy()
        pixels = torch.stack([preprocess(load_image(images[n])) for n in NAMES])  # (N, 3, H, W)
        image = model.encode_image(pixels, normalize=True).numpy()
    return {"text": text, "image": image}


@pytest.fixture(scope="module")
def server_url(parts):
    """A clipworks service of the tiny model alone (no index), served by uvicorn on a loopback port, in a thread."""
    from clipworks.serve.app import create_app

    model, preprocess, tokenizer = parts
    app = create_app(model=model, preprocess=preprocess, tokenizer=tokenizer, model_name="tiny")
    with serving(app) as url:
        yield url


@pytest.fixture(params=["local", "service"])
def options(request, parts):
    """The keywords that build an embedder: the model in-process, or the service (batches of 4 to cross them)."""
    if request.param == "local":
        model, preprocess, tokenizer = parts
        return {"model": model, "preprocess": preprocess, "tokenizer": tokenizer, "batch_size": 4}
    return {"base_url": request.getfixturevalue("server_url"), "batch_size": 4, "backoff_s": 0}


def _close(actual, expected) -> None:
    actual = np.asarray(actual, dtype=np.float32)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=TOL)


def _arrays(images) -> list[np.ndarray]:
    return [np.asarray(Image.open(images[n]).convert("RGB")) for n in NAMES]  # (H, W, 3) uint8, Chroma's images


# ---- the core: both modes give the model's own features ----


def test_embedders_match_the_model(options, images, reference):
    from clipworks.integrations.core import create_embedder

    embedder = create_embedder(**options)
    _close(embedder.text(CAPTIONS), reference["text"])
    paths = [images[n] for n in NAMES]
    sources = [str(paths[0]), paths[1], paths[2].read_bytes(), io.BytesIO(paths[3].read_bytes()),
               Image.open(paths[4]), _arrays(images)[5]]  # every kind of image the integrations pass  # fmt: skip
    _close(embedder.image(sources), reference["image"])
    assert embedder.text([]).shape[0] == 0 and embedder.image([]).shape[0] == 0


def test_the_two_modes_agree(parts, server_url, images):
    from clipworks.integrations.core import LocalEmbedder, ServiceEmbedder

    local = LocalEmbedder(*parts, batch_size=3)
    for encoding in ("base64", "float"):
        service = ServiceEmbedder(server_url, encoding_format=encoding, batch_size=5)
        assert service.model_name == "tiny"  # asked of /v1/models
        texts = CAPTIONS + ["x" * 400]  # longer than the context: truncated alike
        np.testing.assert_allclose(service.text(texts), local.text(texts), atol=TOL, rtol=0)
        arrays = _arrays(images)
        np.testing.assert_allclose(service.image(arrays), local.image(arrays), atol=TOL, rtol=0)


# ---- LangChain ----


def test_langchain_vector_store(options, reference, images):
    _require("langchain_core", "langchain")
    from langchain_core.vectorstores import InMemoryVectorStore

    from clipworks.integrations.langchain import ClipworksEmbeddings

    embeddings = ClipworksEmbeddings(**options)
    store = InMemoryVectorStore(embedding=embeddings)
    ids = store.add_texts(CAPTIONS)
    _close([store.store[i]["vector"] for i in ids], reference["text"])
    hits = store.similarity_search_with_score(CAPTIONS[2], k=2)
    assert hits[0][0].page_content == CAPTIONS[2] and hits[0][1] == pytest.approx(1.0, abs=TOL)
    _close([embeddings.embed_query(CAPTIONS[1])], reference["text"][1:2])
    _close(asyncio.run(embeddings.aembed_documents(CAPTIONS)), reference["text"])
    _close([asyncio.run(embeddings.aembed_query(CAPTIONS[0]))], reference["text"][:1])
    _close(embeddings.embed_image([str(images[n]) for n in NAMES]), reference["image"])  # LangChain's `uris`
    hits = asyncio.run(store.asimilarity_search_by_vector(embeddings.embed_image([str(images["blue"])])[0], k=1))
    assert hits  # an image query over a text store: the vectors share the space


# ---- LlamaIndex ----


def test_llamaindex_embedding(options, reference, images):
    _require("llama_index.core", "llamaindex")
    from llama_index.core.embeddings import MultiModalEmbedding

    from clipworks.integrations.llamaindex import ClipworksEmbedding

    embed = ClipworksEmbedding(embed_batch_size=4, **options)
    assert isinstance(embed, MultiModalEmbedding)
    _close(embed.get_text_embedding_batch(CAPTIONS), reference["text"])
    _close(asyncio.run(embed.aget_text_embedding_batch(CAPTIONS)), reference["text"])
    _close([embed.get_query_embedding(CAPTIONS[3])], reference["text"][3:4])
    _close([asyncio.run(embed.aget_query_embedding(CAPTIONS[3]))], reference["text"][3:4])
    paths = [str(images[n]) for n in NAMES]
    _close(embed.get_image_embedding_batch(paths), reference["image"])
    _close(asyncio.run(embed.aget_image_embedding_batch(paths)), reference["image"])
    _close([embed.get_image_embedding(io.BytesIO(images["red"].read_bytes()))], reference["image"][:1])


def test_llamaindex_multimodal_index(options, reference, images):
    _require("llama_index.core", "llamaindex")
    from llama_index.core.indices.multi_modal import MultiModalVectorStoreIndex
    from llama_index.core.schema import ImageNode, TextNode

    from clipworks.integrations.llamaindex import ClipworksEmbedding

    embed = ClipworksEmbedding(embed_batch_size=4, **options)
    nodes = [TextNode(text=c, id_=f"text-{n}") for c, n in zip(CAPTIONS, NAMES)]
    # LlamaIndex skips nodes without text: an image node carries its file name
    nodes += [ImageNode(image_path=str(images[n]), text=f"{n}.png", id_=f"image-{n}") for n in NAMES]
    index = MultiModalVectorStoreIndex(nodes, embed_model=embed, image_embed_model=embed)
    stored = index.storage_context.vector_stores
    text_store, image_store = stored["default"], stored["image"]
    _close([text_store.get(f"text-{n}") for n in NAMES], reference["text"])
    _close([image_store.get(f"image-{n}") for n in NAMES], reference["image"])
    retriever = index.as_retriever(similarity_top_k=1, image_similarity_top_k=1)
    assert retriever.text_retrieve(CAPTIONS[4])[0].node.node_id == "text-black"
    hit = retriever.image_to_image_retrieve(str(images["green"]))[0]
    assert hit.node.node_id == "image-green" and hit.score == pytest.approx(1.0, abs=TOL)
    assert len(retriever.text_to_image_retrieve("a square")) == 1


# ---- Chroma ----


def test_chroma_collection(options, reference, images):
    chromadb = _require("chromadb", "chroma")
    from clipworks.integrations.chroma import ClipworksEmbeddingFunction

    function = ClipworksEmbeddingFunction(**options)
    client = chromadb.EphemeralClient()
    name = f"clipworks-{'service' if 'base_url' in options else 'local'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a built model= has no config: a "legacy" function
        collection = client.create_collection(name, embedding_function=function)
    try:
        collection.add(ids=[f"text-{n}" for n in NAMES], documents=CAPTIONS)
        collection.add(ids=[f"image-{n}" for n in NAMES], images=_arrays(images))
        got = collection.get(ids=[f"text-{n}" for n in NAMES] + [f"image-{n}" for n in NAMES], include=["embeddings"])
        by_id = dict(zip(got["ids"], got["embeddings"]))
        _close([by_id[f"text-{n}"] for n in NAMES], reference["text"])
        _close([by_id[f"image-{n}"] for n in NAMES], reference["image"])
        found = collection.query(query_texts=[CAPTIONS[5]], n_results=1, where_document={"$contains": "square"})
        assert found["ids"][0] == ["text-white"]
        found = collection.query(query_images=[_arrays(images)[1]], n_results=1)
        assert found["ids"][0] == ["image-green"] and found["distances"][0][0] == pytest.approx(0.0, abs=TOL)
        mixed = function([CAPTIONS[0], _arrays(images)[2], CAPTIONS[3]])  # texts and images in one call, in order
        _close(mixed, np.stack([reference["text"][0], reference["image"][2], reference["text"][3]]))
    finally:
        client.delete_collection(name)


def test_chroma_config_round_trip(server_url):
    _require("chromadb", "chroma")
    from clipworks.integrations.chroma import ClipworksEmbeddingFunction

    function = ClipworksEmbeddingFunction(base_url=server_url)
    config = function.get_config()
    assert config["base_url"] == server_url and not function.is_legacy()
    rebuilt = ClipworksEmbeddingFunction.build_from_config(config)
    np.testing.assert_allclose(rebuilt(["a cat"]), function(["a cat"]), atol=TOL)
    with pytest.raises(ValueError, match="cannot change"):
        function.validate_config_update(config, {**config, "base_url": "http://other:1"})
    with pytest.raises(ValueError, match="input 1 is a list"):
        function(["a cat", [1, 2, 3]])


# ---- errors and retries ----


def test_service_errors_carry_the_servers_message(server_url):
    from clipworks.integrations.core import ServiceEmbedder, ServiceError

    with pytest.raises(ServiceError, match="nope") as e:
        ServiceEmbedder(server_url, "nope", retries=0).text(["a cat"])
    assert "\n" not in str(e.value) and "/v1/embeddings (4" in str(e.value)
    with pytest.raises(ServiceError, match=r"\(422\): unreadable image: .*input\[1\].* of inputs 2-3\)$"):
        ServiceEmbedder(server_url, retries=0, batch_size=2).image([png_bytes((1, 2, 3))] * 3 + [b"not an image"])
    port = free_port()  # nothing listens there
    with pytest.raises(ServiceError, match="cannot reach"):
        ServiceEmbedder(f"http://127.0.0.1:{port}", "tiny", retries=1, backoff_s=0).text(["a cat"])


def test_service_retries_busy_answers():
    import httpx

    from clipworks.integrations.core import ServiceEmbedder, ServiceError

    answers = [httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"retry-after": "0"}),
               httpx.Response(503, json={"error": {"message": "busy"}}),
               httpx.Response(200, json={"data": [{"index": 1, "embedding": [0.0, 1.0]},
                                                  {"index": 0, "embedding": [1.0, 0.0]}], "model": "m"})]  # fmt: skip
    seen = []

    def handler(request):
        seen.append(request)
        return answers[len(seen) - 1]

    embedder = ServiceEmbedder("http://service", "m", encoding_format="float", backoff_s=0,
                               transport=httpx.MockTransport(handler))  # fmt: skip
    np.testing.assert_array_equal(embedder.text(["a", "b"]), [[1.0, 0.0], [0.0, 1.0]])  # by index, not order
    assert len(seen) == 3
    busy = ServiceEmbedder("http://service", "m", retries=1, backoff_s=0, transport=httpx.MockTransport(
        lambda r: httpx.Response(429, json={"error": {"message": "slow down", "type": "rate_limit"}})))
    with pytest.raises(ServiceError, match=r"\(429\): slow down$"):
        busy.text(["a"])

    sizes = []

    def sized(request):
        count = len(json.loads(request.content)["input"])
        sizes.append(count)
        return httpx.Response(200, json={"data": [{"index": i, "embedding": [1.0]} for i in range(count)]})

    split = ServiceEmbedder("http://service", "m", batch_size=3, max_request_bytes=8,
                            transport=httpx.MockTransport(sized))  # fmt: skip
    assert split.text(["aaaa", "bbbb", "c", "d" * 20, "e", "f", "g", "h"]).shape == (8, 1)
    assert sizes == [2, 1, 1, 3, 1]  # at most 8 characters (but for a larger input alone), and at most 3


def test_bad_inputs_are_named(parts):
    from clipworks.integrations.core import create_embedder

    with pytest.raises(ValueError, match="say which model"):
        create_embedder()
    with pytest.raises(ValueError, match="apply to a service only"):
        create_embedder("ViT-B-32", retries=2)
    with pytest.raises(ValueError, match="preprocess="):
        create_embedder(model=parts[0])
    embedder = create_embedder(model=parts[0], preprocess=parts[1], tokenizer=parts[2])
    with pytest.raises(ValueError, match="image 1: a dict is not an image"):
        embedder.image([png_bytes((1, 2, 3)), {}])
    with pytest.raises(ValueError, match="image 0: .* is a URL"):
        embedder.image(["https://example.com/cat.png"])
    pixels = np.asarray(Image.open(io.BytesIO(png_bytes((200, 10, 90)))).convert("RGB"))
    same = embedder.image([pixels, pixels.astype(np.int64), pixels.astype(np.float64)])  # Chroma's dtypes
    np.testing.assert_allclose(same[1:], same[[0, 0]], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="whole numbers 0-255"):
        embedder.image([np.full((8, 8, 3), 0.5)])
    with pytest.raises(ValueError, match="shape"):
        embedder.image([np.zeros((8, 8, 5), dtype=np.uint8)])
    with pytest.raises(ValueError, match="image 0: .*(decode|read|identify)") as e:
        embedder.image([b"not an image"])
    assert "object at 0x" not in str(e.value)
    with pytest.raises(ValueError, match="one string"):
        embedder.text("a cat")
    with pytest.raises(ValueError, match="text 1 is a int"):
        embedder.text(["a", 3])


def test_a_local_model_directory_loads_offline(parts, tmp_path, monkeypatch, reference):
    """A model saved to a directory is built from it with the hub switched off, and shared between functions."""
    from clipworks import save_pretrained
    from clipworks.integrations.core import LocalEmbedder

    save_pretrained(parts[0], tmp_path / "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = LocalEmbedder.from_name(f"local-dir:{tmp_path / 'tiny'}")
    assert LocalEmbedder.from_name(f"local-dir:{tmp_path / 'tiny'}") is first
    _close(first.text(CAPTIONS), reference["text"])


def test_construction_sends_no_request():
    """Built for a service, each integration asks nothing of it until it embeds (nothing listens on the port)."""
    _require("langchain_core", "langchain"), _require("llama_index.core", "llamaindex"), _require("chromadb", "chroma")
    from clipworks.integrations import ClipworksEmbedding, ClipworksEmbeddingFunction, ClipworksEmbeddings, ServiceError

    url = f"http://127.0.0.1:{free_port()}"
    ClipworksEmbeddings(base_url=url)
    assert ClipworksEmbedding(base_url=url).model_name == url  # LlamaIndex's label: no /v1/models request
    function = ClipworksEmbeddingFunction(base_url=url, retries=0)
    assert function.get_config()["base_url"] == url
    with pytest.raises(ServiceError, match="cannot reach"):
        function(["a cat"])
