"""Bad video input gets a clear error naming the problem (and the fix), never a traceback: not a video, a truncated
MP4, a zero-length video, a file with no video stream, a huge frame size, ``--budget 0``; a folder with one bad file
among good ones skips and counts it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="video needs PyAV (pip install av)")

from test_index import make_tiny_model  # noqa: E402
from vislang.cli.main import main  # noqa: E402
from vislang.video.reader import MAX_FRAME_PIXELS, iter_frames, list_videos, probe, write_video  # noqa: E402
from vislang.video.synthetic import MovieConfig, write_movie  # noqa: E402

SMALL = MovieConfig(shots=2, shot_seconds=(2.0, 2.0), fps=10, size=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("badvideo")
    good = root / "good.mp4"
    write_movie(good, seed=0, cfg=SMALL)
    not_video = root / "notes.mp4"
    not_video.write_text("these are meeting notes, not a video\n" * 50)
    truncated = root / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 6 // 10])
    empty = root / "empty.mp4"
    empty.write_bytes(b"")
    no_frames = {}
    for ext, codec in (("mkv", "ffv1"), ("mp4", "libx264")):  # a container header, and no frame after it
        no_frames[ext] = root / f"no_frames.{ext}"
        with av.open(str(no_frames[ext]), "w") as out:
            s = out.add_stream(codec, rate=10)
            s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
            out.start_encoding()
    audio = root / "audio.m4a"
    with av.open(str(audio), "w") as out:  # one second of silence, no video stream
        s = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*s.encode(frame), *s.encode()]:
            out.mux(packet)
    huge = root / "huge.mkv"
    with av.open(str(huge), "w") as out:  # one 8200x8200 gray frame: lossless and all zeros, so a small file
        s = out.add_stream("ffv1", rate=1)
        s.width, s.height, s.pix_fmt = 8200, 8200, "gray"
        frame = av.VideoFrame(8200, 8200, "gray")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for packet in [*s.encode(frame), *s.encode()]:
            out.mux(packet)
    named = {"good": good, "not_video": not_video, "truncated": truncated, "empty": empty, "audio": audio, "huge": huge}
    no_video = {"no_frames": no_frames["mkv"], "no_frames_mp4": no_frames["mp4"]}
    return {"root": root, **named, **no_video, "model": make_tiny_model(root)}


@pytest.mark.parametrize(
    "name, message",
    [
        ("not_video", "not a readable video"),
        ("truncated", "truncated or corrupt"),
        ("empty", "is empty (0 bytes)"),
        ("no_frames", "holds no video frames (a zero-length video)"),
        ("no_frames_mp4", "holds no streams (a zero-length video)"),
        ("audio", "has no video stream (streams: audio)"),
        ("huge", "8200x8200 frames, larger than vislang reads"),
    ],
)
def test_bad_file_gets_a_clear_error(files, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list(iter_frames(files[name]))


def test_huge_frames_are_refused_from_the_header(files) -> None:
    assert 8200 * 8200 > MAX_FRAME_PIXELS >= 7680 * 4320  # 8K UHD still reads
    with pytest.raises(ValueError, match="downscale it first"):
        probe(files["huge"])


@pytest.mark.parametrize("name", ["not_video", "truncated", "empty", "no_frames", "no_frames_mp4", "audio", "huge"])
def test_cli_names_the_problem_and_exits_2(files, name: str, tmp_path: Path, capsys) -> None:
    code = main(["video", "summarize", str(files[name]), "--model", str(files["model"]), "-o", str(tmp_path / "o"),
                 "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(files[name]) in err and "Traceback" not in err


def test_budget_zero_is_refused(files, tmp_path: Path, capsys) -> None:
    code = main(["video", "summarize", str(files["good"]), "--model", str(files["model"]), "-o", str(tmp_path / "o"),
                 "--budget", "0", "--no-progress"])  # fmt: skip
    assert code == 2
    assert "--budget must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_a_folder_skips_and_counts_bad_files(files, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("good", "truncated", "not_video"):
        (folder / files[name].name).write_bytes(files[name].read_bytes())
    assert len(list_videos([folder])) == 3
    code = main(["video", "summarize", str(folder), "--model", str(files["model"]), "-o", str(tmp_path / "o"),
                 "--budget", "2", "--no-video", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "skipped 2 unreadable video(s)" in out
    assert (tmp_path / "o" / "good" / "summary.json").is_file()
    assert not (tmp_path / "o" / "truncated").exists()


def test_truncated_file_with_its_index_first_stops_at_the_last_frame(files, tmp_path: Path, capsys) -> None:
    """An MP4 whose index (moov) comes first and whose data is cut short: decoding keeps what is there and says so."""
    frames = (np.full((64, 64, 3), v, np.uint8) for v in range(0, 250, 5))
    full = write_video(tmp_path / "full.mkv", frames, fps=10)  # Matroska: frames stream in order, no index needed
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    n_full = len(list(iter_frames(full, fps=0)))
    got = list(iter_frames(cut, fps=0))
    assert 0 < len(got) < n_full


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_videos([tmp_path / "nope.mp4"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no videos"):
        list_videos([tmp_path / "empty_dir"])
    with pytest.raises(ValueError, match="--fps must be"):
        list(iter_frames(tmp_path / "x.mp4", fps=-1))
