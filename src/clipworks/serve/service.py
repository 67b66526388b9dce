"""The search service's work, apart from HTTP: encode a query, search an index, turn hits into results."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar
from urllib.parse import quote

import numpy as np
from starlette.concurrency import run_in_threadpool

from .batching import Batcher
from .files import collection_roots, media_type_of, resolve_image_file
from .limits import ModelLimiter, ServeError, ServeSettings, preprocess_upload
from .urls import fetch_url

if TYPE_CHECKING:
    from ..search.index import Hit, SearchIndex

__all__ = ["DEFAULT_K", "Encoder", "ImageQuery", "Service"]

DEFAULT_K = 10
T = TypeVar("T")


class Encoder:
    """A CLIP model with its image transform and tokenizer, giving unit-norm float32 features."""

    def __init__(self, model: Any, preprocess: Callable, tokenizer: Callable) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def text(self, texts: list[str]) -> np.ndarray:
        """(N, E) features of `texts`."""
        import torch

        with torch.inference_mode():
            features = self.model.encode_text(self.tokenizer(texts).to(self._device()), normalize=True)
        return features.float().cpu().numpy()

    def pixels(self, pixels: list) -> np.ndarray:
        """(N, E) features of preprocessed images, each a (3, H, W) tensor from `preprocess`."""
        import torch

        with torch.inference_mode():
            batch = torch.stack(pixels).to(self._device())  # (N, 3, H, W)
            features = self.model.encode_image(batch, normalize=True)
        return features.float().cpu().numpy()

    def image(self, images: list) -> np.ndarray:
        """(N, E) features of RGB PIL images."""
        return self.pixels([self.preprocess(im) for im in images])

    def _device(self):
        return next(self.model.parameters()).device  # `clipworks serve --device`: inputs go where the model is


@dataclass(frozen=True)
class ImageQuery:
    """An image given one of three ways: uploaded bytes, the key of an indexed image, or a URL; `name` is the
    upload's file name, for messages."""

    data: bytes | None = None
    key: str | None = None
    url: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("data", "key", "url") if getattr(self, name) is not None]
        if len(given) != 1:
            names = " and ".join(given) if given else "none"
            raise ServeError(422, f"give exactly one of file, key or url (got {names})")


def _label(query: ImageQuery) -> str:
    """What messages call the image of a query: the upload's file name, or the URL it came from."""
    if query.url is not None:
        return f"the image at {query.url[:200]!r}"
    return "the uploaded file" + (f" {query.name[:200]!r}" if query.name else "")


