"""Opportunistic batching: requests queued while the model is busy run together, each gets its own row."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from test_serve_helpers import collection, make_app  # noqa: F401 (collection is a fixture)

from clipworks.serve.batching import Batcher


def test_requests_queued_while_busy_run_as_one_batch():
    started, release, sizes = threading.Event(), threading.Event(), []

    def square(items: list[int]) -> np.ndarray:
        sizes.append(len(items))
        started.set()
        release.wait(timeout=10)
        return np.array([[x * x] for x in items])

    batcher = Batcher(square, max_batch=3)
    try:
        first = batcher.submit(1)
        assert started.wait(timeout=10)  # the worker is busy with [1]
        queued = [batcher.submit(x) for x in (2, 3, 4, 5)]
        release.set()
        assert first.result(timeout=10).tolist() == [1]
        assert [f.result(timeout=10).tolist() for f in queued] == [[4], [9], [16], [25]]
        assert sizes == [1, 3, 1]  # an idle worker takes one at once; then batches of at most max_batch
    finally:
        batcher.close()


def test_a_failing_item_fails_only_its_caller_and_the_worker_lives_on():
    started, release = threading.Event(), threading.Event()

    def fn(items: list[str]) -> np.ndarray:
        if items == ["block"]:
            started.set()
            release.wait(timeout=10)
        if "bad" in items:
            raise ValueError("bad item")
        return np.array([[len(x)] for x in items])

    batcher = Batcher(fn)
    try:
        blocker = batcher.submit("block")
        assert started.wait(timeout=10)
        good, bad, also_good = batcher.submit("ab"), batcher.submit("bad"), batcher.submit("abcd")  # one batch
        release.set()
        assert blocker.result(timeout=10).tolist() == [5]
        assert good.result(timeout=10).tolist() == [2] and also_good.result(timeout=10).tolist() == [4]
        with pytest.raises(ValueError, match="bad item"):
            bad.result(timeout=10)
        with pytest.raises(ValueError, match="bad item"):
            batcher("bad")
        assert batcher("four").tolist() == [4]

        async def both():
            return await asyncio.gather(batcher.run("a"), batcher.run("abc"))

        assert [r.tolist() for r in asyncio.run(both())] == [[1], [3]]
    finally:
        batcher.close()
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(fn, max_batch=0)


def test_concurrent_searches_through_the_app_get_their_own_results(collection):  # noqa: F811
    """Many concurrent text searches (batched together) each answer their own query."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    queries = [f"a {colour} square" for colour in ("red", "green", "blue", "yellow")] * 4
    with TestClient(make_app(collection, concurrency=16)) as client:
        search = lambda q: client.post("/api/search/text", json={"query": q, "k": 3})  # noqa: E731
        alone = {q: search(q).json()["results"] for q in set(queries)}
        batcher, sizes = client.app.state.service.default.slot.text_batcher, []
        encode = batcher.fn
        batcher.fn = lambda texts: sizes.append(len(texts)) or encode(texts)
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(search, queries))
    assert sum(sizes) == len(queries)  # each query encoded once, in however many batches they arrived
    for q, r in zip(queries, together):
        assert r.status_code == 200
        got, want = r.json()["results"], alone[q]
        np.testing.assert_allclose([x["score"] for x in got], [x["score"] for x in want], atol=1e-5)
        want_scores = {x["key"]: x["score"] for x in want}
        for x in got:  # the same items (up to ties between identical vectors)
            assert x["key"] not in want_scores or abs(want_scores[x["key"]] - x["score"]) < 1e-5
