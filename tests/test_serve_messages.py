"""The search service's error messages (issue 17): they name what was wrong and what is accepted, call an upload by
its file name, and never show a Python repr."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_serve_helpers import COLOURS, collection, make_app, png_bytes  # noqa: F401 (collection is a fixture)

from clipworks.serve.service import Encoder

REPR = re.compile(r"<[\w.]+ object at 0x|<class '")


@pytest.fixture(scope="module")
def client(collection):  # noqa: F811
    from fastapi.testclient import TestClient

    with TestClient(make_app(collection)) as c:
        yield c


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert not REPR.search(message), message
    return message


@pytest.mark.parametrize("endpoint", ["/api/embed", "/api/search/image", "/api/search/image-to-text"])
@pytest.mark.parametrize("data", [b"hello, not an image", b"\x89PNG\r\n\x1a\n torn", b"\xff\xd8\xff\xe0 torn"],
                         ids=["text", "torn-png", "torn-jpeg"])  # fmt: skip
def test_an_unreadable_upload_is_named_by_its_file_name(client, endpoint, data):
    message = _error(client.post(endpoint, files={"file": ("holiday photo.png", data, "image/png")}), 422)
    assert message.startswith("unreadable image: cannot read the uploaded file 'holiday photo.png': "), message
    assert "bytes>" not in message and "accepted formats: JPEG, PNG" in message


def test_a_file_part_without_a_file_name_is_refused_plainly(client):
    message = _error(client.post("/api/embed", files={"file": ("", b"garbage")}), 422)
    assert message == "invalid request: file: expected an uploaded file (a multipart/form-data part with a file name)"


@pytest.mark.parametrize("body, unknown", [({"txt": "cat"}, '"txt"'), ({"texts": ["cat", "dog"]}, '"texts"'),
                                           ({"text": "cat", "k": 3}, '"k"'),
                                           ({"image": "x", "query": "y"}, '"image", "query"')])  # fmt: skip
def test_embed_json_with_unknown_keys_names_them_and_the_accepted_ones(client, body, unknown):
    message = _error(client.post("/api/embed", json=body), 422)
    assert message.startswith(f"unknown key{'s' if ',' in unknown else ''} {unknown} in the JSON body; "), message
    assert message.endswith('/api/embed accepts form fields text, file or url (multipart/form-data to upload a '
                            'file), or a JSON object with "text" or "url"')  # fmt: skip


@pytest.mark.parametrize("body, status, start", [
    (b'{"text": ["cat"]}', 422, 'invalid JSON body: "text": Input should be a valid string'),
    (b'["cat"]', 422, "the JSON body is not an object"),
    (b'{"text": "cat",', 400, "the request body is not valid JSON"),
    (b"{}", 422, "nothing to embed"),
])  # fmt: skip
def test_embed_json_that_is_wrong_otherwise_says_what_and_what_is_accepted(client, body, status, start):
    response = client.post("/api/embed", content=body, headers={"content-type": "application/json"})
    message = _error(response, status)
    assert message.startswith(start) and 'a JSON object with "text" or "url"' in message, message


def test_embed_takes_json_text_as_it_takes_the_form_field(client, collection):  # noqa: F811
    by_json = client.post("/api/embed", json={"text": "a red square"})
    by_form = client.post("/api/embed", data={"text": "a red square"})
    assert by_json.status_code == by_form.status_code == 200, by_json.text
    assert by_json.json() == by_form.json() and by_json.json()["modality"] == "text"
    want = Encoder(collection.model, collection.preprocess, collection.tokenizer).text(["a red square"])[0]
    np.testing.assert_allclose(by_json.json()["embedding"], want, atol=1e-5)
    assert "disabled" in _error(client.post("/api/embed", json={"url": "http://example.com/a.jpg"}), 400)
    assert "not both" in _error(client.post("/api/embed", json={"text": "a", "url": "http://example.com/a.jpg"}), 422)


def test_unknown_form_fields_are_named(client):
    message = _error(client.post("/api/embed", data={"txt": "cat"}), 422)
    assert message.startswith('unknown form field "txt"; /api/embed accepts form fields text, file or url'), message
    message = _error(client.post("/api/search/image", data={"keys": "red", "k": "3"}), 422)
    assert message == ('unknown form field "keys"; /api/search/image accepts form fields file, key or url, and k, '
                       "collection, filters, offset, dedup, safe, aesthetic_weight, min_aesthetic (multipart/form-data "
                       "to upload a file)")  # fmt: skip
    ok = client.post("/api/search/image", data={"key": "green", "k": "3"})
    assert ok.status_code == 200 and ok.json()["results"][0]["key"] == "green"


def test_a_body_of_another_kind_is_refused_with_what_is_accepted(client):
    message = _error(client.post("/api/search/image-to-text", json={"key": "red"}), 415)
    assert message.startswith("/api/search/image-to-text takes form fields file, key or url, and k") and \
        message.endswith("not JSON")  # fmt: skip
    message = _error(client.post("/api/embed", content=b"cat", headers={"content-type": "text/plain"}), 415)
    assert message.endswith("not a text/plain body")


def test_text_search_with_an_unknown_key_lists_the_accepted_keys(client):
    message = _error(client.post("/api/search/text", json={"txt": "cat"}), 422)
    assert "txt: Extra inputs are not permitted" in message
    assert message.endswith('/api/search/text accepts a JSON object with "query", "k", "collection", "filters", '
                            '"offset", "dedup", "safe", "aesthetic_weight", "min_aesthetic"'), message


def test_the_openapi_schema_shows_both_bodies_of_embed(client):
    body = client.get("/openapi.json").json()["paths"]["/api/embed"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert set(body["application/json"]["schema"]["properties"]) == {"text", "url"}


def test_no_message_carries_a_python_repr():
    from clipworks.serve.app import _error as error_response

    body = json.loads(error_response(422, "cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>; "
                                          "received: <class 'str'>").body)  # fmt: skip
    assert body == {"error": "cannot identify image file; received: str"}


def test_a_valid_upload_still_works(client, collection):  # noqa: F811
    r = client.post("/api/embed", files={"file": ("x.png", png_bytes(COLOURS["white"]), "image/png")})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["embedding"], collection.index.vector("white"), atol=2e-3)
