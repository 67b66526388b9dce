"""The search service's work, apart from HTTP: encode a query, search an index, turn hits into results."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar
from urllib.parse import quote

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..models.quant import is_quantized
from ..search.filters import FilterError, check_conditions, parse_filter_string, parse_filters
from .batching import Batcher
from .files import collection_roots, media_type_of, resolve_image_file
from .limits import ModelLimiter, ServeError, ServeSettings, preprocess_upload
from .ranking import DEFAULT_DEDUP, SearchOptions, ranked
from .safety import SafetyFilter
from .urls import fetch_url

if TYPE_CHECKING:
    from ..search.index import Hit, SearchIndex

__all__ = ["DEFAULT_K", "Collection", "Encoder", "ImageQuery", "LiveCollection", "ModelSlot", "Service"]

DEFAULT_K = 10
_COLLECTION_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
T = TypeVar("T")


class Encoder:
    """A CLIP model with its image transform and tokenizer, giving unit-norm float32 features."""

    def __init__(self, model: Any, preprocess: Callable, tokenizer: Callable) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int | None:
        """The embedding size the model's config names (None when it names none)."""
        return getattr(getattr(self.model, "config", None), "embed_dim", None)

    def text(self, texts: list[str]) -> np.ndarray:
        """(N, E) features of `texts`."""
        import torch

        with torch.inference_mode():
            features = self.model.encode_text(self.tokenizer(texts).to(self._device()), normalize=True)
        return features.float().cpu().numpy()

    def token_counts(self, texts: list[str]) -> list[int]:
        """The tokens the model reads of each text, special tokens included (after truncation)."""
        tokenize = getattr(self.tokenizer, "tokenize", None)
        if tokenize is not None:
            return [int(n) for n in tokenize(texts).lengths]
        return [int((row != 0).sum()) for row in self.tokenizer(texts)]  # an OpenCLIP-style callable: 0 pads

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

    def logit_scale(self) -> float:
        """The model's similarity scale (exp of its learned temperature; 100 when it has none)."""
        scale = getattr(self.model, "logit_scale", None)
        return 100.0 if scale is None else float(scale.detach().float().exp().cpu())

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


@dataclass
class Collection:
    """A collection the service searches: its store (a `SearchIndex`, or a Milvus/LanceDB collection with the
    same interface), the model that embeds its queries, and optionally a caption bank for image-to-text search.
    Collections given the same model object share it (one copy, one batching queue)."""

    name: str
    index: Any
    model: Any
    preprocess: Callable
    tokenizer: Callable
    captions: Any = None


@dataclass
class ModelSlot:
    """A model the server runs: its encoder, batching queues and name (the identity indexes record)."""

    name: str
    encoder: Encoder
    text_batcher: Batcher
    image_batcher: Batcher
    dim: int
    int8: bool = False
    precision: str = "fp32"

    def close(self) -> None:
        self.text_batcher.close()
        self.image_batcher.close()


@dataclass
class LiveCollection:
    """A collection as the service holds it: its store, caption bank, model slot and the folders it serves."""

    name: str
    store: Any
    captions: Any
    slot: ModelSlot
    roots: tuple

    @property
    def column_kinds(self) -> dict[str, str]:
        """The metadata columns requests may filter on, with their kinds."""
        return dict(getattr(self.store, "column_kinds", {}) or {})

    def caption_bank(self) -> Any:
        """The caption bank, or `ServeError(404)` when the collection has none."""
        if self.captions is None:
            raise ServeError(404, f"collection {self.name!r} has no caption bank (start the server with --captions "
                                  f"{self.name}=CAPTION_INDEX)")  # fmt: skip
        return self.captions


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _COLLECTION_NAME.fullmatch(name):
        raise ValueError(f"collection name {str(name)[:80]!r}: expected 1 to 64 letters, digits, '.', '_' or '-'")
    return name


