"""Serving the app with uvicorn, plus the two connection limits uvicorn lacks: a header deadline and a cap.

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`) and caps the header size (h11's 16 KiB),
but waits forever for the request line and headers of a connection that sends them slowly or not at all:
a thousand such connections stay open indefinitely (slowloris). `GuardedH11Protocol` closes a connection
whose headers are not complete `header_timeout_s` after its first byte (or its opening), and refuses
connections past `max_connections` at once. Bodies have their own deadline (`limits.BodySizeLimit`).
"""

from __future__ import annotations

import errno
import json
import socket
from typing import Any

try:
    import h11
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:
    raise ImportError("clipworks serve needs uvicorn: pip install 'clipworks[search]'") from e

from .limits import ServeSettings

__all__ = ["GuardedH11Protocol", "bind", "run_server", "server_config"]


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers and a cap on open connections (from
    `settings`, set on a subclass by `server_config`).

    A connection still without a complete request line and headers at the deadline is answered 408 (if it
    sent part of a request) and closed; the deadline counts from the connection's opening, or for a later
    request on a keep-alive connection from its first byte, so trickling bytes does not extend it. A
    connection past the cap is answered 503 and closed at once.
    """

    settings: ServeSettings = ServeSettings()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.settings.max_connections:  # `connections` includes this one
            self._refuse(503, "Service Unavailable", f"the server has {self.settings.max_connections} connections "
                         "open, its limit; retry shortly", b"retry-after: 1\r\n")  # fmt: skip
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._disarm()  # the headers are in: the body deadline and the app take over
        elif self._header_timer is None:  # the first bytes of a new request (uvicorn disarmed keep-alive)
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.settings.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a request arrived: say why it is dropped
            self._refuse(408, "Request Timeout", "request headers not received within "
                         f"{self.settings.header_timeout_s:g} s")  # fmt: skip
        else:  # nothing sent at all: close quietly, as an idle keep-alive connection is closed
            self.transport.close()

    def _refuse(self, status: int, reason: str, message: str, extra_headers: bytes = b"") -> None:
        # written raw: h11 cannot answer a request it has not received
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n").encode()  # fmt: skip
        self.transport.write(head + extra_headers + b"\r\n" + body)
        self.transport.close()


def server_config(app: Any, host: str, port: int, settings: ServeSettings) -> uvicorn.Config:
    """uvicorn's configuration for the service: h11 with `settings`' header deadline and connection cap,
    `settings.keep_alive_s` for idle keep-alive connections, no WebSocket upgrades."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"settings": settings})
    return uvicorn.Config(app, host=host, port=port, http=protocol, ws="none", log_level="warning",
                          timeout_keep_alive=settings.keep_alive_s)  # fmt: skip


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` (port 0: a free one), for `run_server`.

    Binding before the model loads and before the address is announced makes a port in use an OSError with one
    clear message at once, not uvicorn's log line and exit after the address was printed.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except socket.gaierror as e:
        raise OSError(f"cannot serve on {host}:{port}: unknown host ({e.strerror})") from e
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart at once after a stop
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = "; another process is using it, pick another --port" if e.errno == errno.EADDRINUSE else ""
        raise OSError(f"cannot serve on {host}:{port}: {e.strerror}{hint}") from e
    return sock


def run_server(app: Any, sock: socket.socket, settings: ServeSettings) -> None:
    """Serve `app` on a socket from `bind` until interrupted; the socket is closed at the end."""
    host, port = sock.getsockname()[:2]
    uvicorn.Server(server_config(app, host, port, settings)).run(sockets=[sock])