class Service:
    """The indexes, the encoder and the limits behind the HTTP API."""

    def __init__(self, index: SearchIndex, encoder: Encoder, settings: ServeSettings,
                 captions: SearchIndex | None = None) -> None:  # fmt: skip
        if captions is not None and captions.dim != index.dim:
            raise ValueError(f"the caption bank has dimension {captions.dim}, the image index {index.dim}")
        if settings.allow_urls and importlib.util.find_spec("httpx") is None:
            raise ImportError("fetching images from URLs (--allow-urls) needs httpx: pip install httpx")
        self.index = index
        self.captions = captions
        self.encoder = encoder
        self.settings = settings
        self.limiter = ModelLimiter(settings.concurrency, settings.queue, settings.queue_timeout_s)
        self.roots = collection_roots(settings.image_roots, index.manifest)
        self.text_batcher = Batcher(encoder.text, settings.max_batch, name="clipworks-text")
        self.image_batcher = Batcher(encoder.pixels, settings.max_batch, name="clipworks-image")

    def close(self) -> None:
        """Stop the model worker threads."""
        self.text_batcher.close()
        self.image_batcher.close()

    async def limited(self, work: Callable[[], Awaitable[T]]) -> T:
        """Await `work()` inside a limiter slot, waiting in its queue if none is free; `ServeError(503)` when
        the queue is full or the wait passes its deadline."""
        await self.limiter.acquire()
        try:
            return await work()
        finally:
            self.limiter.release()

    async def text_features(self, text: str) -> np.ndarray:
        """(1, E) features of `text`, encoded in a batch with concurrent requests."""
        return (await self.text_batcher.run(text))[None]

    async def image_features(self, query: ImageQuery) -> np.ndarray:
        """(1, E) features of the image a query names: a stored vector, or the decoded image encoded in a
        batch with concurrent requests (decoding and preprocessing run in a worker thread)."""
        data = query.data
        if query.url is not None:
            if not self.settings.allow_urls:
                raise ServeError(400, "fetching images from URLs is disabled on this server (start it with "
                                      "--allow-urls); upload the image instead")  # fmt: skip
            data = await fetch_url(query.url, max_bytes=self.settings.max_body_bytes,
                                   timeout_s=self.settings.url_timeout_s)  # fmt: skip
        prepared = await run_in_threadpool(self._prepare_image, query.key, data, _label(query))
        if isinstance(prepared, np.ndarray):
            return prepared
        return (await self.image_batcher.run(prepared))[None]

    async def search(self, index: SearchIndex, features: np.ndarray, k: int) -> list[dict]:
        """JSON-ready results of searching `index`, in a worker thread (a large index takes a while, and each
        result's file is checked)."""
        images = index is self.index  # /api/image/{key} serves the image index's keys only
        return await run_in_threadpool(lambda: self.results(index.search(features, k)[0], images=images))

    def check_k(self, k: int | None) -> int:
        """`k` (None: 10, or max_k if smaller), or `ServeError(422)` when it is not in [1, max_k]."""
        if k is None:
            return min(DEFAULT_K, self.settings.max_k)
        if not 1 <= k <= self.settings.max_k:
            raise ServeError(422, f"k={k} is out of range: expected 1 <= k <= {self.settings.max_k}")
        return k

    def check_text(self, text: str) -> str:
        """`text` stripped, or `ServeError(422)` when empty or too long."""
        text = text.strip()
        if not text:
            raise ServeError(422, "the query is empty")
        if len(text) > self.settings.max_query_chars:
            raise ServeError(422, f"the query has {len(text)} characters, more than the limit of "
                                  f"{self.settings.max_query_chars}")  # fmt: skip
        return text

    def caption_bank(self) -> SearchIndex:
        """The caption index, or `ServeError(404)` when the server has none."""
        if self.captions is None:
            raise ServeError(404, "this server has no caption bank (start it with --captions CAPTION_INDEX)")
        return self.captions

    def record(self, key: str) -> dict:
        """The image index's record of `key`, or `ServeError(404)`."""
        try:
            return self.index.record(key)
        except (KeyError, ValueError) as e:
            raise ServeError(404, f"unknown key {key[:200]!r}") from e

    def _prepare_image(self, key: str | None, data: bytes | None, label: str = "the uploaded file"):
        """A stored (1, E) vector for a key, else the image's bytes decoded and preprocessed (3, H, W); messages
        call the image `label`."""
        if key is not None:
            self.record(key)  # 404 for an unknown key
            return np.asarray(self.index.vector(key), dtype=np.float32).reshape(1, -1)
        try:
            return preprocess_upload(data, self.settings.max_pixels, self.encoder.preprocess)
        except ServeError as e:  # the decoder names bytes by their count ("cannot read image <123 bytes>: ...")
            size = f"<{len(data or b'')} bytes>"
            message = e.message.replace(f"image {size}", label).replace(size, label)
            raise ServeError(e.status, message, e.headers) from e

    def results(self, hits: list[Hit], images: bool = True) -> list[dict]:
        """JSON-ready results: key, score, caption, and (with `images`) the image URL when the item has a file
        that is served."""
        return [{"key": h.key, "score": round(float(h.score), 6), "caption": h.caption,
                 "image": f"/api/image/{quote(h.key, safe='')}" if images and self._servable(h) else None}
                for h in hits]  # fmt: skip

    def _servable(self, hit: Hit) -> bool:
        try:
            resolve_image_file(hit.path, self.roots, any_type=bool(hit.member))
            if hit.member:
                media_type_of(hit.member)
        except ServeError:
            return False
        return True
