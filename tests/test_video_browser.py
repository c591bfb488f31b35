"""End to end in headless Chromium: on a video index the search page shows each hit's frame, names its video, time
and shot, and plays the video from that shot."""

from __future__ import annotations

import pytest

pytest.importorskip("av", reason="video needs PyAV (pip install av)")

from test_index import make_tiny_model  # noqa: E402
from test_serve_browser import TIMEOUT_MS, ServerThread, browser, results, wait_images_loaded  # noqa: E402, F401
from vislang.index import build_index  # noqa: E402
from vislang.serve import create_app  # noqa: E402
from vislang.video.synthetic import MovieConfig, write_movies  # noqa: E402


@pytest.fixture(scope="module")
def video_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("videobrowser")
    write_movies(root / "movies", 1, cfg=MovieConfig(shots=3, shot_seconds=(2.0, 3.0), fps=10, size=64))
    (root / "movies" / "movie_000.json").unlink()
    build_index(str(root / "movies"), root / "ix", make_tiny_model(root), progress=False)
    return root / "ix"


def test_page_shows_frames_and_plays_the_shot(video_index, browser):  # noqa: F811 -- the browser fixture
    with ServerThread(create_app(video_index)) as url:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        page.fill("#k", "4")
        page.fill("#q", "a red circle")
        page.press("#q", "Enter")
        hits = results(page)
        assert len(hits) == 4
        assert all(h["caption"].startswith("movie_000.mp4 · ") and " s · shot " in h["caption"] for h in hits)
        wait_images_loaded(page, 4)  # the frames, decoded by /v1/frames/{id}
        page.wait_for_function(
            "() => [...document.querySelectorAll('video.moment')].filter(v => v.readyState >= 1).length >= 4",
            timeout=TIMEOUT_MS,
        )
        starts = page.eval_on_selector_all("video.moment", "vs => vs.map(v => [v.currentTime, v.duration])")
        assert all(0 <= t < d for t, d in starts)
        assert any(t > 0 for t, _ in starts) or all(h["caption"].endswith("shot 1") for h in hits)
