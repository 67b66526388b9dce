"""Embedding a collection into shards: decode in worker processes, encode in batches, write, resume.

A job writes `job.json` (what is being embedded), then each shard (`emb-NNNNNN.npy`, `meta-NNNNNN.parquet`,
`sha256-NNNNNN.json` with their checksums, and `skipped-NNNNNN.txt` when inputs were unreadable) as it
completes, and finally `manifest.json` (sealed, with every shard's checksums: `clipworks index` checks them)
and `skipped.txt` once every shard exists. Rerunning the same command skips the finished shards. Under
`torchrun` (RANK/WORLD_SIZE set) rank r takes shards r, r + world, ...; whichever rank finishes the last
shard writes the manifest.

Records carry the inputs' metadata columns (`sources`), and with an aesthetic head (`aesthetic_head`) each
image's score in the float column "aesthetic": the head applied to the unit-norm image embedding, as LAION
scores its collections (and as `clipworks score` does). The loading and encoding stages (workers, the GPU's
copy stream, busy and wait times) are `search.pipeline`'s.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..models.precision import model_dtype
from ..models.quant import is_quantized
from .pipeline import (EmbedStats, _chunks, _Encoder, _preprocess_config, default_batch_size, default_workers,
                       input_dtype)  # fmt: skip
from .sources import Item, Plan, plan_images, plan_texts
from .store import (DTYPES, embeddings_manifest, forget_dropped, read_shard_records, sha256_file, shard_checksums,
                    shard_names, warn_dropped, write_json, write_shard)  # fmt: skip

__all__ = ["ENCODE_IN", "EmbedResult", "EmbedStats", "default_batch_size", "default_workers", "embed_collection",
           "input_dtype", "load_aesthetic_head", "rank_and_world"]

ENCODE_IN = ("auto", "workers", "main")  # where a CPU job encodes: see `embed_collection`'s `encode_in`


@dataclass(frozen=True)
class EmbedResult:
    """What one run of `embed_collection` did; `complete` once every shard of the job exists."""

    out: Path
    shards_total: int
    shards_written: int
    shards_resumed: int
    embedded: int
    skipped: int
    complete: bool
    seconds: float
    removed: int = 0  # rows of deleted or changed files dropped by an update (all updates so far)
    stats: EmbedStats | None = None  # None when nothing was left to embed


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment variables; (0, 1) outside torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world


# Job settings written only when set (so jobs from before they existed still match): a resume must agree on them.
OPTIONAL_JOB_KEYS = ("int8", "aesthetic_head", "gpu_decode", "precision")
AESTHETIC = "aesthetic"  # the metadata column of the aesthetic score


def _check_job(out: Path, job: dict, update: bool = False) -> dict | None:
    """Write `job.json`, or check that the one there describes the same job (a resume) and return it. With
    `update`, the list of inputs (and so the shard count) may differ."""
    file = out / "job.json"
    if file.is_file():
        old = json.loads(file.read_text(encoding="utf-8"))
        free = ("fingerprint", "shards") if update else ("shards",) if "removed" in old else ()  # an update's shards
        keys = list(job) + [k for k in OPTIONAL_JOB_KEYS if k in old and k not in job]
        diff = [k for k in keys if old.get(k) != job.get(k) and k not in free]
        if diff:
            parts = [f"{k}: {old.get(k)!r} there, {job.get(k)!r} now" for k in diff if k != "fingerprint"]
            what = ", ".join(parts + ["the source's list of inputs changed"] * ("fingerprint" in diff))
            hint = "; pass --update to embed only what changed" if diff == ["fingerprint"] else ""
            raise ValueError(f"{out} holds embeddings of another job ({what}); use a new --out or remove it{hint}")
        return old
    if out.exists() and any(p.name != "job.json" and not p.name.startswith(".") for p in out.iterdir()):
        raise ValueError(f"{out} is a non-empty directory that is not an embed job; pass a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(file, job)
    return None


def _done(out: Path, shard: int) -> bool:
    return (out / shard_names(shard)[0]).is_file()


def _write(out: Path, shard: int, parts: list[np.ndarray], records: list[dict], skipped: list[str], dtype, dim) -> None:
    skipped_file = out / f"skipped-{shard:06d}.txt"
    if skipped:
        tmp = out / f".{skipped_file.name}.tmp-{os.getpid()}"
        tmp.write_text("".join(s + "\n" for s in skipped), encoding="utf-8")
        os.replace(tmp, skipped_file)
    else:
        skipped_file.unlink(missing_ok=True)
    emb = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    write_shard(out, shard, emb, records, dtype)  # the .npy is renamed into place last: the shard is done


def _finalize(out: Path, job: dict, dim: int, roots: list[str]) -> bool:
    """Write manifest.json and skipped.txt if every shard exists; True when the collection is complete."""
    n = job["shards"]
    if not all(_done(out, i) for i in range(n)):
        return False
    counts = [np.load(out / shard_names(i)[0], mmap_mode="r").shape[0] for i in range(n)]
    skipped = []
    for i in range(n):
        f = out / f"skipped-{i:06d}.txt"
        skipped += f.read_text(encoding="utf-8").splitlines() if f.is_file() else []
    tmp = out / f".skipped.txt.tmp-{os.getpid()}"
    tmp.write_text("".join(s + "\n" for s in skipped), encoding="utf-8")
    os.replace(tmp, out / "skipped.txt")
    # recorded as each shard was written (computed now only for shards of an older clipworks)
    checksums = {name: sha for i in range(n) for name, sha in shard_checksums(out, i).items()}
    write_json(out / "manifest.json", embeddings_manifest(
        model=job["model"], modality=job["modality"], dtype=job["dtype"], dim=dim, shard_counts=counts,
        roots=roots, skipped=len(skipped), checksums=checksums, source=job["data"],
        removed=job.get("removed")))  # fmt: skip
    return True


UPDATE_SCHEMES = ("folder", "csv", "tsv")


def _plan_update(out: Path, old_job: dict, plan: Plan, shard_size: int) -> tuple[Plan, list[int], dict]:
    """What an update has to do: (the plan with the new and changed inputs in the shards to write, those
    shards' indices, the rows no longer current per shard).

    The rows of every shard written so far (the last finished job's and an interrupted update's) are
    compared with the source: a row is current when its key is listed with the same stamp (a row written
    before stamps existed counts as current) and no later current row has its key. Inputs without a current
    row are embedded again, into the shards the last job left unwritten and then new ones after them.
    """
    written = [int(p.name[4:10]) for p in out.glob("emb-*.npy") if p.name[4:10].isdigit()]
    end = max([old_job["shards"], *[i + 1 for i in written]])
    listed = {item.key: item.stamp for shard in plan.shards for item in shard}
    latest: dict[str, tuple[int, int]] = {}
    removed: dict[int, list[int]] = {}
    for i in sorted(written):
        for row, record in enumerate(read_shard_records(out, i)):
            key, stamp = record["key"], record.get("stamp")
            if key not in listed or (stamp is not None and stamp != listed[key]):
                removed.setdefault(i, []).append(row)
                continue
            if key in latest:  # embedded again after a change: the older row goes
                removed.setdefault(latest[key][0], []).append(latest[key][1])
            latest[key] = (i, row)
    fresh = [item for shard in plan.shards for item in shard if item.key not in latest]
    groups = [fresh[j : j + shard_size] for j in range(0, len(fresh), shard_size)]
    done = set(written)
    gaps = [i for i in range(end) if i not in done]
    targets = (gaps + list(range(end, end + len(groups))))[: max(len(groups), len(gaps))]
    shards: list[list[Item]] = [[] for _ in range(max([end, *[t + 1 for t in targets]]))]
    for target, group in zip(targets, groups):
        shards[target] = group
    return Plan(plan.scheme, shards, plan.roots, plan.fingerprint), targets, removed


def load_aesthetic_head(path: str | os.PathLike, embed_dim: int) -> torch.nn.Module:
    """The scoring head in `path` (`eval.scoring.load_head`: LAION's aesthetic predictor `.pth`, or a clipworks
    head), checked to read `embed_dim`-d embeddings.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a head, or one that reads embeddings of another size.
    """
    from ..eval.scoring import load_head

    loaded = load_head(path)
    reads = loaded.head[0].in_features
    if reads != embed_dim:
        fit_on = f" (it was fit on {loaded.model})" if loaded.model else ""
        raise ValueError(f"aesthetic head {path} reads {reads}-d embeddings; the model gives {embed_dim}-d{fit_on} "
                         "(LAION's aesthetic predictors read ViT-L-14:openai's 768-d embeddings)")  # fmt: skip
    return loaded.head.eval()


@torch.inference_mode()
def head_scores(head: torch.nn.Module, embeddings: np.ndarray, block: int = 65536) -> np.ndarray:
    """(N,) float scores of a scoring head on (N, D) unit-norm embeddings (any float dtype, memory-mapped ones
    too), `block` rows at a time."""
    out = [head(torch.from_numpy(np.ascontiguousarray(embeddings[i : i + block], dtype=np.float32))).reshape(-1)
           for i in range(0, len(embeddings), block)]  # fmt: skip
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def _score(head: torch.nn.Module, embeddings: np.ndarray, records: list[dict]) -> None:
    """Put the head's score of each (unit-norm) embedding into its record's "aesthetic" column."""
    for record, score in zip(records, head_scores(head, embeddings).tolist()):
        record[AESTHETIC] = float(score)


def embed_collection(
    model,
    data: str,
    out: str | os.PathLike,
    *,
    model_name: str,
    transform=None,
    tokenizer=None,
    text: bool = False,
    batch_size: int | None = None,
    workers: int = 4,
    dtype: str = "float16",
    shard_size: int = 10_000,
    rank: int | None = None,
    world_size: int | None = None,
    fast_decode: bool = False,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    update: bool = False,
    aesthetic_head: str | os.PathLike | None = None,
    encode_in: str = "auto",
    gpu_decode: bool = False,
    compile: bool = False,
) -> EmbedResult:
    """Embed the images (or, with `text=True`, the distinct captions) of `data` into shards under `out`.

    Args:
        model: a `clipworks.CLIP` in eval mode (on the device to use); one passed through `quantize_int8`
            is recorded as such in the job, and a resume must agree.
        data: a `folder:`, `csv:`, `tsv:` or `wds:` source; for text also a plain file of one caption per line.
        out: the output directory; rerunning into it resumes (finished shards are skipped).
        model_name: the model identity written into the manifest (`store.model_id`).
        transform: the model's evaluation image transform (images only).
        tokenizer: the model's tokenizer (text only).
        batch_size, workers: images (or captions) per batch (default `default_batch_size`: 256 on a GPU, 64 on a
            CPU), and decoding worker processes (0 decodes in this process).
        dtype: "float16" or "float32" on disk.
        shard_size: items per output shard (folder, csv; wds has one output shard per tar).
        rank, world_size: this process's part; default from torchrun's environment.
        fast_decode: decode JPEGs at reduced size (`load_image(draft_size=...)`) and resize only the kept region
            in one step (`image_transform(fast=True)`); several times faster on large photos, but the pixels
            (and so the embeddings) differ slightly from the exact preprocessing. Off by default.
        progress: show a tqdm progress bar with items per second.
        on_shard: called with each shard index after it is written (tests interrupt from here).
        update: bring the collection in `out` up to date with a changed source (folder, csv, tsv; one
            process): embed new and changed files into new shards and drop the rows of deleted and changed
            ones (see the module's docstring). A new `out` is embedded whole.
        aesthetic_head: a scoring head file (`load_aesthetic_head`; images only): each image's score goes into
            the float metadata column "aesthetic". The job records the file's sha256: a resume or update must
            pass the same head.
        encode_in: where a CPU job encodes: "workers" (each DataLoader worker encodes the batches it decoded, on
            one thread: the cores never switch between decoding and a model waiting at an OpenMP barrier),
            "main" (this process encodes with its torch threads while the workers only decode), or "auto"
            (workers when there are at least as many workers as cores, else main). GPU jobs encode in "main".
        gpu_decode: decode plain JPEGs on the model's device (`torchvision.io.decode_jpeg`, nvJPEG on a GPU) and
            resize, crop and normalise them there (`data.jpeg.decode_preprocess_batch`): the workers only read
            files. Close to the exact preprocessing, not equal to it; other files take the exact route. Off by
            default; recorded in the job (a resume must agree).
        compile: run the image tower through `torch.compile` (on a GPU with CUDA graphs, mode "reduce-overhead");
            the first batches pay the compilation.

    Raises:
        ValueError: bad arguments, a bad source, an aesthetic head with `text` or of another embedding size,
            or an `out` holding another job (or, with `update`, a job of another model, dtype or preprocessing,
            a source that `update` does not read, or several ranks).
        FileNotFoundError: the source or the aesthetic head does not exist.
    """
    device = next(model.parameters()).device
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    if encode_in not in ENCODE_IN or (gpu_decode and (fast_decode or text)):
        raise ValueError(f"encode_in={encode_in!r}, gpu_decode={gpu_decode}: expected encode_in in {ENCODE_IN}, and "
                         "gpu_decode only for images without fast_decode")  # fmt: skip
    if dtype not in DTYPES or batch_size < 1 or workers < 0:
        raise ValueError(f"dtype={dtype!r}, batch_size={batch_size}, workers={workers}: expected dtype in {DTYPES}, "
                         "batch_size >= 1, workers >= 0")  # fmt: skip
    if (transform if not text else tokenizer) is None:
        raise ValueError("embedding images needs `transform`; embedding text needs `tokenizer`")
    if text and aesthetic_head is not None:
        raise ValueError("an aesthetic head scores images; it cannot be used when embedding text")
    dim = int(model.config.embed_dim)
    head = None if aesthetic_head is None else load_aesthetic_head(aesthetic_head, dim)
    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    start, out = time.perf_counter(), Path(out)
    forget_dropped()  # each job names the metadata columns it leaves out
    plan = plan_texts(data, shard_size) if text else plan_images(data, shard_size)
    job = {"model": model_name, "data": data, "modality": "text" if text else "image", "dtype": dtype,
           "shard_size": shard_size, "shards": len(plan.shards), "fingerprint": plan.fingerprint,
           "fast_decode": fast_decode}  # fmt: skip
    if is_quantized(model):  # recorded only when set: jobs written before the option resume as before
        job["int8"] = True
    if head is not None:  # likewise; the file's content, not its name, must match
        job["aesthetic_head"] = sha256_file(aesthetic_head)
    if gpu_decode:  # likewise
        job["gpu_decode"] = True
    computes_in = model_dtype(model)
    if computes_in != torch.float32:  # likewise: bf16 embeddings are not fp32 ones (`apply_precision`)
        named = getattr(model, "precision", None)  # set by `apply_precision`; a plain `.to(dtype)` leaves it stale
        job["precision"] = named if named not in (None, "fp32") else str(computes_in).removeprefix("torch.")
    old_job = _check_job(out, job, update)
    updating = update and old_job is not None
    if updating:
        if text or plan.scheme not in UPDATE_SCHEMES or world_size != 1:
            raise ValueError(f"--update reads {', '.join(s + ':' for s in UPDATE_SCHEMES)} image sources in one "
                             f"process; got {data!r}{' as text' if text else ''}, {world_size} processes")  # fmt: skip
        plan, targets, removed = _plan_update(out, old_job, plan, shard_size)
        for shard in targets:  # shards the new inputs do not fill (gaps the last job left) are written empty
            if not plan.shards[shard] and not _done(out, shard):
                _write(out, shard, [], [], [], dtype, dim)
        mine = range(len(plan.shards))
        pending = [s for s in targets if plan.shards[s]]
    elif old_job is not None and "removed" in old_job:  # an updated collection, source unchanged: its shards stand
        job, mine, pending = old_job, range(old_job["shards"]), []
    else:
        mine = [s for s in range(len(plan.shards)) if s % world_size == rank]
        pending = [s for s in mine if not _done(out, s)]
    if gpu_decode:
        _preprocess_config(transform, "gpu_decode")
    chunks = _chunks(plan, pending, text, transform, batch_size, workers, model, fast_decode, encode_in, gpu_decode)
    encoder = _Encoder(model, device, tokenizer if text else None, transform, compile)
    in_workers = isinstance(chunks, DataLoader) and getattr(chunks.dataset, "encoder", None) is not None
    encoders = chunks.num_workers if in_workers else 1
    written, embedded, skipped = _run(out, chunks, pending, plan, model, tokenizer, device, dtype, dim, progress,
                                      on_shard, head, encoder)  # fmt: skip
    stats = encoder.stats(encoders) if pending else None
    if updating:
        _forget_skipped(out, sorted(set(mine) - set(targets)), {i.key for s in targets for i in plan.shards[s]})
        job = {**job, "shards": len(plan.shards), "removed": {str(k): v for k, v in removed.items()}}
        write_json(out / "job.json", job)  # the update is done: a plain rerun now resumes this job
    complete = _finalize(out, job, dim, plan.roots)
    return EmbedResult(out, job["shards"], written, len(mine) - len(pending), embedded, skipped, complete,
                       time.perf_counter() - start, sum(len(v) for v in job.get("removed", {}).values()),
                       stats)  # fmt: skip


def _forget_skipped(out: Path, shards: list[int], retried: set[str]) -> None:
    """Drop from the skipped lists of `shards` the inputs an update tried again (a new failure is listed with
    the shard it went to)."""
    for shard in shards:
        file = out / f"skipped-{shard:06d}.txt"
        if not file.is_file():
            continue
        lines = file.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.partition("\t")[0] not in retried]
        if len(kept) != len(lines):
            tmp = out / f".{file.name}.tmp-{os.getpid()}"
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, file)


def _run(out, chunks, pending, plan, model, tokenizer, device, dtype, dim, progress, on_shard, head=None,
         encoder: _Encoder | None = None) -> tuple[int, int, int]:  # fmt: skip
    from tqdm import tqdm

    total = None if plan.scheme == "wds" else sum(len(plan.shards[s]) for s in pending)
    bar = tqdm(total=total, unit="text" if plan.scheme == "text" else "img", disable=not progress or not pending,
               desc=f"embedding {len(pending)} shards", smoothing=0.1)  # fmt: skip
    buffers: dict[int, dict[int, tuple]] = {}  # shard -> part -> (embeddings or None, records, skipped)
    ends: dict[int, int] = {}  # shard -> its last part
    written = embedded = skipped = 0
    if encoder is None:
        encoder = _Encoder(model, device, tokenizer if plan.scheme == "text" else None)
    try:
        for chunk in encoder.stream(chunks):
            emb = chunk.embeddings
            if head is not None and chunk.records:
                _score(head, emb, chunk.records)
            warn_dropped(sorted(chunk.dropped))
            got = buffers.setdefault(chunk.shard, {})
            got[chunk.part] = (emb, chunk.records, chunk.skipped)
            if chunk.end:
                ends[chunk.shard] = chunk.part
            embedded, skipped = embedded + len(chunk.records), skipped + len(chunk.skipped)
            bar.update(len(chunk.records) + len(chunk.skipped))
            if ends.get(chunk.shard, -1) + 1 == len(got):  # every part of the shard is in
                parts = [got[p] for p in range(len(got))]
                _write(out, chunk.shard, [e for e, _, _ in parts if e is not None], [r for _, rs, _ in parts for r in rs],
                       [s for _, _, ss in parts for s in ss], dtype, dim)  # fmt: skip
                del buffers[chunk.shard], ends[chunk.shard]
                written += 1
                if on_shard is not None:
                    on_shard(chunk.shard)
    finally:
        bar.close()
    return written, embedded, skipped


def describe(result: EmbedResult) -> str:
    """A one-paragraph summary of an embed run for the command line."""
    rate = result.embedded / result.seconds if result.seconds > 0 else 0.0
    state = "complete" if result.complete else "this rank's shards done; waiting for other ranks' shards"
    removed = f", {result.removed} rows of deleted or changed files removed" if result.removed else ""
    s = result.stats
    busy = "" if s is None or not s.batches else (f"; the model was busy {s.busy_fraction:.0%} of the time"
                                                  f"{f' per worker' if s.encoders > 1 else ''}")  # fmt: skip
    return (f"{result.out}: {result.shards_written} shards written, {result.shards_resumed} already done (of "
            f"{result.shards_total}); {result.embedded} embedded, {result.skipped} skipped{removed}, {rate:.1f}/s; "
            f"{state}{busy}")


def summary_dict(result: EmbedResult) -> dict:
    """`result` as a JSON-ready dict."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
