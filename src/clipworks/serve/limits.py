"""The limits a public search service needs: settings, a request-body cap, a model-work queue, upload decoding."""

from __future__ import annotations

import asyncio
import io
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from PIL import Image

from ..data.decode import ImageDecodeError, load_image

if TYPE_CHECKING:
    import torch

__all__ = ["ServeSettings", "ServeError", "BodySizeLimit", "ModelLimiter", "decode_upload", "preprocess_upload"]

MIB = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    """What the service accepts and how much work it takes on at once."""

    max_k: int = 100
    """Most results one search may ask for; a larger k is answered 422."""
    max_body_bytes: int = 10 * MIB
    """Largest request body (and largest image fetched from a URL); larger ones are answered 413."""
    max_pixels: int = 2**25
    """Most pixels (width * height) an uploaded image may have; checked from its header, before decoding."""
    max_query_chars: int = 1000
    """Longest text query (CLIP reads 77 tokens; this only bounds the tokenizer's work)."""
    concurrency: int = 4
    """Requests doing model work at once; more wait in the queue."""
    queue: int = 64
    """Requests that wait for a model slot while all are taken, served in arrival order; one more is answered
    503 at once (0: no waiting, every request past `concurrency` is refused)."""
    queue_timeout_s: float = 5.0
    """Longest wait in the queue; a request still waiting then is answered 503."""
    max_batch: int = 32
    """Most queries the model encodes in one batch (requests that arrive while it is busy are batched)."""
    allow_urls: bool = False
    """Whether image requests may name a URL to fetch (never a loopback, private or link-local address)."""
    url_timeout_s: float = 10.0
    """Whole-download deadline of a URL fetch."""
    body_timeout_s: float = 30.0
    """Deadline for receiving a whole request body; a client sending slower is answered 408 (a trickled
    upload would otherwise hold its connection and buffer for as long as it likes)."""
    header_timeout_s: float = 10.0
    """Deadline for receiving a request's line and headers, from the connection's first byte (or its opening);
    a connection slower than that is answered 408 and closed (slowloris)."""
    keep_alive_s: float = 5.0
    """How long an idle keep-alive connection stays open between requests."""
    max_connections: int = 512
    """Most open connections; one more is answered 503 and closed."""
    max_depth: int = 1000
    """Deepest result a search may page to ("load more"): offset + k at most this."""
    max_fetch: int = 10_000
    """Most hits one search judges when results are filtered after the search (safety filter, de-duplication,
    aesthetic weighting); a page still short then ends the ranking (`more: false`)."""
    max_inputs: int = 256
    """Most inputs in one /v1/embeddings request."""
    image_roots: tuple[Path, ...] = field(default=())
    """Folders images are served from; empty: the roots recorded in the index's manifest."""

    def __post_init__(self) -> None:
        for name in ("max_k", "max_body_bytes", "max_pixels", "max_query_chars", "concurrency", "max_batch",
                     "max_connections", "queue", "max_depth", "max_fetch", "max_inputs"):  # fmt: skip
            value, least = getattr(self, name), 0 if name == "queue" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"ServeSettings.{name}={value!r}: expected an int >= {least}")
        for name in ("url_timeout_s", "body_timeout_s", "queue_timeout_s", "header_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServeSettings.{name}={getattr(self, name)!r}: expected a positive number")
        object.__setattr__(self, "image_roots", tuple(Path(r) for r in self.image_roots))


