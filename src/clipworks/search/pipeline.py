"""The stages of an embedding job between its inputs and its shards: batches of decoded images (or captions) from
DataLoader workers, and the encoder that turns them into embeddings, with the time each took (`EmbedStats`).

On a CPU with a worker per core, each worker encodes the batches it decoded on one thread (`_WorkerEncoder`); else
the main process encodes (`_Encoder`), on a GPU one batch behind the loader: a side stream copies the next batch
while the current one computes, workers hand over uint8 pixels (normalised on the GPU), and with `gpu_decode` the
JPEGs themselves, decoded there in batches (`clipworks.data.jpeg`). `embed.embed_collection` runs a job on them.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.decode import ImageDecodeError
from .sources import Chunk, ListedImages, Plan, TarImages, normalise

__all__ = ["EmbedStats", "default_batch_size", "default_workers", "input_dtype"]


@dataclass(frozen=True)
class EmbedStats:
    """Where the wall time of one run's encoding loop went: what tells a starved model from a busy one.

    Attributes:
        wall_seconds: the loop, from the first batch asked for to the last shard written.
        encode_seconds: time inside the model's encode calls, summed over the processes that encode (on a GPU,
            the GPU's own time on the batches, from CUDA events).
        wait_seconds: time this process waited for the loader's next batch.
        encoders: processes encoding at once (the DataLoader workers when they encode, else 1).
        batches: batches encoded.
    """

    wall_seconds: float
    encode_seconds: float
    wait_seconds: float
    encoders: int
    batches: int

    @property
    def busy_fraction(self) -> float:
        """The share of the wall time the model was busy, per encoding process (1.0: never waited for input)."""
        return self.encode_seconds / (self.encoders * self.wall_seconds) if self.wall_seconds > 0 else 0.0


def input_dtype(model) -> torch.dtype:
    """The dtype to hand the image tower its pixels in: its first convolution's or linear layer's weight dtype
    (bfloat16 after `apply_precision(model, "bf16")` or `.to(torch.bfloat16)`; float32 for an int8 model, whose
    quantised layers take float32, and for a tower whose patch embedding casts the pixels as it lays them out,
    `fast.PackedPatchEmbed`: a separate cast would be one more pass over the batch)."""
    tower = getattr(model, "visual", model)
    if getattr(getattr(tower, "patch_embed", None), "takes_any_dtype", False):
        return torch.float32
    for module in tower.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.weight.is_floating_point():
            return module.weight.dtype
    return torch.float32


def default_batch_size(device: torch.device) -> int:
    """Images per batch for a job on `device`: 256 on a GPU (a ViT-B/32 batch of 64 leaves an H100 waiting on
    kernel launches), 64 on a CPU (larger batches gain nothing there and hold more memory per worker)."""
    return 256 if device.type == "cuda" else 64


@torch.inference_mode()
def _encode_images(model, images: torch.Tensor, device: torch.device) -> np.ndarray:
    x = images.to(device, non_blocking=True).to(input_dtype(model))  # pixels in the weights' dtype
    return model.encode_image(x, normalize=True).float().cpu().numpy()


@torch.inference_mode()
def _encode_texts(model, tokenizer, captions: list[str], device: torch.device) -> np.ndarray:
    return model.encode_text(tokenizer(captions).to(device), normalize=True).float().cpu().numpy()


def _text_chunks(plan: Plan, shards: list[int], batch_size: int):
    for s in shards:
        items = plan.shards[s]
        for j in range(0, len(items), batch_size):
            recs = [{"key": i.key, "path": i.path, "caption": i.caption} for i in items[j : j + batch_size]]
            yield Chunk(s, recs, None, [], j + batch_size >= len(items), j // batch_size)


class _WorkerEncoder:
    """Encodes a batch in the DataLoader worker that decoded it, on one thread (CPU jobs with at least as many
    workers as cores): the workers alone fill the cores. With the model in the main process, its intra-op
    threads and the decoding workers contend for the same cores (OpenMP threads spin at every barrier while
    a worker holds their core). One thread: a forked worker must not start an OpenMP pool of its own (GNU
    OpenMP hangs in a child forked after the parent used one)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        torch.set_num_threads(1)  # DataLoader workers already run with one; a worker of another loader may not
        return _encode_images(self.model, images, torch.device("cpu"))


def _keep_freed_memory(worker_id: int | None = None) -> bool:
    """Make this process's C allocator keep freed memory for reuse (glibc: `mallopt`); False where it cannot.

    By default glibc serves every allocation above a few MiB with a fresh `mmap` and unmaps it on free, so each
    of a ViT's large activations (a 20 MB MLP hidden state at batch 32) is faulted in page by page, every
    layer, every batch: ~90,000 page faults and ~7% of a ViT-B/32 batch on one core, more with every core
    busy. Here allocations up to 32 MiB come from the heap and freed memory stays mapped (up to 1 GiB). Called
    in the DataLoader workers that encode (`worker_init_fn`): processes of ours, never the caller's.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


def _cores() -> int:
    """The cores this process may use: its CPU affinity, shared among torchrun's processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def default_workers(device: torch.device) -> int:
    """Decoding workers for a job on `device`: one per core on the CPU (each then encodes its own batches,
    see `_WorkerEncoder`), one per core but one for the process feeding a GPU; under torchrun, per process's
    share of the machine's cores."""
    return _cores() if device.type == "cpu" else max(1, _cores() - 1)


