"""Operations of the search service: a JSON access log line per request, request ids and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import IO, TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .service import Service

__all__ = ["ACCESS_LOGGER", "Metrics", "Observability", "configure_access_log", "request_id"]

ACCESS_LOGGER = "clipworks.serve.access"
METRICS_PATH = "/metrics"
# A client's own X-Request-Id is kept when short and printable ASCII without spaces; anything else is replaced,
# so a log line never carries a client's control characters or a megabyte of header.
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,64}")
_log = logging.getLogger(ACCESS_LOGGER)


def configure_access_log(stream: IO[str] | None = None) -> logging.Handler:
    """Print the access log's JSON lines, one per request, to `stream` (default stderr); returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False  # the lines are already JSON: no second copy through a root handler's format
    return handler


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The request's id: its X-Request-Id header if short and printable, else a new random one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if _CLIENT_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def route_template(scope: dict) -> str:
    """The route that served a request, as declared (`/api/image/{key:path}`), never the raw path: a metric
    label per image key would grow without bound."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is not None:
        return path or "/"
    return "unmatched"


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (each app has one; tests create many).

    Args:
        service: the service whose limiter queue and batchers are observed (None: requests only).
    """

    def __init__(self, service: Service | None = None) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as e:
            raise ImportError("the /metrics endpoint needs prometheus_client: pip install 'clipworks[search]'") from e
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("clipworks_http_requests", "HTTP requests answered, by route template and status",
                                ("method", "route", "status"), registry=self.registry)  # fmt: skip
        self.latency = Histogram("clipworks_http_request_duration_seconds", "Time to answer a request, by route",
                                 ("route",), registry=self.registry)  # fmt: skip
        self.batch_size = Histogram("clipworks_batch_size", "Queries the model encoded in one batch", ("kind",),
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)  # fmt: skip
        if service is None:
            return
        limiter = service.limiter
        Gauge("clipworks_queue_depth", "Requests waiting for a model slot",
              registry=self.registry).set_function(lambda: limiter.waiting)  # fmt: skip
        Gauge("clipworks_in_flight", "Requests doing model work now",
              registry=self.registry).set_function(lambda: limiter.in_use)  # fmt: skip
        for slot in service.slots.values():
            for kind, batcher in (("text", slot.text_batcher), ("image", slot.image_batcher)):
                batcher.on_batch = self.batch_size.labels(kind).observe

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Observability:
    """ASGI middleware: gives each request an id (answered as X-Request-Id), counts it in `metrics`, and writes
    one JSON line on the `clipworks.serve.access` logger when it is answered.

    /metrics itself is counted but not logged: a scraper polling it every few seconds would otherwise fill the
    log with lines that say nothing about the service's users.
    """

    def __init__(self, app: Callable, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, rid = time.perf_counter(), request_id(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = rid
        sent = {"status": 500, "bytes": 0}  # 500 unless a response starts: an exception escaped the app

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, rid, sent, time.perf_counter() - start)

    def _record(self, scope: dict, rid: str, sent: dict, seconds: float) -> None:
        route = route_template(scope)
        if self.metrics is not None:
            self.metrics.observe(scope["method"], route, sent["status"], seconds)
        if scope["path"] == METRICS_PATH or not _log.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        line = {"request_id": rid, "method": scope["method"], "path": scope["path"][:1000], "route": route,
                "status": sent["status"], "duration_ms": round(seconds * 1000, 3), "bytes": sent["bytes"],
                "client": None if not client else f"{client[0]}:{client[1]}"}  # fmt: skip
        _log.info(json.dumps(line))

