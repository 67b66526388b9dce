"""A fake Hugging Face hub on 127.0.0.1 for tests: the HTTP endpoints huggingface_hub 2.x calls to fetch files.

Served: `HEAD`/`GET /{repo}/resolve/{revision}/{file}` (`/datasets/{repo}/...` for a dataset repository) (with `X-Repo-Commit`, `ETag`, and for LFS files the
`X-Linked-Etag` SHA-256 and `X-Linked-Size`; `Range` requests answered with 206), `GET /api/models/{repo}[/revision/
{revision}]` (`/api/datasets/...` for a dataset) (model info with `siblings`; `?blobs=true` adds sizes and LFS hashes) and `GET /api/models/{repo}/tree/
{revision}[/{path}]` (the file listing). Errors carry the `X-Error-Code` the real hub sends, so huggingface_hub
raises its usual exceptions. Every request is recorded, and faults can be queued per file: a transfer cut mid-body,
a response with headers and no body, a close-delimited body shorter than the file, or content that does not match
the advertised SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LOOPBACK = "127.0.0.1"
FAULTS = ("truncate", "drop", "short")


def git_sha1(content: bytes) -> str:
    """The git blob id: the hub's ETag for a file stored in git rather than LFS."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class FakeFile:
    content: bytes
    lfs: bool
    served: bytes | None = None  # what GET sends when it differs from `content` (a corrupt transfer)

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_sha1(self.content)


@dataclass
class FakeRepo:
    repo_id: str
    commit: str
    files: dict[str, FakeFile]
    repo_type: str = "model"


@dataclass
class Request:
    method: str
    path: str  # unquoted, without the query
    query: dict[str, list[str]]
    range: str | None


