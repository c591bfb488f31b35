"""Reading video with PyAV: probing, frame sampling at a fixed rate, and a decode thread that overlaps the model.

PyAV (``av``, FFmpeg inside its wheel) is imported inside the functions that need it, so ``import vislang`` stays
light. Frames are streamed: a one-hour video never sits in memory, only a bounded queue of sampled frames does.
Every way a file can be unusable is turned into a ``ValueError`` that names the file and what to do.
"""

from __future__ import annotations

import csv
import glob
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts")
MAX_FRAME_PIXELS = 8192 * 8192  # above 8K UHD (7680x4320); one RGB frame of this size is already 200 MB
_END = object()


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says about a file's first video stream."""

    path: str
    width: int
    height: int
    fps: float  # average frame rate of the stream
    duration: float  # seconds (0 when the container does not say)


@dataclass
class Frame:
    """One sampled frame: its time in seconds, its index among sampled frames and its RGB pixels (H, W, 3)."""

    t: float
    index: int
    rgb: np.ndarray


def list_videos(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Video files named by paths, folders (recursive, sorted), globs or CSV/TSV files with a path column.

    A CSV's first column named ``path``/``filepath``/``video``/``file`` (else its first column) holds the paths,
    relative to the CSV's folder.
    """
    out: list[Path] = []
    for src in sources:
        s = os.path.expanduser(str(src))
        p = Path(s)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in VIDEO_EXTS))
        elif p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
            out.extend(csv_videos(p))
        elif p.exists():
            out.append(p)
        elif any(c in s for c in "*?["):
            out.extend(Path(q) for q in sorted(glob.glob(s, recursive=True)) if Path(q).is_file())
        else:
            raise FileNotFoundError(f"{src} does not exist; give video files, folders of videos, a glob or a CSV")
    if not out:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTS)}) found in {', '.join(map(str, sources))}")
    return out


def csv_videos(path: Path) -> list[Path]:
    """The video paths of a CSV/TSV file (see ``list_videos``)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = reader.fieldnames or []
        column = next((c for c in ("path", "filepath", "video", "file") if c in header), header[0] if header else None)
        if column is None:
            raise ValueError(f"{path} has no header row; give a CSV with a 'path' column of video files")
        return [(path.parent / os.path.expanduser(r[column].strip())).resolve() for r in reader if r.get(column)]


def _open(path: str | os.PathLike):
    """An open PyAV container and its first video stream, or a ValueError saying why the file is unusable."""
    import av  # lazy: PyAV (FFmpeg) is needed only to read video

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if p.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); it is not a video")
    try:
        container = av.open(str(p), metadata_errors="ignore")
    except av.error.EOFError:
        raise ValueError(f"{path} holds no video frames (a zero-length video); give a video with frames") from None
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not a readable video ({e.__class__.__name__}): it is not a video, or it is truncated or "
            "corrupt; re-download or re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`)"
        ) from None
    if not container.streams:
        container.close()
        raise ValueError(f"{path} holds no streams (a zero-length video); give a video with frames")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise ValueError(f"{path} has no video stream (streams: {', '.join(kinds)}); give a file with video in it")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > MAX_FRAME_PIXELS:
        container.close()
        raise ValueError(
            f"{path} has {w}x{h} frames, larger than vislang reads (at most {MAX_FRAME_PIXELS} pixels); "
            "downscale it first, e.g. `ffmpeg -i IN -vf scale=1920:-2 OUT.mp4`"
        )
    if w <= 0 or h <= 0:
        container.close()
        raise ValueError(f"{path} declares a {w}x{h} video stream; it is corrupt, re-encode it")
    return container, stream


