"""The embedder behind every framework integration: a CLIP model run in-process, or a clipworks service over HTTP."""

from __future__ import annotations

import base64
import io
import os
import re
import weakref
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

__all__ = ["Embedder", "LocalEmbedder", "ServiceEmbedder", "ServiceError", "create_embedder", "image_bytes"]

DEFAULT_BATCH_SIZE = 64
EMBEDDINGS_PATH = "/v1/embeddings"
_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")  # `<_io.BytesIO object at 0x7f...>`


class Embedder(Protocol):
    """What the integrations call: batches in, unit-norm float32 rows out, in input order."""

    label: str  # what frameworks record as the model's name (known without asking a service)

    def text(self, texts: Sequence[str]) -> np.ndarray:
        """(N, E) features of `texts`."""
        ...

    def image(self, images: Sequence[Any]) -> np.ndarray:
        """(N, E) features of images given as paths, bytes, file objects, PIL images or (H, W[, C]) arrays."""
        ...


class ServiceError(RuntimeError):
    """The embedding service refused a request or could not be reached; the message is the service's own."""


def create_embedder(
    model_name: str | None = None,
    *,
    pretrained: str | os.PathLike | None = None,
    model: Any = None,
    preprocess: Callable | None = None,
    tokenizer: Callable | None = None,
    base_url: str | None = None,
    device: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **service_options: Any,
) -> Embedder:
    """The embedder the integrations' keywords describe: exactly one of a model name, a built model or a service.

    Args:
        model_name: in-process: a preset (with `pretrained`), `local-dir:DIR` or `hf-hub:REPO`, as
            `clipworks.create_model_and_transforms` takes it. With `base_url`: the model name the service is asked
            for (default: the service's own).
        pretrained: weights for a preset name: a registry tag or a local file or directory (nothing is downloaded
            for a local one).
        model, preprocess, tokenizer: an already built model with its eval transform and tokenizer.
        base_url: the address of a `clipworks serve` service, e.g. "http://127.0.0.1:8000".
        device: where the in-process model runs ("cpu", "cuda", ...); a given model is moved there.
        batch_size: inputs per model call (in-process) or per request (service).
        **service_options: `ServiceEmbedder`'s timeout, retries, backoff_s, encoding_format, transport.
    """
    if base_url is not None:
        if model is not None or pretrained is not None or device is not None:
            raise ValueError("base_url= runs the model in the service: do not pass model=, pretrained= or device=")
        return ServiceEmbedder(base_url, model_name, batch_size=batch_size, **service_options)
    if service_options:
        raise ValueError(f"{sorted(service_options)} apply to a service only: pass base_url= too")
    if model is not None:
        if model_name is not None or pretrained is not None:
            raise ValueError("pass either model_name= (and pretrained=) or a built model=, not both")
        if preprocess is None or tokenizer is None:
            raise ValueError("a built model= needs its preprocess= (the eval transform) and tokenizer=")
        return LocalEmbedder(model, preprocess, tokenizer, device=device, batch_size=batch_size)
    if model_name is None:
        raise ValueError("say which model: model_name= (in-process), model= with preprocess= and tokenizer=, or "
                         "base_url= of a clipworks service")  # fmt: skip
    return LocalEmbedder.from_name(model_name, pretrained, device=device, batch_size=batch_size)


class LocalEmbedder:
    """A CLIP model run in this process, `batch_size` inputs per forward pass.

    Args:
        model: a clipworks `CLIP` (or anything with `encode_text`/`encode_image(..., normalize=True)`).
        preprocess: its eval image transform; tokenizer: its tokenizer.
        device: where to run it; None keeps the model where it is.
        model_name: the name frameworks record (`label`).
    """

    # (name, pretrained, device, batch_size) -> the embedder, while one is alive
    _shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, model: Any, preprocess: Callable, tokenizer: Callable, *, device: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, model_name: str = "clipworks") -> None:  # fmt: skip
        _check_batch_size(batch_size)
        self.model = model.eval() if device is None else model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.model_name = self.label = model_name

    @classmethod
    def from_name(cls, model_name: str, pretrained: str | os.PathLike | None = None, *, device: str | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> LocalEmbedder:  # fmt: skip
        """The model `model_name` names, built once per process while an embedder of it is alive (frameworks
        such as Chroma rebuild embedding functions from their config)."""
        import clipworks

        key = (model_name, None if pretrained is None else str(pretrained), device, batch_size)
        shared = cls._shared.get(key)
        if shared is not None:
            return shared
        model, _, preprocess = clipworks.create_model_and_transforms(model_name, pretrained, device=device)
        if preprocess is None:
            raise ValueError(f"{model_name!r} is a text-only model: the integrations need an image tower too")
        embedder = cls(model, preprocess, clipworks.get_tokenizer(model), batch_size=batch_size,
                       model_name=model_name)  # fmt: skip
        cls._shared[key] = embedder
        return embedder

    def text(self, texts: Sequence[str]) -> np.ndarray:
        """(N, E) unit-norm features of `texts`."""
        import torch

        texts = _check_texts(texts)
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(texts[start:start + self.batch_size]).to(self._device())  # (B, L)
                rows.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return _stack(rows, self._dim())

    def image(self, images: Sequence[Any]) -> np.ndarray:
        """(N, E) unit-norm features of images (see `image_bytes` for the kinds taken)."""
        import torch

        images = list(images)
        rows = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start:start + self.batch_size]
                batch = torch.stack([self._pixels(item, i) for i, item in enumerate(chunk, start)])  # (B, 3, H, W)
                rows.append(self.model.encode_image(batch.to(self._device()), normalize=True).float().cpu().numpy())
        return _stack(rows, self._dim())

    def _pixels(self, item: Any, index: int):
        """The (3, H, W) model input of one image, decoded as the service decodes an upload."""
        from ..data.decode import ImageDecodeError
        from ..transforms import preprocess_file

        is_path = isinstance(item, (str, os.PathLike)) and not _is_data_url(item)
        source = _readable_path(item, index) if is_path else image_bytes(item, index)  # a path: its fast JPEG route
        try:
            return preprocess_file(self.preprocess, source)
        except ImageDecodeError as e:  # Pillow's messages may hold a buffer's repr: not for users
            raise ValueError(f"image {index}: {_OBJECT_REPR.sub('', str(e))}") from e

    def _device(self):
        return next(self.model.parameters()).device

    def _dim(self) -> int:
        return int(getattr(getattr(self.model, "config", None), "embed_dim", 0))


