"""Embedding collections on disk: shards of vectors (`emb-NNNNNN.npy`) with Parquet tables of their keys.

An embeddings directory holds, per shard, `emb-000000.npy` (N, D) float16/float32 unit-norm rows and
`meta-000000.parquet` (columns key, path, caption, member, stamp, then any metadata columns: see
`records_table`), plus `manifest.json` naming the model,
dimension, count, modality ("image" or "text"), dtype, the shards, the image roots and the sha256 of every shard
file (each shard's `sha256-000000.json` records them as the shard is written; the manifest gathers them), sealed
by a sha256 of its own content ("manifest_sha256", see `seal_manifest`). `skipped.txt` lists the
inputs that could not be read. After `embed --update`, the manifest's "removed" maps a shard to the rows
that no longer count (files deleted or changed since): readers drop them, so shards are never rewritten.
Directories and single files are written under temporary names and renamed when complete, so an interrupted
write never leaves a half-written file under its final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

__all__ = [
    "EMBEDDINGS_FORMAT", "DTYPES", "MODALITIES", "model_id", "write_embeddings", "read_embeddings", "write_shard",
    "shard_names", "write_json", "sha256_file", "replace_directory", "normalize_rows", "read_shard_records",
    "seal_manifest", "check_manifest_seal", "shard_checksums", "checksum_name", "records_table", "metadata_names",
    "RESERVED_NAMES",
]  # fmt: skip

EMBEDDINGS_FORMAT = "clipworks-embeddings"
DTYPES = ("float16", "float32")
MODALITIES = ("image", "text")
# member: the image inside a tar `path` (WebDataset); stamp: "size:mtime_ns" of the file when it was embedded
RECORD_FIELDS = ("key", "path", "caption", "member", "stamp")
# Names a metadata column may not take: the fixed fields, and what search results carry beside the metadata.
RESERVED_NAMES = frozenset(RECORD_FIELDS) | {"score", "image", "vector"}
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_warned_names: set[str] = set()  # metadata columns already reported as dropped (`warn_dropped`)
# Embeddings and index manifests carry "manifest_sha256" (and embeddings manifests shard checksums) from version 2.
MANIFEST_VERSION = 2
SEAL = "manifest_sha256"


def model_id(model_arg: str, pretrained: str | None = None) -> str:
    """The identity string of a model, as `--model` names it, plus `:pretrained` when weights are given.

    Both the embedder (which writes it into manifests) and the server (which checks it) build it here.
    """
    return f"{model_arg}:{pretrained}" if pretrained else model_arg


def shard_names(index: int) -> tuple[str, str]:
    """The (embeddings, metadata) file names of shard `index`."""
    return f"emb-{index:06d}.npy", f"meta-{index:06d}.parquet"


def checksum_name(index: int) -> str:
    """The name of shard `index`'s checksum file: {file name: sha256} of its two files."""
    return f"sha256-{index:06d}.json"


