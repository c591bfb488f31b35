"""The index interface every back end implements, and the index directory's small JSON header.

An index maps integer ids to normalised embeddings plus metadata (where the image lives, its caption). Search is by
inner product, which on unit vectors is cosine similarity. An index directory always holds ``index.json``, written
once at creation, naming the back end, the embedding size and the model that produced the vectors, so commands that
only read an index (``vislang search``, ``vislang serve``) need nothing but the directory.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HEADER = "index.json"
BACKENDS = ("faiss", "pgvector")
# Metadata fields an item may carry; ``key`` (its unique source identity) and ``path`` are required.
FIELDS = ("key", "path", "caption", "offset", "size")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, ``os.replace``, fsync the folder: readers see the old or
    new file, and the new one survives a power cut."""
    from ..model_dir import fsync_dir  # lazy: model_dir loads torch, which reading an index header does not need

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 C-contiguous copy with unit-length rows (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array (N, dim), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def item_from_row(row: Sequence[Any]) -> dict[str, Any]:
    """The metadata dict of an ``(id, key, path, caption, offset, size)`` row, as both back ends select it."""
    return {"id": row[0], "key": row[1], "path": row[2], "caption": row[3], "offset": row[4], "size": row[5]}


def read_header(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` of an index directory."""
    path = Path(directory) / HEADER
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a vislang index (no {HEADER}); build one with `vislang index build SRC --model DIR "
            f"--index {directory}`"
        )
    return json.loads(path.read_text())


def write_header(directory: str | os.PathLike, header: dict[str, Any]) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(directory) / HEADER, json.dumps(header, indent=2).encode())