class ServiceEmbedder:
    """A clipworks service's `POST /v1/embeddings` (OpenAI's shape), `batch_size` inputs per request.

    Texts go as strings, images as `data:` URLs. 429 and 503 answers and connection errors are retried with
    backoff (`clipworks.client.SearchClient`'s); any other error answer raises `ServiceError` with the service's
    message.

    Args:
        base_url: the service's address.
        model_name: the model to ask for; None asks the service which it serves (`GET /v1/models`) at the first
            request.
        encoding_format: "base64" (float32 bytes, the smaller answer) or "float".
        max_request_bytes: the most characters of inputs in one request (under the service's body limit, 10 MiB
            by default).
        timeout, retries, backoff_s, transport: as `SearchClient`'s.
    """

    def __init__(self, base_url: str, model_name: str | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 encoding_format: str = "base64", max_request_bytes: int = 8 * 2**20, timeout: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5, transport: Any = None) -> None:  # fmt: skip
        from ..client import SearchClient

        _check_batch_size(batch_size)
        if encoding_format not in ("base64", "float"):
            raise ValueError(f"encoding_format={encoding_format!r}: expected 'base64' or 'float'")
        if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
            raise ValueError(f"max_request_bytes={max_request_bytes!r}: expected an int >= 1")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r}: expected an http:// or https:// address")
        self.client = SearchClient(base_url, timeout=timeout, retries=retries, backoff_s=backoff_s,
                                   transport=transport)  # fmt: skip
        self.base_url = self.client.base_url
        self.batch_size = batch_size
        self.encoding_format = encoding_format
        self.max_request_bytes = max_request_bytes
        self._model_name = model_name
        self.label = model_name if model_name is not None else self.base_url

    @property
    def model_name(self) -> str:
        """The model the service is asked for (asked of the service once, when none was given)."""
        if self._model_name is None:
            models = self._call("GET", "/v1/models").get("data") or []
            if not models:
                raise ServiceError(f"{self.base_url}/v1/models lists no model")
            self._model_name = str(models[0]["id"])
        return self._model_name

    def text(self, texts: Sequence[str]) -> np.ndarray:
        """(N, E) unit-norm features of `texts`, as the service computes them."""
        texts = _check_texts(texts)
        for i, text in enumerate(texts):  # checked here: the service's messages number the items of one request
            if not text:
                raise ValueError(f"text {i} is empty: the service (as OpenAI's API) refuses empty strings")
            if text[:11].lower() == "data:image/":
                raise ValueError(f"text {i} starts with 'data:image/': the service would take it for an image")
        return self._embed(texts)

    def image(self, images: Sequence[Any]) -> np.ndarray:
        """(N, E) unit-norm features of images, sent as data URLs."""
        return self._embed([item if _is_data_url(item) else _data_url(image_bytes(item, i))
                            for i, item in enumerate(images)])  # fmt: skip

    def close(self) -> None:
        """Close the connections."""
        self.client.close()

    def _embed(self, inputs: list[str]) -> np.ndarray:
        rows = []
        chunks = self._chunks(inputs)
        for start, chunk in chunks:
            try:
                body = self._call("POST", EMBEDDINGS_PATH, json={"model": self.model_name, "input": chunk,
                                                                 "encoding_format": self.encoding_format})  # fmt: skip
            except ServiceError as e:
                if len(chunks) == 1:
                    raise
                # the service numbers the items of one request: say which of the caller's they were
                raise ServiceError(f"{e} (in the request of inputs {start}-{start + len(chunk) - 1})") from e
            rows.append(self._rows(body, len(chunk)))
        return _stack(rows, 0)

    def _chunks(self, inputs: list[str]) -> list[tuple[int, list[str]]]:
        """(start, inputs) of each request: at most `batch_size` inputs and, but for a lone larger one,
        `max_request_bytes` of them (images are data URLs: a batch of photos could pass the service's body limit)."""
        chunks: list[tuple[int, list[str]]] = []
        start, size = 0, 0
        for i, item in enumerate(inputs):
            if i > start and (i - start == self.batch_size or size + len(item) > self.max_request_bytes):
                chunks.append((start, inputs[start:i]))
                start, size = i, 0
            size += len(item)
        if inputs:
            chunks.append((start, inputs[start:]))
        return chunks

    def _rows(self, body: Any, count: int) -> np.ndarray:
        try:
            data = sorted(body["data"], key=lambda d: d["index"])
            if [d["index"] for d in data] != list(range(count)):
                raise ValueError(f"indices {[d['index'] for d in data]} for {count} inputs")
            vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") if isinstance(d["embedding"], str)
                       else np.asarray(d["embedding"], dtype=np.float32) for d in data]  # fmt: skip
            return np.stack(vectors).astype(np.float32)  # (B, E)
        except (KeyError, TypeError, ValueError) as e:
            raise ServiceError(f"{self.base_url}{EMBEDDINGS_PATH} answered an unexpected body: {e}") from e

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        from ..client import ClientError

        try:
            return self.client._request(method, path, **kwargs)
        except ClientError as e:
            status = "" if e.status is None else f" ({e.status})"
            raise ServiceError(f"{self.base_url}{path}{status}: {e.message}") from e