def _encode_in_workers(device: torch.device, workers: int, encode_in: str, gpu_decode: bool) -> bool:
    if encode_in == "workers" and (device.type != "cpu" or workers == 0 or gpu_decode):
        raise ValueError(f"encode_in='workers' needs a CPU model, workers >= 1 and no gpu_decode; got {device.type}, "
                         f"workers={workers}, gpu_decode={gpu_decode}")  # fmt: skip
    auto = encode_in == "auto" and device.type == "cpu" and not gpu_decode and workers >= _cores()
    return encode_in == "workers" or auto


def _uint8_config(device: torch.device, transform):
    """The preprocessing config when a job's workers hand over uint8 pixels (`sources.to_uint8`) for this
    process to normalise on the device: GPU jobs with clipworks' evaluation transform, where a quarter of the
    bytes through shared memory, pinning and the copy is what lets the loader keep up. None otherwise."""
    from ..transforms import EvalTransform

    return transform.cfg if device.type == "cuda" and isinstance(transform, EvalTransform) else None


def _image_loader(plan: Plan, shards: list[int], transform, batch_size: int, workers: int, model,
                  draft_size: int | None, encode_in: str = "auto", raw_jpegs: bool = False) -> DataLoader:  # fmt: skip
    device = next(model.parameters()).device
    encode_in_workers = _encode_in_workers(device, workers, encode_in, raw_jpegs)
    uint8_cfg = _uint8_config(device, transform) if not encode_in_workers else None
    kind = TarImages if plan.scheme == "wds" else ListedImages
    dataset = kind({s: plan.shards[s] for s in shards}, transform, batch_size, draft_size, raw_jpegs=raw_jpegs,
                   uint8_cfg=uint8_cfg)  # fmt: skip
    workers = min(workers, len(dataset) if plan.scheme != "wds" else len(shards))
    if encode_in_workers:
        dataset.encoder = _WorkerEncoder(model)
    # Batches go to whichever worker is idle and come back as they finish (`_run` puts shards back in order): a
    # worker that drew a batch of large photos does not hold up the others, as in-order delivery would.
    dynamic = {"in_order": False} if workers and "in_order" in inspect.signature(DataLoader).parameters else {}
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=(2 if dynamic and device.type == "cpu" else 4) if workers else None,
                      worker_init_fn=_keep_freed_memory if encode_in_workers else None,
                      **dynamic)  # fmt: skip


def _chunks(plan: Plan, pending: list[int], text: bool, transform, batch_size: int, workers: int, model,
            fast_decode: bool, encode_in: str = "auto", gpu_decode: bool = False):  # fmt: skip
    """The stream of `Chunk`s for the pending shards: caption batches, or a DataLoader of decoded images
    (on the CPU with workers: of embeddings, each worker encoding what it decoded; with `gpu_decode`: of
    JPEG files left undecoded)."""
    if not pending:
        return []
    if text:
        return _text_chunks(plan, pending, batch_size)
    draft = None
    if fast_decode:
        from ..transforms import image_transform

        cfg = _preprocess_config(transform, "fast_decode")
        draft, transform = cfg.image_size, image_transform(cfg, fast=True)
    return _image_loader(plan, pending, transform, batch_size, workers, model, draft, encode_in, gpu_decode)


def _preprocess_config(transform, option: str):
    cfg = getattr(transform, "cfg", None)
    if cfg is None or not hasattr(transform, "load"):
        raise ValueError(f"{option} needs clipworks' evaluation transform (it carries the preprocessing config)")
    return cfg