class Service:
    """The collections, the models and the limits behind the HTTP API.

    Args:
        collections: what the server searches, the first being the default; may be empty (embeddings only).
        settings: limits and options.
        models: (name, model, preprocess, tokenizer) of models served without a collection (`serve --model M`
            alone: /v1/embeddings and /api/embed).
        safety: the safety filter of search results (None: none).
    """

    def __init__(self, collections: list[Collection], settings: ServeSettings,
                 models: list[tuple[str, Any, Callable, Callable]] = (), safety: SafetyFilter | None = None) -> None:  # fmt: skip
        if settings.allow_urls and importlib.util.find_spec("httpx") is None:
            raise ImportError("fetching images from URLs (--allow-urls) needs httpx: pip install httpx")
        if not collections and not models:
            raise ValueError("a server needs a collection or a model to serve")
        self.settings = settings
        self.safety = safety
        self.limiter = ModelLimiter(settings.concurrency, settings.queue, settings.queue_timeout_s)
        self.slots: dict[str, ModelSlot] = {}
        self._slot_of_model: dict[int, ModelSlot] = {}
        self.collections: dict[str, LiveCollection] = {}
        try:
            for name, model, preprocess, tokenizer in models:
                self._slot(name, model, preprocess, tokenizer, None)
            for c in collections:
                self._add(c)
        except BaseException:
            self.close()
            raise

    def _slot(self, name: str, model: Any, preprocess: Callable, tokenizer: Callable, dim: int | None) -> ModelSlot:
        slot = self._slot_of_model.get(id(model))
        if slot is None:
            if name in self.slots:
                raise ValueError(f"two different models are both named {name!r}")
            encoder = Encoder(model, preprocess, tokenizer)
            dim = encoder.dim or dim
            if dim is None:
                raise ValueError(f"model {name!r}: its embedding size is unknown (no config.embed_dim)")
            slot = ModelSlot(name, encoder, Batcher(encoder.text, self.settings.max_batch, name="clipworks-text"),
                             Batcher(encoder.pixels, self.settings.max_batch, name="clipworks-image"), int(dim),
                             is_quantized(model), getattr(model, "precision", "fp32"))  # fmt: skip
            self.slots[name] = self._slot_of_model[id(model)] = slot
        return slot

    def _add(self, c: Collection) -> None:
        name = _check_name(c.name)
        if name in self.collections:
            raise ValueError(f"two collections are named {name!r}")
        dim = getattr(getattr(c.model, "config", None), "embed_dim", None) or c.index.dim
        if dim != c.index.dim:
            raise ValueError(f"collection {name!r}: the model embeds into {dim} dimensions but the index holds "
                             f"{c.index.dim}")  # fmt: skip
        slot = self._slot(c.index.model, c.model, c.preprocess, c.tokenizer, c.index.dim)
        if c.captions is not None and c.captions.dim != c.index.dim:
            raise ValueError(f"collection {name!r}: the caption bank has dimension {c.captions.dim}, the image "
                             f"index {c.index.dim}")  # fmt: skip
        roots = collection_roots(self.settings.image_roots, c.index.manifest)
        self.collections[name] = LiveCollection(name, c.index, c.captions, slot, roots)

    @property
    def default(self) -> LiveCollection | None:
        """The first collection (requests that name none search it), or None on an embeddings-only server."""
        return next(iter(self.collections.values()), None)

    def close(self) -> None:
        """Stop the model worker threads."""
        for slot in self.slots.values():
            slot.close()

    def collection(self, name: str | None) -> LiveCollection:
        """The collection `name` (None: the default), or `ServeError(404)`."""
        if not self.collections:
            raise ServeError(404, "this server has no collections to search (it serves embeddings only; start it "
                                  "with --index NAME=DIR)")  # fmt: skip
        if name is None or name == "":
            return self.default
        found = self.collections.get(name)
        if found is None:
            raise ServeError(404, f"no collection named {name[:100]!r} (this server has: "
                                  f"{', '.join(self.collections)})")  # fmt: skip
        return found

    def model_slot(self, name: str | None) -> ModelSlot:
        """The model `name` (None: the default collection's, or the only one), or `ServeError(404)`."""
        if name is None:
            if self.default is not None:
                return self.default.slot
            return next(iter(self.slots.values()))
        slot = self.slots.get(name)
        if slot is None:
            raise ServeError(404, f"no model named {name[:100]!r} on this server (it has: {', '.join(self.slots)})")
        return slot

    async def limited(self, work: Callable[[], Awaitable[T]]) -> T:
        """Await `work()` inside a limiter slot, waiting in its queue if none is free; `ServeError(503)` when
        the queue is full or the wait passes its deadline."""
        await self.limiter.acquire()
        try:
            return await work()
        finally:
            self.limiter.release()

    async def text_features(self, text: str, slot: ModelSlot) -> np.ndarray:
        """(1, E) features of `text`, encoded in a batch with concurrent requests."""
        return (await slot.text_batcher.run(text))[None]

    async def image_features(self, query: ImageQuery, collection: LiveCollection | None,
                             slot: ModelSlot | None = None) -> np.ndarray:  # fmt: skip
        """(1, E) features of the image a query names: a stored vector of `collection`, or the decoded image
        encoded by `slot` (default: the collection's model) in a batch with concurrent requests (decoding and
        preprocessing run in a worker thread)."""
        slot = slot or collection.slot
        data = query.data
        if query.url is not None:
            data = await self.fetch(query.url)
        prepared = await run_in_threadpool(self._prepare_image, collection, slot, query.key, data, _label(query))
        if isinstance(prepared, np.ndarray):
            return prepared
        return (await slot.image_batcher.run(prepared))[None]

    async def fetch(self, url: str) -> bytes:
        """The bytes at `url` (servers started with --allow-urls), within the body size and time limits."""
        if not self.settings.allow_urls:
            raise ServeError(400, "fetching images from URLs is disabled on this server (start it with "
                                  "--allow-urls); upload the image instead")  # fmt: skip
        return await fetch_url(url, max_bytes=self.settings.max_body_bytes, timeout_s=self.settings.url_timeout_s)

    async def search(self, collection: LiveCollection, features: np.ndarray, options: SearchOptions,
                     captions: bool = False) -> dict:  # fmt: skip
        """The JSON-ready page of searching `collection` (its caption bank with `captions`), in a worker thread
        (a large index takes a while, and each result's file is checked)."""
        store = collection.caption_bank() if captions else collection.store

        def work() -> dict:
            unsafe = None
            if self.safety is not None and not captions:
                unsafe = partial(self.safety.unsafe, collection.slot.encoder)
            try:
                page = ranked(store, features, options, unsafe, max_fetch=self.settings.max_fetch)
            except FilterError as e:
                raise ServeError(422, str(e)) from e
            return {"collection": collection.name, "offset": options.offset, "more": page.more,
                    "results": self.results(collection, page.hits, images=not captions)}  # fmt: skip

        return await run_in_threadpool(work)

    def check_k(self, k: int | None) -> int:
        """`k` (None: 10, or max_k if smaller), or `ServeError(422)` when it is not in [1, max_k]."""
        if k is None:
            return min(DEFAULT_K, self.settings.max_k)
        if not 1 <= k <= self.settings.max_k:
            raise ServeError(422, f"k={k} is out of range: expected 1 <= k <= {self.settings.max_k}")
        return k

    def options(self, collection: LiveCollection, *, k: int | None, offset: int | None = None, filters: Any = None,
                dedup: bool | float | None = None, safe: bool | None = None, aesthetic_weight: float | None = None,
                min_aesthetic: float | None = None) -> SearchOptions:  # fmt: skip
        """The `SearchOptions` of a request, checked: `ServeError(422)` naming what is wrong."""
        k, offset = self.check_k(k), offset or 0
        if not 0 <= offset or offset + k > self.settings.max_depth:
            raise ServeError(422, f"offset={offset}: expected 0 <= offset and offset + k <= {self.settings.max_depth}")
        try:
            where = parse_filter_string(filters) if isinstance(filters, str) else parse_filters(filters)
            if min_aesthetic is not None:
                where += parse_filters({"aesthetic": {"gte": min_aesthetic}})
            where = check_conditions(where, collection.column_kinds)
        except FilterError as e:
            raise ServeError(422, str(e)) from e
        if dedup is True:
            dedup = DEFAULT_DEDUP
        elif dedup is False:
            dedup = None
        if dedup is not None and not 0 < dedup <= 1:
            raise ServeError(422, f"dedup={dedup}: expected true, false or a cosine similarity in (0, 1]")
        weight = aesthetic_weight or 0.0
        if weight and "aesthetic" not in collection.column_kinds:
            raise ServeError(422, f"collection {collection.name!r} has no aesthetic scores to weight by (embed it "
                                  "with --aesthetic-head)")  # fmt: skip
        if not -100 <= weight <= 100:
            raise ServeError(422, f"aesthetic_weight={weight}: expected a number in [-100, 100]")
        return SearchOptions(k, offset, where, dedup, True if safe is None else bool(safe), float(weight))

    def check_text(self, text: str) -> str:
        """`text` stripped, or `ServeError(422)` when empty or too long."""
        text = text.strip()
        if not text:
            raise ServeError(422, "the query is empty")
        if len(text) > self.settings.max_query_chars:
            raise ServeError(422, f"the query has {len(text)} characters, more than the limit of "
                                  f"{self.settings.max_query_chars}")  # fmt: skip
        return text

    def check_vector(self, vector: list, collection: LiveCollection) -> np.ndarray:
        """A query vector as a (1, D) float32 array, or `ServeError(422)`: another size, not finite, all zero."""
        v = np.asarray(vector, dtype=np.float64)
        if v.ndim != 1 or v.shape[0] != collection.store.dim:
            raise ServeError(422, f"the vector has {v.size} values; collection {collection.name!r} holds "
                                  f"{collection.store.dim}-dimensional vectors")  # fmt: skip
        if not np.isfinite(v).all() or not np.any(v):
            raise ServeError(422, "the vector must be finite and not all zero")
        return v.astype(np.float32)[None]

    def record(self, collection: LiveCollection, key: str) -> dict:
        """The record of `key` in `collection`, or `ServeError(404)`."""
        try:
            return collection.store.record(key)
        except (KeyError, ValueError) as e:
            raise ServeError(404, f"unknown key {key[:200]!r} in collection {collection.name!r}") from e

    def _prepare_image(self, collection: LiveCollection | None, slot: ModelSlot, key: str | None, data: bytes | None,
                       label: str = "the uploaded file"):  # fmt: skip
        """A stored (1, E) vector for a key, else the image's bytes decoded and preprocessed (3, H, W); messages
        call the image `label`."""
        if key is not None:
            if collection is None:
                raise ServeError(422, "a key names an image of a collection; this request has none")
            self.record(collection, key)  # 404 for an unknown key
            return np.asarray(collection.store.vector(key), dtype=np.float32).reshape(1, -1)
        return self.prepare_upload(slot, data, label)

    def prepare_upload(self, slot: ModelSlot, data: bytes | None, label: str = "the uploaded file"):
        """An image's bytes decoded and preprocessed for `slot`'s model (3, H, W); `ServeError` (4xx) for bytes
        that are not an image within the limits, calling it `label`."""
        try:
            return preprocess_upload(data, self.settings.max_pixels, slot.encoder.preprocess)
        except ServeError as e:  # the decoder names bytes by their count ("cannot read image <123 bytes>: ...")
            size = f"<{len(data or b'')} bytes>"
            message = e.message.replace(f"image {size}", label).replace(size, label)
            raise ServeError(e.status, message, e.headers) from e

    def image_url(self, collection: LiveCollection, key: str) -> str:
        """The URL of a key's image on this server (the default collection's keys need no `collection=`)."""
        url = f"/api/image/{quote(key, safe='')}"
        return url if collection is self.default else f"{url}?collection={quote(collection.name, safe='')}"

    def results(self, collection: LiveCollection, hits: list[Hit], images: bool = True) -> list[dict]:
        """JSON-ready results: key, score, caption, metadata, the aesthetic score, and (with `images`) the URL of
        the item's image when it has a file that is served."""
        out = []
        for h in hits:
            metadata = {name: _json_value(v) for name, v in (getattr(h, "metadata", None) or {}).items()}
            url = self.image_url(collection, h.key) if images and self._servable(collection, h) else None
            out.append({"key": h.key, "score": round(float(h.score), 6), "caption": h.caption, "image": url,
                        "full_image": url, "aesthetic": metadata.get("aesthetic"), "metadata": metadata})  # fmt: skip
        return out

    def _servable(self, collection: LiveCollection, hit: Hit) -> bool:
        try:
            resolve_image_file(hit.path, collection.roots, any_type=bool(hit.member))
            if hit.member:
                media_type_of(hit.member)
        except ServeError:
            return False
        return True


def _json_value(value: Any) -> Any:
    """A metadata value as JSON carries it: NaN and infinities as null, numpy scalars as Python's."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
