"""The search service as a FastAPI app: JSON API, image files, the web page; every error a JSON 4xx."""

from __future__ import annotations

import json
import re
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

try:
    from fastapi import FastAPI, File, Form, Request, UploadFile
except ImportError as e:
    raise ImportError("the search service needs FastAPI: pip install 'clipworks[search]'") from e
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .files import open_image_file, read_tar_member
from .limits import BodySizeLimit, ServeError, ServeSettings
from .observability import METRICS_PATH, Metrics, Observability
from .openai_api import OPENAI_PREFIX, add_embeddings_api, openai_error_body
from .ranking import SearchOptions
from .safety import SafetyFilter
from .schemas import (CollectionsResponse, EmbedRequest, EmbedResponse, ErrorResponse, HealthResponse, SearchResponse,
                      TextSearchRequest, VectorSearchRequest)  # fmt: skip
from .service import Collection, ImageQuery, Service

if TYPE_CHECKING:
    from ..search.index import SearchIndex

__all__ = ["create_app", "STATIC_DIR"]

STATIC_DIR = Path(__file__).parent / "static"
ERRORS: dict = {code: {"model": ErrorResponse} for code in (400, 404, 408, 413, 415, 422, 503, 504)}
# The page loads only its own files: no CDN, no inline script, no framing.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
               "frame-ancestors 'none'; form-action 'none'")  # fmt: skip
# What each endpoint that takes form fields accepts, for the messages that refuse anything else.
IMAGE_FIELDS = ("file", "key", "url", "k", "collection", "filters", "offset", "dedup", "safe", "aesthetic_weight",
                "min_aesthetic")  # fmt: skip
CAPTION_FIELDS = ("file", "key", "url", "k", "collection", "offset")
IMAGE_ACCEPTS = ("form fields file, key or url, and k, collection, filters, offset, dedup, safe, aesthetic_weight, "
                 "min_aesthetic (multipart/form-data to upload a file)")  # fmt: skip
EMBED_FIELDS = ("text", "file", "url")
EMBED_ACCEPTS = ('form fields text, file or url (multipart/form-data to upload a file), or a JSON object with '
                 '"text" or "url"')  # fmt: skip
# /api/embed also reads a JSON body; its schema joins the form's in /openapi.json.
EMBED_JSON = {"requestBody": {"content": {"application/json": {"schema": EmbedRequest.model_json_schema()}}}}
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
JSON_BODIES = {"/api/search/text": TextSearchRequest, "/api/search/vector": VectorSearchRequest}  # for the messages that refuse a body
# `<_io.BytesIO object at 0x7f...>`: a Python repr, which no message the service sends may hold (issue 17).
_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")
_CLASS_REPR = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>")  # `<class 'str'>`: the name alone