@dataclass
class FakeHub:
    """The server and its state: repositories, recorded requests and queued faults."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    faults: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def __post_init__(self):
        self._server = ThreadingHTTPServer((LOOPBACK, 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], lfs: set[str] | None = None,
                 repo_type: str = "model") -> FakeRepo:  # fmt: skip
        """A repository at a fresh commit. `lfs` names the LFS files; by default the weights files and tar shards
        are. A dataset repository is served under /datasets/ and /api/datasets/."""
        lfs = lfs if lfs is not None else {n for n in files if n.endswith((".safetensors", ".bin", ".pt", ".tar"))}
        commit = hashlib.sha1(repr((repo_id, sorted(files.items()), len(self.repos))).encode()).hexdigest()
        key = repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"
        self.repos[key] = FakeRepo(repo_id, commit, {n: FakeFile(c, n in lfs) for n, c in files.items()}, repo_type)
        return self.repos[key]

    def corrupt(self, repo_id: str, filename: str) -> None:
        """Serve other bytes of the same length under the file's advertised SHA-256."""
        f = self.repos[repo_id].files[filename]
        f.served = bytes(b ^ 0xFF for b in f.content)

    def fail(self, repo_id: str, filename: str, *modes: str) -> None:
        """The next GETs of the file misbehave, one mode each: see FAULTS."""
        assert all(m in FAULTS for m in modes), modes
        self.faults.setdefault((repo_id, filename), []).extend(modes)

    def gets(self, repo_id: str, filename: str) -> list[Request]:
        """The GET requests for one file's content."""
        return [r for r in self.requests if r.method == "GET" and r.path.startswith(f"/{repo_id}/resolve/")
                and r.path.endswith(f"/{filename}")]  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and Content-Length semantics, as the hub

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.hub.requests.append(Request(self.command, path, query, self.headers.get("Range")))
        api = path.startswith(("/api/models/", "/api/datasets/"))
        rest = path[len("/api/") :] if api else path[1:]
        if api and rest.startswith("models/"):
            rest = rest[len("models/") :]
        key = next((k for k in self.hub.repos if rest == k or rest.startswith(k + "/")), None)
        if key is None:
            return self._error(404, "RepoNotFound")
        repo, tail = self.hub.repos[key], rest[len(key) :]
        if api:
            return self._api(repo, tail, query)
        if not tail.startswith("/resolve/"):
            return self._error(404, "EntryNotFound", repo)
        revision, _, filename = tail[len("/resolve/") :].partition("/")
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound")
        if filename not in repo.files:
            return self._error(404, "EntryNotFound", repo)
        self._file(repo, filename)

    def _api(self, repo: FakeRepo, tail: str, query) -> None:
        kind, _, rest = tail.lstrip("/").partition("/")
        revision, _, sub = rest.partition("/")
        if kind and revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound")
        if kind in ("", "revision"):
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = [{"rfilename": n, **(self._blob_info(f) if blobs else {})} for n, f in repo.files.items()]
            return self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit, "private": False,
                               "siblings": siblings})  # fmt: skip
        if kind == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(self._tree(repo, sub, recursive))
        self._error(404, "EntryNotFound", repo)

    @staticmethod
    def _blob_info(f: FakeFile) -> dict:
        lfs = {"sha256": f.etag, "size": len(f.content), "pointerSize": 134} if f.lfs else None
        return {"size": len(f.content), "blobId": git_sha1(f.content), **({"lfs": lfs} if lfs else {})}

    @staticmethod
    def _tree(repo: FakeRepo, sub: str, recursive: bool) -> list[dict]:
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        entries, folders = [], set()
        for name, f in sorted(repo.files.items()):
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix) :]
            if "/" in rel and not recursive:
                folders.add(prefix + rel.split("/")[0])
                continue
            lfs = {"lfs": {"oid": f.etag, "size": len(f.content), "pointerSize": 134}} if f.lfs else {}
            entries.append({"type": "file", "path": name, "size": len(f.content), "oid": git_sha1(f.content), **lfs})
        return [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(folders)] + entries

    def _file(self, repo: FakeRepo, filename: str) -> None:
        f = repo.files[filename]
        body = f.served if f.served is not None else f.content
        status, start, end = 200, 0, len(body) - 1
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[len("bytes=") :].partition("-")
            status, start, end = 206, int(first), int(last) if last else len(body) - 1
        queue = self.hub.faults.get((repo.repo_id, filename)) if self.command == "GET" else None
        fault = queue.pop(0) if queue else None
        chunk = body[start : end + 1]
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{f.etag}"')
        if f.lfs:
            self.send_header("X-Linked-Etag", f'"{f.etag}"')
            self.send_header("X-Linked-Size", str(len(f.content)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        if fault == "short":  # a close-delimited body: ends "cleanly", but early
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is None:
            self.wfile.write(chunk)
            return
        self.wfile.write(chunk[: len(chunk) // 2] if fault in ("truncate", "short") else b"")
        self.close_connection = True  # the connection drops before the promised Content-Length

    def _json(self, data) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, repo: FakeRepo | None = None) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if repo is not None:  # huggingface_hub caches "file absent at this commit" under the commit it is told
            self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _NoSleep:
    """`time` for huggingface_hub's modules, without the pauses between retries (the tests need no backoff)."""

    def __getattr__(self, name):
        import time

        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


def _loopback_only(request) -> None:
    if request.url.host != LOOPBACK:
        raise RuntimeError(f"a test tried to reach {request.url}: only the fake hub on {LOOPBACK} is allowed")


@contextmanager
def serving(monkeypatch, home: Path):
    """A running FakeHub that huggingface_hub talks to, with its cache under `home`; any other host is refused."""
    import httpx2
    from huggingface_hub import constants, file_download
    from huggingface_hub.utils import _http

    with FakeHub() as hub:
        assert urlsplit(hub.url).hostname == LOOPBACK
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
               "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        # huggingface_hub reads these variables once, at import: the constants must be patched too.
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(file_download, "time", _NoSleep())  # the pause before resuming a transfer
        monkeypatch.setattr(_http, "time", _NoSleep())  # the backoff between retries of failed requests
        # Bytes are written (and counted for resuming) per chunk of 10 MiB by default: test files are smaller.
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 << 10)
        # Every request huggingface_hub makes goes through this client: anything but loopback fails loudly.
        _http.set_client_factory(lambda: httpx2.Client(
            event_hooks={"request": [_loopback_only, _http.hf_request_event_hook]}, follow_redirects=True, timeout=30
        ))  # fmt: skip
        try:
            yield hub
        finally:
            _http.set_client_factory(_http.default_client_factory)
