"""Downloads from the Hugging Face hub: files checked against their SHA-256, checkpoint repositories, offline use.

Everything goes through `huggingface_hub`'s cache (transfers resumed within a call, atomic renames, size checks,
`HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_HOME`). It checks sizes, not contents: on top of it, every file we hand out is
checked against a SHA-256 — the one the caller gives, else the hub's LFS SHA-256, which is the blob's name in the
cache (weights are LFS files; small git-stored configs have no SHA-256 to check) — and a file that fails the check is
removed from the cache so that nothing ever reuses it as complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from .pretrained import PretrainedEntry, get_pretrained

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CHUNK = 16 << 20
_MARKERS = ".clipworks-verified"  # per-repo folder in the cache: SHA-256 of blobs already hashed, by blob name

# Checkpoint layouts a repository can hold, in order of preference: (required config, optional configs, weights
# file names with safetensors first). OpenCLIP's comes first because timm's repos also carry a timm config.json
# and image-only model.safetensors next to the OpenCLIP files.
_LAYOUTS = (
    ("open_clip_config.json", (), ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")),
    ("config.json", ("preprocessor_config.json",), ("model.safetensors", "pytorch_model.bin")),
)


class ChecksumError(ValueError):
    """A downloaded file's SHA-256 differs from the one expected; the cached copy has been removed."""


class HubUnavailableError(OSError):
    """The hub cannot be reached (offline mode or no connection) and the file is not in the cache."""


class DownloadError(OSError):
    """A transfer failed after `huggingface_hub`'s retries; the partial file was discarded."""


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # submodules used below; the package imports them lazily
        import huggingface_hub.errors
        import huggingface_hub.file_download
    except ImportError as e:
        raise ImportError("downloading from the Hugging Face hub needs huggingface_hub: "
                          "pip install 'clipworks[hub]'") from e  # fmt: skip
    return huggingface_hub


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def _offline(hf) -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; a variable set later must still count.
    return hf.constants.is_offline_mode() or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


# How long a probe's "reachable" is reused (a failure is probed again: it costs nothing), and how long a probe may take.
_PROBE_TTL_S, _PROBE_TIMEOUT_S = 30.0, 5.0
_reached: dict[tuple[str, int], float] = {}


