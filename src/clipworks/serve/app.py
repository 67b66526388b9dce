"""The search service as a FastAPI app: JSON API, image files, the web page; every error a JSON 4xx."""

from __future__ import annotations

from contextlib import asynccontextmanager
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

from ..models.quant import is_quantized
from .files import open_image_file, read_tar_member
from .limits import BodySizeLimit, ServeError, ServeSettings
from .schemas import EmbedResponse, ErrorResponse, HealthResponse, SearchResponse, TextSearchRequest
from .service import Encoder, ImageQuery, Service

if TYPE_CHECKING:
    from ..search.index import SearchIndex

__all__ = ["create_app", "STATIC_DIR"]

STATIC_DIR = Path(__file__).parent / "static"
ERRORS: dict = {code: {"model": ErrorResponse} for code in (400, 404, 408, 413, 422, 503, 504)}
# The page loads only its own files: no CDN, no inline script, no framing.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
               "frame-ancestors 'none'; form-action 'none'")  # fmt: skip


def create_app(
    index: SearchIndex,
    model: Any,
    preprocess: Callable,
    tokenizer: Callable,
    settings: ServeSettings | None = None,
    captions: SearchIndex | None = None,
) -> FastAPI:
    """The search service over `index` (and, for image-to-text search, the caption bank `captions`).

    Args:
        index: the image index (`clipworks.search.load_index`), built with embeddings of `model`.
        model: the CLIP model that embeds queries; `preprocess` its image transform, `tokenizer` its tokenizer.
        settings: limits and options (default `ServeSettings()`).
        captions: an index of caption embeddings of the same model, or None.

    Raises:
        ValueError: the model's embedding size differs from the index's, or the image roots are unusable.
    """
    settings = settings or ServeSettings()
    embed_dim = getattr(getattr(model, "config", None), "embed_dim", index.dim)
    if embed_dim != index.dim:
        raise ValueError(f"the model embeds into {embed_dim} dimensions but the index holds {index.dim}")
    service = Service(index, Encoder(model, preprocess, tokenizer), settings, captions)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    # no /docs or /redoc: those pages load their scripts from a CDN (the schema is at /openapi.json)
    app = FastAPI(title="clipworks search", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)
    _add_search_api(app, service)
    _add_api(app, service)
    _add_page(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(SecurityHeaders)
    return app


async def _image_query(file: UploadFile | None, key: str | None, url: str | None) -> ImageQuery:
    data = None if file is None else await file.read()
    return ImageQuery(data=data, key=key or None, url=url or None)


def _add_search_api(app: FastAPI, service: Service) -> None:
    index = service.index

    @app.post("/api/search/text", response_model=SearchResponse, responses=ERRORS)
    async def search_text(body: TextSearchRequest) -> dict:
        """Images that match a text query, best first."""
        query, k = service.check_text(body.query), service.check_k(body.k)

        async def work() -> list[dict]:
            return await service.search(index, await service.text_features(query), k)

        return {"results": await service.limited(work)}

    @app.post("/api/search/image", response_model=SearchResponse, responses=ERRORS)
    async def search_image(file: UploadFile | None = File(None), key: str | None = Form(None),
                           url: str | None = Form(None), k: int | None = Form(None)) -> dict:  # fmt: skip
        """Images like the one given: an upload (`file`), an indexed image (`key`) or, if enabled, a `url`."""
        k = service.check_k(k)
        query = await _image_query(file, key, url)

        async def work() -> list[dict]:
            return await service.search(index, await service.image_features(query), k)

        return {"results": await service.limited(work)}

    @app.post("/api/search/image-to-text", response_model=SearchResponse, responses=ERRORS)
    async def search_image_to_text(file: UploadFile | None = File(None), key: str | None = Form(None),
                                   url: str | None = Form(None), k: int | None = Form(None)) -> dict:  # fmt: skip
        """Captions from the caption bank that describe the image given (as for /api/search/image)."""
        k, bank = service.check_k(k), service.caption_bank()
        query = await _image_query(file, key, url)

        async def work() -> list[dict]:
            return await service.search(bank, await service.image_features(query), k)

        return {"results": await service.limited(work)}


def _add_api(app: FastAPI, service: Service) -> None:
    index, settings = service.index, service.settings
    int8 = is_quantized(service.encoder.model)

    @app.get("/api/health", response_model=HealthResponse)
    def health() -> dict:
        """The model, the index sizes and the limits."""
        captions = None if service.captions is None else len(service.captions)
        return {"status": "ok", "model": index.model, "dim": index.dim, "images": len(index), "captions": captions,
                "max_k": settings.max_k, "max_body_bytes": settings.max_body_bytes,
                "allow_urls": settings.allow_urls, "int8": int8}  # fmt: skip

    @app.post("/api/embed", response_model=EmbedResponse, responses=ERRORS)
    async def embed(text: str | None = Form(None), file: UploadFile | None = File(None),
                    url: str | None = Form(None)) -> dict:  # fmt: skip
        """The embedding of a `text`, or of an image (`file` upload or, if enabled, `url`)."""
        if text is not None:
            if file is not None or url:
                raise ServeError(422, "give either text or an image (file or url), not both")
            text = service.check_text(text)
            features = await service.limited(lambda: service.text_features(text))
        else:
            query = await _image_query(file, None, url)
            features = await service.limited(lambda: service.image_features(query))
        modality = "text" if text is not None else "image"
        return {"model": index.model, "modality": modality, "embedding": features[0].tolist()}

    @app.get("/api/image/{key:path}", response_class=StreamingResponse, responses=ERRORS)
    def image(key: str) -> StreamingResponse:
        """The image file of an indexed key (only files inside the collection's roots)."""
        record = service.record(key)
        headers = {"Cache-Control": "private, max-age=3600"}
        if record.get("member"):  # an image inside a WebDataset tar
            data, media_type = read_tar_member(record.get("path"), record["member"], service.roots)
            return Response(data, media_type=media_type, headers=headers)
        file, media_type, size = open_image_file(record.get("path"), service.roots)
        headers["Content-Length"] = str(size)
        return StreamingResponse(_chunks(file), media_type=media_type, headers=headers)


def _add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _chunks(file, size: int = 1 << 16):
    """A file's bytes in chunks, closing it at the end (or when the client goes away)."""
    with file:
        while chunk := file.read(size):
            yield chunk


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, f"the request body is not valid JSON: {detail}".rstrip(": ")
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return 422, "invalid request: " + "; ".join(parts)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(*_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, "internal server error")  # no traceback or message leaves the server


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
