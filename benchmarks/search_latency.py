"""Search latency over HTTP against the same queries straight on FAISS, in one run.

An index of ``--n`` random unit vectors (FAISS + SQLite, as ``vislang index build`` writes it) is served by
``vislang serve`` in a second process; this process sends text queries over loopback HTTP at concurrency 1 and 16 and
times each request. The same texts are then embedded here and searched three ways in-process: with the library
(``Searcher.search_text``: tokenize + text tower + FAISS + SQLite metadata), with the FAISS index alone, and the ratio
of HTTP to each is printed, so the service's overhead is read against a peer measured under the same load.

    python benchmarks/search_latency.py                    # 100k vectors, 300 queries per row
    python benchmarks/search_latency.py --smoke            # 2k vectors, a few queries: checks that it works
    python benchmarks/search_latency.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "heart"]
SIZES = ["small", "large", "big", "tiny"]


def query_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"a {rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(SHAPES)}" for _ in range(n)]


def make_model(root: Path, dim: int) -> Path:
    """An untrained dual encoder with a ``dim``-sized space (the text tower is what queries pay for)."""
    import torch

    from vislang.factory import fit_config_to_tokenizer, save_pretrained
    from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
    from vislang.tokenizers import Tokenizer

    torch.manual_seed(0)
    tokenizer = Tokenizer.train(query_texts(500) + ["a photo of a"], vocab_size=200, context_length=16)
    cfg = ModelConfig(
        embed_dim=dim,
        vision=VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=2, mean=(0.5,) * 3, std=(0.5,) * 3),
        text=TextConfig(arch="transformer", context_length=16, width=128, layers=2, heads=4),
    )
    return save_pretrained(CLIP(fit_config_to_tokenizer(cfg, tokenizer)).eval(), root / "model", tokenizer)


def make_index(root: Path, model: Path, n: int, dim: int, kind: str) -> Path:
    from vislang.index import create_index

    rng = np.random.default_rng(1)
    with create_index(root / "ix", dim, model=str(model), kind=kind, exact_max=max(n, 1)) as ix:
        for start in range(0, n, 20_000):
            m = min(20_000, n - start)
            x = rng.standard_normal((m, dim)).astype(np.float32)
            ix.add(x, [{"key": f"r{i}", "path": f"/random/{i}.png"} for i in range(start, start + m)])
    return root / "ix"


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def row(name: str, ms: list[float], wall: float, n: int) -> dict:
    p50, p99 = percentiles(ms)
    return {"name": name, "p50_ms": p50, "p99_ms": p99, "qps": n / wall, "n": n}


def http_rows(url: str, texts: list[str], k: int, concurrencies: list[int]) -> list[dict]:
    """One row per concurrency: each worker thread keeps its own keep-alive connection."""
    import httpx

    rows = []
    for c in concurrencies:
        local, clients = threading.local(), []

        def one(i: int, local=local, clients=clients) -> float:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=url, timeout=60)
                clients.append(local.client)
            t0 = time.perf_counter()
            r = local.client.post("/v1/search", json={"text": texts[i], "k": k})
            r.raise_for_status()
            assert len(r.json()["results"]) == k
            return 1e3 * (time.perf_counter() - t0)

        with ThreadPoolExecutor(c) as pool:
            list(pool.map(one, range(min(len(texts), 4 * c))))  # warm up connections and threads
            t0 = time.perf_counter()
            ms = list(pool.map(one, range(len(texts))))
            wall = time.perf_counter() - t0
        for cl in clients:
            cl.close()
        rows.append(row(f"HTTP, concurrency {c}", ms, wall, len(texts)))
    return rows


def timed(fn, items) -> tuple[list[float], float]:
    ms = []
    t0 = time.perf_counter()
    for it in items:
        s = time.perf_counter()
        fn(it)
        ms.append(1e3 * (time.perf_counter() - s))
    return ms, time.perf_counter() - t0


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /healthz within {seconds:.0f} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    p.add_argument("--dim", type=int, default=256, help="embedding size")
    p.add_argument("--queries", type=int, default=300, help="queries per row")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--kind", default="flat", choices=["flat", "hnsw", "ivf"], help="FAISS index type (default exact)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads in both processes")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that everything runs")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.queries, args.dim, args.concurrency = 2000, 12, 32, [1, 4]
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    from vislang.index import Searcher

    texts = query_texts(args.queries, seed=2)
    with tempfile.TemporaryDirectory(prefix="vislang-search-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model = make_model(root, args.dim)
        index_dir = make_index(root, model, args.n, args.dim, args.kind)
        print(f"indexed {args.n} random {args.dim}-d unit vectors ({args.kind}) in {time.perf_counter() - t0:.1f} s")

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "vislang.cli", "serve", "--index", str(index_dir), "--port", str(port)]
        proc = subprocess.Popen([*cmd, "--log-level", "warning"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            wait_healthy(url, proc)
            rows = http_rows(url, texts, args.k, args.concurrency)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

        searcher = Searcher(index_dir)
        try:
            searcher.search_text(texts[0], args.k)  # warm up
            ms, wall = timed(lambda t: searcher.search_text(t, args.k), texts)
            rows.append(row("library (embed + FAISS + metadata)", ms, wall, len(texts)))
            vecs = searcher.embed_texts(texts)  # (Q, dim): the same queries, embedded once
            index = searcher.index
            ms, wall = timed(lambda i: index.search(vecs[i : i + 1], args.k), range(len(texts)))
            rows.append(row("FAISS search alone", ms, wall, len(texts)))
        finally:
            searcher.close()

    print(f"\n{'row':38s} {'p50 ms':>9s} {'p99 ms':>9s} {'queries/s':>10s}")
    for r in rows:
        print(f"{r['name']:38s} {r['p50_ms']:9.2f} {r['p99_ms']:9.2f} {r['qps']:10.1f}")
    http1, lib, faiss_row = rows[0], rows[-2], rows[-1]
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": rows,
        "ratio_http_over_library_p50": http1["p50_ms"] / lib["p50_ms"],
        "ratio_http_over_faiss_p50": http1["p50_ms"] / faiss_row["p50_ms"],
    }
    print(f"\nratio HTTP/library p50 = {result['ratio_http_over_library_p50']:.2f}")
    print(f"ratio HTTP/FAISS p50 = {result['ratio_http_over_faiss_p50']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