def _reachable(hf) -> bool:
    """False when the hub's host certainly cannot be reached: its name does not resolve, or it refuses the connection
    (no network, or HF_ENDPOINT names a port nothing listens on). huggingface_hub retries such failures with backoff
    for about 25 s per file before giving up; one TCP connection tells at once. True otherwise, including when a proxy
    stands between (only the client can tell then) or the probe times out (a slow network is left to the client)."""
    url = urlsplit(hf.constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return True
    now = time.monotonic()
    if now - _reached.get((host, port), -_PROBE_TTL_S) < _PROBE_TTL_S:
        return True
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except socket.timeout:
        return True
    except OSError:  # gaierror (no DNS), ConnectionRefusedError, ENETUNREACH, EHOSTUNREACH
        return False
    _reached[host, port] = now
    return True


def _network_errors() -> tuple[type[BaseException], ...]:
    # Transport errors of whichever HTTP client this huggingface_hub uses (httpx2, or httpx before it).
    return tuple(m.TransportError for name in ("httpx2", "httpx") if (m := sys.modules.get(name)) is not None)


def _unavailable(repo_id: str, what: str, revision: str | None, offline: bool) -> HubUnavailableError:
    why = ("offline mode is on (HF_HUB_OFFLINE)" if offline
           else "the hub could not be reached (no connection, or HF_ENDPOINT is wrong)")  # fmt: skip
    return HubUnavailableError(f"cannot get {what} of {repo_id!r} (revision {revision or 'main'}): {why}, and it "
                               "is not in the local cache; download it once while online")  # fmt: skip


def sha256_file(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """The SHA-256 of a file, read in chunks (checkpoints are many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _blob(pointer: Path) -> Path | None:
    """The cache blob a snapshot entry points to, when the cache is laid out with symlinks."""
    if not pointer.is_symlink():
        return None
    blob = Path(os.path.realpath(pointer))
    return blob if blob.parent.name == "blobs" else None


def _marker(blob: Path) -> Path:
    return blob.parent.parent / _MARKERS / blob.name


def _actual_sha256(pointer: Path, blob: Path | None) -> str:
    """The file's SHA-256, hashed once per blob: a multi-GB checkpoint is not re-read on every load."""
    stat = (blob or pointer).stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if blob is not None:
        try:
            recorded = json.loads(_marker(blob).read_text())
            if {k: recorded.get(k) for k in stamp} == stamp and _SHA256.fullmatch(recorded.get("sha256", "")):
                return recorded["sha256"]
        except (OSError, ValueError, AttributeError):
            pass
    actual = sha256_file(pointer)
    if blob is not None:
        try:  # best effort: a read-only cache still works, it just hashes again next time
            _marker(blob).parent.mkdir(exist_ok=True)
            _marker(blob).write_text(json.dumps({"sha256": actual, **stamp}))
        except OSError:
            pass
    return actual


def _evict(pointer: Path, blob: Path | None) -> None:
    """Remove a file from the cache: its blob, its marker and every snapshot entry pointing at the blob."""
    if blob is not None:
        snapshots = blob.parent.parent / "snapshots"
        for entry in snapshots.rglob("*") if snapshots.is_dir() else ():
            if entry.is_symlink() and Path(os.path.realpath(entry)) == blob:
                entry.unlink(missing_ok=True)
        _marker(blob).unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
    pointer.unlink(missing_ok=True)


def _verify(pointer: Path, repo_id: str, filename: str, sha256: str | None) -> None:
    blob = _blob(pointer)
    # The hub names LFS blobs by their SHA-256 (ETag); small git-stored files get a git SHA-1 and are only
    # checked when the caller gives a hash.
    expected = sha256 or (blob.name if blob is not None and _SHA256.fullmatch(blob.name) else None)
    if expected is None:
        return
    actual = _actual_sha256(pointer, blob)
    if actual != expected:
        _evict(pointer, blob)
        source = "the expected SHA-256" if sha256 else "the hub's LFS SHA-256"
        raise ChecksumError(f"{filename} from {repo_id!r} has SHA-256 {actual}, but {source} is {expected}; "
                            "the cached copy was removed")  # fmt: skip


def download_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    repo_type: str = "model",
) -> Path:
    """A file of a hub repository, from the local cache or downloaded into it, checked against its SHA-256.

    Args:
        repo_id: the repository ("org/name").
        filename: the file's path in the repository.
        revision: a branch, tag or commit; default "main".
        sha256: the expected SHA-256 (hex); without it, the hub's LFS SHA-256 of the file when it has one.
        cache_dir: the hub cache folder; default `huggingface_hub`'s (`HF_HUB_CACHE`, under `HF_HOME`).
        repo_type: "model" or "dataset".

    Returns:
        The file's path in the cache (a snapshot entry: do not modify it).

    Raises:
        ValueError: `sha256` is not 64 hex digits.
        ChecksumError: the file's SHA-256 differs from the expected one; the cached copy is removed.
        HubUnavailableError: offline or unreachable, and the file is not cached. A host that does not resolve or
            refuses the connection is told at once, without huggingface_hub's retries.
        DownloadError: the transfer failed after retries; nothing was cached.
        huggingface_hub.errors.HfHubHTTPError: the repository, revision or file does not exist (or is gated).
    """
    if sha256 is not None and not _SHA256.fullmatch(sha256.lower()):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    hf = _hub()
    offline = _offline(hf)
    try:  # unreachable: the cache only, at once (see `_reachable`)
        path = hf.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, repo_type=repo_type,
                                  local_files_only=offline or not _reachable(hf), library_name="clipworks")  # fmt: skip
    except hf.errors.LocalEntryNotFoundError as e:
        raise _unavailable(repo_id, repr(filename), revision, offline) from e
    except hf.errors.HfHubHTTPError:
        raise  # the hub's own message names the missing repository, revision or file
    except (OSError, *_network_errors()) as e:
        raise DownloadError(f"downloading {filename} from {repo_id!r} failed: {e}; the partial file was "
                            "discarded, run again to retry") from e  # fmt: skip
    path = Path(path)
    _verify(path, repo_id, filename, sha256.lower() if sha256 else None)
    return path


