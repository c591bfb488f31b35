"""The scale-out back end: PostgreSQL with the pgvector extension, one table of items with their vectors.

Several servers can share one database, and the database does the transactions: each ``add``/``remove`` is one
PostgreSQL transaction. Search orders by pgvector's negative inner product (``<#>``) and uses an HNSW index
(``vector_ip_ops``) once the planner prefers it. Without a ``uri`` the index runs its own PostgreSQL, the one the
``pgserver`` package ships, with its data in ``{index}/pgdata``: the same directory-is-the-index experience as FAISS.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Index, atomic_write_bytes, item_from_row

URI_ENV = "VISLANG_PG_URI"
PASSWORD_FILE = "pg-password"  # the embedded server's password, beside index.json (mode 0600)
HBA = """# written by vislang: every connection needs the password in {index}/pg-password (no trust)
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
"""


def close_trust(uri: str, directory: Path, psycopg) -> str:
    """Give the embedded server's superuser a password and require it (scram-sha-256) instead of ``trust``; returns
    the password, kept in ``{index}/pg-password`` (mode 0600).

    Why: pgserver initialises its database with ``--auth=trust`` (any local connection is the superuser, no password).
    Its socket normally sits in ``pgdata/`` (mode 0700, so only its owner gets in), but when that path is too long for
    a socket it moves to a shared runtime folder, which it makes world-writable when run as root: any local user
    could then read and rewrite the index. With a password, reaching the socket is no longer enough.
    Order matters for a crash: password set, then saved, then trust removed; each step is redone until all are done.
    """
    import secrets

    from psycopg import sql

    pw_file = directory / PASSWORD_FILE
    if pw_file.is_file():
        password = pw_file.read_text().strip()
    else:
        password = secrets.token_urlsafe(24)
        with psycopg.connect(uri, autocommit=True) as conn:  # trust is still in force for this one connection
            conn.execute(sql.SQL("ALTER USER CURRENT_USER PASSWORD {}").format(sql.Literal(password)))
        fd = os.open(directory / f".{PASSWORD_FILE}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password)
            f.flush()
            os.fsync(f.fileno())
        os.replace(directory / f".{PASSWORD_FILE}.tmp", pw_file)
    hba = directory / "pgdata" / "pg_hba.conf"
    if any(line.split()[-1:] == ["trust"] for line in hba.read_text().splitlines() if not line.startswith("#")):
        st = hba.stat()
        atomic_write_bytes(hba, HBA.encode())
        os.chown(hba, st.st_uid, st.st_gid)  # the server may run as its own system user (pgserver under root)
        os.chmod(hba, 0o600)
        with psycopg.connect(uri, autocommit=True, password=password) as conn:
            conn.execute("SELECT pg_reload_conf()")
    return password


def vector_literal(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.8g}" for x in v.tolist()) + "]"


class PgVectorIndex(Index):
    """Items and vectors in a PostgreSQL table.

    Args:
        directory: the index directory (``index.json``; ``pgdata/`` when the database is embedded).
        dim: embedding size.
        uri: a PostgreSQL connection string; default ``$VISLANG_PG_URI``, else an embedded server (``pgserver``).
        table: the items table (letters, digits and underscores).
        hnsw: create an HNSW index on the vectors.
        ef_search: HNSW search beam width (raised to k when k is larger).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        dim: int,
        uri: str | None = None,
        table: str = "vislang_items",
        hnsw: bool = True,
        ef_search: int = 100,
    ) -> None:
        try:
            import psycopg
        except ModuleNotFoundError as e:
            raise RuntimeError("the pgvector back end needs psycopg: pip install 'psycopg[binary]' pgserver") from e
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,50}", table):
            raise ValueError(f"table name {table!r} must be letters, digits and underscores")
        self.directory = Path(directory)
        self.dim, self.table, self.ef_search = int(dim), table, int(ef_search)
        self._server = None
        uri = uri or os.environ.get(URI_ENV)
        if not uri:
            try:
                import pgserver
            except ModuleNotFoundError as e:
                raise RuntimeError(
                    f"no PostgreSQL given (uri option or ${URI_ENV}) and no embedded one: pip install pgserver"
                ) from e
            self._server = pgserver.get_server(self.directory / "pgdata", cleanup_mode="stop")
            uri = self._server.get_uri()
            password = close_trust(self._server.get_uri(), self.directory, psycopg)
        self._lock = threading.RLock()
        self.conn = psycopg.connect(uri, autocommit=True, **({"password": password} if self._server else {}))
        self.psycopg = psycopg
        t = self.table
        with self._lock, self.conn.transaction():
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            self.conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {t} (
                    id BIGSERIAL PRIMARY KEY,
                    key TEXT NOT NULL UNIQUE,
                    path TEXT NOT NULL,
                    caption TEXT NOT NULL DEFAULT '',
                    "offset" BIGINT,
                    size BIGINT,
                    embedding vector({self.dim}) NOT NULL)"""
            )
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {t}_state (name TEXT PRIMARY KEY, value JSONB NOT NULL)")
            # An HNSW index built over rows already there costs a fraction of inserting the same rows one by one
            # into an indexed table (pgvector's advice for bulk loads), so an empty table gets its index only when
            # it is first searched or the index is saved or closed: a bulk build inserts into a bare table.
            self._hnsw_pending = False
            if hnsw:
                if self.conn.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0]:
                    self._create_hnsw()
                else:
                    self._hnsw_pending = True

    def _create_hnsw(self) -> None:
        t = self.table
        self.conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_hnsw ON {t} USING hnsw (embedding vector_ip_ops)")
        self._hnsw_pending = False

    def save(self) -> None:
        """Create the deferred HNSW index (every row write is already durable)."""
        with self._lock:
            if self._hnsw_pending and not self.conn.closed:
                self._create_hnsw()

    def close(self) -> None:
        try:
            self.save()
        finally:  # the connection and an embedded server are released even if the deferred index fails
            with self._lock:
                if not self.conn.closed:
                    self.conn.close()
                if self._server is not None:
                    self._server.cleanup()
                    self._server = None

    # --- state --------------------------------------------------------------------------------------------------
    def get_state(self, name: str, default: Any = None) -> Any:
        with self._lock:
            row = self.conn.execute(f"SELECT value FROM {self.table}_state WHERE name = %s", (name,)).fetchone()
        return row[0] if row else default

    def set_state(self, name: str, value: Any) -> None:
        with self._lock:
            self.conn.execute(
                f"INSERT INTO {self.table}_state VALUES (%s, %s::jsonb) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                (name, json.dumps(value)),
            )

    def add_to_state_list(self, name: str, values: Iterable[str]) -> list[str]:
        """One upsert that unions in SQL: the row lock of ``ON CONFLICT DO UPDATE`` makes concurrent calls of the
        processes of a sharded build add up instead of overwriting each other."""
        t = self.table
        with self._lock:
            row = self.conn.execute(
                f"INSERT INTO {t}_state VALUES (%s, %s::jsonb) ON CONFLICT (name) DO UPDATE SET value = ("
                "SELECT coalesce(jsonb_agg(DISTINCT x ORDER BY x), '[]'::jsonb) FROM ("
                f"SELECT jsonb_array_elements({t}_state.value) UNION SELECT jsonb_array_elements(EXCLUDED.value)"
                ") AS u(x)) RETURNING value",
                (name, json.dumps(sorted(set(values)))),
            ).fetchone()
        return list(row[0])

    # --- the interface ------------------------------------------------------------------------------------------
    def _add(self, vectors: np.ndarray, metadata: list[dict[str, Any]], ids: list[int] | None) -> np.ndarray:
        t = self.table
        with self._lock:
            try:
                with self.conn.transaction():
                    if ids is None:
                        seq = f"pg_get_serial_sequence('{t}', 'id')"
                        rows = self.conn.execute(
                            f"SELECT nextval({seq}) FROM generate_series(1, %s)", (len(vectors),)
                        ).fetchall()
                        ids = [r[0] for r in rows]
                    new_ids = np.asarray(ids, dtype=np.int64)
                    with self.conn.cursor() as cur:
                        cur.executemany(
                            f'INSERT INTO {t} (id, key, path, caption, "offset", size, embedding) '
                            "VALUES (%s, %s, %s, %s, %s, %s, %s::vector)",
                            [
                                (
                                    int(i),
                                    m["key"],
                                    str(m["path"]),
                                    m.get("caption") or "",
                                    m.get("offset"),
                                    m.get("size"),
                                    vector_literal(v),
                                )
                                for i, m, v in zip(new_ids.tolist(), metadata, vectors)
                            ],
                        )
            except self.psycopg.errors.UniqueViolation as e:
                raise ValueError(f"an id or key of this batch is already in the index ({e.diag.message_detail})") from e
        return new_ids

    def _remove(self, ids: list[int]) -> int:
        with self._lock:
            return self.conn.execute(f"DELETE FROM {self.table} WHERE id = ANY(%s)", (ids,)).rowcount

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.save()  # a deferred HNSW index is built before the first search needs it
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)  # (Q, k)
        ids = np.full((len(queries), k), -1, dtype=np.int64)  # (Q, k)
        with self._lock, self.conn.transaction():
            self.conn.execute(f"SET LOCAL hnsw.ef_search = {max(self.ef_search, min(k, 1000))}")
            for row, v in enumerate(queries):
                lit = vector_literal(v)
                hits = self.conn.execute(
                    f"SELECT id, -(embedding <#> %s::vector) FROM {self.table} ORDER BY embedding <#> %s::vector "
                    "LIMIT %s",
                    (lit, lit, k),
                ).fetchall()
                for j, (i, s) in enumerate(hits):
                    ids[row, j], scores[row, j] = i, s
        return scores, ids

    def __len__(self) -> int:
        with self._lock:
            return int(self.conn.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0])

    def get(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        wanted = [int(i) for i in ids]
        with self._lock:
            rows = self.conn.execute(
                f'SELECT id, key, path, caption, "offset", size FROM {self.table} WHERE id = ANY(%s)', (wanted,)
            ).fetchall()
        found = {r[0]: item_from_row(r) for r in rows}
        return [found.get(i) for i in wanted]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        wanted = [int(i) for i in ids]
        with self._lock:
            rows = self.conn.execute(
                f"SELECT id, embedding::text FROM {self.table} WHERE id = ANY(%s)", (wanted,)
            ).fetchall()
        found = {i: np.asarray(json.loads(text), dtype=np.float32) for i, text in rows}
        missing = [i for i in wanted if i not in found]
        if missing:
            raise KeyError(f"no item with id {missing[0]} in the index")
        return np.stack([found[i] for i in wanted]) if wanted else np.zeros((0, self.dim), np.float32)

    def ids_for_keys(self, keys: Sequence[str]) -> dict[str, int]:
        with self._lock:
            rows = self.conn.execute(f"SELECT key, id FROM {self.table} WHERE key = ANY(%s)", (list(keys),)).fetchall()
        return dict(rows)

    def ids_for_paths(self, paths: Sequence[str]) -> list[int]:
        with self._lock:
            rows = self.conn.execute(f"SELECT id FROM {self.table} WHERE path = ANY(%s)", (list(paths),)).fetchall()
        return [r[0] for r in rows]

    def all_ids(self) -> np.ndarray:
        """Every id, ascending (as the FAISS back end's ``all_ids``)."""
        with self._lock:
            rows = self.conn.execute(f"SELECT id FROM {self.table} ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "table": self.table, "embedded_server": self._server is not None}
