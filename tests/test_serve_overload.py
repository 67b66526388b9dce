"""Slow and greedy clients: the model-slot queue, the URL fetch deadline, the header deadline, the connection cap."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from test_serve_helpers import collection, make_app  # noqa: F401 (collection is a fixture)

from clipworks.serve.limits import ModelLimiter, ServeError
from clipworks.serve.urls import fetch_url

# -- the queue in front of the model slots


def test_waiting_requests_are_served_in_order_and_a_full_queue_is_refused():
    async def main() -> None:
        limiter = ModelLimiter(1, queue=2, wait_s=60)
        await limiter.acquire()  # the one slot
        order = []

        async def wait(name: str) -> None:
            await limiter.acquire()
            order.append(name)

        first = asyncio.create_task(wait("first"))
        await asyncio.sleep(0)
        second = asyncio.create_task(wait("second"))
        await asyncio.sleep(0)
        assert limiter.waiting == 2 and not limiter.try_acquire()
        with pytest.raises(ServeError) as e:  # the fourth: the queue is full
            await limiter.acquire()
        assert e.value.status == 503 and "2 waiting" in e.value.message and e.value.headers == {"Retry-After": "1"}
        limiter.release()
        await first
        assert order == ["first"] and not second.done()
        limiter.release()
        await second
        assert order == ["first", "second"] and limiter.waiting == 0
        limiter.release()
        assert limiter.try_acquire()  # every slot came back

    asyncio.run(main())


def test_a_waiter_past_its_deadline_is_refused_and_the_slot_is_kept():
    async def main() -> None:
        limiter = ModelLimiter(1, queue=1, wait_s=0.05)
        await limiter.acquire()
        with pytest.raises(ServeError) as e:
            await limiter.acquire()
        assert e.value.status == 503 and "within 0.05 s" in e.value.message and limiter.waiting == 0
        limiter.release()
        assert limiter.try_acquire() and not limiter.try_acquire()

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_queue_and_gives_back_a_slot_handed_to_it():
    async def main() -> None:
        limiter = ModelLimiter(1, queue=2, wait_s=60)
        await limiter.acquire()
        gone = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        gone.cancel()  # cancelled while waiting
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert limiter.waiting == 0
        late = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        limiter.release()  # the slot is handed to `late`...
        late.cancel()  # ...which is cancelled before it runs: the slot must not be lost
        with pytest.raises(asyncio.CancelledError):
            await late
        assert limiter.try_acquire()

    asyncio.run(main())


def test_a_request_waits_for_a_slot_instead_of_503(collection):  # noqa: F811
    from fastapi.testclient import TestClient

    with TestClient(make_app(collection, concurrency=1, queue=1, queue_timeout_s=60)) as client:
        limiter = client.app.state.service.limiter
        assert limiter.try_acquire()  # the test holds the only slot
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(client.post("/api/search/text", json={"query": "a"})))
        waiter.start()
        _wait_until(lambda: limiter.waiting == 1)
        full = client.post("/api/search/text", json={"query": "b"})  # the queue holds one: refused at once
        assert full.status_code == 503 and full.headers["retry-after"] == "1" and "busy" in full.json()["error"]
        limiter.release()
        waiter.join(timeout=60)
        assert answers[0].status_code == 200, answers[0].text
        assert limiter.try_acquire()  # the request gave its slot back
        limiter.release()


def test_a_request_still_waiting_at_the_deadline_is_503(collection):  # noqa: F811
    from fastapi.testclient import TestClient

    with TestClient(make_app(collection, concurrency=1, queue=4, queue_timeout_s=0.1)) as client:
        limiter = client.app.state.service.limiter
        assert limiter.try_acquire()
        try:
            r = client.post("/api/search/text", json={"query": "a"})
            assert r.status_code == 503 and "within 0.1 s" in r.json()["error"] and r.headers["retry-after"] == "1"
        finally:
            limiter.release()
        assert client.post("/api/search/text", json={"query": "a"}).status_code == 200


# -- a URL that trickles


@pytest.fixture
def trickling_server():
    """A loopback server answering /body with headers and then 10 bytes every 0.1 s, and /headers with a status
    line and then one header byte every 0.1 s, for up to 20 s each; yields (port, bytes sent per path)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop, sent = threading.Event(), {"/body": 0, "/headers": 0}

    def trickle(conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request and (chunk := conn.recv(1024)):
                request += chunk
            path = request.split(b" ")[1].decode() if request.count(b" ") >= 2 else "/"
            head, piece = ((b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x" * 10) if path == "/body" else
                           (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a"))  # fmt: skip
            try:
                conn.sendall(head)
                for _ in range(200):
                    if stop.wait(0.1):
                        return
                    conn.sendall(piece)
                    sent[path] = sent.get(path, 0) + len(piece)
            except OSError:  # the client hung up
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], sent
    stop.set()
    listener.close()


@pytest.mark.parametrize("path", ["/body", "/headers"])
def test_a_trickling_url_is_cut_off_at_the_deadline(trickling_server, monkeypatch, path):
    port, sent = trickling_server
    monkeypatch.setattr("clipworks.serve.urls.check_address", lambda address: None)  # loopback stands in for the web
    start = time.monotonic()
    with pytest.raises(ServeError) as e:
        asyncio.run(fetch_url(f"http://images.example:{port}{path}", max_bytes=1 << 20, timeout_s=1,
                              resolver=lambda host, p: ["127.0.0.1"]))  # fmt: skip
    elapsed = time.monotonic() - start
    assert e.value.status == 504 and "longer than the limit of 1 s" in e.value.message
    assert sent[path] > 0  # bytes kept coming: no single read waited long enough to time out
    assert elapsed < 1 + 1.5, f"the fetch took {elapsed:.1f} s against a deadline of 1 s"


def test_a_trickling_url_frees_its_model_slot_at_the_deadline(collection, trickling_server, monkeypatch):  # noqa: F811
    from fastapi.testclient import TestClient

    port, _ = trickling_server
    monkeypatch.setattr("clipworks.serve.urls.check_address", lambda address: None)
    with TestClient(make_app(collection, allow_urls=True, url_timeout_s=1, concurrency=2)) as client:
        r = client.post("/api/search/image", data={"url": f"http://127.0.0.1:{port}/body"})
        assert r.status_code == 504 and "longer than the limit" in r.json()["error"]
        limiter = client.app.state.service.limiter
        assert limiter.try_acquire() and limiter.try_acquire()  # the slot came back
        limiter.release()
        limiter.release()


# -- connections that never finish their headers, and too many connections


@pytest.fixture
def start_server(collection):  # noqa: F811
    """Starts the app under `server_config` (uvicorn, in a thread) with the given settings; yields its port."""
    import uvicorn

    from clipworks.serve.limits import ServeSettings
    from clipworks.serve.server import server_config

    servers = []

    def start(**settings) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = make_app(collection, **settings)
        server = uvicorn.Server(server_config(app, "127.0.0.1", port, ServeSettings(**settings)))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        _wait_until(lambda: server.started or not thread.is_alive())
        assert server.started, "uvicorn did not start"
        return port

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def _connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def _read_until_closed(sock: socket.socket, limit_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after `limit_s`."""
    sock.settimeout(limit_s)
    received = b""
    with sock:
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
        except socket.timeout:
            pytest.fail(f"the server kept the connection open for {limit_s} s (received {received[:80]!r})")
    return received


def test_connections_that_never_finish_their_headers_are_closed(start_server):
    import httpx

    port = start_server(header_timeout_s=1)
    partial = [_connect(port, b"GET /api/health HTTP/1.1\r\nHost: x\r\n") for _ in range(4)]
    silent = _connect(port)
    assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=30).status_code == 200  # served meanwhile
    request = b"GET /api/health HTTP/1.1\r\nHost: x\r\nUser-Agent: a-very-slow-client\r\n\r\n"
    trickler, cut_at = _connect(port), None
    for i in range(len(request)):  # a byte every 0.1 s: 7 s in all, were the deadline an idle timeout
        try:
            trickler.sendall(request[i : i + 1])
        except OSError:
            cut_at = i
            break
        time.sleep(0.1)
    trickler.close()
    assert cut_at is not None and cut_at < len(request) - 1, "the trickled request was never cut off"
    for sock in partial:
        answer = _read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request headers not received within 1 s" in answer
    assert _read_until_closed(silent) == b""  # nothing sent: closed without an answer


def test_a_keep_alive_connection_gets_the_header_deadline_for_its_next_request(start_server):
    port = start_server(header_timeout_s=1, keep_alive_s=60)
    sock = _connect(port, b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b'"status"' not in answer or not answer.endswith(b"}"):
        chunk = sock.recv(4096)
        assert chunk, "the server closed the keep-alive connection"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    sock.sendall(b"GET /api/health HTTP/1.1\r\n")  # the next request starts, and stalls
    assert _read_until_closed(sock).startswith(b"HTTP/1.1 408 ")  # long before the 60 s keep-alive


def test_connections_past_the_cap_are_refused(start_server):
    import httpx

    port = start_server(max_connections=2, header_timeout_s=60)
    held = [_connect(port), _connect(port)]
    extra = _read_until_closed(_connect(port))
    assert extra.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in extra and b"2 connections" in extra
    for sock in held:
        sock.close()
    _wait_until(lambda: _status(httpx, port) == 200)  # once the held ones are gone, requests are served again


def _status(httpx, port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=30).status_code
    except httpx.HTTPError:  # refused at the cap: the connection closed before an answer could be read
        return None


def _wait_until(condition, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {limit_s} s")
        time.sleep(0.02)