class Index(ABC):
    """Vectors by integer id, with metadata, searched by inner product on normalised vectors.

    Ids are assigned by the index (increasing, never reused after ``remove``) unless the caller passes them. Every
    ``add`` and ``remove`` is one transaction: after a crash an index holds each item completely or not at all.
    """

    directory: Path
    dim: int

    # --- writing: validation here, storage in the back ends' _add / _remove ------------------------------------
    def add(
        self, vectors: np.ndarray, metadata: Sequence[dict[str, Any]], ids: Sequence[int] | None = None
    ) -> np.ndarray:
        """Add (N, dim) vectors, one metadata dict each (``key`` and ``path`` required); returns their ids (N,)."""
        vecs = normalize_rows(vectors)  # (N, dim)
        self.check_batch(vecs, metadata, ids)
        if len(vecs) == 0:
            return np.zeros(0, dtype=np.int64)
        return self._add(vecs, list(metadata), None if ids is None else [int(i) for i in ids])

    def remove(self, ids: Sequence[int]) -> int:
        """Remove items by id; unknown ids are ignored. Returns how many were removed."""
        wanted = sorted({int(i) for i in ids})
        return self._remove(wanted) if wanted else 0

    @abstractmethod
    def _add(self, vectors: np.ndarray, metadata: list[dict[str, Any]], ids: list[int] | None) -> np.ndarray:
        """Store a checked, non-empty batch of unit vectors (N, dim) in one transaction; returns the ids (N,).

        A key or id already in the index raises ValueError and stores nothing.
        """

    @abstractmethod
    def _remove(self, ids: list[int]) -> int:
        """Delete the given (distinct, non-empty) ids in one transaction; returns how many existed."""

    def save(self) -> None:  # noqa: B027 -- optional hook, not abstract
        """Persist whatever is kept only in memory (a no-op where every write is already durable)."""

    def close(self) -> None:
        """Save and release files and connections."""
        self.save()

    # --- reading ------------------------------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, ids (Q, k) int64), best first; rows are padded with id -1 past the last hit."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be at least 1, got {k!r}")
        q = normalize_rows(vectors)  # (Q, dim)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have size {q.shape[1]}, this index holds size {self.dim}")
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return self._search(q, int(k))

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``search`` on checked, non-empty unit queries (Q, dim) with k >= 1."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def get(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        """Metadata (with ``id``) of each id, ``None`` for unknown ones."""

    @abstractmethod
    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored (normalised) vectors of known ids, (N, dim); KeyError names an unknown id."""

    @abstractmethod
    def ids_for_keys(self, keys: Sequence[str]) -> dict[str, int]:
        """{key: id} for the keys already indexed (what a resumed build skips)."""

    @abstractmethod
    def ids_for_paths(self, paths: Sequence[str]) -> list[int]:
        """Ids of every item read from one of ``paths`` (all the frames of a video: their keys differ, the path
        is the video's)."""

    @abstractmethod
    def get_state(self, name: str, default: Any = None) -> Any:
        """A small JSON value stored with the index (build progress, options)."""

    @abstractmethod
    def set_state(self, name: str, value: Any) -> None: ...

    def add_to_state_list(self, name: str, values: Iterable[str]) -> list[str]:
        """Union ``values`` into the sorted list of strings held in state ``name``; returns the new list.

        Read, merge, write: enough where one process writes (FAISS). A back end that several processes write at
        once (pgvector under a sharded build) does it in one statement instead, so no process's values are lost."""
        merged = sorted(set(self.get_state(name) or []) | set(values))
        self.set_state(name, merged)
        return merged

    # --- shared helpers ------------------------------------------------------------------------------------------
    @property
    def header(self) -> dict[str, Any]:
        return read_header(self.directory)

    def query(self, vectors: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Search and join the metadata: per query, a list of ``{"id", "score", "path", "caption", ...}``."""
        scores, ids = self.search(vectors, k)
        found = self.get(sorted({int(i) for i in ids.ravel() if i >= 0}))
        by_id = {m["id"]: m for m in found if m is not None}
        out = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for s, i in zip(row_scores.tolist(), row_ids.tolist()):
                if i >= 0 and i in by_id:  # an id removed between search and lookup is dropped
                    hits.append({**by_id[i], "score": float(s)})
            out.append(hits)
        return out

    def info(self) -> dict[str, Any]:
        """Size, embedding size, back end and build state, for ``vislang index info`` and ``/healthz``."""
        return {
            "directory": str(self.directory),
            "backend": self.header.get("backend"),
            "size": len(self),
            "dim": self.dim,
            "model": self.header.get("model"),
            "build": self.get_state("build"),
        }

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_batch(self, vectors: np.ndarray, metadata: Sequence[dict[str, Any]], ids: Sequence[int] | None) -> None:
        """ValueError for a batch whose shapes, ids or metadata do not fit this index."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must be (N, {self.dim}) for this index, got {tuple(vectors.shape)}")
        if len(metadata) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(metadata)} metadata entries; give one per vector")
        if ids is not None and len(ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        for m in metadata:
            if not m.get("key") or not m.get("path"):
                raise ValueError(f"every item needs a 'key' and a 'path', got {m!r}")
            unknown = set(m) - set(FIELDS)
            if unknown:
                raise ValueError(f"unknown metadata field(s) {sorted(unknown)}; allowed: {list(FIELDS)}")
        keys = [m["key"] for m in metadata]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate keys in one batch; each image may be indexed once")


def create_index(
    directory: str | os.PathLike, dim: int, backend: str = "faiss", model: str | None = None, **options: Any
) -> Index:
    """Create an empty index directory (``index.json`` + the back end's storage) and open it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown index back end {backend!r}; use one of {list(BACKENDS)}")
    d = Path(directory)
    if (d / HEADER).is_file():
        raise FileExistsError(f"{d} already holds an index; open it with open_index, or pick a new directory")
    write_header(d, {"backend": backend, "dim": int(dim), "model": model, "options": options})
    return open_index(d)


def open_index(directory: str | os.PathLike, read_only: bool = False) -> Index:
    """Open an existing index directory with the back end its ``index.json`` names.

    ``read_only`` (a server): the FAISS back end opens SQLite read-only and memory-maps its vectors file, so several
    server processes share one copy of the vectors; pgvector reads through its database server either way.
    """
    header = read_header(directory)
    backend = header.get("backend")
    if backend == "faiss":
        # lazy: this back end's optional package (faiss / psycopg) loads only when chosen
        from .faiss_index import FaissIndex

        return FaissIndex(directory, int(header["dim"]), **header.get("options", {}), read_only=read_only)
    if backend == "pgvector":
        # lazy: this back end's optional package (faiss / psycopg) loads only when chosen
        from .pgvector_index import PgVectorIndex

        return PgVectorIndex(directory, int(header["dim"]), **header.get("options", {}))
    raise ValueError(f"{directory}/{HEADER} names an unknown back end {backend!r}; expected one of {list(BACKENDS)}")
