"""Recall@k of the approximate back ends (FAISS HNSW, FAISS IVF, pgvector HNSW) against exact search, on one dataset.

Every back end indexes the same vectors through vislang's own ``create_index`` + ``add`` (so build time includes the
SQLite or PostgreSQL writes a real ``vislang index build`` pays), then answers the same queries one at a time. The
reference is brute force in numpy; exact FAISS (``flat``) is run too, as a check that the harness itself scores 1.0.

    python benchmarks/index_recall.py                          # 50k Fashion-MNIST embeddings (runs/demo/model)
    python benchmarks/index_recall.py --model runs/acc1/model  # the same with another trained model
    python benchmarks/index_recall.py --data clustered --n 100000 --dim 128
    python benchmarks/index_recall.py --smoke                  # 3k random vectors: checks that it runs

Data: ``fmnist`` embeds Fashion-MNIST train images (the index) and test images (the queries) with a trained model,
which is what image-to-image search sees; ``clustered`` draws unit vectors around 200 random centres (structure like
real embeddings); ``random`` draws them uniformly on the sphere, the hardest case for any approximate index.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(kind: str, n: int, q: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return unit_rows(rng.standard_normal((n, dim))), unit_rows(rng.standard_normal((q, dim)))
    centres = unit_rows(rng.standard_normal((200, dim)))

    def draw(m: int) -> np.ndarray:
        return unit_rows(centres[rng.integers(0, len(centres), m)] + 0.08 * rng.standard_normal((m, dim)))

    return draw(n), draw(q)


def fmnist(model_dir: str, n: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image embeddings: ``n`` train images (the index), ``q`` test images (the queries)."""
    import torch

    from vislang.data import FashionMNIST
    from vislang.evaluation.embed import embed_images
    from vislang.factory import create_model_and_transforms

    model, _, _ = create_model_and_transforms(model_dir)
    model.eval()

    def embed(split: str, m: int) -> np.ndarray:
        imgs = FashionMNIST(split).images[:m]  # (m, 28, 28) uint8
        x = torch.from_numpy(np.array(imgs)).unsqueeze(1)  # (m, 1, 28, 28), a writable copy
        return embed_images(model, x, batch_size=1024).numpy()

    base, queries = embed("train", n), embed("test", q)
    if len(base) < n:
        raise SystemExit(f"Fashion-MNIST train has {len(base)} images; use --n {len(base)} or less")
    return base, queries


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k."""
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found.tolist(), truth.tolist())]))


def measure(index, queries: np.ndarray, truth_ids: np.ndarray, k: int) -> tuple[float, float]:
    """(recall@k, p50 ms) with one query per call, as a server sends them."""
    found, ms = [], []
    index.search(queries[:1], k)  # warm up
    for i in range(len(queries)):
        t0 = time.perf_counter()
        _, ids = index.search(queries[i : i + 1], k)
        ms.append(1e3 * (time.perf_counter() - t0))
        found.append(ids[0])
    return recall_at(np.stack(found), truth_ids), float(np.percentile(ms, 50))


def build(root: Path, name: str, x: np.ndarray, batch: int = 5000, **options):
    """A vislang index of ``x`` (ids 1..N in row order) and the seconds its ``add`` calls and ``save`` took (save
    builds what a back end defers, pgvector's HNSW index of a bulk load; the embedded PostgreSQL's start,
    ``create_index``, is left out: it is paid once per server, not per vector)."""
    from vislang.index import create_index

    ix = create_index(root / name, x.shape[1], **options)
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        ix.add(x[s : s + batch], [{"key": f"v{i}", "path": f"/v/{i}"} for i in range(s, min(s + batch, len(x)))])
    ix.save()
    return ix, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fmnist", choices=["fmnist", "clustered", "random"])
    p.add_argument("--model", default="runs/demo/model", help="fmnist: the model that embeds the images")
    p.add_argument("--n", type=int, default=50_000, help="indexed vectors")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--dim", type=int, default=128, help="clustered/random: vector size")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32], help="IVF rows, one per value")
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 128], help="FAISS HNSW rows, one per value")
    p.add_argument("--no-pgvector", action="store_true", help="skip PostgreSQL (pgserver) rows")
    p.add_argument("--threads", type=int, default=1, help="FAISS/torch threads (default 1: a shared machine)")
    p.add_argument("--smoke", action="store_true", help="3k random vectors, 20 queries")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.data, args.n, args.queries, args.dim = "random", 3000, 20, 32
        args.nprobe, args.ef_search = [8], [64]
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.data == "fmnist":
        x, q = fmnist(args.model, args.n, args.queries)
    else:
        x, q = synthetic(args.data, args.n, args.queries, args.dim)
    ids = np.arange(1, len(x) + 1)
    truth = ids[np.argsort(-(q @ x.T), axis=1)[:, : args.k]]  # (Q, k) brute force
    print(f"{args.data}: {len(x)} vectors of size {x.shape[1]}, {len(q)} queries ({time.perf_counter() - t0:.1f} s)")

    rows = []

    def add_row(name: str, build_s: float, ix) -> None:
        r, p50 = measure(ix, q, truth, args.k)
        rows.append({"name": name, "recall": r, "build_s": build_s, "p50_ms": p50})
        print(f"  {name}: recall@{args.k} {r:.4f}, p50 {p50:.3f} ms", flush=True)

    with tempfile.TemporaryDirectory(prefix="vislang-recall-") as tmp:
        root = Path(tmp)
        ix, s = build(root, "flat", x, kind="flat")
        add_row("FAISS exact (flat)", s, ix)
        ix.close()
        ix, s = build(root, "hnsw", x, kind="hnsw")
        for ef in args.ef_search:
            ix.ef_search = ef
            add_row(f"FAISS HNSW M=32 efSearch={ef}", s, ix)
        ix.close()
        ix, s = build(root, "ivf", x, kind="ivf")
        nlist = ix.info()["nlist"]
        for nprobe in args.nprobe:
            ix.nprobe = nprobe
            add_row(f"FAISS IVF-Flat nlist={nlist} nprobe={nprobe}", s, ix)
        ix.close()
        if not args.no_pgvector:
            try:
                ix, s = build(root, "pg", x, backend="pgvector")
            except RuntimeError as e:
                print(f"  pgvector skipped: {e}", file=sys.stderr)
            else:
                add_row(f"pgvector HNSW (m=16, ef_search={ix.ef_search})", s, ix)
                ix.close()

    print(f"\n{'index':44s} {'recall@' + str(args.k):>10s} {'build s':>9s} {'query p50 ms':>13s}")
    for r in rows:
        print(f"{r['name']:44s} {r['recall']:10.4f} {r['build_s']:9.1f} {r['p50_ms']:13.3f}")
    result = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "n": len(x), "dim": x.shape[1]}
    result["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
