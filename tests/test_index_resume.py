"""A build killed with SIGKILL (no cleanup, no save) resumes with every image indexed exactly once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu")
if not hasattr(signal, "SIGKILL"):
    pytest.skip("needs SIGKILL (POSIX)", allow_module_level=True)

from test_index import make_tiny_model, write_images  # noqa: E402
from vislang.index import Searcher, build_index  # noqa: E402

SLOW_BUILD = textwrap.dedent(
    """
    import sys, time
    from vislang.index import build as b
    real = b.embed_items
    def slow(*args, **kw):
        time.sleep(0.3)  # leaves time to kill the build between commits
        return real(*args, **kw)
    b.embed_items = slow
    b.build_index(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=1, commit_every=1, progress=False)
    """
)


def committed(db_path) -> int:
    if not db_path.is_file():
        return 0
    try:
        with sqlite3.connect(db_path, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # the table is being created


def test_sigkilled_build_resumes_exactly(tmp_path):
    model = make_tiny_model(tmp_path)
    images = write_images(tmp_path / "images", 16)
    ix = tmp_path / "ix"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_BUILD, str(tmp_path / "images"), str(ix), str(model)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 50
        while committed(ix / "meta.sqlite") < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the build committed nothing within 50 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    before = committed(ix / "meta.sqlite")
    assert 3 <= before < 16
    import faiss

    for f in ix.glob("vectors-v*.faiss"):  # published at each commit: a committed version, never ahead of SQLite
        assert faiss.read_index(str(f)).ntotal <= before

    counts = build_index(str(tmp_path / "images"), ix, progress=False)
    assert counts["already"] == before and counts["added"] == 16 - before
    with sqlite3.connect(ix / "meta.sqlite") as db:
        keys = [r[0] for r in db.execute("SELECT key FROM items")]
    assert sorted(keys) == sorted(str(p.resolve()) for p in images)  # none lost, none twice
    s = Searcher(ix)
    try:
        assert s.search_image(images[0], k=1)[0]["path"] == str(images[0].resolve())
        assert len(s.search_text("a red circle", k=100)) == 16
    finally:
        s.close()
