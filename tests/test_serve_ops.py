"""Operations of the search service: the JSON access log, request ids, /metrics, and the Python client."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
from test_serve_helpers import COLOURS, collection, make_app, png_bytes  # noqa: F401 (collection is a fixture)

from clipworks.serve.observability import ACCESS_LOGGER


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def access_log():
    """The access log's lines, as dicts (the suite runs with `-p no:logging`: no caplog)."""
    logger, handler = logging.getLogger(ACCESS_LOGGER), _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def client(collection):  # noqa: F811
    from fastapi.testclient import TestClient

    with TestClient(make_app(collection)) as c:
        yield c


def test_access_log_line_for_a_200_and_a_4xx(client, access_log):
    ok = client.get("/api/health")
    bad = client.post("/api/search/text", json={"query": "a", "k": 0})
    client.get("/metrics")  # counted, not logged
    assert ok.status_code == 200 and bad.status_code == 422
    assert [line["path"] for line in access_log] == ["/api/health", "/api/search/text"]
    first, second = access_log
    assert set(first) == {"request_id", "method", "path", "route", "status", "duration_ms", "bytes", "client"}
    assert (first["method"], first["status"], first["route"]) == ("GET", 200, "/api/health")
    assert first["bytes"] == len(ok.content) and first["duration_ms"] >= 0 and first["client"]
    assert first["request_id"] == ok.headers["x-request-id"]
    assert (second["method"], second["status"]) == ("POST", 422)
    assert second["bytes"] == len(bad.content) and second["request_id"] == bad.headers["x-request-id"]
    assert first["request_id"] != second["request_id"]


def test_request_id_is_echoed_when_short_and_printable(client, access_log):
    assert client.get("/api/health", headers={"X-Request-Id": "trace-42.a"}).headers["x-request-id"] == "trace-42.a"
    for bad in ("x" * 65, "two words", ""):
        got = client.get("/api/health", headers={"X-Request-Id": bad}).headers["x-request-id"]
        assert got != bad and len(got) == 32
    assert access_log[0]["request_id"] == "trace-42.a"


def _samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_metrics_count_requests_by_route_template_and_status(client):
    for key in ("red", "blue", "no-such-key"):
        client.get(f"/api/image/{key}")
    assert client.post("/api/search/text", json={"query": "a red square", "k": 3}).status_code == 200
    client.get("/no/such/page")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = _samples(r.text)

    def requests(method: str, route: str, status: int) -> float:
        labels = (("method", method), ("route", route), ("status", str(status)))
        return samples.get(("clipworks_http_requests_total", labels), 0)

    assert requests("GET", "/api/image/{key:path}", 200) == 2
    assert requests("GET", "/api/image/{key:path}", 404) == 1
    assert requests("POST", "/api/search/text", 200) == 1
    assert requests("GET", "unmatched", 404) == 1
    assert not any("red" in dict(labels).get("route", "") for _, labels in samples)  # templates, not raw paths
    assert samples[("clipworks_http_request_duration_seconds_count", (("route", "/api/search/text"),))] == 1
    assert ("clipworks_http_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "/api/image/{key:path}"))) \
        in samples  # fmt: skip
    assert samples[("clipworks_batch_size_count", (("kind", "text"),))] >= 1
    assert samples[("clipworks_queue_depth", ())] == 0 and samples[("clipworks_in_flight", ())] == 0


class _Inject:
    """ASGI wrapper answering the next statuses queued for a path before letting requests through; counts them."""

    def __init__(self, app) -> None:
        self.app, self.plan, self.calls = app, {}, []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.calls.append(scope["path"])
            queued = self.plan.get(scope["path"])
            if queued:
                status = queued.pop(0)
                body = json.dumps({"error": f"injected {status}"}).encode()
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"0")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def served(collection):  # noqa: F811
    """The app under uvicorn on 127.0.0.1 behind `_Inject`: yields (base URL, the injector)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inject = _Inject(make_app(collection))
    server = uvicorn.Server(uvicorn.Config(inject, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", inject
    server.should_exit = True
    thread.join(timeout=10)


def test_client_health_search_and_embed(served, collection):  # noqa: F811
    from clipworks.client import SearchClient

    with SearchClient(served[0], timeout=10) as client:
        assert client.health()["images"] == len(collection.index)
        assert len(client.search_text("a red square", k=3)) == 3
        assert client.search_image(png_bytes(COLOURS["blue"]), k=2)[0]["key"] == "blue"
        assert client.embed_text("a red square").shape == (collection.index.dim,)


def test_client_retries_a_503_and_never_a_4xx(served):
    from clipworks.client import ClientError, SearchClient

    url, inject = served
    client = SearchClient(url, timeout=10, retries=3, backoff_s=0)
    inject.calls.clear()
    inject.plan["/api/search/text"] = [503, 503]
    assert len(client.search_text("a", k=1)) == 1
    assert inject.calls == ["/api/search/text"] * 3  # two refused, the third served
    inject.calls.clear()
    inject.plan["/api/embed"] = [400]
    with pytest.raises(ClientError, match="injected 400") as e:
        client.embed_text("a")
    assert e.value.status == 400 and inject.calls == ["/api/embed"]
    inject.calls.clear()
    with pytest.raises(ClientError, match="k") as e:  # the service's own 422 message
        client.search_text("a", k=0)
    assert e.value.status == 422 and inject.calls == ["/api/search/text"]
    inject.plan["/api/health"] = [503, 503]
    with pytest.raises(ClientError, match="injected 503"):
        SearchClient(url, retries=1, backoff_s=0).health()  # retries spent: the last 503 is raised


def test_client_gives_up_on_an_unreachable_server():
    from clipworks.client import ClientError, SearchClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ClientError, match="cannot reach") as e:
        SearchClient(f"http://127.0.0.1:{port}", retries=1, backoff_s=0).health()
    assert e.value.status is None