def _plan(files: set[str]) -> tuple[list[str], str | None]:
    """The files of one checkpoint among a repository's `files`: (configs and weights, or a shard index last).

    Raises:
        ValueError: no layout is complete; the message lists what would be.
    """
    for config, optional, weights in _LAYOUTS:
        if config not in files:
            continue
        configs = [config, *(f for f in optional if f in files)]
        for name in weights:  # safetensors, single or sharded, before pickles: never both
            if name in files:
                return [*configs, name], None
            if f"{name}.index.json" in files:
                return configs, f"{name}.index.json"
    expected = "; or ".join(f"{c} with {' / '.join(w)} (or a sharded .index.json)" for c, _, w in _LAYOUTS)
    raise ValueError(f"no CLIP checkpoint found: expected {expected}; found {sorted(files) or 'no files'}")


def _shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a shard index with a 'weight_map' ({e})") from e
    bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
    if bad:  # an index must not send us fetching files outside the checkpoint
        raise ValueError(f"{index}: shard names must be plain file names, got {bad}")
    return shards


def _cached_files(hf, repo_id: str, revision: str | None, cache_dir, repo_type: str = "model"
                  ) -> tuple[str | None, set[str]]:  # fmt: skip
    """(commit, file paths) of the cached snapshot of `revision`, or (None, empty) if none: the top-level files of
    a model repository, every file of a dataset's."""
    cache = Path(cache_dir if cache_dir is not None else hf.constants.HF_HUB_CACHE).expanduser()
    storage = cache / hf.file_download.repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    commit = revision if revision and _COMMIT.fullmatch(revision) else None
    ref = storage / "refs" / (revision or "main")
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        return None, set()
    entries = snapshot.iterdir() if repo_type == "model" else snapshot.rglob("*")
    return commit, {p.relative_to(snapshot).as_posix() for p in entries if p.is_file()}  # is_file: skips broken links


def _remember_commit(hf, repo_id: str, revision: str | None, commit: str, cache_dir, repo_type: str = "model") -> None:
    """Record in the cache which commit `revision` resolved to, as hf_hub_download does for a branch: files fetched
    pinned to the commit are then found offline by branch name too."""
    if revision is not None and _COMMIT.fullmatch(revision):
        return
    cache = Path(cache_dir if cache_dir is not None else hf.constants.HF_HUB_CACHE).expanduser()
    ref = cache / hf.file_download.repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "refs" / (revision or "main")
    try:  # best effort, as huggingface_hub's own: a read-only cache still works online
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text().strip() != commit:
            ref.write_text(commit)
    except OSError:
        pass


def _list_files(hf, repo_id: str, revision: str | None, cache_dir, offline: bool, repo_type: str = "model"
                ) -> tuple[str | None, set[str], bool]:  # fmt: skip
    """(commit, file paths, from the cache): the hub's listing, else (offline or unreachable) the cached snapshot's
    (`_cached_files`); (None, empty, True) when neither is there."""
    if not offline and _reachable(hf):
        try:
            info = hf.HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type)
            return info.sha, {s.rfilename for s in info.siblings or ()}, False
        except (hf.errors.OfflineModeIsEnabled, *_network_errors()):
            pass  # no connection: fall back to the cache, as hf_hub_download does
    commit, files = _cached_files(hf, repo_id, revision, cache_dir, repo_type)
    return commit, files, True


