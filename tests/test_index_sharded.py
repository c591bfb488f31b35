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


def test_sharded_build_records_roots_and_honours_allow_outside_root(tmp_path: Path, monkeypatch) -> None:
    """A CSV whose rows point out of its folder: refused without --allow-outside-root; with it, the index records the
    CSV's folder (rank 0, before any item) and the outside folders of both ranks (rank 0's share reads folder a,
    rank 1's folder b), so the server may send every indexed image, as after a build by one process."""
    from vislang.index.files import ROOTS_STATE, servable_path

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    inside = write_images(tmp_path / "data" / "imgs", 2)
    out_a, out_b = write_images(tmp_path / "a", 2), write_images(tmp_path / "b", 2, split="train")
    rows = [f"imgs/{inside[0].name}", f"imgs/{inside[1].name}", out_a[0], out_b[0], out_a[1], out_b[1]]
    (tmp_path / "data" / "pairs.csv").write_text("path\n" + "".join(f"{r}\n" for r in rows))
    server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="stop")
    try:
        uri = server.get_uri()
        monkeypatch.setenv(URI, uri)
        model = make_tiny_model(tmp_path)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "VISLANG_PG_URI": uri}

        def build(index: str, *extra: str) -> subprocess.CompletedProcess:
            cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "vislang.cli", "index", "build",
                   str(tmp_path / "data" / "pairs.csv"), "--model", str(model), "--index", str(tmp_path / index),
                   "--backend", "pgvector", "--batch-size", "2", "--no-progress", *extra]  # fmt: skip
            return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

        refused = build("refused")
        assert refused.returncode != 0 and "--allow-outside-root" in refused.stdout + refused.stderr
        proc = build("allowed", "--allow-outside-root")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "indexed 6 new image(s)" in proc.stdout
        with open_index(tmp_path / "allowed") as ix:
            roots = ix.get_state(ROOTS_STATE)
            assert roots == sorted(str(d.resolve()) for d in (tmp_path / "data", tmp_path / "a", tmp_path / "b"))
            for p in [*inside, *out_a, *out_b]:
                assert servable_path(p.resolve(), roots) == str(p.resolve())
    finally:
        server.cleanup()


URI = "VISLANG_PG_URI"
