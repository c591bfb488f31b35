"""Coalesce concurrent search requests into one text-embedding call and one index scan.

Why: an exact FAISS search is memory-bound — one pass over the stored vectors costs about the same for one query as
for thirty — and the text tower, too, runs a batch of texts for little more than one. So a single worker thread takes
every request waiting when it becomes free and answers them together. Nothing waits for a timer: a lone query runs at
once, and under load the batches grow by themselves while the previous one runs (OpenCLIP-style services and Triton's
dynamic batcher make the same trade).
"""

from __future__ import annotations

import queue
import threading
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


class SearchBatcher:
    """A worker thread answering ``submit`` calls in batches of up to ``max_batch``.

    Args:
        embed_texts: texts -> (N, dim) normalised embeddings.
        search: (N, dim) vectors, k -> per query a list of hits (best first).
        before_batch: called once per batch before searching (e.g. pick up items another process added).
        max_batch: most requests answered by one call.
    """

    def __init__(
        self,
        embed_texts: Callable[[list[str]], np.ndarray],
        search: Callable[[np.ndarray, int], list[list[dict[str, Any]]]],
        before_batch: Callable[[], None] | None = None,
        max_batch: int = 64,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.embed_texts, self.search, self.before_batch = embed_texts, search, before_batch
        self.max_batch = max_batch
        self.batches = 0  # how many calls answered how many requests: for tests and /healthz-style insight
        self.requests = 0
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="vislang-search-batcher", daemon=True)
        self._thread.start()

    def submit(self, k: int, text: str | None = None, vector: np.ndarray | None = None) -> Future:
        """Queue one search (a text or a vector); the future resolves to its top-``k`` hits."""
        if (text is None) == (vector is None):
            raise ValueError("submit exactly one of text or vector")
        req = _Request(k=k, text=text, vector=None if vector is None else np.asarray(vector, np.float32).ravel())
        self._queue.put(req)
        return req.future

    def _take(self) -> list[_Request]:
        batch = [self._queue.get()]  # block for the first; then take what is already waiting, no timer
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                hits = self._answer(batch)
            except Exception as e:  # noqa: BLE001 -- every caller gets the error; the worker keeps serving
                for req in batch:
                    req.future.set_exception(e)
                continue
            for req, h in zip(batch, hits):
                req.future.set_result(h[: req.k])

    def _answer(self, batch: list[_Request]) -> list[list[dict[str, Any]]]:
        self.batches += 1
        self.requests += len(batch)
        texts = [r.text for r in batch if r.text is not None]
        text_vecs = iter(self.embed_texts(texts)) if texts else iter(())
        vectors = np.stack([next(text_vecs) if r.text is not None else r.vector for r in batch]).astype(np.float32)
        if self.before_batch is not None:
            self.before_batch()
        return self.search(vectors, max(r.k for r in batch))
