"""benchmarks/search_latency.py runs end to end in --smoke mode (server in a second process, loopback only)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vislang[serve]')")
pytest.importorskip("httpx", reason="the benchmark client needs httpx")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "search_latency.py"


def test_search_latency_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("search_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["search_latency"] = module
    spec.loader.exec_module(module)
    out = module.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "r.json")])
    names = [r["name"] for r in out["rows"]]
    assert names == [
        "HTTP, 1 worker, concurrency 1",
        "HTTP, 1 worker, concurrency 4",
        "HTTP, 2 workers, concurrency 1",  # two server processes sharing the read-only index
        "HTTP, 2 workers, concurrency 4",
        "library (embed + FAISS + metadata)",
        "FAISS search alone",
    ]
    assert all(r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["qps"] > 0 for r in out["rows"])
    assert out["ratio_http_over_faiss_p50"] > 1  # HTTP includes the FAISS search, so it cannot be faster
    assert set(out["goals"]) == {"workers1_c1_p99_ms", "workers2_c1_p99_ms"}  # no concurrency 16 in a smoke run
    if Path("/proc/self/stat").is_file():  # the server's CPU time per query, read from /proc
        assert all(r["server_cpu_ms_per_query"] >= 0 for r in out["rows"][:4])
    assert (tmp_path / "r.json").is_file()
