"""A load test on a real `vislang serve` process: good requests and every kind of bad one, shuffled and sent from
8 threads at once. Every good request must get the right answer, every bad one its own status code, and the server
must still be up and answering at the end."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vislang[serve]')")
httpx = pytest.importorskip("httpx", reason="the load test client needs httpx")

from test_index import make_tiny_model, write_images  # noqa: E402
from test_serve import png_header_only  # noqa: E402
from vislang.index import Searcher, build_index  # noqa: E402

KEY = "load-test-key"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "search_latency.py"
TEXTS = ["a red circle", "a blue square", "a small green star", "a large yellow triangle"]


def bench_helpers():
    """``free_port`` and ``wait_healthy`` from the latency benchmark, which starts its server the same way."""
    spec = importlib.util.spec_from_file_location("search_latency_helpers", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.free_port, module.wait_healthy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    model = make_tiny_model(root)
    images = write_images(root / "images", 12)
    build_index(str(root / "images"), root / "ix", model, progress=False)
    searcher = Searcher(root / "ix")
    try:  # the answers the server must give, computed by the library in this process
        expected = {t: [h["id"] for h in searcher.search_text(t, 5)] for t in TEXTS}
        ids = searcher.index.ids_for_keys([str(p.resolve()) for p in images])
    finally:
        searcher.close()
    return {"root": root, "images": images, "index": root / "ix", "expected": expected, "ids": ids}


@pytest.fixture(scope="module")
def server(world):
    free_port, wait_healthy = bench_helpers()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vislang.cli", "serve", "--index", str(world["index"]), "--port", str(port)]
    cmd += ["--api-key", KEY, "--max-upload-mb", "0.25", "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(url, proc, seconds=90)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def requests_mix(world) -> tuple[list[tuple[str, dict, object]], list[tuple[str, dict, object]]]:
    """Good and bad (name, httpx request kwargs, check): ``check`` is a function of the response, or a status code."""
    auth = {"X-API-Key": KEY}
    good: list[tuple[str, dict, object]] = []
    for text, want in world["expected"].items():

        def text_ok(r, want=want) -> bool:
            return r.status_code == 200 and [h["id"] for h in r.json()["results"]] == want

        good.append(("text", {"method": "POST", "url": "/v1/search", "json": {"text": text, "k": 5}}, text_ok))
    for p in world["images"][:4]:
        want_id = world["ids"][str(p.resolve())]

        def upload_ok(r, want_id=want_id) -> bool:
            top = r.status_code == 200 and r.json()["results"][0]
            return bool(top) and top["id"] == want_id and abs(top["score"] - 1) < 1e-3

        files = {"image": ("q.png", p.read_bytes(), "image/png")}
        good.append(("upload", {"method": "POST", "url": "/v1/search", "files": files, "data": {"k": "3"}}, upload_ok))

        data = p.read_bytes()

        def bytes_ok(r, data=data) -> bool:
            return r.status_code == 200 and r.content == data

        good.append(("image", {"method": "GET", "url": f"/v1/images/{want_id}"}, bytes_ok))

    def embed_ok(r) -> bool:
        return r.status_code == 200 and r.json()["dim"] == 16 and len(r.json()["embeddings"]) == 2

    good.append(("embed", {"method": "POST", "url": "/v1/embed", "json": {"texts": TEXTS[:2]}}, embed_ok))
    for g in good:
        g[1]["headers"] = auth

    png = world["images"][0].read_bytes()
    search = {"method": "POST", "url": "/v1/search", "headers": auth}
    bad: list[tuple[str, dict, object]] = [
        ("oversized", {**search, "files": {"image": ("b.png", png[:8] + b"\0" * 300_000, "image/png")}}, 413),
        ("not an image", {**search, "files": {"image": ("x.png", b"plain text", "image/png")}}, 415),
        ("broken png", {**search, "files": {"image": ("x.png", png[:60], "image/png")}}, 415),
        ("bomb", {**search, "files": {"image": ("x.png", png_header_only(100_000, 100_000), "image/png")}}, 400),
        ("pixel limit", {**search, "files": {"image": ("x.png", png_header_only(7000, 7000), "image/png")}}, 400),
        ("wrong type", {**search, "content": b"a red circle", "headers": {**auth, "content-type": "text/plain"}}, 415),
        ("k=0", {**search, "json": {"text": "a red circle", "k": 0}}, 400),
        ("k huge", {**search, "json": {"text": "a red circle", "k": 10**9}}, 400),
        ("k text", {**search, "json": {"text": "a red circle", "k": "ten"}}, 400),
        ("unknown id", {"method": "GET", "url": "/v1/images/424242", "headers": auth}, 404),
        ("traversal", {"method": "GET", "url": "/v1/images/..%2F..%2F..%2Fetc%2Fpasswd", "headers": auth}, 404),
        ("dot-dot", {"method": "GET", "url": "/v1/images/%2e%2e", "headers": auth}, 404),
        ("no key", {"method": "POST", "url": "/v1/search", "json": {"text": "a red circle"}}, 401),
        ("wrong key", {**search, "json": {"text": "a red circle"}, "headers": {"X-API-Key": "nope"}}, 401),
    ]
    return good, bad


def test_mixed_good_and_bad_requests_under_concurrency(world, server):
    url, proc = server
    good, bad = requests_mix(world)
    work = good * 8 + bad * 5  # 104 good, 70 bad
    random.Random(0).shuffle(work)
    local = threading.local()
    clients = []

    def send(item):
        name, kwargs, check = item
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=60)
            clients.append(local.client)
        r = local.client.request(**kwargs)
        ok = check(r) if callable(check) else r.status_code == check
        if ok and not callable(check):  # a bad request: the JSON error body names its status
            ok = r.json().get("status") == check and bool(r.json().get("error"))
        return name, ok, r.status_code

    try:
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(send, work))
    finally:
        for c in clients:
            c.close()
    failed = Counter((name, status) for name, ok, status in outcomes if not ok)
    assert not failed, f"wrong answers (request kind, status): {dict(failed)}"
    assert len(outcomes) == len(work)
    assert proc.poll() is None, "the server died under load"
    health = httpx.get(url + "/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["size"] == 12
    after = httpx.post(url + "/v1/search", json={"text": TEXTS[0], "k": 5}, headers={"X-API-Key": KEY}, timeout=30)
    assert [h["id"] for h in after.json()["results"]] == world["expected"][TEXTS[0]]