def _canonical_sha256(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """`manifest` as JSON reads it back, with "manifest_sha256": the sha256 of its canonical JSON (sorted keys,
    no spaces) without that field. Every other file of a directory is checked against the manifest; this
    checks the manifest itself (a changed root, model or recall), whatever its indentation."""
    manifest = json.loads(json.dumps(manifest))
    return {**manifest, SEAL: _canonical_sha256(manifest)}


def check_manifest_seal(manifest: dict, file, remedy: str, unsealed: str, error: type = ValueError) -> None:
    """Raise `error` ending in `remedy` when `manifest` (read from `file`) does not match its seal, or a
    version 2 manifest has none. A manifest written before manifests were sealed (version 1) is read with a
    warning ending in `unsealed`: refusing it would break every index and collection made before, whose
    other files still have checksums to check."""
    sealed = manifest.get(SEAL)
    if sealed is None and isinstance(manifest.get("version"), int) and manifest["version"] < MANIFEST_VERSION:
        warnings.warn(f"{file}: written before clipworks sealed its manifests with a checksum; {unsealed}",
                      stacklevel=3)  # fmt: skip
        return
    actual = _canonical_sha256(manifest)
    if sealed != actual:
        said = f"it says {sealed[:12]}..." if isinstance(sealed, str) else f"it has no {SEAL}"
        raise error(f"{file}: manifest checksum mismatch (sha256 of its content {actual[:12]}..., {said}): the "
                    f"manifest is corrupt or was edited; {remedy}")  # fmt: skip


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


def metadata_names(names) -> tuple[list[str], list[str]]:
    """(the metadata column names among `names` that may be kept, those that may not), each in first-seen order.

    A metadata column is named `[A-Za-z_][A-Za-z0-9_]{0,63}` and not one of `RESERVED_NAMES`; the fixed record
    fields (key, path, ...) are not metadata and are in neither list."""
    kept, dropped = [], []
    for name in dict.fromkeys(names):
        if name in RECORD_FIELDS:
            continue
        good = isinstance(name, str) and _COLUMN_NAME.fullmatch(name) and name not in RESERVED_NAMES
        (kept if good else dropped).append(name)
    return kept, dropped


def forget_dropped() -> None:
    """Let `warn_dropped` name again the columns it named already (an embed job warns once per name)."""
    _warned_names.clear()


def warn_dropped(names) -> None:
    """Warn, once per name (since `forget_dropped`), that metadata columns `names` are left out."""
    new = [str(n) for n in names if str(n) not in _warned_names]
    if new:
        _warned_names.update(new)
        shown = ", ".join(repr(n[:80]) for n in new[:20]) + (f" and {len(new) - 20} more" if len(new) > 20 else "")
        warnings.warn(f"metadata columns {shown} left out: a column name is letters, digits and _ (not first), at "
                      f"most 64 characters, and not one of {', '.join(sorted(RESERVED_NAMES))}", stacklevel=3)


def _scalar_kind(value) -> str | None:
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    return "string"


def _metadata_array(values: list):
    """An arrow array of one metadata column: bool, int64 or float64 when every present value is of that kind
    (ints and floats together: float64), else text (str() of each value); NaN and None are missing."""
    import pyarrow as pa

    kinds = [_scalar_kind(v) for v in values]
    present = set(kinds) - {None}
    if present and present <= {"int", "float"}:
        typed = [None if k is None else (int(v) if k == "int" and present == {"int"} else float(v))
                 for v, k in zip(values, kinds)]  # fmt: skip
        try:
            return pa.array(typed, type=pa.int64() if present == {"int"} else pa.float64())
        except (OverflowError, pa.ArrowInvalid):  # an int beyond int64: kept as text
            pass
    elif present == {"bool"}:
        return pa.array([None if k is None else bool(v) for v, k in zip(values, kinds)], type=pa.bool_())
    text = [None if k is None else str(v).lower() if k == "bool" else str(v) for v, k in zip(values, kinds)]
    return pa.array(text, type=pa.string())


def records_table(records: list[dict]):
    """The arrow table of `records`: the fixed fields (key, path, caption, member, stamp) as text, then every
    other key any record has, as a metadata column (`metadata_names`; others are dropped with a warning): bool,
    int64 or float64 when all its present values are of that kind, else text; None where a record lacks it."""
    import pyarrow as pa

    fixed = {f: [r.get(f) if f == "key" or r.get(f) is None else str(r[f]) for r in records] for f in RECORD_FIELDS}
    columns = {f: pa.array(v, type=pa.string()) for f, v in fixed.items()}
    kept, dropped = metadata_names(name for r in records for name in r)
    warn_dropped(dropped)
    for name in kept:
        columns[name] = _metadata_array([r.get(name) for r in records])
    return pa.table(columns)


def write_shard(out_dir: Path, index: int, embeddings: np.ndarray, records: list[dict], dtype: str) -> dict[str, str]:
    """Write shard `index` into `out_dir`: the metadata table (`records_table`), the checksum file of both, then
    the embeddings, each renamed in place; returns the checksums ({file name: sha256}).

    The embeddings file appears last, so its presence marks a complete shard (what a resumed embed skips).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_records(embeddings, records)
    emb_name, meta_name = shard_names(index)
    table = records_table(records)
    tmp_meta = out_dir / f".{meta_name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp_meta)
    os.replace(tmp_meta, out_dir / meta_name)
    tmp_emb = out_dir / f".{emb_name}.tmp-{os.getpid()}.npy"
    np.save(tmp_emb, np.ascontiguousarray(embeddings, dtype=np.dtype(dtype)))
    checksums = {emb_name: sha256_file(tmp_emb), meta_name: sha256_file(out_dir / meta_name)}
    write_json(out_dir / checksum_name(index), checksums)
    os.replace(tmp_emb, out_dir / emb_name)
    return checksums


def shard_checksums(directory: str | os.PathLike, index: int) -> dict[str, str]:
    """{file name: sha256} of shard `index`: as recorded when it was written, or (a shard written before
    shards recorded them) computed now."""
    directory = Path(directory)
    file = directory / checksum_name(index)
    if file.is_file():
        return json.loads(file.read_text(encoding="utf-8"))
    return {name: sha256_file(directory / name) for name in shard_names(index)}


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
    return _rows(table)


def _rows(table: dict[str, list]) -> list[dict]:
    """Record dicts of a table's columns: the fixed fields (None where a file predates one), then its metadata."""
    n = len(table.get("key", []))
    names = list(RECORD_FIELDS) + [c for c in table if c not in RECORD_FIELDS]
    return [dict(zip(names, row)) for row in zip(*(table.get(f, [None] * n) for f in names))]


def _check_sha256(file: Path, data: bytes, expected: str | None) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if expected != actual:
        said = f"the manifest says {expected[:12]}..." if expected else "the manifest has no checksum for it"
        raise ValueError(f"{file}: checksum mismatch (sha256 {actual[:12]}..., {said}): the shard is corrupt or "
                         "was changed; embed the collection again")  # fmt: skip


def _read_shard(directory: Path, index: int, checksums: dict | None = None) -> tuple[np.ndarray, list[dict]]:
    """Shard `index`'s embeddings and records, both files checked against `checksums` (None: not checked) in
    the very bytes that are then parsed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = shard_names(index)
    try:
        data = [(directory / name).read_bytes() for name in names]
    except OSError as e:
        raise ValueError(f"{directory}: shard {index} is unreadable ({type(e).__name__}: {e})") from e
    if checksums is not None:
        for name, content in zip(names, data):
            _check_sha256(directory / name, content, checksums.get(name))
    try:
        emb = np.load(io.BytesIO(data[0]), allow_pickle=False)
        table = pq.read_table(pa.BufferReader(data[1])).to_pydict()
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory}: shard {index} is unreadable ({type(e).__name__}: {e})") from e
    records = _rows(table)
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
            image's name inside a tar `path`) and "stamp"; other keys are metadata columns (`records_table`).
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
        checksums = write_shard(tmp, 0, normalize_rows(embeddings), records, dtype)
        write_json(tmp / "manifest.json", embeddings_manifest(
            model=model, modality=modality, dtype=dtype, dim=embeddings.shape[1], shard_counts=[len(records)],
            roots=roots or [], skipped=0, checksums=checksums))  # fmt: skip
    return Path(out_dir)


def embeddings_manifest(*, model, modality, dtype, dim, shard_counts, roots, skipped, checksums, removed=None,
                        **extra) -> dict:  # fmt: skip
    """The sealed manifest dict of an embeddings directory; `checksums` maps every shard file's name to its
    sha256 (`write_shard`, `shard_checksums`); `removed` maps shard index -> rows that no longer count
    ("count" is the rows that do)."""
    removed = {str(k): sorted(int(r) for r in v) for k, v in sorted((removed or {}).items(), key=lambda kv: int(kv[0])) if v}
    count = int(sum(shard_counts)) - sum(len(v) for v in removed.values())
    manifest = {"format": EMBEDDINGS_FORMAT, "version": MANIFEST_VERSION, "model": model, "modality": modality,
                "dtype": dtype, "dim": int(dim), "count": count,
                "shards": [int(c) for c in shard_counts], "roots": [str(r) for r in roots], "skipped": int(skipped),
                "checksums": dict(sorted(checksums.items())), **extra}  # fmt: skip
    if removed:
        manifest["removed"] = removed
    return seal_manifest(manifest)


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


def read_embeddings(directory: str | os.PathLike, verify: bool = True) -> tuple[np.ndarray, list[dict], dict]:
    """Read a whole embeddings directory, checking (unless `verify=False`) the manifest against its seal and
    every shard file against the manifest's sha256, in the bytes that are then parsed.

    Returns:
        (float32 (N, D) array, records with "key", "path", "caption", "member", "stamp" and the shard's
        metadata columns (a record of a shard without a column lacks it), the manifest dict), without the
        rows the manifest lists as "removed". Files written before "member" or "stamp" existed read them as
        None. A directory written before manifests were sealed and shards checksummed is read
        unchecked, with a warning.

    Raises:
        ValueError: not an embeddings directory, a checksum mismatch (naming the file), a shard missing or
            unreadable, or counts that disagree.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    checksums = None
    if verify:
        check_manifest_seal(manifest, directory / "manifest.json", remedy="embed the collection again",
                            unsealed="neither it nor its shards can be verified; rerun the `clipworks embed` "
                                     "command that wrote it to add checksums of the shards as they are now")  # fmt: skip
        if SEAL in manifest:  # a sealed manifest lists the checksum of every shard file
            checksums = manifest.get("checksums") or {}
    dim, counts = int(manifest["dim"]), manifest["shards"]
    removed = manifest.get("removed", {})
    arrays, records = [], []
    for i, count in enumerate(counts):
        emb, recs = _read_shard(directory, i, checksums)
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