def create_app(
    index: SearchIndex | None = None,
    model: Any = None,
    preprocess: Callable | None = None,
    tokenizer: Callable | None = None,
    settings: ServeSettings | None = None,
    captions: SearchIndex | None = None,
    *,
    collections: list[Collection] | None = None,
    model_name: str | None = None,
    safety: SafetyFilter | None = None,
) -> FastAPI:
    """The search service over one collection (`index`, with the caption bank `captions` for image-to-text
    search), several (`collections`), or none (`model` alone: /v1/embeddings and /api/embed only).

    Args:
        index: the image index (`clipworks.search.load_index`, or a Milvus/LanceDB store), built with embeddings
            of `model`; it is the collection named "default".
        model: the CLIP model that embeds queries; `preprocess` its image transform, `tokenizer` its tokenizer.
        settings: limits and options (default `ServeSettings()`).
        captions: an index of caption embeddings of the same model, or None.
        collections: several collections (each with its model; the first is the default), instead of `index`.
        model_name: the name /v1/embeddings knows `model` by when there is no `index` (default: "clip").
        safety: the safety filter of search results (`serve.safety.SafetyFilter`), or None.

    Raises:
        ValueError: a model's embedding size differs from its index's, the image roots are unusable, or two
            collections share a name.
    """
    settings = settings or ServeSettings()
    collections = list(collections or ())
    models = []
    if index is not None:
        collections.insert(0, Collection("default", index, model, preprocess, tokenizer, captions))
    elif model is not None:
        models.append((model_name or "clip", model, preprocess, tokenizer))
    service = Service(collections, settings, models, safety)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    # no /docs or /redoc: those pages load their scripts from a CDN (the schema is at /openapi.json)
    app = FastAPI(title="clipworks search", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    app.state.metrics = metrics = Metrics(service)
    _add_error_handlers(app)
    _add_search_api(app, service)
    _add_api(app, service)
    add_embeddings_api(app, service)
    _add_page(app, metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(Observability, metrics=metrics)  # outermost: it sees the 413s and 408s above too
    return app


async def _image_query(file: UploadFile | None, key: str | None, url: str | None) -> ImageQuery:
    data = None if file is None else await file.read()
    name = None if file is None else file.filename  # what messages call the upload
    return ImageQuery(data=data, key=key or None, url=url or None, name=name or None)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(request: Request) -> bool:
    kind = _content_type(request)
    return kind == "application/json" or kind.endswith("+json")


async def _check_form(request: Request, accepted: tuple[str, ...], accepts: str) -> None:
    """`ServeError` for a body an endpoint of form fields cannot read: another content type (415), or form fields
    it does not know (422); `accepts` says what it takes."""
    path = request.url.path
    if _content_type(request) not in FORM_TYPES:
        if await request.body():
            what = "JSON" if _is_json(request) else f"a {_content_type(request) or 'untyped'} body"
            raise ServeError(415, f"{path} takes {accepts}, not {what}")
        return
    unknown = [name for name in (await request.form()).keys() if name not in accepted]
    if unknown:
        names = ", ".join(json.dumps(n[:100]) for n in dict.fromkeys(unknown))
        raise ServeError(422, f"unknown form field{'s' if len(unknown) > 1 else ''} {names}; {path} accepts {accepts}")


async def _embed_json(request: Request) -> EmbedRequest:
    """The JSON body of /api/embed, or `ServeError` naming what is wrong and the keys it accepts."""
    from pydantic import ValidationError

    try:
        return EmbedRequest.model_validate_json(await request.body())
    except ValidationError as e:
        errors = e.errors()
    accepts = f"/api/embed accepts {EMBED_ACCEPTS}"
    invalid = next((err for err in errors if err["type"] == "json_invalid"), None)
    if invalid is not None:
        detail = invalid.get("ctx", {}).get("error", "")
        raise ServeError(400, f"the request body is not valid JSON ({detail}); {accepts}")
    unknown = [str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden" and err["loc"]]
    if unknown:
        names = ", ".join(json.dumps(n[:100]) for n in unknown[:10])
        raise ServeError(422, f"unknown key{'s' if len(unknown) > 1 else ''} {names} in the JSON body; {accepts}")
    if any(not err["loc"] for err in errors):  # the body is not an object
        raise ServeError(422, f"the JSON body is not an object; {accepts}")
    parts = [f"{json.dumps(str(err['loc'][0]))}: {err['msg']}" for err in errors[:5]]
    raise ServeError(422, f"invalid JSON body: {'; '.join(parts)}; {accepts}")


def _form_dedup(value: str | None) -> bool | float | None:
    if value is None or value.strip().lower() in ("", "false", "0", "off", "no"):
        return None
    if value.strip().lower() in ("true", "on", "yes"):
        return True
    try:
        return float(value)
    except ValueError:
        raise ServeError(422, f"dedup={value[:40]!r}: expected true, false or a cosine similarity in (0, 1]") from None


def _add_search_api(app: FastAPI, service: Service) -> None:
    def options(collection, body) -> SearchOptions:
        return service.options(collection, k=body.k, offset=body.offset, filters=body.filters, dedup=body.dedup,
                               safe=body.safe, aesthetic_weight=body.aesthetic_weight,
                               min_aesthetic=body.min_aesthetic)  # fmt: skip

    @app.post("/api/search/text", response_model=SearchResponse, responses=ERRORS)
    async def search_text(body: TextSearchRequest) -> dict:
        """Images that match a text query, best first."""
        collection = service.collection(body.collection)
        query, opts = service.check_text(body.query), options(collection, body)

        async def work() -> dict:
            features = await service.text_features(query, collection.slot)
            return await service.search(collection, features, opts)

        return await service.limited(work)

    @app.post("/api/search/vector", response_model=SearchResponse, responses=ERRORS)
    async def search_vector(body: VectorSearchRequest) -> dict:
        """Images nearest a raw embedding (normalised here), best first."""
        collection = service.collection(body.collection)
        vector, opts = service.check_vector(body.vector, collection), options(collection, body)
        return await service.search(collection, vector, opts)

    @app.post("/api/search/image", response_model=SearchResponse, responses=ERRORS)
    async def search_image(request: Request, file: UploadFile | None = File(None), key: str | None = Form(None),
                           url: str | None = Form(None), k: int | None = Form(None),
                           collection: str | None = Form(None), filters: str | None = Form(None),
                           offset: int | None = Form(None), dedup: str | None = Form(None),
                           safe: bool | None = Form(None), aesthetic_weight: float | None = Form(None),
                           min_aesthetic: float | None = Form(None)) -> dict:  # fmt: skip
        """Images like the one given: an upload (`file`), an indexed image (`key`) or, if enabled, a `url`."""
        await _check_form(request, IMAGE_FIELDS, IMAGE_ACCEPTS)
        found = service.collection(collection)
        opts = service.options(found, k=k, offset=offset, filters=filters, dedup=_form_dedup(dedup), safe=safe,
                               aesthetic_weight=aesthetic_weight, min_aesthetic=min_aesthetic)  # fmt: skip
        query = await _image_query(file, key, url)

        async def work() -> dict:
            return await service.search(found, await service.image_features(query, found), opts)

        return await service.limited(work)

    @app.post("/api/search/image-to-text", response_model=SearchResponse, responses=ERRORS)
    async def search_image_to_text(request: Request, file: UploadFile | None = File(None),
                                   key: str | None = Form(None), url: str | None = Form(None),
                                   k: int | None = Form(None), collection: str | None = Form(None),
                                   offset: int | None = Form(None)) -> dict:  # fmt: skip
        """Captions from the collection's caption bank that describe the image given (as for /api/search/image)."""
        await _check_form(request, CAPTION_FIELDS, IMAGE_ACCEPTS)
        found = service.collection(collection)
        found.caption_bank()  # 404 before any work
        opts = replace(service.options(found, k=k, offset=offset), safe=False)
        query = await _image_query(file, key, url)

        async def work() -> dict:
            return await service.search(found, await service.image_features(query, found), opts, captions=True)

        return await service.limited(work)


def _collection_info(service: Service, c) -> dict:
    kinds = c.column_kinds
    return {"name": c.name, "model": c.store.model, "dim": c.store.dim, "kind": str(c.store.manifest.get("kind")),
            "modality": str(c.store.manifest.get("modality") or "image"),
            "images": len(c.store), "captions": None if c.captions is None else len(c.captions), "columns": kinds,
            "aesthetic": "aesthetic" in kinds, "default": c is service.default}  # fmt: skip


def _add_api(app: FastAPI, service: Service) -> None:
    settings = service.settings

    @app.get("/api/health", response_model=HealthResponse)
    def health() -> dict:
        """The models, the default collection's sizes and the limits."""
        default, slot = service.default, service.model_slot(None)
        return {"status": "ok", "model": slot.name, "dim": slot.dim,
                "images": None if default is None else len(default.store),
                "captions": None if default is None or default.captions is None else len(default.captions),
                "collections": list(service.collections), "models": list(service.slots),
                "safety": service.safety is not None, "max_k": settings.max_k,
                "max_body_bytes": settings.max_body_bytes, "allow_urls": settings.allow_urls,
                "int8": slot.int8, "precision": slot.precision}  # fmt: skip

    @app.get("/api/collections", response_model=CollectionsResponse)
    def collections() -> dict:
        """The collections this server searches, the default first."""
        return {"collections": [_collection_info(service, c) for c in service.collections.values()]}

    @app.post("/api/embed", response_model=EmbedResponse, responses=ERRORS, openapi_extra=EMBED_JSON)
    async def embed(request: Request, text: str | None = Form(None), file: UploadFile | None = File(None),
                    url: str | None = Form(None)) -> dict:  # fmt: skip
        """The embedding of a `text`, or of an image (`file` upload or, if enabled, `url`), by the default
        collection's model: form fields, or a JSON object with "text" or "url"."""
        if _is_json(request):
            body = await _embed_json(request)
            text, url = body.text, body.url
        else:
            await _check_form(request, EMBED_FIELDS, EMBED_ACCEPTS)
        if text is None and file is None and not url:
            raise ServeError(422, f"nothing to embed: /api/embed accepts {EMBED_ACCEPTS}")
        slot = service.model_slot(None)
        if text is not None:
            if file is not None or url:
                raise ServeError(422, "give either text or an image (file or url), not both")
            text = service.check_text(text)
            features = await service.limited(lambda: service.text_features(text, slot))
        else:
            query = await _image_query(file, None, url)
            features = await service.limited(lambda: service.image_features(query, service.default, slot))
        modality = "text" if text is not None else "image"
        return {"model": slot.name, "modality": modality, "embedding": features[0].tolist()}

    @app.get("/api/image/{key:path}", response_class=StreamingResponse, responses=ERRORS)
    def image(key: str, collection: str | None = None) -> StreamingResponse:
        """The image file of a collection's key (only files inside the collection's roots)."""
        found = service.collection(collection)
        record = service.record(found, key)
        headers = {"Cache-Control": "private, max-age=3600"}
        if record.get("member"):  # an image inside a WebDataset tar
            data, media_type = read_tar_member(record.get("path"), record["member"], found.roots)
            return Response(data, media_type=media_type, headers=headers)
        file, media_type, size = open_image_file(record.get("path"), found.roots)
        headers["Content-Length"] = str(size)
        return StreamingResponse(_chunks(file), media_type=media_type, headers=headers)


def _add_page(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get(METRICS_PATH, include_in_schema=False)
    def prometheus() -> Response:
        body, media_type = metrics.render()
        return Response(body, media_type=media_type)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _chunks(file, size: int = 1 << 16):
    """A file's bytes in chunks, closing it at the end (or when the client goes away)."""
    with file:
        while chunk := file.read(size):
            yield chunk


def _error(status: int, message: str, headers: dict | None = None, request: Request | None = None) -> JSONResponse:
    # a library's message may name a Python object (Pillow names the buffer it read): never shown to the user
    message = _CLASS_REPR.sub(r"\1", _OBJECT_REPR.sub("", message))
    if request is not None and request.url.path.startswith(OPENAI_PREFIX):
        return JSONResponse(openai_error_body(status, message), status_code=status, headers=headers)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError, path: str) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, f"the request body is not valid JSON: {detail}".rstrip(": ")
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        message = e.get("msg", "invalid")
        if "Expected UploadFile" in message:  # a form part without a file name arrives as text
            message = "expected an uploaded file (a multipart/form-data part with a file name)"
        parts.append(f"{where}: {message}")
    if path in JSON_BODIES:
        fields = JSON_BODIES[path].model_fields  # the required ones first
        names = sorted(fields, key=lambda name: not fields[name].is_required())
        parts.append(f"{path} accepts a JSON object with {', '.join(map(json.dumps, names))}")
    return 422, "invalid request: " + "; ".join(parts)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(*_validation_message(exc, request.url.path), request=request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None), request)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, "internal server error", request=request)  # no traceback or message leaves the server


class SecurityHeaders:
    """ASGI middleware adding headers that keep browsers from sniffing types, framing or leaking referrers."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"content-security-policy"]
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"content-security-policy", PAGE_POLICY.encode())]  # fmt: skip
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
