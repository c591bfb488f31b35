"""Chaos run: a real `vislang serve` under mixed load and hostile requests while another process adds 20k items and
is SIGKILLed once, then re-run. The goal: no server error, no lost or duplicated item, good requests still fast.

An index of ``--vectors`` random unit vectors (each pointing at one of 100 small PNGs, so ``/v1/images`` has files
to send) is served by ``vislang serve`` on 127.0.0.1. Then, for ``--minutes``:

- ``--concurrency`` threads send a mix of good requests (text search, search by id, embed, classify, image file)
  and, between them, hostile ones: a decompression bomb, a truncated image, wrong types, a huge k, traversal and
  non-ASCII ids, a 5,000-digit number, nesting 100k deep, an id over int64, a backslash label, a foreign Host header,
  a cross-site Origin, client disconnects mid-request, and slow-loris bodies (one at a time, in their own thread);
- after a tenth of the time, ``vislang index add`` of ``--new`` images starts in a second process, is SIGKILLed
  once a quarter of them is committed, and is run again to the end.

It prints requests sent per kind, answers by status, the 5xx count, good-request p50/p99 before, during and after
the writer, the longest good request, the items at the end against those expected (every item exactly once), and
the server's peak RSS. Every number comes from this run; timings depend on the machine and its load.

    python benchmarks/chaos.py                              # 5 minutes, 100k vectors, 20k added
    python benchmarks/chaos.py --minutes 1 --vectors 20000  # a shorter run
    python benchmarks/chaos.py --smoke                      # seconds: checks that everything runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_latency import free_port, make_model, percentiles, query_texts, wait_healthy  # noqa: E402

KEY = "chaos-key"
FILES = 100  # distinct image files the base vectors point at


def png(seed: int, size: int = 16) -> bytes:
    import io

    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG that announces ``width``x``height`` pixels and holds none (the server must refuse it unread)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def setup(root: Path, vectors: int, new: int, dim: int) -> tuple[Path, Path]:
    """(index directory, folder of ``new`` images to add) under ``root``."""
    from vislang.index import create_index
    from vislang.index.files import ROOTS_STATE

    model = make_model(root, dim)
    base = root / "base"
    base.mkdir()
    for i in range(FILES):
        (base / f"b{i:03d}.png").write_bytes(png(i))
    rng = np.random.default_rng(1)
    with create_index(root / "ix", dim, model=str(model), kind="flat") as ix:
        ix.set_state(ROOTS_STATE, [str(base.resolve())])
        for start in range(0, vectors, 20_000):
            m = min(20_000, vectors - start)
            meta = [
                {"key": f"r{i}", "path": str((base / f"b{i % FILES:03d}.png").resolve())}
                for i in range(start, start + m)
            ]
            ix.add(rng.standard_normal((m, dim)).astype(np.float32), meta)
    folder = root / "new"
    folder.mkdir()
    for i in range(new):
        (folder / f"n{i:05d}.png").write_bytes(png(10_000 + i))
    return root / "ix", folder


def committed(ix: Path) -> int:
    try:
        with sqlite3.connect(ix / "meta.sqlite", timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:
        return -1


class Writer(threading.Thread):
    """`vislang index add` of the new folder: SIGKILLed once a quarter is committed, then run again to the end."""

    def __init__(self, ix: Path, folder: Path, base: int, new: int, env: dict) -> None:
        super().__init__(daemon=True)
        self.ix, self.folder, self.base, self.new, self.env = ix, folder, base, new, env
        self.started = self.finished = None
        self.killed_at = None  # items committed when the first run was killed
        self.codes = []

    def run_add(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "vislang.cli", "index", "add", str(self.folder), "--index", str(self.ix),
               "--batch-size", "64", "--commit-every", "4", "--no-progress"]  # fmt: skip
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def run(self) -> None:
        self.started = time.monotonic()
        proc = self.run_add()
        while proc.poll() is None and committed(self.ix) < self.base + self.new // 4:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            self.killed_at = committed(self.ix) - self.base
        self.codes.append(proc.wait())
        again = self.run_add()
        _, err = again.communicate()
        self.codes.append(again.returncode)
        if again.returncode:
            print(err.decode()[-2000:], file=sys.stderr)
        self.finished = time.monotonic()


def good_requests(k: int, n_ids: int, seed: int):
    """Endlessly: (kind, httpx request kwargs) of a good request."""
    rng = random.Random(seed)
    texts = query_texts(200, seed)
    while True:
        r = rng.random()
        i = rng.randint(1, n_ids)
        if r < 0.45:
            yield "search text", {"method": "POST", "url": "/v1/search", "json": {"text": rng.choice(texts), "k": k}}
        elif r < 0.6:
            yield "search id", {"method": "POST", "url": "/v1/search", "json": {"image_id": i, "k": k}}
        elif r < 0.75:
            yield "embed", {"method": "POST", "url": "/v1/embed", "json": {"texts": [rng.choice(texts)]}}
        elif r < 0.9:
            labels = ["a red circle", "a blue square", "a green star"]
            yield "classify", {"method": "POST", "url": "/v1/classify", "json": {"image_id": i, "labels": labels}}
        else:
            yield "image", {"method": "GET", "url": f"/v1/images/{i}"}


def hostile_requests(truncated: bytes):
    """(kind, request kwargs, the statuses that are right) of every hostile request the server must survive."""
    search = {"method": "POST", "url": "/v1/search"}
    raw = {**search, "headers": {"content-type": "application/json"}}
    return [
        ("bomb", {**search, "files": {"image": ("b.png", bomb_header())}}, {400}),
        ("truncated image", {**search, "files": {"image": ("t.png", truncated)}}, {400, 415}),
        ("wrong type", {**search, "json": {"text": 5}}, {400}),
        ("k text", {**search, "json": {"text": "a red circle", "k": "ten"}}, {400}),
        ("huge k", {**search, "json": {"text": "a red circle", "k": 10**6}}, {400}),
        ("traversal id", {"method": "GET", "url": "/v1/images/..%2F..%2F..%2Fetc%2Fpasswd"}, {404}),
        ("non-ascii id", {"method": "GET", "url": "/v1/images/%C2%B2"}, {404}),
        ("5000 digits", {**raw, "content": '{"text": "a", "k": ' + "9" * 5000 + "}"}, {400}),
        ("deep nesting", {**raw, "content": '{"embedding": ' + "[" * 100_000 + "]" * 100_000 + "}"}, {400}),
        ("id over int64", {**search, "json": {"image_id": 10**20}}, {404}),
        ("not json", {**raw, "content": "{"}, {400}),
        (
            "backslash label",
            {"method": "POST", "url": "/v1/classify", "json": {"image_id": 1, "labels": ["a\\d", "b"]}},
            {200},
        ),  # fmt: skip
        ("foreign host", {"method": "GET", "url": "/healthz", "headers": {"Host": "rebound.attacker.example"}}, {400}),
        ("cross-site", {**search, "json": {"text": "a"}, "headers": {"Origin": "https://attacker.example"}}, {403}),
    ]


def disconnect(port: int) -> None:
    """A client that sends a whole search and closes before the answer."""
    body = json.dumps({"text": "a red circle", "k": 10}).encode()
    head = (f"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {KEY}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)


def slow_loris(port: int, stop: threading.Event, statuses: Counter) -> None:
    """One at a time: announce a body, send a byte of it, then nothing; the server must answer 408 and move on."""
    while not stop.is_set():
        head = (f"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode()  # fmt: skip
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                s.sendall(head)
                answer = s.recv(64).decode("latin-1")
            statuses[int(answer.split()[1]) if answer.startswith("HTTP/") else 0] += 1
        except OSError:
            statuses[0] += 1


def load(url: str, port: int, args, stop: threading.Event, writer: Writer, n_ids: int) -> dict:
    import httpx

    truncated = png(0, 64)[:60]
    hostile = hostile_requests(truncated)
    lock = threading.Lock()
    sent, statuses, wrong = Counter(), Counter(), Counter()
    good: list[tuple[float, float]] = []  # (finish time, ms)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        gen = good_requests(args.k, n_ids, seed)
        with httpx.Client(base_url=url, timeout=120, headers={"X-API-Key": KEY}) as client:
            while not stop.is_set():
                if rng.random() < args.hostile:
                    if rng.random() < 0.1:
                        kind, ok = "disconnect", None
                        disconnect(port)
                        with lock:
                            sent[kind] += 1
                        continue
                    kind, kwargs, ok = rng.choice(hostile)
                else:
                    (kind, kwargs), ok = next(gen), {200}
                t0 = time.perf_counter()
                try:
                    r = client.request(**kwargs)
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                ms = 1e3 * (time.perf_counter() - t0)
                with lock:
                    sent[kind] += 1
                    statuses[status] += 1
                    if status not in ok:
                        wrong[(kind, status)] += 1
                    elif ok == {200}:
                        good.append((time.monotonic(), ms))

    loris_status: Counter = Counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
    threads.append(threading.Thread(target=slow_loris, args=(port, stop, loris_status), daemon=True))
    for t in threads:
        t.start()
    return {"threads": threads, "sent": sent, "statuses": statuses, "wrong": wrong, "good": good,
            "loris": loris_status}  # fmt: skip


def phase_stats(good: list[tuple[float, float]], start: float | None, end: float | None) -> dict:
    out = {}
    phases = {
        "before writer": [ms for t, ms in good if start is None or t < start],
        "during writer": [ms for t, ms in good if start is not None and start <= t and (end is None or t <= end)],
        "after writer": [ms for t, ms in good if end is not None and t > end],
    }
    for name, ms in phases.items():
        p50, p99 = percentiles(ms) if ms else (float("nan"), float("nan"))
        out[name] = {"n": len(ms), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(res: dict) -> None:
    print("\nrequests sent per kind:")
    for kind, n in sorted(res["sent"].items()):
        print(f"  {kind:<18} {n:>8}")
    print("answers by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(res["statuses"].items())))
    print("slow-loris bodies: " + ", ".join(f"{s}: {n}" for s, n in sorted(res["loris"].items())))
    print(f"5xx answers: {res['5xx']}   (goal 0)")
    print(f"wrong answers (kind, status): {res['wrong'] or 'none'}")
    print("good requests:")
    for name, s in res["phases"].items():
        print(f"  {name:<14} n={s['n']:>7}  p50 {s['p50_ms']:>8.1f} ms  p99 {s['p99_ms']:>8.1f} ms")
    during, after = res["phases"]["during writer"]["p99_ms"], res["phases"]["after writer"]["p99_ms"]
    print(f"p99 during the writer / p99 after it (same run): {during / after:.2f}x")
    print(f"longest good request: {res['longest_ms']:.0f} ms")
    w = res["writer"]
    print(f"writer: killed after {w['killed_at']} of {w['new']} new items committed; exit codes {w['codes']}; "
          f"{w['seconds']:.1f} s in all")  # fmt: skip
    verdict = "every item exactly once" if res["exact"] else "MISMATCH"
    print(f"items at the end: {res['items']} (expected {res['expected']}); new keys {res['new_keys']} of "
          f"{w['new']}, distinct keys {res['distinct_keys']}  -> {verdict}")  # fmt: skip
    print(f"server peak RSS: {res['peak_rss_mb']:.0f} MB; server alive at the end: {res['alive']}")


def run(args) -> dict:
    import httpx

    root = Path(tempfile.mkdtemp(prefix="vislang-chaos-"))
    t0 = time.monotonic()
    ix, folder = setup(root, args.vectors, args.new, args.dim)
    print(f"[chaos] index of {args.vectors} vectors and {args.new} new images ready in {time.monotonic() - t0:.0f} s")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "VISLANG_API_KEY": KEY}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")
    cmd = [sys.executable, "-m", "vislang.cli", "serve", "--index", str(ix), "--port", str(port), "--log-level",
           "warning", "--body-timeout", str(args.body_timeout),
           "--limit-concurrency", str(args.concurrency * 2 + 16)]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    try:
        wait_healthy(url, server)
        writer = Writer(ix, folder, args.vectors, args.new, env)
        state = load(url, port, args, stop, writer, args.vectors)
        duration = 60 * args.minutes
        t_start = time.monotonic()
        time.sleep(duration / 10)
        writer.start()
        while time.monotonic() - t_start < duration or writer.is_alive():
            time.sleep(0.5)
        time.sleep(max(duration / 10, 5))  # "after": the writer is done
        stop.set()
        for t in state["threads"]:
            t.join(args.body_timeout + 30)
        alive = server.poll() is None and httpx.get(url + "/healthz", timeout=30).status_code == 200
        rss = peak_rss_mb(server.pid)
    finally:
        stop.set()
        server.terminate()
        server.wait(30)
        log.close()
    t_end = time.monotonic()
    with sqlite3.connect(ix / "meta.sqlite") as db:
        items = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        distinct = db.execute("SELECT COUNT(DISTINCT key) FROM items").fetchone()[0]
        new_keys = {r[0] for r in db.execute("SELECT key FROM items WHERE key NOT LIKE 'r%'")}
    want_keys = {str(p.resolve()) for p in folder.iterdir()}
    statuses = state["statuses"]
    traces = (root / "server.log").read_text(errors="replace").count("Traceback")
    res = {
        "sent": dict(state["sent"]),
        "statuses": dict(statuses),
        "loris": dict(state["loris"]),
        "5xx": sum(n for s, n in statuses.items() if s >= 500) + sum(n for s, n in state["loris"].items() if s >= 500),
        "server_tracebacks": traces,
        "wrong": {f"{k} {s}": n for (k, s), n in state["wrong"].items()},
        "phases": phase_stats(state["good"], writer.started, writer.finished),
        "longest_ms": max((ms for _, ms in state["good"]), default=float("nan")),
        "writer": {
            "killed_at": writer.killed_at,
            "new": args.new,
            "codes": writer.codes,
            "seconds": (writer.finished or t_end) - (writer.started or t_end),
        },  # fmt: skip
        "items": items,
        "expected": args.vectors + args.new,
        "new_keys": len(new_keys),
        "distinct_keys": distinct,
        "exact": items == distinct == args.vectors + args.new and new_keys == want_keys,
        "peak_rss_mb": rss,
        "alive": alive,
    }
    report(res)
    print(f"server tracebacks in its log: {traces}")
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="load duration (longer while the writer runs)")
    p.add_argument("--vectors", type=int, default=100_000, help="vectors in the served index")
    p.add_argument("--new", type=int, default=20_000, help="images `vislang index add` adds")
    p.add_argument("--dim", type=int, default=64, help="embedding size")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--hostile", type=float, default=0.2, help="share of requests that are hostile")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--body-timeout", type=float, default=30.0, help="the server's --body-timeout")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    p.add_argument("--smoke", action="store_true", help="seconds: a small index, a short load")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.minutes, args.vectors, args.new, args.concurrency, args.body_timeout = 0.15, 2000, 600, 8, 3.0
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
