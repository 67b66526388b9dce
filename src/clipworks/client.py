"""A Python client of the search service (`clipworks serve`): health, collections, search by text, image, key or
vector with filters and pages, text embeddings."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ClientError", "SearchClient"]

MAX_RETRY_AFTER_S = 60.0  # a Retry-After longer than this is not waited for in full
RETRY_STATUSES = (429, 503)  # too many requests, busy: the same request may succeed later


class ClientError(Exception):
    """The service refused a request (`status`, with its JSON message), or could not be reached (`status` None)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message if status is None else f"{status}: {message}")
        self.status = status
        self.message = message


class SearchClient:
    """A client of a running search service.

    Connection errors and 429 and 503 answers (a busy server) are retried up to `retries` times, waiting the answer's
    Retry-After or else `backoff_s` doubled at each try; any other error answer raises `ClientError` at once.

    Args:
        base_url: the service's address, e.g. "http://127.0.0.1:8000".
        timeout: seconds for each request.
        retries: further tries after the first (0: none).
        backoff_s: the first wait between tries when the service names none.
        transport: an httpx transport to send through instead of the network (tests).
    """

    def __init__(self, base_url: str, timeout: float = 30.0, retries: int = 3, backoff_s: float = 0.5,
                 transport: Any = None) -> None:  # fmt: skip
        try:
            import httpx
        except ImportError as e:
            raise ImportError("SearchClient needs httpx: pip install 'clipworks[search]'") from e
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries={retries!r}: expected an int >= 0")
        if not timeout > 0 or backoff_s < 0:
            raise ValueError(f"timeout={timeout!r}, backoff_s={backoff_s!r}: expected a positive timeout and a "
                             "backoff >= 0")  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def health(self) -> dict:
        """The service's model, index sizes and limits."""
        return self._request("GET", "/api/health")

    def collections(self) -> list[dict]:
        """The service's collections (name, model, dim, sizes, filterable columns), the default first."""
        return self._request("GET", "/api/collections")["collections"]

    def search_text(self, query: str, k: int = 10, **options: Any) -> list[dict]:
        """Images matching a text query, best first: dicts with key, score, caption, image (a URL path), aesthetic
        and metadata. `options`: collection, filters (a dict or "col=v;col>=n" string), offset, dedup, safe,
        aesthetic_weight, min_aesthetic (see `page` for the whole answer)."""
        return self.page("text", query, k, **options)["results"]

    def search_vector(self, vector: Any, k: int = 10, **options: Any) -> list[dict]:
        """Images nearest a raw embedding (any vector of the collection's size), best first; options as
        `search_text`."""
        return self.page("vector", vector, k, **options)["results"]

    def search_image(self, image: str | Path | bytes | None = None, k: int = 10, *, key: str | None = None,
                     **options: Any) -> list[dict]:  # fmt: skip
        """Images like the given one (a file path or the file's bytes), or like the collection's image `key`,
        best first; options as `search_text`."""
        return self.page("image", image if key is None else None, k, key=key, **options)["results"]

    def page(self, by: str, query: Any, k: int = 10, *, key: str | None = None, **options: Any) -> dict:
        """The whole answer of a search `by` "text", "vector" or "image": collection, results, offset and more
        (whether a next page exists: ask again with offset + k)."""
        options = {name: value for name, value in options.items() if value is not None}
        if by == "text":
            return self._request("POST", "/api/search/text", json={"query": query, "k": k, **options})
        if by == "vector":
            vector = np.asarray(query, dtype=np.float64).reshape(-1).tolist()
            return self._request("POST", "/api/search/vector", json={"vector": vector, "k": k, **options})
        if by != "image":
            raise ValueError(f"by={by!r}: expected 'text', 'vector' or 'image'")
        if isinstance(options.get("filters"), dict):
            raise ValueError("image searches take filters as a string (\"col=v;col>=n\")")
        fields = {"k": str(k), **{name: str(v).lower() if isinstance(v, bool) else str(v) for name, v in options.items()}}
        if key is not None:
            return self._request("POST", "/api/search/image", data={**fields, "key": key})
        if query is None:
            raise ValueError("give an image (a path or bytes) or key=")
        if isinstance(query, (bytes, bytearray)):
            name, data = "image", bytes(query)
        else:
            path = Path(query)
            try:
                name, data = path.name, path.read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read the image {str(path)!r}: {e.strerror}") from e
        files = {"file": (name, data, "application/octet-stream")}
        return self._request("POST", "/api/search/image", files=files, data=fields)

    def embed_text(self, text: str) -> np.ndarray:
        """The embedding of `text` in the service's model, shape (E,)."""
        body = self._request("POST", "/api/embed", json={"text": text})
        return np.asarray(body["embedding"], dtype=np.float32)

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:  # refused, reset, timed out: the same request may succeed later
                if last:
                    raise ClientError(None, f"cannot reach {self.base_url}{path}: {e}") from e
                time.sleep(self._backoff(attempt))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                time.sleep(self._backoff(attempt, response.headers.get("retry-after")))
                continue
            if response.is_error:
                raise ClientError(response.status_code, _message(response))
            return response.json()
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, attempt: int, retry_after: str | None = None) -> float:
        try:
            seconds = float(retry_after)  # type: ignore[arg-type]
        except (TypeError, ValueError):  # absent, or an HTTP date: our own backoff
            seconds = float("nan")
        if not seconds >= 0:  # also NaN and negative values
            return self.backoff_s * 2**attempt
        return min(seconds, MAX_RETRY_AFTER_S)


def _message(response: Any) -> str:
    """The service's {"error": message} (or OpenAI's {"error": {"message": ...}} from the /v1 routes), or the start
    of whatever else the answer holds."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and isinstance(body["error"].get("message"), str):
        return body["error"]["message"]
    return response.text[:200] or response.reason_phrase
