"""Opportunistic batching of model work: requests that arrive while the model is busy run as one batch.

One worker thread per `Batcher` takes everything queued (up to `max_batch`) and runs it in a single call.
An idle server runs each request alone at once (no waiting window, so no added latency); a loaded one runs
bigger batches, which on a CPU is several times more queries per second than many batch-1 calls fighting
over the same cores.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Generic, TypeVar

import numpy as np

__all__ = ["Batcher"]

T = TypeVar("T")
_STOP = object()


class Batcher(Generic[T]):
    """Runs `fn(items) -> (len(items), ...) array` on batches of items submitted from any thread or loop."""

    def __init__(self, fn: Callable[[list[T]], np.ndarray], max_batch: int = 32, name: str = "batcher") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: expected a positive int")
        self.fn = fn
        self.max_batch = max_batch
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.on_batch: Callable[[int], None] | None = None
        """Called with each batch's size before it runs (the service's metrics observe it)."""

    def submit(self, item: T) -> Future:
        """Queue `item`; the future's result is its row of `fn`'s output (or `fn`'s exception)."""
        return self.submit_many([item])[0]

    def submit_many(self, items: list[T]) -> list[Future]:
        """Queue `items` together (the worker never starts a batch between them); a future per item."""
        futures = [Future() for _ in items]
        self._start()
        self._queue.put(list(zip(items, futures)))
        return futures

    async def run_many(self, items: list[T]) -> list[Any]:
        """The rows of `items`, run in as few batches as `max_batch` allows (with other callers' items)."""
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in self.submit_many(items))))

    async def run(self, item: T) -> Any:
        """`item`'s row, awaited without holding a thread."""
        return await asyncio.wrap_future(self.submit(item))

    def __call__(self, item: T) -> Any:
        """`item`'s row, blocking the calling thread until its batch is done."""
        return self.submit(item).result()

    def close(self) -> None:
        """Stop the worker after the batches already queued."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join()
                self._thread = None

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            pending = list(first)
            while len(pending) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)  # finish these batches, then stop
                    break
                pending.extend(nxt)
            for start in range(0, len(pending), self.max_batch):
                batch = pending[start : start + self.max_batch]
                self._observe(len(batch))
                self._run(batch)

    def _observe(self, size: int) -> None:
        try:
            if self.on_batch is not None:
                self.on_batch(size)
        except Exception:  # a broken observer must not stop the worker every request waits on
            pass

    def _run(self, batch: list[tuple[T, Future]]) -> None:
        live = [(item, f) for item, f in batch if f.running() or f.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            out = self.fn([item for item, _ in live])
        except Exception as e:
            if len(live) == 1:
                live[0][1].set_exception(e)
            else:  # one bad item must not fail its neighbours: run each alone, so only its own caller sees it
                for one in live:
                    self._run([one])
            return
        for row, (_, f) in zip(out, live):
            f.set_result(row)
