"""The embedded back end: FAISS for search, one SQLite file for metadata and the vectors themselves.

SQLite is the record: every ``add``/``remove`` is one SQLite transaction that also bumps a version number. The FAISS
index is derived from it and saved as ``vectors-v{version}.faiss`` (temporary file, then ``os.replace``); when the
saved file is missing or older than the database (a crash, or another process wrote to the index) it is rebuilt from
the stored vectors on open. So a crash can never leave vectors without metadata, or the other way round, and a
resumed build sees exactly the items that were committed. The price is storing each vector twice on disk.

Search is exact (``IndexFlatIP``) up to ``exact_max`` vectors and approximate above, with one of two structures
(``ann``): HNSW, which needs no training and takes additions one by one but cannot delete (a removal rebuilds it),
or IVF-Flat, whose ``nlist`` ≈ 4·sqrt(N) centroids are trained on the stored vectors, which takes additions and
deletions in place and is retrained from SQLite when the index has grown enough that its lists are too long (nlist
below half of 4·sqrt(N)). ``nprobe`` lists are scanned per query. Flat and HNSW sit inside ``IndexIDMap2`` and IVF
stores ids itself, so ids are always the index's own. Every rebuild happens in memory and is saved like any other
version: the file on disk is the old index or the new one, never half of each.

A reader (the server) catches up with another process's writes in ``refresh`` without stopping its searches: the
new version's FAISS file (which ``vislang index add`` publishes at every commit), or a rebuild from one consistent
SQLite read when there is none, is prepared on a connection of its own *beside* the live index, and swapped in with
one assignment; the lock is held only to compare versions and to swap.

A server's processes open the index ``read_only``: SQLite through a read-only URI (no schema or journal change, so a
reader can never write), and the FAISS file memory-mapped (``IO_FLAG_MMAP_IFC``), so N server workers share one copy
of the vectors in the page cache instead of holding N. A reader never saves: when the file of the current version is
missing it builds the index in memory, and waits for a writer to publish the file.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Index, atomic_write_bytes, item_from_row

DB_NAME = "meta.sqlite"
BLAS_THRESHOLD = 4  # queries per search from which exact FAISS search uses a matrix product
_BLAS_SWITCH = threading.Lock()
KINDS = ("auto", "flat", "hnsw", "ivf")
ANNS = ("hnsw", "ivf")  # what ``auto`` switches to above exact_max
IVF_TRAIN_PER_LIST = 64  # training sample: at most this many stored vectors per IVF list (k-means cost ~ sample)
_CHUNK = 500  # ids per "IN (...)" query, under SQLite's variable limit

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,      -- the item's source identity: a resolved file path, or shard#sample
    path TEXT NOT NULL,            -- the file to read the image from
    caption TEXT NOT NULL DEFAULT '',
    offset INTEGER,                -- byte offset of the image inside `path` (a tar member); NULL = the whole file
    size INTEGER,                  -- its length in bytes when `offset` is set
    vector BLOB NOT NULL           -- float32 (dim,), normalised
);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def chunks(seq: Sequence[Any], n: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class FaissIndex(Index):
    """FAISS + SQLite index in one directory.

    Args:
        directory: the index directory (holds ``index.json``, ``meta.sqlite`` and ``vectors-v*.faiss``).
        dim: embedding size.
        kind: ``auto`` (exact up to ``exact_max`` vectors, ``ann`` above), ``flat`` (always exact), ``hnsw`` or
            ``ivf`` (always approximate, once the index holds anything).
        exact_max: the largest index searched exactly in ``auto`` mode.
        ann: the approximate structure ``auto`` switches to: ``hnsw`` or ``ivf``.
        hnsw_m: HNSW neighbours per node (more = better recall, more memory).
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW search-time beam width (raised to k when k is larger).
        nlist: IVF lists; default ``round(4 * sqrt(N))`` at each (re)training.
        nprobe: IVF lists scanned per query (more = better recall, slower).
        read_only: open for searching only (a server): SQLite read-only, the FAISS file memory-mapped; writes raise.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        dim: int,
        kind: str = "auto",
        exact_max: int = 100_000,
        ann: str = "hnsw",
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 16,
        read_only: bool = False,
    ) -> None:
        import faiss

        if kind not in KINDS:
            raise ValueError(f"unknown FAISS index kind {kind!r}; use one of {list(KINDS)}")
        if ann not in ANNS:
            raise ValueError(f"unknown approximate index {ann!r}; use one of {list(ANNS)}")
        if exact_max < 0:
            raise ValueError(f"exact_max must be 0 or more, got {exact_max}")
        if nprobe < 1 or (nlist is not None and nlist < 1):
            raise ValueError(f"nprobe and nlist must be at least 1, got nprobe={nprobe}, nlist={nlist}")
        self.faiss = faiss
        self.directory = Path(directory)
        self.dim = int(dim)
        self.kind, self.exact_max, self.ann = kind, int(exact_max), ann
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.nlist, self.nprobe = nlist, int(nprobe)
        self.read_only = bool(read_only)
        self._lock = threading.RLock()  # writes, version changes and the swap; never held while building
        self._refreshing = threading.Lock()  # one catch-up build at a time
        # autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) in _add/_remove
        self.db = self._connect(check_same_thread=False)
        if not self.read_only:
            self.db.execute("PRAGMA journal_mode=WAL")  # readers (a server) are not blocked by a build writing
            self.db.executescript(SCHEMA)
        self._version = -1
        self._dirty = False
        self._faiss = None
        self.refresh()

    def _connect(self, check_same_thread: bool = True) -> sqlite3.Connection:
        """A connection to the metadata database; read-only (``mode=ro``) for a read-only index."""
        path = self.directory / DB_NAME
        if not self.read_only:
            return sqlite3.connect(path, check_same_thread=check_same_thread, isolation_level=None)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; build the index first (`vislang index build`)")
        uri = f"{path.resolve().as_uri()}?mode=ro"
        return sqlite3.connect(uri, uri=True, check_same_thread=check_same_thread, isolation_level=None)

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(f"{self.directory} is open read-only (a server's view); write with `vislang index "
                                  "add` / `index remove`, which the server picks up by itself")  # fmt: skip

    # --- FAISS side ---------------------------------------------------------------------------------------------
    def _kind_for(self, n: int) -> str:
        """The structure an index of ``n`` vectors should have (an empty one is always exact: nothing to train)."""
        if self.kind == "flat" or n == 0 or (self.kind == "auto" and n <= self.exact_max):
            return "flat"
        return self.ann if self.kind == "auto" else self.kind

    def nlist_for(self, n: int) -> int:
        """IVF lists for ``n`` vectors: the ``nlist`` option, else round(4·sqrt(n)); never more than n."""
        return max(1, min(n, self.nlist or round(4 * math.sqrt(n))))

    def _new_faiss(self, vecs: np.ndarray, ids: np.ndarray):
        """A FAISS index of the kind ``len(vecs)`` calls for, holding ``vecs`` (N, dim) under ``ids`` (N,)."""
        faiss, n = self.faiss, len(vecs)
        kind = self._kind_for(n)
        if kind == "ivf":
            # index_factory returns the IndexIVFFlat itself (owning its quantizer); a downcast_index copy of the
            # wrapper would not keep the object alive
            index = faiss.index_factory(self.dim, f"IVF{self.nlist_for(n)},Flat", faiss.METRIC_INNER_PRODUCT)
            sample = IVF_TRAIN_PER_LIST * index.nlist
            train = vecs if n <= sample else vecs[np.random.default_rng(0).choice(n, sample, replace=False)]
            index.cp.seed = 0  # the same vectors train the same centroids
            index.cp.min_points_per_centroid = 1  # 4·sqrt(N) lists is by design: no "too few points" warning
            index.train(train)
            index.nprobe = self.nprobe
        else:
            if kind == "flat":
                inner = faiss.IndexFlatIP(self.dim)
            else:
                inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                inner.hnsw.efConstruction = self.ef_construction
                inner.hnsw.efSearch = self.ef_search
            index = faiss.IndexIDMap2(inner)
        if n:
            index.add_with_ids(vecs, ids)
        return index

    @property
    def current_kind(self) -> str:
        """``flat``, ``hnsw`` or ``ivf``: what the FAISS index in memory is now."""
        return self._kind_of(self._faiss)

    def _kind_of(self, index) -> str:
        index = self.faiss.downcast_index(index)
        if isinstance(index, self.faiss.IndexIVF):
            return "ivf"
        return "hnsw" if isinstance(self.faiss.downcast_index(index.index), self.faiss.IndexHNSW) else "flat"

    def _needs_rebuild(self, n: int) -> bool:
        """Whether ``n`` items call for another structure, or (IVF) a retraining with more lists."""
        kind = self._kind_for(n)
        if kind != self.current_kind:
            return True
        return kind == "ivf" and self.faiss.downcast_index(self._faiss).nlist * 2 < self.nlist_for(n)

    def _faiss_path(self, version: int) -> Path:
        return self.directory / f"vectors-v{version}.faiss"

    def _from_rows(self, db: sqlite3.Connection):
        """A FAISS index (and for IVF, trained) of the vectors stored in SQLite, read through ``db``."""
        rows = db.execute("SELECT id, vector FROM items ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))  # (N,)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
        return self._new_faiss(vecs, ids)

    def _rebuild(self) -> None:
        """Rebuild the FAISS index from SQLite (a writer, under the lock: its own last transaction is the state)."""
        self._faiss = self._from_rows(self.db)

    def _snapshot(self) -> tuple[int, Any, bool]:
        """(version, FAISS index, whether it still needs saving) of the database as it is now, read in one read
        transaction on a connection of its own, so no lock of this object is held and searches go on meanwhile."""
        db = self._connect()
        try:
            db.execute("BEGIN")  # a WAL read snapshot: the version, the count and the rows agree
            row = db.execute("SELECT value FROM state WHERE name = 'version'").fetchone()
            version = int(json.loads(row[0])) if row else 0
            n = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            path = self._faiss_path(version)
            if path.is_file():
                try:
                    # read-only: memory-mapped, so server processes share the vectors in the page cache (a writer
                    # must not map: it adds to the index it loaded)
                    flags = self.faiss.IO_FLAG_MMAP_IFC if self.read_only else 0
                    loaded = self.faiss.read_index(str(path), flags)
                    if loaded.ntotal == n and loaded.d == self.dim:
                        return version, loaded, False
                except RuntimeError:
                    pass  # unreadable or deleted meanwhile: rebuilt below
            return version, self._from_rows(db), not self.read_only  # a reader never saves
        finally:
            db.close()

    def refresh(self) -> bool:
        """Catch up with writes made by another process (or a crash); True when the FAISS index was swapped."""
        with self._lock:
            if self._db_version() == self._version:
                return False
        with self._refreshing:
            version, index, dirty = self._snapshot()  # beside the live index: searches keep running on it
            with self._lock:
                if version == self._version or (self._version > version and self._faiss is not None):
                    return False  # caught up meanwhile (another refresh, or this process's own write)
                self._faiss, self._version, self._dirty = index, version, dirty
            return True

    def _catch_up_locked(self) -> None:
        """``refresh`` for a writer, which holds the lock throughout (taking ``_refreshing`` under it could deadlock
        with a reader's refresh waiting for the lock to swap)."""
        if self._db_version() != self._version:
            self._version, self._faiss, self._dirty = self._snapshot()

    def save(self) -> None:
        """Write the FAISS index for the current version (atomically) and delete older ones."""
        with self._lock:
            if not self._dirty or self.read_only:
                return
            data = self.faiss.serialize_index(self._faiss)  # uint8 array
            atomic_write_bytes(self._faiss_path(self._version), data.tobytes())
            for old in self.directory.glob("vectors-v*.faiss"):
                if old.name != self._faiss_path(self._version).name:
                    old.unlink(missing_ok=True)
            self._dirty = False

    def close(self) -> None:
        with self._lock:
            self.save()
            self.db.close()

    # --- SQLite side --------------------------------------------------------------------------------------------
    def _db_version(self) -> int:
        row = self.db.execute("SELECT value FROM state WHERE name = 'version'").fetchone()
        return int(json.loads(row[0])) if row else 0

    def _bump_version(self) -> None:
        self._version = self._db_version() + 1
        self.db.execute("INSERT OR REPLACE INTO state VALUES ('version', ?)", (json.dumps(self._version),))

    def get_state(self, name: str, default: Any = None) -> Any:
        with self._lock:
            row = self.db.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_state(self, name: str, value: Any) -> None:
        self._check_writable()
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (name, json.dumps(value)))

    # --- the interface ------------------------------------------------------------------------------------------
    def _add(self, vectors: np.ndarray, metadata: list[dict[str, Any]], ids: list[int] | None) -> np.ndarray:
        self._check_writable()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")  # the write lock first: no other process commits until COMMIT
            try:
                self._catch_up_locked()  # another process may have written since
                if ids is None:
                    row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
                    start = (row[0] if row else 0) + 1
                    ids = list(range(start, start + len(vectors)))
                new_ids = np.asarray(ids, dtype=np.int64)
                self.db.executemany(
                    "INSERT INTO items (id, key, path, caption, offset, size, vector) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (int(i), m["key"], str(m["path"]), m.get("caption") or "", m.get("offset"), m.get("size"), v)
                        for i, m, v in zip(new_ids.tolist(), metadata, (row.tobytes() for row in vectors))
                    ],
                )
                self._bump_version()
                self.db.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                self.db.execute("ROLLBACK")
                self._version = self._db_version()
                raise ValueError(f"an id or key of this batch is already in the index ({e})") from e
            except BaseException:
                self.db.execute("ROLLBACK")
                self._version = self._db_version()
                raise
            if self._needs_rebuild(len(self)):
                self._rebuild()  # crossed exact_max, or IVF lists grew too long: retrain from SQLite
            else:
                self._faiss.add_with_ids(vectors, new_ids)
            self._dirty = True
            return new_ids

    def _remove(self, ids: list[int]) -> int:
        self._check_writable()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self._catch_up_locked()
                found = []
                for part in chunks(ids):
                    q = ",".join("?" * len(part))
                    found += [r[0] for r in self.db.execute(f"SELECT id FROM items WHERE id IN ({q})", part)]
                    self.db.execute(f"DELETE FROM items WHERE id IN ({q})", part)
                if found:
                    self._bump_version()
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            if not found:
                return 0
            if self.current_kind != "hnsw" and not self._needs_rebuild(len(self)):
                self._faiss.remove_ids(np.asarray(found, dtype=np.int64))  # flat and IVF delete in place
            else:
                self._rebuild()  # HNSW cannot delete; or the index shrank back under exact_max
            self._dirty = True
            return len(found)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._faiss  # one reference: a rebuild or refresh swaps in a new object
        kind = self._kind_of(index)
        if kind == "hnsw":
            params = self.faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
            return index.search(queries, k, params=params)  # (Q, k), (Q, k)
        if kind == "ivf":
            params = self.faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.faiss.downcast_index(index).nlist))
            return index.search(queries, k, params=params)
        return self._exact_search(index, queries, k)

    def _exact_search(self, index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search; a batch of ``BLAS_THRESHOLD``+ queries runs as one matrix product (BLAS).

        Why: the server batches concurrent queries, and FAISS's default would scan the vectors once per query —
        measured on 100k x 256-d, one thread: 16 queries 31 ms as a product, 157 ms one by one. A single query stays
        on FAISS's SIMD scan (9 ms; 19 ms as a product). The switch is a FAISS global, so it is set per call.
        """
        if len(queries) < BLAS_THRESHOLD:
            return index.search(queries, k)
        cvar = self.faiss.cvar
        with _BLAS_SWITCH:  # a global of FAISS: set, search, restore, one batch at a time
            default = cvar.distance_compute_blas_threshold
            cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
            try:
                return index.search(queries, k)
            finally:
                cvar.distance_compute_blas_threshold = default

    def __len__(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def get(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        wanted = [int(i) for i in ids]
        found: dict[int, dict[str, Any]] = {}
        with self._lock:
            for part in chunks(wanted):
                q = ",".join("?" * len(part))
                sql = f"SELECT id, key, path, caption, offset, size FROM items WHERE id IN ({q})"
                for r in self.db.execute(sql, part):
                    found[r[0]] = item_from_row(r)
        return [found.get(i) for i in wanted]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        wanted = [int(i) for i in ids]
        found: dict[int, bytes] = {}
        with self._lock:
            for part in chunks(wanted):
                q = ",".join("?" * len(part))
                found.update(self.db.execute(f"SELECT id, vector FROM items WHERE id IN ({q})", part).fetchall())
        missing = [i for i in wanted if i not in found]
        if missing:
            raise KeyError(f"no item with id {missing[0]} in the index")
        if not wanted:
            return np.zeros((0, self.dim), np.float32)
        return np.frombuffer(b"".join(found[i] for i in wanted), dtype=np.float32).reshape(len(wanted), self.dim)

    def ids_for_keys(self, keys: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        keys = list(keys)
        with self._lock:
            for part in chunks(keys):
                q = ",".join("?" * len(part))
                out.update((k, i) for k, i in self.db.execute(f"SELECT key, id FROM items WHERE key IN ({q})", part))
        return out

    def ids_for_paths(self, paths: Sequence[str]) -> list[int]:
        out: list[int] = []
        with self._lock:
            for part in chunks(list(paths)):
                q = ",".join("?" * len(part))
                out.extend(i for (i,) in self.db.execute(f"SELECT id FROM items WHERE path IN ({q})", part))
        return out

    def all_ids(self) -> np.ndarray:
        """Every id, ascending."""
        with self._lock:
            return np.array([r[0] for r in self.db.execute("SELECT id FROM items ORDER BY id")], dtype=np.int64)

    def info(self) -> dict[str, Any]:
        out = {**super().info(), "kind": self.current_kind, "version": self._version, "exact_max": self.exact_max}
        out["ann"] = self.ann
        if out["kind"] == "ivf":
            out.update(nlist=int(self.faiss.downcast_index(self._faiss).nlist), nprobe=self.nprobe)
        return out