class ServeError(Exception):
    """A request the service refuses: answered with `status`, the JSON body {"error": message} and `headers`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _json_error(status: int, message: str) -> tuple[dict, dict]:
    import json

    body = json.dumps({"error": message}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}  # fmt: skip
    return start, {"type": "http.response.body", "body": body}


class BodySizeLimit:
    """ASGI middleware: refuses request bodies over `max_bytes` with 413, and bodies not received within
    `timeout_s` with 408.

    A declared Content-Length over the cap is refused before anything is read; otherwise the body is read
    and counted chunk by chunk (chunked uploads declare no length) and refused as soon as it passes the cap.
    The app then reads the buffered body, so nothing downstream ever sees more than `max_bytes`.
    """

    def __init__(self, app: Callable, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body is larger than the limit of {self.max_bytes} bytes"
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
                if length < 0:
                    raise ValueError(declared)
            except ValueError:
                await self._refuse(send, 400, f"invalid Content-Length header {declared[:40]!r}")
                return
            if length > self.max_bytes:
                await self._refuse(send, 413, too_large)
                return
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                await self._refuse(send, 408, f"request body not received within {self.timeout_s:g} s")
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    @staticmethod
    async def _refuse(send: Callable, status: int, message: str) -> None:
        start, body = _json_error(status, message)
        await send(start)
        await send(body)


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the client's disconnect, as the server would

    return replay


class ModelLimiter:
    """At most `slots` requests do model work at once; up to `queue` more wait for a slot, first come first
    served, for at most `wait_s` seconds. A request past a full queue, or still waiting at its deadline, gets
    `ServeError(503)` with a Retry-After header.

    A slot freed while requests wait passes straight to the first of them, so a newcomer cannot overtake the
    queue. Thread-safe: slots may be taken and given back from any thread (waiting happens on an event loop).
    """

    def __init__(self, slots: int, queue: int = 0, wait_s: float = 5.0) -> None:
        self.slots = slots
        self.queue = queue
        self.wait_s = wait_s
        self._free = slots
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Requests now waiting for a slot."""
        return len(self._waiters)

    @property
    def in_use(self) -> int:
        """Slots now taken (requests doing model work)."""
        return self.slots - self._free

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits; False otherwise."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            return False

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if none is free; `ServeError(503)` when the queue is full or the
        wait passes `wait_s`."""
        loop = asyncio.get_running_loop()
        waiter = (loop, loop.create_future())
        with self._lock:  # one lock for the check and the queueing: a slot freed in between is not missed
            if self._free and not self._waiters:
                self._free -= 1
                return
            queued = len(self._waiters) < self.queue
            if queued:
                self._waiters.append(waiter)
        if not queued:
            raise self._busy(f"the server is busy ({self.slots} requests in progress, {self.queue} waiting)")
        try:
            await asyncio.wait([waiter[1]], timeout=self.wait_s)  # does not cancel the future on timeout
        except BaseException:  # cancelled: leave the queue, or give back a slot handed over meanwhile
            if not self._leave(waiter):
                self.release()
            raise
        if self._leave(waiter):  # still in the queue at the deadline; otherwise release() handed it a slot
            raise self._busy(f"the server is busy: no model slot came free within {self.wait_s:g} s")

    def release(self) -> None:
        """Give back a slot: to the first waiting request, or to the free ones."""
        with self._lock:
            while self._waiters:
                loop, future = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(_wake, future)
                    return
                except RuntimeError:  # its loop is closed: nobody waits there any more
                    continue
            assert self._free < self.slots, "ModelLimiter.release() called more often than acquire()"
            self._free += 1

    def _leave(self, waiter: tuple) -> bool:
        """Take `waiter` out of the queue; False when `release` already took it out (and gave it a slot)."""
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                return True
            return False

    @staticmethod
    def _busy(reason: str) -> ServeError:
        return ServeError(503, f"{reason}; retry shortly", headers={"Retry-After": "1"})


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded image as RGB, or `ServeError`: 413 over `max_pixels` (read from the header, before any
    pixel is decoded), 422 for an empty, broken or unsupported file."""
    _check_upload(data, max_pixels)
    try:
        return load_image(data, max_pixels=max_pixels)
    except ImageDecodeError as e:
        raise ServeError(422, f"unreadable image: {e}") from e


def preprocess_upload(data: bytes, max_pixels: int, preprocess: Callable) -> torch.Tensor:
    """`preprocess(decode_upload(data, max_pixels))`, with the same errors (`transforms.preprocess_file`:
    an `EvalTransform` takes JPEG photos by its faster exact route, the same tensor)."""
    from ..transforms import preprocess_file

    _check_upload(data, max_pixels)
    try:
        return preprocess_file(preprocess, data, max_pixels=max_pixels)
    except ImageDecodeError as e:
        raise ServeError(422, f"unreadable image: {e}") from e


def _check_upload(data: bytes, max_pixels: int) -> None:
    if not data:
        raise ServeError(422, "the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as header:  # lazy: reads the size, decodes nothing
            width, height = header.size
    except Image.DecompressionBombError as e:
        raise ServeError(413, f"the image has more pixels than the limit of {max_pixels}: {e}") from e
    except Exception:  # Pillow's plugins raise many types on hostile headers; load_image names the problem below
        width = height = 0
    if width * height > max_pixels:
        raise ServeError(413, f"the image is {width}x{height} = {width * height} pixels, more than the limit "
                              f"of {max_pixels}")  # fmt: skip