def download_dataset(repo_id: str, files: list[str], *, revision: str | None = None,
                     cache_dir: str | os.PathLike | None = None) -> Path:  # fmt: skip
    """Files of a hub dataset repository, in one cached snapshot folder, each checked as `download_file` checks it.

    Args:
        files: paths in the repository; one ending in "/*" stands for every file in that folder (and below). Paths
            the repository lacks are skipped: the caller checks what it needs.

    Returns:
        The snapshot folder, which also holds the requested files cached earlier. Offline (or unreachable), the
        cached snapshot of the revision, as complete as it was left.

    Raises:
        HubUnavailableError: offline or unreachable, and nothing of the dataset is cached.
        FileNotFoundError: the repository has none of `files` (the message lists some of its files).
        ChecksumError, DownloadError, huggingface_hub.errors.HfHubHTTPError: as `download_file`.
    """
    hf = _hub()
    offline = _offline(hf)
    commit, present, from_cache = _list_files(hf, repo_id, revision, cache_dir, offline, "dataset")
    folders = tuple(f[:-1] for f in files if f.endswith("/*"))
    names = sorted(f for f in present if f in files or f.startswith(folders))
    if commit is None or (not names and from_cache):
        raise _unavailable(repo_id, "the dataset", revision, offline)
    if not names:
        raise FileNotFoundError(f"hub dataset {repo_id!r} (revision {revision or 'main'}) has none of {files}; its "
                                f"files include {sorted(present)[:8] or 'none'}")  # fmt: skip
    paths = [download_file(repo_id, n, revision=commit, cache_dir=cache_dir, repo_type="dataset") for n in names]
    if not from_cache:
        _remember_commit(hf, repo_id, revision, commit, cache_dir, "dataset")
    return paths[0].parents[len(Path(names[0]).parts) - 1]


def download_config(repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached snapshot folder holding a checkpoint repository's config, without its weights: OpenCLIP's
    open_clip_config.json, else config.json (clipworks' or transformers').

    Raises:
        HubUnavailableError, huggingface_hub.errors.HfHubHTTPError: as `download_file`, for both files.
    """
    hf = _hub()
    first = None
    for name in (_LAYOUTS[0][0], _LAYOUTS[1][0]):
        try:
            return download_file(repo_id, name, revision=revision, cache_dir=cache_dir).parent
        except (hf.errors.EntryNotFoundError, HubUnavailableError) as e:
            first = first or e
    raise first


def download_repo(repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The files of the CLIP checkpoint in a hub repository, in one cached snapshot folder.

    Fetches only what a checkpoint needs: OpenCLIP's open_clip_config.json with its weights, else config.json
    (+ preprocessor_config.json) with a transformers model's weights. Safetensors weights (single or sharded)
    are preferred over pickled ones, and only one of the two is downloaded. Offline, the cached snapshot of the
    revision is used. Every file is checked as `download_file` checks it.

    Returns:
        The snapshot folder (it may also hold files cached earlier by other tools).

    Raises:
        ValueError: the repository holds no CLIP checkpoint (the message lists its files).
        HubUnavailableError: offline or unreachable, and the checkpoint is not (completely) cached.
        ChecksumError, DownloadError, huggingface_hub.errors.HfHubHTTPError: as `download_file`.
    """
    hf = _hub()
    offline = _offline(hf)
    commit, files, from_cache = _list_files(hf, repo_id, revision, cache_dir, offline)
    if commit is None:
        raise _unavailable(repo_id, "the checkpoint", revision, offline)
    try:
        names, index = _plan(files)
    except ValueError as e:
        if from_cache:  # a partial snapshot in the cache, not a bad repository
            raise _unavailable(repo_id, "a complete checkpoint", revision, offline) from e
        raise ValueError(f"{repo_id!r}: {e}") from e
    # Pin every file to the commit just resolved, so configs and weights come from the same revision.
    paths = [download_file(repo_id, name, revision=commit, cache_dir=cache_dir) for name in names]
    if index is not None:
        paths.append(download_file(repo_id, index, revision=commit, cache_dir=cache_dir))
        for shard in _shards(paths[-1]):
            if shard not in files:
                raise ValueError(f"{repo_id!r}: {index} names shard {shard!r}, which the repository lacks")
            paths.append(download_file(repo_id, shard, revision=commit, cache_dir=cache_dir))
    folder = paths[0].parent
    assert all(p.parent == folder for p in paths), "a checkpoint's files come from one snapshot"
    if not from_cache:
        _remember_commit(hf, repo_id, revision, commit, cache_dir)
    return folder


def resolve_pretrained(
    model: str, tag: str, cache_dir: str | os.PathLike | None = None
) -> tuple[Path, PretrainedEntry]:
    """The weights file of a registered release (`clipworks.list_pretrained()`), downloaded and checked.

    Falls back to the entry's `fallback_filename` when the repository has no `filename` (or, offline, when only
    the fallback is cached).

    Raises:
        ValueError: unknown model or tag (the message lists the model's tags).
        ChecksumError, HubUnavailableError, DownloadError: as `download_file`.
    """
    entry = get_pretrained(model, tag)
    hf = _hub()
    try:
        path = download_file(entry.hf_hub, entry.filename, revision=entry.revision, sha256=entry.sha256,
                             cache_dir=cache_dir)  # fmt: skip
        return path, entry
    except (hf.errors.EntryNotFoundError, HubUnavailableError) as e:
        if entry.fallback_filename is None:
            raise
        first_error = e
    try:
        return download_file(entry.hf_hub, entry.fallback_filename, revision=entry.revision, cache_dir=cache_dir), entry
    except HubUnavailableError:
        if isinstance(first_error, HubUnavailableError):
            raise first_error from None  # neither file is cached: report the preferred one
        raise


# A tokenizer's files, as `clipworks.hf_tokenizer` reads them: tokenizer.json, else a SentencePiece model.
TOKENIZER_FILES = ("tokenizer.json",)
SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_plan(files: set[str]) -> list[str]:
    main = next(([n] for n in (*TOKENIZER_FILES, *SENTENCEPIECE_FILES) if n in files), [])
    return main and [*main, *(n for n in TOKENIZER_CONFIGS if n in files)]


def repo_has_tokenizer(repo_id: str, *, revision: str | None = None, cache_dir=None) -> bool | None:
    """Whether a hub repository holds tokenizer files (tokenizer.json or a SentencePiece model); None when that
    cannot be told (offline, or unreachable, with no snapshot of it cached)."""
    hf = _hub()
    commit, files, from_cache = _list_files(hf, repo_id, revision, cache_dir, _offline(hf))
    if commit is None:
        return None
    return bool(_tokenizer_plan(files)) or (None if from_cache else False)


def download_tokenizer(
    repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The tokenizer files of a hub repository, in one cached snapshot folder: tokenizer.json (else its
    SentencePiece model: spiece.model, sentencepiece.bpe.model or tokenizer.model) with tokenizer_config.json and
    special_tokens_map.json when present. Offline, the cached snapshot of the revision is used.

    Raises:
        FileNotFoundError: the repository has no tokenizer files (the message lists its files).
        HubUnavailableError: offline or unreachable, and the tokenizer is not (completely) cached.
        ChecksumError, DownloadError, huggingface_hub.errors.HfHubHTTPError: as `download_file`.
    """
    hf = _hub()
    offline = _offline(hf)
    commit, files, from_cache = _list_files(hf, repo_id, revision, cache_dir, offline)
    names = _tokenizer_plan(files)
    if not names and (from_cache or commit is None):
        raise _unavailable(repo_id, "the tokenizer", revision, offline)
    if not names:
        expected = ", ".join((*TOKENIZER_FILES, *SENTENCEPIECE_FILES))
        raise FileNotFoundError(f"hub repository {repo_id!r} (revision {revision or 'main'}) has no tokenizer files "
                                f"({expected}); its files: {sorted(files) or 'none'}")  # fmt: skip
    paths = [download_file(repo_id, name, revision=commit, cache_dir=cache_dir) for name in names]
    if not from_cache:
        _remember_commit(hf, repo_id, revision, commit, cache_dir)
    return paths[0].parent
