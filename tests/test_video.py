"""Video: the shapes-movie generator and its ground truth, shot detection and its metrics, key frames, summaries and
moment merging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av", reason="video needs PyAV (pip install av)")

from test_index import make_tiny_model  # noqa: E402
from vislang.video.moments import merge_moments, snap_to_shots, temporal_iou  # noqa: E402
from vislang.video.reader import iter_frames, probe  # noqa: E402
from vislang.video.shots import (  # noqa: E402
    detect_boundaries,
    match_boundaries,
    prf,
    select_key_frames,
    shot_ranges,
    time_to_index,
)
from vislang.video.synthetic import MovieConfig, plan_movie, write_movie  # noqa: E402

SMALL = MovieConfig(shots=4, shot_seconds=(3.0, 4.0), fps=10, size=64, fade_fraction=0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    movie = root / "movie.mp4"
    truth = write_movie(movie, seed=3, cfg=SMALL)
    return {"root": root, "model": make_tiny_model(root), "movie": movie, "truth": truth}


# ------------------------------------------------------------------------------------------------------ generator


def test_movie_file_matches_its_ground_truth(world) -> None:
    truth = world["truth"]
    assert json.loads(world["movie"].with_suffix(".json").read_text()) == truth
    info = probe(world["movie"])
    assert (info.width, info.height) == (64, 64) and info.fps == 10
    assert info.duration == pytest.approx(truth["duration"], abs=0.15)
    shots = truth["shots"]
    assert len(shots) == 4 and shots[0]["start"] == 0
    assert all(a["end"] == b["start"] for a, b in zip(shots, shots[1:]))  # contiguous
    assert [b["t"] for b in truth["boundaries"]] == [s["start"] for s in shots[1:]]
    frames = {round(f.t, 1): f.rgb.astype(np.float32) for f in iter_frames(world["movie"], fps=0)}

    def change(t: float) -> float:  # mean pixel change from the frame before t to the frame at or after it
        a, b = np.floor(t * 10) / 10, np.ceil(t * 10 + 1e-6) / 10
        return float(np.abs(frames[round(b, 1)] - frames[round(a, 1)]).mean())

    cuts = [change(b["t"]) for b in truth["boundaries"]]
    inside = [change(s["start"] + 1.55) for s in shots]  # a frame step inside each shot
    assert min(cuts) > 2 * max(inside), (cuts, inside)


def test_movies_are_reproducible_and_hold_fades_and_events() -> None:
    cfg = MovieConfig(shots=30, fade_fraction=0.3, appear_fraction=0.5, recolor_fraction=0.5)
    a, b = plan_movie(cfg, 7), plan_movie(cfg, 7)
    assert [s.to_json() for s in a] == [s.to_json() for s in b]
    assert [s.to_json() for s in a] != [s.to_json() for s in plan_movie(cfg, 8)]
    kinds = {s.transition for s in a[1:]}
    assert kinds == {"cut", "fade"}
    assert any(s.appear for s in a) and any(s.recolor for s in a)
    shot = next(s for s in a if s.appear)
    i, t = shot.appear
    assert len(shot.state(t - 0.01).objects) == len(shot.scene.objects) - 1  # hidden before it appears
    assert len(shot.state(t + 0.01).objects) == len(shot.scene.objects)
    shot = next(s for s in a if s.recolor)
    i, t, color = shot.recolor
    assert shot.state(t + 0.01).objects[i].color == color != shot.scene.objects[i].color
    for s in a:  # every reference caption names the colour of every object of the shot
        for caption in s.captions:
            assert all(o.color in caption for o in s.scene.objects), caption


def test_fade_frames_blend_the_two_shots(tmp_path: Path) -> None:
    cfg = MovieConfig(shots=2, shot_seconds=(3.0, 3.0), fps=10, size=64, fade_fraction=1.0, fade_seconds=(2.0, 2.0))
    truth = write_movie(tmp_path / "fade.mp4", seed=1, cfg=cfg)
    assert truth["boundaries"] == [{"t": 3.0, "kind": "fade"}]
    f = {round(x.t, 1): x.rgb.astype(np.float32) for x in iter_frames(tmp_path / "fade.mp4", fps=0)}
    mid = 0.5 * (f[1.5] + f[4.5])  # before and after the fade (objects drift a little meanwhile)
    assert np.abs(f[3.0] - mid).mean() < np.abs(f[3.0] - f[1.5]).mean()
    assert np.abs(f[3.0] - mid).mean() < np.abs(f[3.0] - f[4.5]).mean()


# ---------------------------------------------------------------------------------------------------- shot metrics


def test_boundary_matching_is_one_to_one_within_tolerance() -> None:
    assert match_boundaries([10, 11], [10]) == [(0, 0)]  # two predictions, one truth: one match
    assert match_boundaries([12], [10]) == []
    assert sorted(match_boundaries([9, 21], [10, 20])) == [(0, 0), (1, 1)]
    assert match_boundaries([11], [10, 12]) and len(match_boundaries([11], [10, 12])) == 1
    assert prf(8, 10, 16) == pytest.approx({"precision": 0.8, "recall": 0.5, "f1": 2 * 0.4 / 1.3})
    assert time_to_index(6.18, 2) == 13 and time_to_index(6.5, 2) == 13
    assert shot_ranges(10, [3, 7]) == [(0, 3), (3, 7), (7, 10)]


def test_detection_finds_steps_and_leaves_one_shot_whole() -> None:
    rng = np.random.default_rng(0)
    n = 30
    grid = 0.5 + 0.003 * rng.standard_normal((n, 64, 3))  # noise only: one shot
    emb = rng.standard_normal((n, 8)) * 0.01 + np.eye(8)[0]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert detect_boundaries(emb, grid).index.tolist() == []
    for cut, level, axis in ((10, 0.7, 1), (20, 0.3, 2)):  # two shots more: every cell and the content change
        grid[cut:] += level - grid[cut:].mean()
        emb[cut:] = np.eye(8)[axis] + 0.01 * rng.standard_normal((n - cut, 8))
    grid[15:, :5] += 0.2  # an object changes inside the second shot: a few cells
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert detect_boundaries(emb, grid).index.tolist() == [10, 20]


def test_detection_on_a_generated_movie_finds_its_cuts(world) -> None:
    from vislang.factory import load_embedding_model
    from vislang.video.analyze import analyze
    from vislang.video.summary import shots_of

    model, _ = load_embedding_model(world["model"])
    table = analyze(world["movie"], model, fps=2)
    truth = [time_to_index(b["t"], 2) for b in world["truth"]["boundaries"]]
    pred = detect_boundaries(table.emb, table.grid).index.tolist()
    assert len(match_boundaries(pred, truth)) == len(truth) == len(pred), (pred, truth)
    shots, _ = shots_of(table)
    assert len(shots) == 4 and shots[-1]["end"] == pytest.approx(world["truth"]["duration"], abs=0.2)


# ------------------------------------------------------------------------------------------------------ key frames


def test_key_frames_cover_shots_first_then_add_frames() -> None:
    rng = np.random.default_rng(0)
    centers = np.eye(6)[:3]
    sizes = [20, 12, 3]  # three clusters of frames
    emb = np.concatenate([c + 0.05 * rng.standard_normal((k, 6)) for c, k in zip(centers, sizes)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    medoids = [5, 25, 33]
    assert select_key_frames(emb, medoids, 3) == medoids
    assert select_key_frames(emb, medoids, 2) == [5, 25]  # the two shots that cover most frames
    more = select_key_frames(emb, medoids, 5)
    assert len(more) == 5 and set(medoids) <= set(more) and more == sorted(more)
    with pytest.raises(ValueError, match="at least 1"):
        select_key_frames(emb, medoids, 0)


def test_summarize_writes_every_output(world, tmp_path: Path) -> None:
    from vislang.factory import load_embedding_model
    from vislang.video.summary import SummaryOptions, summarize

    model, _ = load_embedding_model(world["model"])
    s = summarize(world["movie"], model.eval(), tmp_path / "out", SummaryOptions(budget=3, clip_seconds=1.0),
                  captioner=lambda images: [f"caption {i}" for i in range(len(images))])  # fmt: skip
    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text()) == s
    assert len(s["key_frames"]) == 3 and [k["t"] for k in s["key_frames"]] == sorted(k["t"] for k in s["key_frames"])
    assert len({k["shot"] for k in s["key_frames"]}) == 3  # three different shots
    assert [k["caption"] for k in s["key_frames"]] == ["caption 0", "caption 1", "caption 2"]
    from PIL import Image

    board = Image.open(out / "storyboard.png")
    assert board.width > 3 * 256 and board.height > 64
    page = (out / "summary.html").read_text()
    assert page.count('class="kf"') == 3 and "movie.mp4#t=" in page and "<video" in page
    clip = probe(out / "summary.mp4")
    assert clip.duration == pytest.approx(3.0, abs=0.35)  # three non-overlapping 1 s clips
    assert all((out / k["image"]).is_file() for k in s["key_frames"])


def test_summary_budget_from_ratio_and_defaults() -> None:
    from vislang.video.summary import SummaryOptions

    assert SummaryOptions().key_frame_budget(7, 60.0) == 7
    assert SummaryOptions(ratio=0.1, clip_seconds=2.0).key_frame_budget(7, 60.0) == 3
    assert SummaryOptions(budget=2).key_frame_budget(7, 60.0) == 2
    for bad in ({"budget": 0}, {"ratio": 0.0}, {"ratio": 1.5}, {"clip_seconds": 0}, {"fps": -1}):
        with pytest.raises(ValueError):
            SummaryOptions(**bad)


# --------------------------------------------------------------------------------------------------------- moments


def test_adjacent_frames_merge_into_moments() -> None:
    frames = [(1.0, 0.5), (1.5, 0.9), (2.0, 0.6), (5.0, 0.95), (3.0, 0.4)]
    hits = [{"video": "a", "t": t, "score": s, "id": i} for i, (t, s) in enumerate(frames)]
    hits.append({"video": "b", "t": 1.5, "score": 0.7, "id": 9})
    moments = merge_moments(hits, step=0.5)
    assert [(m["video"], m["start"], m["end"]) for m in moments] == [("a", 5.0, 5.5), ("a", 1.0, 3.5), ("b", 1.5, 2.0)]
    assert moments[1]["id"] == 1 and moments[1]["t"] == 1.5 and moments[1]["frames"] == 4  # 3.0 joins over one gap
    assert len(merge_moments(hits, step=0.5, gap=0)) == 4  # without a gap 3.0 stands alone
    assert temporal_iou((0, 2), (1, 3)) == pytest.approx(1 / 3) and temporal_iou((0, 1), (2, 3)) == 0
    snapped = snap_to_shots(moments, {"a": [(0.0, 4.0), (4.0, 8.0)]})
    assert [(m["start"], m["end"]) for m in snapped] == [(4.0, 8.0), (0.0, 4.0), (1.5, 2.0)]
    with pytest.raises(ValueError):
        merge_moments(hits, step=0)
    in_shots = [{"video": "a", "t": t, "score": 0.5, "shot": k} for t, k in ((1.0, 0), (1.5, 0), (2.0, 1), (2.5, 1))]
    assert [(m["start"], m["end"]) for m in merge_moments(in_shots, 0.5)] == [(1.0, 2.0), (2.0, 3.0)]  # split at cut


def test_frame_keys_round_trip() -> None:
    from vislang.index.video import frame_fields, frame_key

    key = frame_key("/v/a#b.mp4", 12.5, 3, 10.0, 15.25)
    assert frame_fields(key) == {"video": "/v/a#b.mp4", "t": 12.5, "shot": 3, "shot_start": 10.0, "shot_end": 15.25}
    assert frame_fields("/images/x.png") is None and frame_fields("/shards/0.tar#sample7") is None
