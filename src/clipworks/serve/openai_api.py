"""`POST /v1/embeddings` and `GET /v1/models` in OpenAI's shapes, so that the clients RAG stacks already use
(the `openai` package, LangChain's and LlamaIndex's OpenAI embeddings) embed with the server's CLIP models.

`input` is a string or a list of them, as OpenAI's API takes it; since CLIP also embeds images, an item may be
an image: a string holding a data URL (`data:image/png;base64,...`), or a content part as OpenAI's chat API
writes them (`{"type": "image_url", "image_url": {"url": "..."}}`, the URL fetched on servers started with
`--allow-urls`; `{"type": "text", "text": "..."}` for text). Token arrays are refused (CLIP's tokenizer is not
OpenAI's). `encoding_format` "base64" answers little-endian float32 bytes, as OpenAI does (the `openai` client asks
for it by default). `usage.prompt_tokens` counts the text tokens the model read (start and end tokens included,
after truncation to its context); images count none. Errors answer OpenAI's shape, `{"error": {"message",
"type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .limits import ServeError

if TYPE_CHECKING:
    from .service import ModelSlot, Service

__all__ = ["add_embeddings_api", "openai_error_body", "OPENAI_PREFIX"]

OPENAI_PREFIX = "/v1/"
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+(?:;[A-Za-z0-9=.+-]+)*;base64,", re.IGNORECASE)
_CODES = {400: "invalid_request_error", 404: "not_found", 408: "timeout", 413: "request_too_large",
          415: "unsupported_media_type", 422: "invalid_request_error", 429: "rate_limit_exceeded",
          503: "server_overloaded", 504: "timeout"}  # fmt: skip


def openai_error_body(status: int, message: str, param: str | None = None) -> dict:
    """The error body OpenAI's API answers (its clients read `error.message`)."""
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": _CODES.get(status, kind)}}


class _Item:
    """One input: a text, or an image given as bytes (a data URL) or a URL to fetch."""

    def __init__(self, text: str | None = None, data: bytes | None = None, url: str | None = None) -> None:
        self.text, self.data, self.url = text, data, url


def _data_url(value: str, where: str) -> bytes:
    match = _DATA_URL.match(value)
    if match is None:
        raise ServeError(422, f"{where}: a data URL must be data:image/TYPE;base64,DATA")
    try:
        return base64.b64decode(value[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(422, f"{where}: the data URL's base64 is invalid") from None


def _image_part(part: dict, where: str) -> _Item:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise ServeError(422, f'{where}: an image part is {{"type": "image_url", "image_url": {{"url": "..."}}}}')
    if url[:5].lower() == "data:":
        return _Item(data=_data_url(url, where))
    return _Item(url=url)


def _item(value: Any, i: int) -> _Item:
    where = f"input[{i}]"
    if isinstance(value, str):
        if not value:
            raise ServeError(422, f"{where} is an empty string")
        if value[:11].lower() == "data:image/":
            return _Item(data=_data_url(value, where))
        return _Item(text=value)
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "text" and isinstance(value.get("text"), str) and value["text"]:
            return _Item(text=value["text"])
        if kind == "image_url":
            return _image_part(value, where)
        raise ServeError(422, f'{where}: expected a string, {{"type": "text", "text": "..."}} or {{"type": '
                              f'"image_url", "image_url": {{"url": "..."}}}}')  # fmt: skip
    if isinstance(value, (int, list)) and not isinstance(value, bool):
        raise ServeError(422, "token arrays are not accepted (CLIP's tokenizer is not OpenAI's): send the texts")
    raise ServeError(422, f"{where}: expected a string or an image part, got {type(value).__name__}")


def _parse(body: Any, max_inputs: int) -> tuple[str, list[_Item], str, int | None]:
    if not isinstance(body, dict):
        raise ServeError(422, "the body must be a JSON object with \"model\" and \"input\"")
    unknown = set(body) - {"model", "input", "encoding_format", "dimensions", "user"}
    if unknown:
        raise ServeError(422, f"unknown field {sorted(unknown)[0][:60]!r}; /v1/embeddings accepts model, input, "
                              "encoding_format, dimensions, user")  # fmt: skip
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ServeError(422, "\"model\" is required: one of the names GET /v1/models lists")
    raw = body.get("input")
    items = [raw] if isinstance(raw, (str, dict)) else raw
    if not isinstance(items, list) or not items:
        raise ServeError(422, "\"input\" must be a non-empty string or list")
    if len(items) > max_inputs:
        raise ServeError(422, f"\"input\" has {len(items)} items, more than this server's limit of {max_inputs}")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ServeError(422, f"encoding_format {str(fmt)[:20]!r}: expected \"float\" or \"base64\"")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
        raise ServeError(422, "\"dimensions\" must be an integer")
    return model, [_item(v, i) for i, v in enumerate(items)], fmt, dims


async def _embed(service: Service, slot: ModelSlot, items: list[_Item]) -> tuple[np.ndarray, int]:
    """(N, D) features of the items (texts and images each in as few batches as the batcher allows) and the
    number of text tokens read."""
    out: list[np.ndarray | None] = [None] * len(items)
    texts = [(i, it.text) for i, it in enumerate(items) if it.text is not None]
    images = [(i, it) for i, it in enumerate(items) if it.text is None]
    tokens = 0
    if texts:
        strings = [t for _, t in texts]
        tokens = sum(await run_in_threadpool(slot.encoder.token_counts, strings))
        for (i, _), row in zip(texts, await slot.text_batcher.run_many(strings)):
            out[i] = row
    if images:
        pixels = []
        for i, it in images:
            data = it.data if it.url is None else await service.fetch(it.url)
            label = f"input[{i}]" + (f" (the image at {it.url[:200]!r})" if it.url else "")
            pixels.append(await run_in_threadpool(service.prepare_upload, slot, data, label))
        for (i, _), row in zip(images, await slot.image_batcher.run_many(pixels)):
            out[i] = row
    return np.stack(out).astype(np.float32), tokens


def _encoded(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def add_embeddings_api(app: FastAPI, service: Service) -> None:
    """Add `POST /v1/embeddings` and `GET /v1/models` to `app`."""

    @app.get("/v1/models")
    def models() -> dict:
        """The models /v1/embeddings takes, by name."""
        return {"object": "list",
                "data": [{"id": name, "object": "model", "created": 0, "owned_by": "clipworks"} for name in service.slots]}  # fmt: skip

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        """Embeddings of texts and images in OpenAI's request and response shapes (see the module docstring)."""
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise ServeError(400, f"the request body is not valid JSON ({e})") from None
        name, items, fmt, dims = _parse(body, service.settings.max_inputs)
        slot = service.model_slot(name)
        if dims is not None and dims != slot.dim:
            raise ServeError(422, f"dimensions={dims}: model {name!r} embeds into {slot.dim} dimensions and cannot "
                                  "shorten them")  # fmt: skip
        features, tokens = await service.limited(lambda: _embed(service, slot, items))
        data = [{"object": "embedding", "index": i, "embedding": _encoded(v, fmt)} for i, v in enumerate(features)]
        # a JSONResponse as is: FastAPI's encoder would walk every float of every embedding first (slow for floats)
        return JSONResponse({"object": "list", "data": data, "model": slot.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip
