"""Embedding collections on disk: shards of vectors (`emb-NNNNNN.npy`) with Parquet tables of their keys.

An embeddings directory holds, per shard, `emb-000000.npy` (N, D) float16/float32 unit-norm rows and
`meta-000000.parquet` (columns key, path, caption, member, stamp), plus `manifest.json` naming the model,
dimension, count, modality ("image" or "text"), dtype, the shards and the image roots. `skipped.txt` lists the
inputs that could not be read. After `embed --update`, the manifest's "removed" maps a shard to the rows
that no longer count (files deleted or changed since): readers drop them, so shards are never rewritten.
Directories and single files are written under temporary names and renamed when complete, so an interrupted
write never leaves a half-written file under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

__all__ = [
    "EMBEDDINGS_FORMAT", "DTYPES", "MODALITIES", "model_id", "write_embeddings", "read_embeddings", "write_shard",
    "shard_names", "write_json", "sha256_file", "replace_directory", "normalize_rows", "read_shard_records",
]  # fmt: skip

EMBEDDINGS_FORMAT = "clipworks-embeddings"
DTYPES = ("float16", "float32")
MODALITIES = ("image", "text")
# member: the image inside a tar `path` (WebDataset); stamp: "size:mtime_ns" of the file when it was embedded
RECORD_FIELDS = ("key", "path", "caption", "member", "stamp")


def model_id(model_arg: str, pretrained: str | None = None) -> str:
    """The identity string of a model, as `--model` names it, plus `:pretrained` when weights are given.

    Both the embedder (which writes it into manifests) and the server (which checks it) build it here.
    """
    return f"{model_arg}:{pretrained}" if pretrained else model_arg


def shard_names(index: int) -> tuple[str, str]:
    """The (embeddings, metadata) file names of shard `index`."""
    return f"emb-{index:06d}.npy", f"meta-{index:06d}.parquet"


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write `obj` as JSON to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_records(embeddings: np.ndarray, records: list[dict]) -> None:
    if embeddings.ndim != 2 or embeddings.shape[0] != len(records):
        raise ValueError(f"embeddings of shape {embeddings.shape} do not fit {len(records)} records: expected (N, D) "
                         "with one row per record")  # fmt: skip
    bad = next((r for r in records if not isinstance(r, dict) or not isinstance(r.get("key"), str) or not r["key"]), 0)
    if bad != 0:
        raise ValueError(f"every record needs a non-empty string 'key'; got {bad!r}")


def write_shard(out_dir: Path, index: int, embeddings: np.ndarray, records: list[dict], dtype: str) -> None:
    """Write shard `index` into `out_dir`: the metadata table first, then the embeddings, each renamed in place.

    The embeddings file appears last, so its presence marks a complete shard (what a resumed embed skips).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_records(embeddings, records)
    emb_name, meta_name = shard_names(index)
    columns = {f: [r.get(f) if f == "key" or r.get(f) is None else str(r[f]) for r in records] for f in RECORD_FIELDS}
    table = pa.table({f: pa.array(v, type=pa.string()) for f, v in columns.items()})
    tmp_meta = out_dir / f".{meta_name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp_meta)
    os.replace(tmp_meta, out_dir / meta_name)
    tmp_emb = out_dir / f".{emb_name}.tmp-{os.getpid()}.npy"
    np.save(tmp_emb, np.ascontiguousarray(embeddings, dtype=np.dtype(dtype)))
    os.replace(tmp_emb, out_dir / emb_name)


def read_shard_records(directory: str | os.PathLike, index: int) -> list[dict]:
    """The records (metadata rows) of shard `index`, without its embeddings.

    Raises:
        ValueError: the metadata file is missing or unreadable.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(Path(directory) / shard_names(index)[1]).to_pydict()
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory}: shard {index} is unreadable ({type(e).__name__}: {e})") from e
    n = len(table.get("key", []))
    return [dict(zip(RECORD_FIELDS, row)) for row in zip(*(table.get(f, [None] * n) for f in RECORD_FIELDS))]


def _read_shard(directory: Path, index: int) -> tuple[np.ndarray, list[dict]]:
    try:
        emb = np.load(directory / shard_names(index)[0], allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory}: shard {index} is unreadable ({type(e).__name__}: {e})") from e
    records = read_shard_records(directory, index)
    if emb.ndim != 2 or len(records) != emb.shape[0]:
        raise ValueError(f"{directory}: shard {index} has {emb.shape} embeddings for {len(records)} records")
    return emb, records


def replace_directory(path: str | os.PathLike, formats: tuple[str, ...]):
    """`checkpoints.io.atomic_directory` that may also replace a directory of ours (its manifest's "format" in
    `formats`)."""
    from ..checkpoints.io import atomic_directory

    return atomic_directory(path, replaceable=lambda p: _format_of(p) in formats)


def _format_of(path: Path) -> str | None:
    try:
        return json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def write_embeddings(
    out_dir: str | os.PathLike,
    embeddings: np.ndarray,
    records: list[dict],
    *,
    model: str,
    modality: str = "image",
    dtype: str = "float16",
    roots: list[str] | None = None,
) -> Path:
    """Write a complete embeddings directory in one go (one shard), atomically.

    Args:
        out_dir: the directory to create (an existing embeddings directory there is replaced).
        embeddings: (N, D) features; rows are normalised to unit length before storing.
        records: one dict per row with a unique string "key" and optional "path", "caption", "member" (the
            image's name inside a tar `path`) and "stamp".
        model: the model identity (see `model_id`).
        modality: "image" or "text".
        dtype: "float16" (default) or "float32" on disk.
        roots: folders the images' paths lie under (what a server may serve files from).

    Raises:
        ValueError: shapes, keys, modality or dtype are bad.
    """
    if modality not in MODALITIES or dtype not in DTYPES:
        raise ValueError(f"modality={modality!r}, dtype={dtype!r}: choose modality from {MODALITIES}, dtype from {DTYPES}")
    embeddings = np.asarray(embeddings)
    _check_records(embeddings, records)
    keys = [r["key"] for r in records]
    if len(set(keys)) != len(keys):
        raise ValueError(f"keys must be unique; {len(keys) - len(set(keys))} duplicates")
    with replace_directory(out_dir, (EMBEDDINGS_FORMAT,)) as tmp:
        write_shard(tmp, 0, normalize_rows(embeddings), records, dtype)
        write_json(tmp / "manifest.json", embeddings_manifest(
            model=model, modality=modality, dtype=dtype, dim=embeddings.shape[1], shard_counts=[len(records)],
            roots=roots or [], skipped=0))  # fmt: skip
    return Path(out_dir)


def embeddings_manifest(*, model, modality, dtype, dim, shard_counts, roots, skipped, removed=None, **extra) -> dict:
    """The manifest dict of an embeddings directory; `removed` maps shard index -> rows that no longer count
    ("count" is the rows that do)."""
    removed = {str(k): sorted(int(r) for r in v) for k, v in sorted((removed or {}).items(), key=lambda kv: int(kv[0])) if v}
    manifest = {"format": EMBEDDINGS_FORMAT, "version": 1, "model": model, "modality": modality, "dtype": dtype,
                "dim": int(dim), "count": int(sum(shard_counts)) - sum(len(v) for v in removed.values()),
                "shards": [int(c) for c in shard_counts], "roots": [str(r) for r in roots], "skipped": int(skipped),
                **extra}  # fmt: skip
    if removed:
        manifest["removed"] = removed
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of an embeddings directory.

    Raises:
        ValueError: no manifest (not an embeddings directory, or an embed that has not finished).
    """
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        hint = " (an unfinished embed? run it again to complete it)" if any(directory.glob("emb-*.npy")) else ""
        raise ValueError(f"{directory}: not an embeddings directory: no manifest.json{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != EMBEDDINGS_FORMAT:
        raise ValueError(f"{path}: not a clipworks embeddings manifest (format is not {EMBEDDINGS_FORMAT!r})")
    return manifest


def read_embeddings(directory: str | os.PathLike) -> tuple[np.ndarray, list[dict], dict]:
    """Read a whole embeddings directory.

    Returns:
        (float32 (N, D) array, records with "key", "path", "caption", "member", "stamp", the manifest dict),
        without the rows the manifest lists as "removed". Files written before "member" or "stamp" existed
        read them as None.

    Raises:
        ValueError: not an embeddings directory, a shard missing or unreadable, or counts that disagree.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    dim, counts = int(manifest["dim"]), manifest["shards"]
    removed = manifest.get("removed", {})
    arrays, records = [], []
    for i, count in enumerate(counts):
        emb, recs = _read_shard(directory, i)
        if emb.shape != (count, dim) and count:
            raise ValueError(f"{directory}: shard {i} holds {emb.shape} embeddings; manifest says ({count}, {dim})")
        emb = emb.astype(np.float32, copy=False).reshape(-1, dim)
        if str(i) in removed:
            rows = np.asarray(removed[str(i)], dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= len(recs)):
                raise ValueError(f"{directory}: the manifest removes rows {rows.min()}..{rows.max()} of shard {i}, "
                                 f"which holds {len(recs)}")  # fmt: skip
            keep = np.ones(len(recs), dtype=bool)
            keep[rows] = False
            emb, recs = emb[keep], [r for r, k in zip(recs, keep) if k]
        arrays.append(emb)
        records.extend(recs)
    embeddings = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
    if len(records) != manifest["count"]:
        raise ValueError(f"{directory}: {len(records)} records, manifest says {manifest['count']}")
    return embeddings, records, manifest
