"""`POST /v1/embeddings` in OpenAI's shape, called by the official `openai` client on 127.0.0.1: texts and
images, float and base64, usage counts, batching, errors in OpenAI's shape; and a server with a model alone."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from test_serve_helpers import build_collection, png_bytes, serving

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from clipworks.serve.app import create_app
    from clipworks.serve.limits import ServeSettings

    c = build_collection(tmp_path_factory.mktemp("openai"))
    app = create_app(c.index, c.model, c.preprocess, c.tokenizer, ServeSettings(max_inputs=40, max_batch=8))
    with serving(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), c, app, url


def _data_url(colour) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(colour)).decode()


def test_texts_through_the_openai_client_equal_encode_text(served):
    from clipworks.serve.service import Encoder

    client, c, app, _ = served
    texts = [f"a photo of thing number {i}" for i in range(32)]
    out = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    expected = Encoder(c.model, c.preprocess, c.tokenizer).text(texts)
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [d.index for d in out.data] == list(range(32)) and out.model == "tiny"
    lengths = c.tokenizer.tokenize(texts).lengths
    assert out.usage.prompt_tokens == out.usage.total_tokens == int(lengths.sum())
    floats = client.embeddings.create(model="tiny", input="a red square", encoding_format="float")
    one = Encoder(c.model, c.preprocess, c.tokenizer).text(["a red square"])[0]
    np.testing.assert_allclose(floats.data[0].embedding, one, atol=1e-5)


def test_images_as_data_urls_and_content_parts(served):
    from clipworks.data.decode import load_image
    from clipworks.serve.service import Encoder

    client, c, _, _ = served
    encoder = Encoder(c.model, c.preprocess, c.tokenizer)
    inputs = [_data_url((220, 30, 30)), "a red square",
              {"type": "image_url", "image_url": {"url": _data_url((30, 60, 220))}}, {"type": "text", "text": "blue"}]
    out = client.embeddings.create(model="tiny", input=inputs, encoding_format="float")
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    stored = np.asarray(c.index.vectors(), dtype=np.float32)
    red = stored[c.index.row("red")]
    np.testing.assert_allclose(got[0], encoder.image([load_image(c.images / "red.png")])[0], atol=1e-5)
    assert float(got[0] @ red) > 0.999  # the index stores float16
    np.testing.assert_allclose(got[1], encoder.text(["a red square"])[0], atol=1e-5)
    np.testing.assert_allclose(got[2], encoder.image([load_image(c.images / "blue.png")])[0], atol=1e-5)
    np.testing.assert_allclose(got[3], encoder.text(["blue"])[0], atol=1e-5)
    assert out.usage.prompt_tokens == int(c.tokenizer.tokenize(["a red square", "blue"]).lengths.sum())


@pytest.mark.parametrize("kwargs, status, words", [
    ({"model": "gpt", "input": "x"}, 404, "no model named 'gpt'"),
    ({"model": "tiny", "input": [[1, 2, 3]]}, 422, "token arrays"),
    ({"model": "tiny", "input": []}, 422, "non-empty"),
    ({"model": "tiny", "input": ["x"] * 41}, 422, "limit of 40"),
    ({"model": "tiny", "input": "x", "dimensions": 8}, 422, "cannot shorten"),
    ({"model": "tiny", "input": "data:image/png;base64,!!!"}, 422, "base64"),
    ({"model": "tiny", "input": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}, 422,
     "cannot read input[0]"),
    ({"model": "tiny", "input": {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}}, 400,
     "--allow-urls"),
])  # fmt: skip
def test_errors_reach_the_client_in_openai_shape(served, kwargs, status, words):
    client, *_ = served
    with pytest.raises(openai.APIStatusError) as raised:
        client.embeddings.create(**kwargs)
    assert raised.value.status_code == status
    body = raised.value.body
    assert body["type"] == "invalid_request_error" and words in body["message"], body


def test_models_are_listed(served):
    client, *_ = served
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_concurrent_requests_are_batched(served):
    from concurrent.futures import ThreadPoolExecutor

    client, c, app, _ = served
    sizes = []
    batcher = app.state.service.default.slot.text_batcher
    batcher.on_batch, before = sizes.append, batcher.on_batch
    try:
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda i: client.embeddings.create(model="tiny", input=[f"t{i}-{j}" for j in range(20)]),
                                 range(4)))  # fmt: skip
    finally:
        batcher.on_batch = before
    assert all(len(o.data) == 20 for o in outs)
    assert sum(sizes) == 80 and max(sizes) == 8  # max_batch: 20 inputs never run one by one


def test_a_server_with_a_model_alone_serves_embeddings(served):
    import httpx

    from clipworks.serve.app import create_app
    from clipworks.serve.service import Encoder

    _, c, _, _ = served
    app = create_app(model=c.model, preprocess=c.preprocess, tokenizer=c.tokenizer, model_name="ViT-tiny:test")
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        out = client.embeddings.create(model="ViT-tiny:test", input=["a cat"])
        np.testing.assert_allclose(out.data[0].embedding, Encoder(c.model, c.preprocess, c.tokenizer).text(["a cat"])[0],
                                   atol=1e-5)  # fmt: skip
        health = httpx.get(f"{url}/api/health").json()
        assert health["collections"] == [] and health["images"] is None and health["models"] == ["ViT-tiny:test"]
        search = httpx.post(f"{url}/api/search/text", json={"query": "a cat"})
        assert search.status_code == 404 and "embeddings only" in search.json()["error"]
        embed = httpx.post(f"{url}/api/embed", json={"text": "a cat"})
        assert embed.status_code == 200 and embed.json()["model"] == "ViT-tiny:test"
