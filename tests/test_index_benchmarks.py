"""benchmarks/index_recall.py runs end to end in --smoke mode and scores exact search at recall 1."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "index_recall.py"


def test_index_recall_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("index_recall", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["index_recall"] = module
    spec.loader.exec_module(module)
    out = module.main(["--smoke", "--no-pgvector", "--json", str(tmp_path / "r.json")])
    rows = {r["name"].split(" ")[1]: r for r in out["rows"]}
    assert set(rows) == {"exact", "HNSW", "IVF-Flat"}
    assert rows["exact"]["recall"] == 1.0  # the harness scores brute force as perfect
    assert rows["HNSW"]["recall"] >= 0.9 and 0.2 < rows["IVF-Flat"]["recall"] < 1  # uniform data: IVF misses some
    assert all(r["build_s"] > 0 and r["p50_ms"] > 0 for r in out["rows"])
    assert "recall@10" in capsys.readouterr().out and (tmp_path / "r.json").is_file()
