"""`vislang index duplicates`: exact copies by their bytes, near copies by their embeddings, joined into groups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install faiss-cpu)")

from vislang.index import create_index, open_index  # noqa: E402
from vislang.index.duplicates import find_duplicates  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def archive(tmp_path: Path, **backend) -> tuple[Path, dict[str, int]]:
    """An index of 8 files: a and a_copy share bytes and vector; b is a's near copy (cosine ~0.99); c and d are near
    each other (~0.95) with different bytes; e, f, g stand alone."""
    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal((5, 16)))  # a, c, e, f, g directions
    a = base[0]
    vecs = {
        "a": a, "a_copy": a, "b": unit(a + 0.12 * unit(rng.standard_normal(16))),
        "c": base[1], "d": unit(base[1] + 0.3 * unit(rng.standard_normal(16))),
        "e": base[2], "f": base[3], "g": base[4],
    }  # fmt: skip
    files = {}
    for name in vecs:
        p = tmp_path / f"{name}.bin"
        p.write_bytes(b"same bytes" if name in ("a", "a_copy") else name.encode() * 10)
        files[name] = p
    with create_index(tmp_path / "ix", 16, **backend) as ix:
        names = list(vecs)
        meta = [{"key": str(files[n]), "path": str(files[n]), "caption": n} for n in names]
        ids = ix.add(np.stack([vecs[n] for n in names]), meta)
    return tmp_path / "ix", {n: int(i) for n, i in zip(names, ids)}


def test_exact_and_near_groups(tmp_path: Path) -> None:
    ix_dir, ids = archive(tmp_path)
    with open_index(ix_dir) as ix:
        cos = lambda x, y: float(ix.vectors([ids[x]])[0] @ ix.vectors([ids[y]])[0])  # noqa: E731
        assert cos("a", "b") > 0.97 and 0.9 < cos("c", "d") < 0.97
        groups = find_duplicates(ix, threshold=0.9)
        as_sets = {(g.kind, frozenset(g.ids)) for g in groups}
        assert ("exact", frozenset({ids["a"], ids["a_copy"]})) in as_sets
        assert ("near", frozenset({ids["a"], ids["a_copy"], ids["b"]})) in as_sets
        assert ("near", frozenset({ids["c"], ids["d"]})) in as_sets
        assert len(groups) == 3  # e, f, g are in none
        strict = find_duplicates(ix, threshold=0.97)
        assert {frozenset(g.ids) for g in strict if g.kind == "near"} == {
            frozenset({ids["a"], ids["a_copy"], ids["b"]})
        }
        assert all(g.min_score >= 0.97 for g in strict if g.kind == "near")
        only_near = find_duplicates(ix, threshold=0.9, exact=False)
        assert all(g.kind == "near" for g in only_near) and len(only_near) == 2
        with pytest.raises(ValueError, match="cosine similarity"):
            find_duplicates(ix, threshold=1.5)


def test_cli_duplicates_prints_and_writes_the_report(tmp_path: Path, capsys) -> None:
    from vislang.cli.main import main

    ix_dir, ids = archive(tmp_path)
    out = tmp_path / "dups.json"
    assert main(["index", "duplicates", "--index", str(ix_dir), "--threshold", "0.9", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "8 images; 1 exact and 2 near-duplicate group(s)" in text and "a_copy.bin" in text
    report = json.loads(out.read_text())
    assert report["exact_groups"] == 1 and report["near_groups"] == 2 and report["items_in_groups"] == 7
    assert main(["index", "duplicates", "--index", str(tmp_path / "nowhere")]) != 0


def test_pgvector_index_finds_the_same_groups(tmp_path: Path, monkeypatch) -> None:
    pgserver = pytest.importorskip("pgserver", reason="PostgreSQL from the pgserver package")
    server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="stop")
    try:
        monkeypatch.setenv("VISLANG_PG_URI", server.get_uri())
        ix_dir, ids = archive(tmp_path, backend="pgvector", hnsw=False)
        with open_index(ix_dir) as ix:
            groups = {(g.kind, frozenset(g.ids)) for g in find_duplicates(ix, threshold=0.9)}
        assert groups == {
            ("exact", frozenset({ids["a"], ids["a_copy"]})),
            ("near", frozenset({ids["a"], ids["a_copy"], ids["b"]})),
            ("near", frozenset({ids["c"], ids["d"]})),
        }
    finally:
        server.cleanup()
