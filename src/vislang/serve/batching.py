"""Coalesce concurrent search requests into one text-embedding call and one index scan.

Why: an exact FAISS search is memory-bound — one pass over the stored vectors costs about the same for one query as
for thirty — and the text tower, too, runs a batch of texts for little more than one. So a single worker thread takes
every request waiting when it becomes free and answers them together. Nothing waits for a timer: a lone query runs at
once, and under load the batches grow by themselves while the previous one runs (OpenCLIP-style services and Triton's
dynamic batcher make the same trade).

A server must keep answering whatever its clients do, so the worker never dies for a caller's sake: a request whose
caller gave up (a cancelled future: the client disconnected, or its handler timed out) is dropped unanswered, one
whose deadline passed while it waited is failed with ``TimeoutError`` without being searched, and the queue is
bounded, so a flood is refused at once (``Overloaded``, answered 503 with ``Retry-After``) rather than queued for
minutes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class _Request:
    k: int
    text: str | None = None  # embedded in the worker, batched with the other texts
    vector: np.ndarray | None = None  # (dim,) already embedded (uploaded image, stored image, raw embedding)
    future: Future = field(default_factory=Future)
    deadline: float = float("inf")  # time.monotonic() after which the answer is no longer wanted


class Overloaded(RuntimeError):
    """The queue is full: the caller should answer 503 and ask the client to retry later."""


class SearchBatcher:
    """A worker thread answering ``submit`` calls in batches of up to ``max_batch``.

    Args:
        embed_texts: texts -> (N, dim) normalised embeddings.
        search: (N, dim) vectors, k -> per query a list of hits (best first).
        before_batch: called once per batch before searching (e.g. pick up items another process added).
        max_batch: most requests answered by one call.
        max_queue: most requests waiting; ``submit`` raises ``Overloaded`` beyond.
        timeout: seconds a request may wait in the queue before it is failed with ``TimeoutError`` unsearched.
    """

    def __init__(
        self,
        embed_texts: Callable[[list[str]], np.ndarray],
        search: Callable[[np.ndarray, int], list[list[dict[str, Any]]]],
        before_batch: Callable[[], None] | None = None,
        max_batch: int = 64,
        max_queue: int = 1024,
        timeout: float = 30.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.embed_texts, self.search, self.before_batch = embed_texts, search, before_batch
        self.max_batch, self.timeout = max_batch, timeout
        self.batches = 0  # how many calls answered how many requests: for tests and /healthz-style insight
        self.requests = 0
        self.dropped = 0  # cancelled or past their deadline when their turn came
        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="vislang-search-batcher", daemon=True)
        self._thread.start()

    def submit(self, k: int, text: str | None = None, vector: np.ndarray | None = None) -> Future:
        """Queue one search (a text or a vector); the future resolves to its top-``k`` hits."""
        if (text is None) == (vector is None):
            raise ValueError("submit exactly one of text or vector")
        vec = None if vector is None else np.asarray(vector, np.float32).ravel()
        req = _Request(k=k, text=text, vector=vec, deadline=time.monotonic() + self.timeout)
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} searches are already waiting; retry in a moment") from None
        return req.future

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (``/healthz`` reports it)."""
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Requests waiting now."""
        return self._queue.qsize()

    def _take(self) -> list[_Request]:
        """The requests to answer now, each marked running (so it can no longer be cancelled); those cancelled or
        past their deadline are dropped on the way."""
        batch: list[_Request] = []
        while not batch:
            waiting = [self._queue.get()]  # block for the first; then take what is already waiting, no timer
            while len(waiting) < self.max_batch:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            now = time.monotonic()
            for req in waiting:
                if not req.future.set_running_or_notify_cancel():  # the caller gave up: nobody to answer
                    self.dropped += 1
                elif now > req.deadline:
                    self.dropped += 1
                    _settle(req.future, error=TimeoutError("the search waited too long in the queue"))
                else:
                    batch.append(req)
        return batch

    def _run(self) -> None:
        while True:
            try:
                batch = self._take()
                try:
                    hits = self._answer(batch)
                except Exception as e:  # noqa: BLE001 -- every caller gets the error; the worker keeps serving
                    for req in batch:
                        _settle(req.future, error=e)
                    continue
                for req, h in zip(batch, hits):
                    _settle(req.future, result=h[: req.k])
            except Exception:  # noqa: BLE001 -- nothing a request does may end the worker
                continue

    def _answer(self, batch: list[_Request]) -> list[list[dict[str, Any]]]:
        self.batches += 1
        self.requests += len(batch)
        texts = [r.text for r in batch if r.text is not None]
        text_vecs = iter(self.embed_texts(texts)) if texts else iter(())
        vectors = np.stack([next(text_vecs) if r.text is not None else r.vector for r in batch]).astype(np.float32)
        if self.before_batch is not None:
            self.before_batch()
        return self.search(vectors, max(r.k for r in batch))


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a future that may have been answered or cancelled meanwhile (never raises: the worker must live)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except Exception:  # noqa: BLE001 -- InvalidStateError: the caller is gone, and so is the need to answer
        pass
