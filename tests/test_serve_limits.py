"""The search service's limits: body size, pixels, k, concurrency, URL fetching (SSRF), malformed requests."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_serve_helpers import COLOURS, collection, make_app, png_bytes  # noqa: F401 (collection is a fixture)

from clipworks.serve.limits import BodySizeLimit, ServeError, ServeSettings, decode_upload
from clipworks.serve.urls import address_refusal, check_address, fetch_url, resolve_public


def _client(collection, **settings):  # noqa: F811
    from fastapi.testclient import TestClient

    return TestClient(make_app(collection, **settings), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(collection):  # noqa: F811
    with _client(collection, max_k=5, max_body_bytes=4096, max_pixels=50 * 50) as c:
        yield c


def _assert_error(r, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    message = r.json()["error"]
    assert isinstance(message, str) and "Traceback" not in message
    for word in words:
        assert word in message, message


def test_body_over_the_limit_is_413(client):
    _assert_error(client.post("/api/search/text", content=b"x" * 5000, headers={"content-type": "application/json"}),
                  413, "4096 bytes")  # fmt: skip
    big = png_bytes((1, 2, 3), size=(30, 30)) + b"\0" * 5000
    _assert_error(client.post("/api/search/image", files={"file": ("a.png", big)}), 413)


def test_streamed_body_is_counted_without_a_content_length():
    def run(chunks, headers=()):
        sent, seen = [], []
        incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def app(scope, receive, send):
            seen.append((await receive())["body"])
            await send({"type": "http.response.start", "status": 200, "headers": []})

        async def receive():
            return incoming.pop(0)

        async def send(message):
            sent.append(message)

        asyncio.run(BodySizeLimit(app, 10)({"type": "http", "headers": list(headers)}, receive, send))
        return sent[0]["status"], seen, incoming

    assert run([b"abcd", b"efgh"]) == (200, [b"abcdefgh"], [])
    status, seen, unread = run([b"abcdef", b"ghijkl", b"never read"])  # chunked: no length declared
    assert (status, seen, len(unread)) == (413, [], 1)  # refused at the chunk that passed the cap
    assert run([b""], [(b"content-length", b"11")])[:2] == (413, [])  # declared too large: nothing read
    assert run([b""], [(b"content-length", b"ten")])[0] == 400
    assert run([b""], [(b"content-length", b"-5")])[0] == 400


def test_a_body_trickled_past_the_deadline_is_408():
    sent, seen = [], []

    async def app(scope, receive, send):
        seen.append("app")

    async def receive():
        seen.append("receive")
        if len(seen) == 1:
            return {"type": "http.request", "body": b"ab", "more_body": True}
        await asyncio.sleep(10)  # the rest never comes

    async def send(message):
        sent.append(message)

    asyncio.run(BodySizeLimit(app, 100, timeout_s=0.2)({"type": "http", "headers": []}, receive, send))
    assert sent[0]["status"] == 408 and "app" not in seen
    assert b"not received within 0.2 s" in sent[1]["body"]


def test_pixel_cap_and_broken_images(client):
    _assert_error(client.post("/api/search/image", files={"file": ("a.png", png_bytes((9, 9, 9), (60, 60)))}),
                  413, "3600 pixels", "2500")  # fmt: skip
    _assert_error(client.post("/api/search/image", files={"file": ("a.png", b"not an image at all")}), 422, "unreadable")
    _assert_error(client.post("/api/search/image", files={"file": ("a.png", png_bytes((1, 1, 1))[:60])}), 422)
    _assert_error(client.post("/api/search/image", files={"file": ("a.png", b"")}), 422, "empty")
    assert client.post("/api/search/image", files={"file": ("a.png", png_bytes((1, 1, 1), (50, 50)))}).status_code == 200


def test_decompression_bomb_header_is_refused_before_decoding():
    import struct
    import zlib

    # A PNG header claiming 100000 x 100000 pixels with almost no data: refused from the header alone.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    with pytest.raises(ServeError) as e:
        decode_upload(bomb, max_pixels=2**25)
    assert e.value.status == 413


@pytest.mark.parametrize("k", [6, 0, -1])
def test_k_out_of_range_is_422(client, k):
    _assert_error(client.post("/api/search/text", json={"query": "a cat", "k": k}), 422, "k")
    _assert_error(client.post("/api/search/image", data={"key": "red", "k": str(k)}), 422, "k")


def test_saturated_service_without_a_queue_answers_503_at_once(collection):  # noqa: F811
    with _client(collection, concurrency=2, queue=0) as client:
        limiter = client.app.state.service.limiter
        assert limiter.try_acquire() and limiter.try_acquire() and not limiter.try_acquire()
        try:
            r = client.post("/api/search/text", json={"query": "a cat"})
            _assert_error(r, 503, "busy")
            assert r.headers["retry-after"] == "1"
            _assert_error(client.post("/api/search/image", data={"key": "red"}), 503)
            assert client.get("/api/health").status_code == 200  # no model work: still answered
        finally:
            limiter.release()
            limiter.release()
        assert client.post("/api/search/text", json={"query": "a cat"}).status_code == 200
        assert limiter.try_acquire() and limiter.try_acquire()  # every request gave its slot back
        limiter.release()
        limiter.release()


def test_urls_are_refused_unless_enabled(client):
    _assert_error(client.post("/api/search/image", data={"url": "http://example.com/cat.jpg"}), 400, "--allow-urls")
    _assert_error(client.post("/api/embed", data={"url": "http://example.com/cat.jpg"}), 400, "disabled")


@pytest.mark.parametrize("url", ["http://127.0.0.1/x.png", "http://10.1.2.3:8080/x.png", "http://[::1]/x.png",
                                 "http://169.254.169.254/latest/meta-data/", "http://localhost/x.png",
                                 "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/x.png", "http://2130706433/x.png",
                                 "http://0x7f000001/x.png", "ftp://example.com/x.png",
                                 "http://user:pw@example.com/x.png", "http:///nohost", "http://example.com:99999/"])  # fmt: skip
def test_enabled_urls_never_reach_local_addresses(collection, url):  # noqa: F811
    with _client(collection, allow_urls=True) as client:  # all refused before any connection is made
        r = client.post("/api/search/image", data={"url": url})
        _assert_error(r, 400, *(["refused to fetch"] if "example.com" not in url and "nohost" not in url else []))


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.1", "10.0.0.1", "172.16.5.4", "192.168.1.1",
                                     "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255",
                                     "240.0.0.1", "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:10.0.0.1",
                                     "2002:7f00:1::", "64:ff9b::a00:1"])  # fmt: skip
def test_address_checker_refuses_non_public_addresses(address):
    assert address_refusal(address) is not None
    with pytest.raises(ServeError) as e:
        check_address(address)
    assert e.value.status == 400 and "refused" in e.value.message


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_address_checker_accepts_public_addresses(address):
    assert address_refusal(address) is None


def test_every_resolved_address_must_be_public():
    assert resolve_public("example.com", 80, lambda h, p: ["93.184.216.34"]) == ["93.184.216.34"]
    with pytest.raises(ServeError, match="10.0.0.7"):  # one private answer among public ones is enough to refuse
        resolve_public("example.com", 80, lambda h, p: ["93.184.216.34", "10.0.0.7"])
    with pytest.raises(ServeError, match="no addresses"):
        resolve_public("example.com", 80, lambda h, p: [])

    def fails(host, port):
        raise OSError("Name or service not known")

    with pytest.raises(ServeError, match="cannot resolve"):
        asyncio.run(fetch_url("http://nowhere.invalid/x.png", max_bytes=100, timeout_s=1, resolver=fails))


@pytest.mark.parametrize(
    "body, status, words",
    [(b"{not json", 400, ["not valid JSON"]), (b'{"query": 5}', 422, ["query"]), (b'{"k": 3}', 422, ["query"]),
     (b'{"query": "a", "k": "3"}', 422, ["k"]), (b'{"query": "a", "extra": 1}', 422, ["extra"]),
     (b'{"query": "   "}', 422, ["empty"]), (b'["a"]', 422, []), (b"", 422, []), (b"null", 422, []),
     (json.dumps({"query": "x" * 1001}).encode(), 422, ["1000"])],
)  # fmt: skip
def test_malformed_text_requests_are_4xx_json(client, body, status, words):
    _assert_error(client.post("/api/search/text", content=body, headers={"content-type": "application/json"}),
                  status, *words)  # fmt: skip


def test_malformed_form_requests_are_4xx_json(client):
    no_boundary = {"content-type": "multipart/form-data"}
    _assert_error(client.post("/api/search/image", content=b"--b\r\nxx", headers=no_boundary), 400, "boundary")
    _assert_error(client.post("/api/search/image", data={"k": "many", "key": "red"}), 422, "k")
    _assert_error(client.post("/api/search/image", data={"key": "no-such-key"}), 404, "unknown key")
    _assert_error(client.post("/api/search/image", data={"key": "red", "url": "http://x.org/a.png"}), 422, "exactly one")
    _assert_error(client.post("/api/search/image"), 422, "exactly one")
    _assert_error(client.post("/api/search/image", data={"file": "not a file"}), 422)
    _assert_error(client.get("/api/nothing-here"), 404)
    _assert_error(client.get("/api/search/text"), 405)
    _assert_error(client.post("/api/search/text", content=b"query=a", headers={"content-type": "text/plain"}), 422)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="max_k"):
        ServeSettings(max_k=0)
    with pytest.raises(ValueError, match="url_timeout_s"):
        ServeSettings(url_timeout_s=0)
    with pytest.raises(ValueError, match="queue=-1"):
        ServeSettings(queue=-1)
    for name in ("queue_timeout_s", "header_timeout_s", "keep_alive_s"):
        with pytest.raises(ValueError, match=name):
            ServeSettings(**{name: 0})
    with pytest.raises(ValueError, match="max_connections"):
        ServeSettings(max_connections=0)
    assert ServeSettings(queue=0).queue == 0  # no queue: refuse at once


@pytest.fixture
def local_http_server():
    """A loopback HTTP server: /ok.png (an image), /big (2000 bytes), /redirect, /missing; records Host headers."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hosts = []
    image = png_bytes(COLOURS["green"])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hosts.append(self.headers["Host"])
            status, headers, body = {"/ok.png": (200, {}, image), "/big": (200, {}, b"x" * 2000),
                                     "/redirect": (302, {"Location": "http://127.0.0.1/ok.png"}, b"")}.get(
                                         self.path, (404, {}, b"no"))  # fmt: skip
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], hosts, image
    server.shutdown()
    server.server_close()


def test_fetch_connects_to_the_checked_address_with_a_size_cap(local_http_server, monkeypatch):
    port, hosts, image = local_http_server
    checked = []
    monkeypatch.setattr("clipworks.serve.urls.check_address", checked.append)  # let loopback stand in for the web
    pinned = lambda host, p: ["127.0.0.1"]  # noqa: E731  (the resolver's answer is what gets connected to)
    fetch = lambda path, cap=1000: asyncio.run(fetch_url(f"http://images.example:{port}{path}", max_bytes=cap,  # noqa: E731
                                                         timeout_s=5, resolver=pinned))  # fmt: skip
    assert fetch("/ok.png") == image
    assert hosts == [f"images.example:{port}"] and checked == ["127.0.0.1"]
    with pytest.raises(ServeError, match="more than the limit of 1000") as e:
        fetch("/big")
    assert e.value.status == 413
    with pytest.raises(ServeError, match="redirects are not followed"):
        fetch("/redirect")
    assert len(hosts) == 3  # the redirect target was not requested
    with pytest.raises(ServeError, match="HTTP 404"):
        fetch("/missing")