def probe(path: str | os.PathLike) -> VideoInfo:
    """Size, frame rate and duration of a video's first video stream, from its header (no decoding)."""
    container, stream = _open(path)
    with container:
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000  # microseconds (av.time_base)
        else:
            duration = (stream.frames or 0) / fps
        w, h = stream.codec_context.width, stream.codec_context.height
    return VideoInfo(str(path), w, h, fps, duration)


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) scaled so the longer side is at most ``max_side``, kept even (what H.264 encoders need)."""
    s = min(1.0, max_side / max(width, height))
    return max(2, int(width * s) // 2 * 2), max(2, int(height * s) // 2 * 2)


def iter_frames(
    path: str | os.PathLike,
    fps: float = 2.0,
    max_side: int = 224,
    start: float = 0.0,
    end: float | None = None,
    threads: int = 0,
) -> Iterator[Frame]:
    """Decoded frames sampled every ``1/fps`` seconds (``fps=0``: every frame), resized once by FFmpeg.

    Args:
        path: a video file.
        fps: sampling rate in frames per second; 0 keeps every frame.
        max_side: longest side of the returned frames in pixels (the aspect ratio is kept).
        start: first second to return (the decoder seeks to the key frame before it).
        end: last second (exclusive); None = to the end.
        threads: FFmpeg decoding threads (0 = FFmpeg's choice).

    A file that ends early (truncated) stops the iteration at its last decodable frame with a warning; a file that
    yields no frame at all raises a ValueError.
    """
    import av  # lazy: PyAV (FFmpeg) is needed only to read video

    if fps < 0:
        raise ValueError(f"--fps must be 0 (every frame) or positive, got {fps}")
    container, stream = _open(path)
    w, h = fit_size(stream.codec_context.width, stream.codec_context.height, max_side)
    stream.thread_type = "AUTO"
    if threads:
        stream.codec_context.thread_count = threads
    step = 1.0 / fps if fps else 0.0
    next_t, n = start, 0
    with container:
        if start > 0 and stream.time_base is not None:
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        try:
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else n * step
                if end is not None and t >= end:
                    break
                if t + 1e-6 < next_t:
                    continue
                yield Frame(t, n, frame.to_ndarray(width=w, height=h, format="rgb24"))
                n += 1
                next_t = (next_t + step) if step else t
                while step and next_t <= t:  # variable frame rate or a gap: never emit two frames for one slot
                    next_t += step
        except (av.error.FFmpegError, EOFError) as e:
            if n == 0:
                raise ValueError(
                    f"{path} holds no decodable frame ({e.__class__.__name__}); it is truncated or corrupt"
                ) from None
            print(f"[vislang] {path}: decoding stopped at {t:.1f} s ({e.__class__.__name__}); the file is truncated")
    if n == 0 and start == 0:
        raise ValueError(f"{path} holds no video frames (a zero-length video); give a video with at least one frame")


def frame_at(path: str | os.PathLike, t: float, max_side: int = 512) -> np.ndarray:
    """The RGB frame shown at second ``t`` (the first frame at or after it; the last frame when ``t`` is past it)."""
    last = None
    for f in iter_frames(path, fps=0, max_side=max_side, start=max(0.0, t - 1e-3)):
        if f.t + 1e-3 >= t:
            return f.rgb
        last = f.rgb
    if last is None:
        raise ValueError(f"{path} has no frame at or after {t:.2f} s")
    return last


def threaded(items: Iterable, maxsize: int = 16) -> Iterator:
    """``items`` produced by a worker thread into a bounded queue: the producer (decoding, which releases the GIL in
    FFmpeg) runs ahead of the consumer (the model) by at most ``maxsize`` items, so memory stays bounded. An exception
    in the producer is raised in the consumer; stopping early (``close``) stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # handed to the consumer, which raises it where the cause is visible
            q.put(e)

    worker = threading.Thread(target=produce, daemon=True, name="vislang-decode")
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def batches(frames: Iterable[Frame], size: int) -> Iterator[list[Frame]]:
    """Consecutive lists of ``size`` frames (the last may be shorter)."""
    batch: list[Frame] = []
    for f in frames:
        batch.append(f)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = 10.0, crf: int = 23) -> Path:
    """Encode RGB frames (H, W, 3 uint8, one size, even sides) as H.264 MP4, atomically (temp file + rename)."""
    import av  # lazy: PyAV (FFmpeg) is needed only to write video

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    n = 0
    with av.open(str(tmp), mode="w") as out:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                stream.height, stream.width = rgb.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "veryfast"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                out.mux(packet)
            n += 1
        if stream is not None:
            for packet in stream.encode():
                out.mux(packet)
    if n == 0:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"no frames to write to {path}")
    os.replace(tmp, path)
    return path
