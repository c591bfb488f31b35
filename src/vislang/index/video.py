"""Videos in an index: every sampled frame an item, search hits merged into moments.

A frame's item key is ``VIDEO#t=SECONDS&shot=K&start=A&end=B``: the video file, the frame's time, and the detected
shot it belongs to with that shot's span, so a hit says where to play from without another lookup, and the index
schema (key, path, caption) stays the one images use. Each video is added in one transaction and then recorded in
the index's state, so an interrupted build skips finished videos and redoes at most the one it was in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np

from ..inference import IMAGE_EXTS
from ..video.moments import merge_moments
from ..video.reader import VIDEO_EXTS, csv_videos, list_videos
from .files import ROOTS_STATE, OutsideRoot, is_inside

STATE = "video"  # index state: {"fps": sampling rate, "done": [finished video paths]}


def is_video_source(src: str) -> bool:
    """Whether ``vislang index build SRC`` means videos: a video file, a glob of them, a CSV/TSV whose first path is a
    video, or a folder holding videos and no images (a folder with both is indexed as images, as before)."""
    p = Path(os.path.expanduser(src))
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):  # a table of video paths (its first row decides)
        try:
            first = next(iter(csv_videos(p)), None)
        except (ValueError, KeyError, UnicodeDecodeError):
            return False
        return first is not None and first.suffix.lower() in VIDEO_EXTS
    if p.is_file():
        return p.suffix.lower() in VIDEO_EXTS
    if p.is_dir():
        files = [q.suffix.lower() for q in p.rglob("*") if q.is_file()]
        return any(s in VIDEO_EXTS for s in files) and not any(s in IMAGE_EXTS for s in files)
    return any(c in src for c in "*?[") and any(src.lower().endswith(e) for e in VIDEO_EXTS)


def frame_key(video: str, t: float, shot: int, start: float, end: float) -> str:
    return f"{video}#t={t:.3f}&shot={shot}&start={start:.3f}&end={end:.3f}"


def frame_fields(key: str) -> dict[str, Any] | None:
    """``video``, ``t``, ``shot``, ``shot_start``, ``shot_end`` of a frame item's key; None for an image's key."""
    video, sep, query = key.rpartition("#")
    if not sep or not query.startswith("t="):
        return None
    q = {k: v[0] for k, v in parse_qs(query).items()}
    try:
        return {"video": video, "t": float(q["t"]), "shot": int(q["shot"]), "shot_start": float(q["start"]),
                "shot_end": float(q["end"])}  # fmt: skip
    except (KeyError, ValueError):
        return None


def video_roots(src: str, videos: list[str], roots: set[str], allow_outside_root: bool) -> set[str]:
    """The folders the server may send these videos from: the source's, plus (only when allowed) those of videos a
    CSV names outside it."""
    roots = set(roots)
    for video in videos:
        if not any(is_inside(video, r) for r in roots):
            if not allow_outside_root:
                raise OutsideRoot(
                    f"{src}: the video {video} lies outside {sorted(roots)[0]}, so it is not indexed: a server would "
                    "send it to its clients; pass --allow-outside-root if you mean to index it"
                )
            roots.add(str(Path(video).parent))
    return roots


def build_video_index(
    src: str,
    index_dir: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    fps: float = 2.0,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    backend: str = "faiss",
    allow_outside_root: bool = False,
    precision: str = "auto",
    **options: Any,
) -> dict[str, Any]:
    """Index the sampled frames of videos (``src``: a video, a folder or glob of them, or a CSV of paths).

    As for images (``index.files``), the build records the folders the videos come from, and a CSV naming videos
    outside its own folder is refused unless ``allow_outside_root``: the server sends indexed videos to its clients.

    Returns the counts ``build_index`` returns (``added`` frames, ``already``, ``duplicates``, ``unreadable`` videos,
    ``size``, ``seconds``) plus ``videos`` indexed.
    """
    from ..video.analyze import analyze  # lazy: torch is loaded only when something is embedded
    from ..video.summary import shots_of  # lazy: torch is loaded only when something is embedded
    from .build import load_embedder, open_or_create, source_roots  # lazy: build.py imports is_video_source

    if fps <= 0:
        raise ValueError(f"--fps must be positive to index video, got {fps}")
    if precision != "auto":  # frames are embedded by video.analyze, at auto
        raise ValueError(f"--precision {precision} applies to images; video frames are embedded at auto (bf16 where "
                         "it pays and agrees with fp32): leave --precision out for a video source")  # fmt: skip
    videos = [str(p.resolve()) for p in list_videos([src])]
    roots = video_roots(src, videos, source_roots(src), allow_outside_root)
    index, model_path = open_or_create(index_dir, model_dir, backend, **options)
    counts: dict[str, Any] = {"added": 0, "already": 0, "duplicates": 0, "unreadable": 0, "videos": 0}
    try:
        index.set_state(ROOTS_STATE, sorted(set(index.get_state(ROOTS_STATE) or []) | roots))
        state = index.get_state(STATE, {"fps": fps, "done": []})
        if abs(state["fps"] - fps) > 1e-9 and state["done"]:
            raise ValueError(
                f"{index_dir} holds frames sampled at {state['fps']} fps; add more with --fps {state['fps']}"
            )
        model, _ = load_embedder(model_path, device)
        bar = None
        if progress:
            from tqdm.auto import tqdm  # lazy: progress bars only for the command line

            bar = tqdm(desc="indexing video", unit="frame", total=None)
        t0 = time.perf_counter()
        for video in dict.fromkeys(videos):
            if video in state["done"]:
                counts["already"] += 1
                continue
            try:
                table = analyze(video, model, fps=fps, batch_size=batch_size, device=device, bar=bar)
            except ValueError as e:
                counts["unreadable"] += 1
                print(f"[vislang] skipped {e}")
                continue
            shot_spans = [(s["start"], s["end"]) for s in shots_of(table)[0]]
            shot_idx = np.searchsorted([a for a, _ in shot_spans], table.times, side="right") - 1  # (N,)
            keys = [frame_key(video, float(t), int(k), *shot_spans[k]) for t, k in zip(table.times, shot_idx)]
            done = index.ids_for_keys(keys)  # frames of a video whose build stopped between add and set_state
            fresh = [i for i, key in enumerate(keys) if key not in done]
            counts["duplicates"] += len(keys) - len(fresh)
            if fresh:
                index.add(table.emb[fresh], [{"key": keys[i], "path": video, "caption": ""} for i in fresh])
            counts["added"] += len(fresh)
            counts["videos"] += 1
            state["done"].append(video)
            index.set_state(STATE, state)
        counts["seconds"] = round(time.perf_counter() - t0, 3)
        if bar is not None:
            bar.close()
        counts["size"] = len(index)
    finally:
        index.close()
    if counts["videos"] == 0 and counts["unreadable"]:
        raise ValueError(f"none of the {counts['unreadable']} video(s) in {src} could be read")
    return counts


def forget_videos(index: Any, videos: Sequence[str]) -> None:
    """Drop ``videos`` from the finished list of an index's video state, so that a later ``index build`` over them
    embeds them again instead of skipping them as done (``index remove`` of a video)."""
    state = index.get_state(STATE)
    if state and state.get("done"):
        gone = set(videos)
        index.set_state(STATE, {**state, "done": [v for v in state["done"] if v not in gone]})


def video_step(index: Any) -> float | None:
    """Seconds between indexed frames of a video index; None for an index of images."""
    state = index.get_state(STATE)
    return 1.0 / state["fps"] if state else None


def moments_of(hits: Sequence[dict[str, Any]], step: float, limit: int | None = None) -> list[dict[str, Any]]:
    """Frame hits (with ``id``, ``key``, ``score``) merged into moments: video, start, end, best frame ``t`` and
    ``id``, its shot and the shot's span; image hits are left out."""
    frames = []
    for h in hits:
        f = frame_fields(h["key"])
        if f is not None:
            frames.append({"id": h["id"], "score": h["score"], **f})
    return merge_moments(frames, step)[:limit]
