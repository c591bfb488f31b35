"""The search batcher: concurrent queries answered together, each exactly as if alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from vislang.serve.batching import SearchBatcher

RNG = np.random.default_rng(0)
STORE = RNG.normal(size=(500, 8)).astype(np.float32)


def embed(texts):
    return np.stack([np.full(8, len(t) * (1 + sum(map(ord, t)) % 7), np.float32) for t in texts]).astype(np.float32)


def search(vectors, k):
    scores = vectors @ STORE.T
    order = np.argsort(-scores, axis=1)[:, :k]
    return [[{"id": int(i), "score": float(s[i])} for i in row] for row, s in zip(order, scores)]


def test_concurrent_queries_are_batched_and_each_gets_its_own_answer():
    gate = threading.Event()
    calls = []

    def slow_search(vectors, k):
        calls.append(len(vectors))
        gate.wait(5)  # hold the first batch so the others queue up behind it
        return search(vectors, k)

    b = SearchBatcher(embed, slow_search)
    texts = [f"query {i}" * (i % 3 + 1) for i in range(20)]
    vecs = [RNG.normal(size=8).astype(np.float32) for _ in range(5)]
    futures = [b.submit(3 + i % 4, text=t) for i, t in enumerate(texts)]
    futures += [b.submit(5, vector=v) for v in vecs]
    gate.set()
    got = [f.result(timeout=10) for f in futures]
    want = [search(embed([t]), 3 + i % 4)[0] for i, t in enumerate(texts)] + [search(v[None], 5)[0] for v in vecs]
    assert [[h["id"] for h in g] for g in got] == [[h["id"] for h in w] for w in want]  # each query's own k
    np.testing.assert_allclose([h["score"] for g in got for h in g], [h["score"] for w in want for h in w], rtol=1e-5)
    assert b.requests == 25 and b.batches < 25 and max(calls) > 1


def test_a_failing_batch_fails_its_callers_and_the_worker_keeps_serving():
    state = {"fail": True}

    def flaky(vectors, k):
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("index unavailable")
        return search(vectors, k)

    b = SearchBatcher(embed, flaky)
    with pytest.raises(RuntimeError, match="index unavailable"):
        b.submit(2, text="a").result(timeout=10)
    assert b.submit(2, text="a").result(timeout=10) == search(embed(["a"]), 2)[0]


def test_submit_needs_exactly_one_query():
    b = SearchBatcher(embed, search)
    with pytest.raises(ValueError, match="exactly one"):
        b.submit(3)
    with pytest.raises(ValueError, match="exactly one"):
        b.submit(3, text="a", vector=np.zeros(8))
    with pytest.raises(ValueError, match="max_batch"):
        SearchBatcher(embed, search, max_batch=0)


def _blocked():
    """A search that waits for ``gate`` and records the batch sizes it saw."""
    gate, calls = threading.Event(), []

    def blocked(vectors, k):
        calls.append(len(vectors))
        gate.wait(10)
        return search(vectors, k)

    return gate, calls, blocked


def test_a_cancelled_search_is_dropped_and_the_worker_keeps_serving():
    """A client that disconnects cancels its future, mid-search or while queued: the worker must not die of it."""
    import time

    gate, calls, blocked = _blocked()
    b = SearchBatcher(embed, blocked)
    running = b.submit(2, text="taken into a batch")
    while not calls:  # the worker is inside search() with it
        time.sleep(0.01)
    running.cancel()  # the handler was cancelled mid-search
    queued = b.submit(2, text="still waiting")
    queued.cancel()  # cancelled while queued
    gate.set()
    assert b.submit(2, text="a").result(timeout=10) == search(embed(["a"]), 2)[0]
    assert b.alive and b.dropped == 1 and calls[1:] == [1]  # the queued one was never searched


def test_a_full_queue_refuses_at_once_and_a_late_request_is_not_searched():
    import time

    from vislang.serve.batching import Overloaded

    gate, calls, blocked = _blocked()
    b = SearchBatcher(embed, blocked, max_queue=2, timeout=0.05)
    first = b.submit(1, text="first")
    while not calls:
        time.sleep(0.01)
    late = [b.submit(1, text="x"), b.submit(1, text="y")]
    assert b.depth == 2
    with pytest.raises(Overloaded, match="retry"):
        b.submit(1, text="one too many")
    time.sleep(0.1)  # the two queued ones pass their deadline
    gate.set()
    assert first.result(timeout=10)
    for f in late:
        with pytest.raises(TimeoutError):
            f.result(timeout=10)
    assert calls == [1] and b.alive