class _Encoder:
    """Encodes the chunks that reach this process without embeddings, and keeps the time that took.

    Each batch is cast to the weights' dtype on the model's device (`input_dtype`). On a GPU a batch's copy
    runs on a side stream while the previous batch computes, and its embeddings come back through pinned
    memory one batch later: the CPU hands the GPU the next batch before waiting for this one's results.
    """

    def __init__(self, model, device: torch.device, tokenizer=None, transform=None, compile: bool = False):
        self.model, self.device, self.tokenizer, self.transform = model, device, tokenizer, transform
        self.cuda = device is not None and device.type == "cuda"
        self.dtype = input_dtype(model) if model is not None else torch.float32
        self.forward = functools.partial(model.encode_image, normalize=True) if model is not None else None
        self.compiled = compile
        if compile:
            self.forward = torch.compile(self.forward, mode="reduce-overhead" if self.cuda else None)
        self.copies = torch.cuda.Stream(device) if self.cuda else None
        self.encode_seconds = self.wait_seconds = 0.0
        self.batches, self.started = 0, None

    def stats(self, encoders: int) -> EmbedStats:
        wall = time.perf_counter() - self.started if self.started is not None else 0.0
        return EmbedStats(wall, self.encode_seconds, self.wait_seconds, encoders, self.batches)

    def stream(self, chunks):
        """The chunks, each with its embeddings (on a GPU one batch behind the loader)."""
        self.started, pending, it = time.perf_counter(), None, iter(chunks)
        while True:
            start = time.perf_counter()
            chunk = next(it, None)
            self.wait_seconds += time.perf_counter() - start
            if chunk is None:
                break
            finish = self._submit(chunk)
            if pending is not None:
                yield pending()
            pending = finish
            if not self.cuda:
                yield pending()
                pending = None
        if pending is not None:
            yield pending()

    @torch.inference_mode()
    def _submit(self, chunk: Chunk) -> Callable[[], Chunk]:
        if chunk.embeddings is not None or not chunk.records:  # encoded by a worker (CPU jobs), or nothing to do
            self.encode_seconds += chunk.encode_seconds
            self.batches += chunk.embeddings is not None
            return lambda: chunk
        self.batches += 1
        start = time.perf_counter()
        if self.tokenizer is not None:
            chunk.embeddings = _encode_texts(self.model, self.tokenizer, [r["caption"] for r in chunk.records],
                                             self.device)  # fmt: skip
            self.encode_seconds += time.perf_counter() - start
            return lambda: chunk
        if not self.cuda and not chunk.jpegs and not self.compiled and chunk.images.is_floating_point():
            chunk.embeddings = _encode_images(self.model, chunk.images, self.device)
            self.encode_seconds += time.perf_counter() - start
            return lambda: chunk
        x = self._pixels(chunk)  # (B, 3, S, S) on the device, in the weights' dtype
        if not len(x):  # every file of the batch failed
            return lambda: chunk
        if not self.cuda:
            chunk.embeddings = self.forward(x).float().numpy()
            self.encode_seconds += time.perf_counter() - start
            return lambda: chunk
        began, ended, copied = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        if self.compiled and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()  # each batch is a new step for the CUDA graphs
        began.record()
        emb = self.forward(x).float()
        ended.record()
        host = torch.empty(emb.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(emb, non_blocking=True)
        copied.record()

        def finish() -> Chunk:
            copied.synchronize()
            chunk.embeddings = host.numpy()
            self.encode_seconds += began.elapsed_time(ended) / 1000
            return chunk

        return finish

    def _pixels(self, chunk: Chunk) -> torch.Tensor:
        if not chunk.jpegs:
            return self._to_device(chunk.images).to(self.dtype)
        from ..data.jpeg import decode_preprocess_batch

        cfg = self.transform.cfg
        pixels, failed = decode_preprocess_batch(chunk.jpegs, cfg, self.device)
        n, rows = len(chunk.records), chunk.jpeg_rows
        if len(rows) == n and not failed:  # the usual batch: every file a JPEG the device decoded
            return pixels.to(self.dtype)
        x = torch.empty(n, 3, cfg.image_size, cfg.image_size, device=self.device)
        decoded = [r for i, r in enumerate(rows) if i not in failed]
        if decoded:
            x[self._index(decoded)] = pixels
        others = sorted(set(range(n)) - set(rows))  # decoded by the workers, in record order
        if others:
            x[self._index(others)] = self._to_device(chunk.images)
        kept = [r for r in range(n) if r not in self._rescue(chunk, failed, x)]
        if len(kept) < n:
            x, chunk.records = x[self._index(kept)], [chunk.records[r] for r in kept]
        return x.to(self.dtype)

    def _index(self, rows: list[int]) -> torch.Tensor:
        """Row indices on the device, copied without waiting for it (a Python list index would)."""
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def _rescue(self, chunk: Chunk, failed: list[int], x: torch.Tensor) -> set[int]:
        """Decode the files the device failed on by the exact route, into `x`; the rows that fail there too."""
        lost = set()
        for i in failed:
            row = chunk.jpeg_rows[i]
            try:
                x[row] = self.transform.load(bytes(chunk.jpegs[i])).to(self.device)
            except ImageDecodeError as e:
                lost.add(row)
                chunk.skipped.append(f"{chunk.records[row]['key']}\t{e}".replace("\n", " "))
        return lost

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        """float32 model input on the device from a chunk's pixels (uint8 ones normalised there)."""
        if self.cuda:
            with torch.cuda.stream(self.copies):  # the copy overlaps the previous batch's compute
                x = images.to(self.device, non_blocking=True)
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.copies)
            x.record_stream(current)
            images = x
        return images if images.is_floating_point() else normalise(images, self.transform.cfg)
