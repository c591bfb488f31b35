"""`torchrun --nproc-per-node 2 -m vislang.cli index build ... --backend pgvector`: two CPU processes each embed
their share of a folder into one pgserver database; every image ends up indexed exactly once, and the index answers
like one built by a single process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pgserver = pytest.importorskip("pgserver", reason="these tests run PostgreSQL from the pgserver package")

from test_index import make_tiny_model, write_images  # noqa: E402
from vislang.index import build_index, open_index  # noqa: E402
from vislang.index.sharded import shard  # noqa: E402


def test_shard_splits_disjointly_and_completely() -> None:
    items = list(range(11))
    parts = [list(shard(iter(items), r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == items and parts[0] == [0, 3, 6, 9]


def test_two_processes_fill_one_pgvector_index(tmp_path: Path, monkeypatch) -> None:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="stop")
    try:
        uri = server.get_uri()
        monkeypatch.setenv(URI, uri)  # this process opens the same database (the index header does not keep the URI)
        model = make_tiny_model(tmp_path)
        images = write_images(tmp_path / "images", 13)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "VISLANG_PG_URI": uri}
        cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "vislang.cli", "index", "build",
               str(tmp_path / "images"), "--model", str(model), "--index", str(tmp_path / "ix"), "--backend",
               "pgvector", "--batch-size", "3", "--no-progress"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "2 processes embedded [7, 6] image(s)" in proc.stdout
        assert "indexed 13 new image(s)" in proc.stdout
        with open_index(tmp_path / "ix") as ix:
            assert len(ix) == 13
            keys = [m["key"] for m in ix.get(list(ix.ids_for_keys([str(p.resolve()) for p in images]).values()))]
            assert sorted(keys) == sorted(str(p.resolve()) for p in images)  # every image exactly once
            assert ix.get_state("build")["status"] == "complete"
            sharded = {m["key"]: ix.vectors([m["id"]])[0] for m in ix.get(list(range(1, 40))) if m}
        one = build_index(str(tmp_path / "images"), tmp_path / "one", model, progress=False, backend="pgvector",
                          table="single")  # fmt: skip
        assert one["added"] == 13
        with open_index(tmp_path / "one") as ix:
            for p in images:
                i = ix.ids_for_keys([str(p.resolve())])[str(p.resolve())]
                np.testing.assert_allclose(ix.vectors([i])[0], sharded[str(p.resolve())], atol=1e-5)
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # resumes: nothing new
        assert again.returncode == 0 and "indexed 0 new image(s) (13 already there" in again.stdout
    finally:
        server.cleanup()


URI = "VISLANG_PG_URI"
