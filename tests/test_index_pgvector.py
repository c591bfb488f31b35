"""The PostgreSQL + pgvector back end answers like the FAISS one (same interface, same build and search paths)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("psycopg", reason="the pgvector back end needs psycopg (pip install 'psycopg[binary]')")
pgserver = pytest.importorskip("pgserver", reason="these tests run PostgreSQL from the pgserver package")
pytest.importorskip("faiss", reason="the comparison needs faiss-cpu")

from test_index import make_tiny_model, meta, unit, write_images  # noqa: E402
from vislang.index import Searcher, build_index, create_index, open_index  # noqa: E402


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "pgdata", cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


def test_add_search_remove_match_faiss(pg, tmp_path):
    x, q = unit(300, 8), unit(4, 8, seed=1)
    pgix = create_index(tmp_path / "pg", 8, backend="pgvector", uri=pg, table="t_match", hnsw=False)
    fx = create_index(tmp_path / "fx", 8)
    try:
        ids_pg, ids_f = pgix.add(x, meta(300)), fx.add(x, meta(300))
        assert len(pgix) == 300 and ids_pg.tolist() == ids_f.tolist() == list(range(1, 301))
        s_pg, i_pg = pgix.search(q, 5)
        s_f, i_f = fx.search(q, 5)
        assert np.array_equal(i_pg, i_f)  # exact search on both sides
        np.testing.assert_allclose(s_pg, s_f, atol=1e-5)
        assert pgix.get([2, 999]) == [
            {"id": 2, "key": "k1", "path": "/img/1.png", "caption": "c1", "offset": None, "size": None},
            None,
        ]
        np.testing.assert_allclose(pgix.vectors([5])[0], x[4], atol=1e-6)
        assert pgix.ids_for_keys(["k0", "nope"]) == {"k0": 1}
        assert pgix.remove([1, 2, 12345]) == 2 and len(pgix) == 298
        assert 1 not in pgix.search(x[:1], 3)[1]
        with pytest.raises(ValueError, match="already in the index"):
            pgix.add(unit(1, 8), meta(1, start=5))
        new = pgix.add(unit(1, 8), [{"key": "fresh", "path": "/p.png"}])
        assert new[0] > 300  # ids are never reused
        pgix.set_state("build", {"status": "complete"})
        assert pgix.get_state("build") == {"status": "complete"} and pgix.get_state("none", 7) == 7
        assert pgix.search(q, 1000)[1].shape == (4, 1000)  # padded with -1 past the last hit
    finally:
        pgix.close()
        fx.close()
    with open_index(tmp_path / "pg") as again:  # reopened from index.json
        assert len(again) == 299 and again.info()["backend"] == "pgvector"


def test_hnsw_recall(pg, tmp_path):
    x = unit(2000, 16)
    with create_index(tmp_path / "pg", 16, backend="pgvector", uri=pg, table="t_hnsw") as ix:
        ids = ix.add(x, meta(2000))
        _, found = ix.search(x[:40], 1)
        assert (found[:, 0] == ids[:40]).mean() >= 0.95


def test_build_and_search_on_embedded_postgres(tmp_path):
    model = make_tiny_model(tmp_path)
    images = write_images(tmp_path / "images", 6)
    counts = build_index(str(tmp_path / "images"), tmp_path / "ix", model, backend="pgvector", progress=False)
    assert counts["added"] == 6
    assert (tmp_path / "ix" / "pgdata").is_dir()  # no uri: the index runs its own PostgreSQL
    again = build_index(str(tmp_path / "images"), tmp_path / "ix", progress=False)  # resume: nothing to add
    assert again["added"] == 0 and again["already"] == 6
    s = Searcher(tmp_path / "ix")
    try:
        hit = s.search_image(images[2], k=2)[0]
        assert hit["path"] == str(images[2].resolve()) and hit["score"] == pytest.approx(1.0, abs=1e-4)
    finally:
        s.close()


def test_two_server_processes_share_one_pgvector_index(pg, tmp_path):
    """Scale-out: two `vislang serve` processes on one PostgreSQL index; an image added by a third writer is found by
    both (each server re-reads the table on every search, so nothing has to be told)."""
    import os
    import subprocess
    import sys

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from test_serve_load import bench_helpers

    free_port, wait_healthy = bench_helpers()
    model = make_tiny_model(tmp_path)
    write_images(tmp_path / "images", 6)
    build_index(str(tmp_path / "images"), tmp_path / "ix", model, backend="pgvector", uri=pg, progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs, urls = [], []
    try:
        for _ in range(2):
            port = free_port()
            cmd = [sys.executable, "-m", "vislang.cli", "serve", "--index", str(tmp_path / "ix"), "--port", str(port)]
            procs.append(subprocess.Popen(cmd + ["--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE))  # fmt: skip
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs):
            wait_healthy(url, proc, seconds=90)
        more = write_images(tmp_path / "more", 2, split="val")
        added = build_index(str(tmp_path / "more"), tmp_path / "ix", progress=False)  # a third writer
        assert added["added"] == 2
        for url in urls:
            assert httpx.get(url + "/healthz", timeout=30).json()["size"] == 8
            with open(more[0], "rb") as f:
                r = httpx.post(url + "/v1/search", files={"image": ("q.png", f, "image/png")}, data={"k": "1"},
                               timeout=60)  # fmt: skip
            assert r.status_code == 200 and r.json()["results"][0]["name"] == more[0].name
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _indexes(ix) -> set[str]:
    rows = ix.conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (ix.table,)).fetchall()
    return {r[0] for r in rows}


def test_hnsw_index_of_an_empty_table_waits_for_the_bulk_load(pg, tmp_path):
    x = unit(300, 8)
    with create_index(tmp_path / "a", 8, backend="pgvector", uri=pg, table="t_defer") as ix:
        ix.add(x[:200], meta(200))
        ix.add(x[200:], meta(100, start=200))
        assert "t_defer_hnsw" not in _indexes(ix)  # rows went into a bare table
        _, found = ix.search(x[:20], 1)
        assert "t_defer_hnsw" in _indexes(ix)  # the first search built it over every row
        assert (found[:, 0] == np.arange(1, 21)).mean() >= 0.95
    ix = create_index(tmp_path / "b", 8, backend="pgvector", uri=pg, table="t_defer2")
    ix.add(x, meta(300))
    ix.close()  # closing builds it too
    with open_index(tmp_path / "b") as again:
        assert "t_defer2_hnsw" in _indexes(again) and len(again) == 300
    with create_index(tmp_path / "c", 8, backend="pgvector", uri=pg, table="t_plain", hnsw=False) as ix:
        ix.add(x, meta(300))
        ix.search(x[:2], 1)
        assert "t_plain_hnsw" not in _indexes(ix)  # hnsw=False never builds one


def test_the_embedded_server_needs_a_password(tmp_path):
    """pgserver initialises with --auth=trust: whoever reaches its socket is the superuser. Opening an embedded
    index replaces trust with scram-sha-256 and a password kept beside index.json, readable by its owner only."""
    import psycopg

    ix = create_index(tmp_path / "ix", 4, backend="pgvector")
    ix.add(np.eye(4, dtype=np.float32)[:2], [{"key": "a", "path": "/a.png"}, {"key": "b", "path": "/b.png"}])
    hba = (tmp_path / "ix" / "pgdata" / "pg_hba.conf").read_text()
    assert "trust" not in [w for line in hba.splitlines() if not line.startswith("#") for w in line.split()[-1:]]
    assert oct((tmp_path / "ix" / "pg-password").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(psycopg.OperationalError, match="password"):  # reaching the socket is not enough
        psycopg.connect(ix._server.get_uri(), connect_timeout=10).close()
    ix.close()
    with open_index(tmp_path / "ix") as again:  # reopened: the stored password gets in
        assert len(again) == 2