def image_bytes(item: Any, index: int = 0) -> bytes:
    """An image's encoded bytes: a file path's contents, bytes, a file object's contents, a `data:` URL's payload,
    or a PIL image or (H, W), (H, W, 3) or (H, W, 4) array of values 0-255 (Chroma's images) as PNG.

    Raises:
        ValueError: anything else, naming the item's index and type.
    """
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str) and _is_data_url(item):
        try:
            return base64.b64decode(item.split(",", 1)[1], validate=True)
        except (IndexError, ValueError) as e:
            raise ValueError(f"image {index}: not a base64 data URL ('data:image/png;base64,...')") from e
    if isinstance(item, (str, os.PathLike)):
        try:
            return Path(_readable_path(item, index)).read_bytes()
        except OSError as e:
            raise ValueError(f"image {index}: cannot read {str(item)!r}: {e.strerror}") from e
    if hasattr(item, "read"):  # a file object, e.g. LlamaIndex's BytesIO
        if hasattr(item, "seek"):
            item.seek(0)
        return bytes(item.read())
    if isinstance(item, np.ndarray):
        item = _array_image(item, index)
    from PIL import Image

    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return buffer.getvalue()
    raise ValueError(f"image {index}: a {type(item).__name__} is not an image: give a file path, bytes, a file "
                     "object, a data URL, a PIL image or an (H, W, 3) array of 0-255 values")  # fmt: skip


def _array_image(array: np.ndarray, index: int):
    from PIL import Image

    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or not array.size:
        raise ValueError(f"image {index}: an array of shape {array.shape} is not an image: expected (H, W), "
                         "(H, W, 3) or (H, W, 4)")  # fmt: skip
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"image {index}: an array of {array.dtype} is not an image: expected values 0-255")
    # Chroma's images may be int64 or float64; only whole values 0-255 are pixels without guessing a scale
    if array.min() < 0 or array.max() > 255 or (array.dtype.kind == "f" and not np.all(array == np.round(array))):
        raise ValueError(f"image {index}: array values must be whole numbers 0-255 (got {array.dtype} in "
                         f"[{array.min()}, {array.max()}]); scale a 0-1 float image by 255 first")  # fmt: skip
    array = array.astype(np.uint8)
    return Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)


def _readable_path(item: str | os.PathLike, index: int) -> str | os.PathLike:
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        raise ValueError(f"image {index}: {item[:100]!r} is a URL: download the image and pass its bytes or path")
    return item


def _is_data_url(item: Any) -> bool:
    return isinstance(item, str) and item[:11].lower() == "data:image/"


def _data_url(data: bytes) -> str:
    """A `data:image/...;base64,` URL of an image file's bytes (the service decodes whatever format they hold)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as header:  # lazy: reads the header only
            kind = (header.format or "unknown").lower()
    except Exception:  # not an image Pillow knows: the service says what is wrong with it
        kind = "unknown"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("expected a list of texts, got one string")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"text {bad} is a {type(texts[bad]).__name__}, not a str")
    return texts


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")


def _stack(rows: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)
