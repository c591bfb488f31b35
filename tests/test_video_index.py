"""Video in the index: `vislang index build` on videos (each sampled frame an item with video, t, shot), resume,
`vislang search` and `/v1/search` returning moments, and the frame and video routes of the server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("av", reason="video needs PyAV (pip install av)")
pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install faiss-cpu)")

from test_index import make_tiny_model, write_images  # noqa: E402
from vislang.cli.main import main  # noqa: E402
from vislang.index import build_index, open_index  # noqa: E402
from vislang.index.video import frame_fields, is_video_source  # noqa: E402
from vislang.video.synthetic import MovieConfig, write_movies  # noqa: E402

SMALL = MovieConfig(shots=3, shot_seconds=(2.0, 3.0), fps=10, size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("videoindex")
    movies = write_movies(root / "movies", 2, cfg=SMALL)
    for p in movies:
        p.with_suffix(".json").unlink()  # a folder of videos only
    model = make_tiny_model(root)
    index = root / "movies.index"
    counts = build_index(str(root / "movies"), index, model, progress=False, fps=2)
    return {"root": root, "movies": movies, "model": model, "index": index, "counts": counts}


def test_every_sampled_frame_is_an_item(world) -> None:
    counts = world["counts"]
    assert counts["videos"] == 2 and counts["unreadable"] == 0
    with open_index(world["index"]) as index:
        items = index.get(list(range(1, len(index) + 1)))
        assert len(index) == counts["added"] == counts["size"]
    fields = [frame_fields(it["key"]) for it in items if it is not None]
    assert all(f is not None for f in fields)
    for movie in world["movies"]:
        times = sorted(f["t"] for f in fields if f["video"] == str(movie.resolve()))
        assert times[:3] == [0.0, 0.5, 1.0]  # 2 fps
        assert len(times) == pytest.approx(2 * json_duration(movie), abs=2)
    shots = {(f["video"], f["shot"]) for f in fields}
    assert len(shots) >= 4  # the detector cut the 3-shot movies into shots


def json_duration(movie: Path) -> float:
    from vislang.video.reader import probe

    return probe(movie).duration


def test_rebuild_skips_indexed_videos_and_counts_bad_ones(world, tmp_path: Path) -> None:
    again = build_index(str(world["root"] / "movies"), world["index"], progress=False, fps=2)
    assert again["added"] == 0 and again["already"] == 2
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(world["movies"][0].read_bytes())
    (folder / "broken.mp4").write_bytes(b"not a video at all" * 10)
    counts = build_index(str(folder), tmp_path / "mixed.index", world["model"], progress=False)
    assert counts["videos"] == 1 and counts["unreadable"] == 1


def test_sources_are_told_apart(world, tmp_path: Path) -> None:
    assert is_video_source(str(world["movies"][0])) and is_video_source(str(world["root"] / "movies"))
    assert is_video_source(str(world["root"] / "movies" / "*.mp4"))
    write_images(tmp_path / "imgs", 2)
    assert not is_video_source(str(tmp_path / "imgs"))
    table = tmp_path / "videos.csv"
    table.write_text(f"path\n{world['movies'][0]}\n")
    assert is_video_source(str(table))
    (tmp_path / "images.csv").write_text("filepath,caption\nimgs/scene000.png,a scene\n")
    assert not is_video_source(str(tmp_path / "images.csv"))


def test_search_prints_moments(world, capsys) -> None:
    code = main(["search", "a red circle", "--index", str(world["index"]), "-k", "3", "--json"])
    assert code == 0
    moments = json.loads(capsys.readouterr().out)
    assert 1 <= len(moments) <= 3
    for m in moments:
        assert Path(m["video"]).name.startswith("movie_") and m["start"] <= m["t"] < m["end"]
        assert m["shot_start"] <= m["t"] < m["shot_end"] + 1e-6
        assert 1 <= m["frames"] <= round((m["end"] - m["start"]) / 0.5)  # merged frames lie inside the span
    scores = [m["score"] for m in moments]
    assert scores == sorted(scores, reverse=True)
    assert main(["search", "a red circle", "--index", str(world["index"]), "-k", "2"]) == 0
    assert " s  (best " in capsys.readouterr().out


def test_server_returns_moments_frames_and_video(world) -> None:
    from fastapi.testclient import TestClient

    from vislang.serve.app import create_app

    client = TestClient(create_app(world["index"]))
    r = client.post("/v1/search", json={"text": "a blue square", "k": 30})
    assert r.status_code == 200
    body = r.json()
    hit = body["results"][0]
    assert hit["url"] == f"/v1/frames/{hit['id']}" and hit["video"].startswith("movie_")
    assert hit["video_url"].startswith(f"/v1/videos/{hit['id']}#t=")
    assert body["moments"] and body["moments"][0]["score"] == pytest.approx(hit["score"], abs=1e-6)
    assert sum(m["frames"] for m in body["moments"]) == 30  # every frame hit lands in one moment
    frame = client.get(hit["url"])
    assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
    assert frame.content[:3] == b"\xff\xd8\xff"
    part = client.get(f"/v1/videos/{hit['id']}", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100 and part.headers["content-type"] == "video/mp4"
    for bad in ("abc", "99999"):
        assert client.get(f"/v1/frames/{bad}").status_code == 404
        assert client.get(f"/v1/videos/{bad}").status_code == 404


def test_image_index_has_no_moments(world, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from vislang.serve.app import create_app

    write_images(tmp_path / "imgs", 3)
    build_index(str(tmp_path / "imgs"), tmp_path / "img.index", world["model"], progress=False)
    client = TestClient(create_app(tmp_path / "img.index"))
    body = client.post("/v1/search", json={"text": "a red circle", "k": 2}).json()
    assert "moments" not in body and body["results"][0]["url"].startswith("/v1/images/")
    assert client.get(f"/v1/frames/{body['results'][0]['id']}").status_code == 404


def test_a_csv_naming_videos_outside_its_folder_needs_allow_outside_root(world, tmp_path) -> None:
    """As for images: a server sends indexed videos, so a CSV may not reach outside its folder unless asked."""
    from vislang.index.files import OutsideRoot

    csv = tmp_path / "list" / "videos.csv"
    csv.parent.mkdir()
    csv.write_text("path\n" + "\n".join(str(m.resolve()) for m in world["movies"][:1]) + "\n")
    with pytest.raises(OutsideRoot, match="--allow-outside-root"):
        build_index(str(csv), tmp_path / "out.index", world["model"], progress=False, fps=2)
    counts = build_index(str(csv), tmp_path / "ok.index", world["model"], progress=False, fps=2,
                         allow_outside_root=True)  # fmt: skip
    assert counts["videos"] == 1
    with open_index(tmp_path / "ok.index") as index:
        assert str(world["movies"][0].resolve().parent) in index.get_state("roots")


def test_index_remove_takes_a_video_and_a_later_build_adds_it_again(world, tmp_path) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    kept, dropped = (folder / m.name for m in world["movies"])
    for src, dst in zip(world["movies"], (kept, dropped)):
        dst.write_bytes(src.read_bytes())
    index_dir = tmp_path / "two.index"
    first = build_index(str(folder), index_dir, world["model"], progress=False, fps=2)
    assert main(["index", "remove", str(dropped), "--index", str(index_dir)]) == 0
    with open_index(index_dir) as index:
        videos = {frame_fields(it["key"])["video"] for it in index.get(list(range(1, first["added"] + 1))) if it}
        assert videos == {str(kept.resolve())} and 0 < len(index) < first["added"]
    again = build_index(str(folder), index_dir, progress=False, fps=2)  # the removed video is no longer "done"
    assert again["videos"] == 1 and again["already"] == 1 and again["size"] == first["added"]


def test_a_frame_is_captioned_by_its_id(world, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from test_serve_generative import make_tiny_captioner
    from vislang.serve.app import create_app

    client = TestClient(create_app(world["index"], caption_model=make_tiny_captioner(tmp_path)))
    hit = client.post("/v1/search", json={"text": "a red circle", "k": 1}).json()["results"][0]
    r = client.post("/v1/caption", json={"image_id": hit["id"]})
    assert r.status_code == 200 and isinstance(r.json()["caption"], str)  # decoded from the video at its time
    assert client.post("/v1/caption", json={"image_id": 10**9}).status_code == 404


def test_under_an_api_key_video_urls_are_signed_for_the_video_element(world) -> None:
    """A <video> element sends no X-API-Key header: its URL carries an expiring HMAC of that path instead."""
    from fastapi.testclient import TestClient

    from vislang.serve.app import create_app
    from vislang.serve.guard import SIGNED_TTL, sign_url, signature_valid

    client = TestClient(create_app(world["index"], api_key="s3cret"))
    key = {"X-API-Key": "s3cret"}
    body = client.post("/v1/search", json={"text": "a blue square", "k": 5}, headers=key).json()
    hit, moment = body["results"][0], body["moments"][0]
    for url in (hit["video_url"], moment["video_url"]):
        path, _, rest = url.partition("?")
        assert path.startswith("/v1/videos/") and "sig=" in rest and "#t=" in rest
        playable = url.partition("#")[0]
        r = client.get(playable, headers={"Range": "bytes=0-9"})  # no key: the signature lets it through
        assert r.status_code == 206 and len(r.content) == 10
    bare = hit["video_url"].partition("?")[0]
    assert client.get(bare).status_code == 401
    tampered = hit["video_url"].partition("#")[0][:-1] + ("0" if hit["video_url"].partition("#")[0][-1] != "0" else "1")
    assert client.get(tampered).status_code == 401
    other = moment["video_url"].partition("?")[0] if moment["id"] != hit["id"] else "/v1/videos/999999"
    assert client.get(other + "?" + hit["video_url"].partition("?")[2].partition("#")[0]).status_code == 401
    frame_with_sig = f"/v1/frames/{hit['id']}?" + hit["video_url"].partition("?")[2].partition("#")[0]
    assert client.get(frame_with_sig).status_code == 401  # only video files take signatures
    signed = sign_url("s3cret", "/v1/videos/7", now=1000.0)
    path, _, query = signed.partition("?")
    assert signature_valid("s3cret", path, query, now=1000.0 + SIGNED_TTL - 1)
    assert not signature_valid("s3cret", path, query, now=1000.0 + SIGNED_TTL + 1)  # expired
    assert not signature_valid("other", path, query, now=1000.0)
    plain = TestClient(create_app(world["index"])).post("/v1/search", json={"text": "a blue square", "k": 1}).json()
    assert "sig=" not in plain["results"][0]["video_url"]  # no key, nothing to sign
