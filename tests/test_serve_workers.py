"""`vislang serve --workers 2`: two processes answer on one port, both with the library's answers, and each picks up
items that `index add` commits while they run (issue 29). Plus the thread defaults that keep FAISS and torch from
oversubscribing a small machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("faiss", reason="the index needs faiss-cpu")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vislang[serve]')")
httpx = pytest.importorskip("httpx", reason="the test client needs httpx")

from test_index import make_tiny_model, write_images  # noqa: E402
from test_serve_load import bench_helpers  # noqa: E402
from vislang.index import Searcher, build_index  # noqa: E402
from vislang.serve.workers import default_threads, serve, set_threads  # noqa: E402

TEXTS = ["a red circle", "a blue square"]


def answers_by_process(url: str, text: str, k: int, tries: int = 40) -> dict[int, list[int]]:
    """{server pid: ids answered} from new connections, until both processes have answered (or ``tries`` ran out)."""
    seen: dict[int, list[int]] = {}
    for _ in range(tries):
        with httpx.Client(base_url=url, timeout=30) as client:  # a new connection: either process may accept it
            pid = client.get("/healthz").json()["pid"]
            r = client.post("/v1/search", json={"text": text, "k": k})  # same connection, same process
            assert r.status_code == 200, r.text
            seen[pid] = [h["id"] for h in r.json()["results"]]
        if len(seen) == 2:
            break
    return seen


def test_two_workers_answer_like_the_library_and_catch_up(tmp_path):
    model = make_tiny_model(tmp_path)
    write_images(tmp_path / "images", 10)
    build_index(str(tmp_path / "images"), tmp_path / "ix", model, progress=False)
    searcher = Searcher(tmp_path / "ix")
    expected = {t: [h["id"] for h in searcher.search_text(t, 5)] for t in TEXTS}
    searcher.close()

    free_port, wait_healthy = bench_helpers()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vislang.cli", "serve", "--index", str(tmp_path / "ix"), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--workers", "2", "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        wait_healthy(url, proc, seconds=120, workers=2)  # both processes loaded and answering
        for text, want in expected.items():
            seen = answers_by_process(url, text, 5)
            assert len(seen) == 2 and all(ids == want for ids in seen.values()), seen
        write_images(tmp_path / "more", 3, split="val")
        build_index(str(tmp_path / "more"), tmp_path / "ix", progress=False)  # `index add` while they serve
        deadline = time.monotonic() + 30
        while True:
            seen = answers_by_process(url, TEXTS[0], 100)
            if len(seen) == 2 and all(len(ids) == 13 for ids in seen.values()):
                break
            assert time.monotonic() < deadline, f"the workers did not pick up the added items: {seen}"
            time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert b"Traceback" not in err, err.decode()[-3000:]


def test_thread_defaults_leave_cores_for_http():
    assert default_threads(1, cpus=2) == 1 and default_threads(2, cpus=2) == 1  # the 2-core machine: 1 each
    assert default_threads(1, cpus=16) == 8 and default_threads(4, cpus=16) == 2
    assert default_threads(8, cpus=4) == 1  # never 0


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--workers must be at least 1"):
        serve({"index_dir": str(tmp_path)}, 0, None)


def test_a_worker_that_could_not_start_stops_the_command_at_once(tmp_path):
    """uvicorn restarts dying workers for ever; the options are checked before any worker starts instead."""
    with pytest.raises(FileNotFoundError, match="is not a vislang index"):
        serve({"index_dir": str(tmp_path / "missing")}, 2, None, port=0)
    model = make_tiny_model(tmp_path)
    write_images(tmp_path / "images", 2)
    build_index(str(tmp_path / "images"), tmp_path / "ix", model, progress=False)
    with pytest.raises(FileNotFoundError, match="--caption-model .* is not a directory"):
        serve({"index_dir": str(tmp_path / "ix"), "caption_model": str(tmp_path / "nope")}, 2, None, port=0)


def test_the_server_freezes_its_startup_objects(tmp_path, monkeypatch):
    """A full garbage collection over the ~230k objects a loaded server holds takes 100+ ms with the GIL held; the
    server takes them out of the collector's scans before it answers anything."""
    import gc

    import uvicorn

    model = make_tiny_model(tmp_path)
    write_images(tmp_path / "images", 2)
    build_index(str(tmp_path / "images"), tmp_path / "ix", model, progress=False)
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(frozen=gc.get_freeze_count(), app=app))
    threads = torch.get_num_threads()
    gc.unfreeze()
    try:
        serve({"index_dir": str(tmp_path / "ix")}, 1, 1, port=0)
    finally:
        gc.unfreeze()
        set_threads(threads)  # serve set this process's threads: give the other tests theirs back
    assert ran["frozen"] > 10_000 and ran["app"].state.service.searcher.index.read_only
