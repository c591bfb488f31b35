"""Moments: frame hits of a search merged into time ranges of a video, and the temporal IoU that scores them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def merge_moments(hits: Iterable[dict[str, Any]], step: float, gap: int = 1) -> list[dict[str, Any]]:
    """Frame hits (dicts with ``video``, ``t``, ``score``; others kept from the best frame) merged into moments.

    Hits of one video whose times are at most ``(gap + 1) * step`` apart join one moment, so a run of matching frames
    with one miss in it is still one moment; hits that carry a ``shot`` join only hits of the same shot. A moment spans
    ``[first t, last t + step)``: a sampled frame stands for the ``step`` seconds after it. Moments are ranked by their
    best frame's score.

    Args:
        hits: search results of sampled frames (any order).
        step: seconds between sampled frames (1 / fps).
        gap: missing frames tolerated inside a moment.
    """
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    by_video: dict[str, list[dict[str, Any]]] = {}
    for h in hits:
        by_video.setdefault(str(h["video"]), []).append(h)
    moments = []
    for video, hs in by_video.items():
        hs.sort(key=lambda h: h["t"])
        run = [hs[0]]
        for h in hs[1:]:
            same_shot = h.get("shot") == run[-1].get("shot")  # hits that name their shot never span a cut
            if same_shot and h["t"] - run[-1]["t"] <= (gap + 1) * step + 1e-6:
                run.append(h)
            else:
                moments.append(moment(video, run, step))
                run = [h]
        moments.append(moment(video, run, step))
    moments.sort(key=lambda m: -m["score"])
    return moments


def moment(video: str, run: Sequence[dict[str, Any]], step: float) -> dict[str, Any]:
    """One moment of a time-sorted run of frame hits: its span, best score and the fields of its best frame."""
    best = max(run, key=lambda h: h["score"])
    out = {k: v for k, v in best.items() if k not in ("t", "score")}
    out.update(video=video, start=round(run[0]["t"], 3), end=round(run[-1]["t"] + step, 3), t=best["t"],
               score=float(best["score"]), frames=len(run))  # fmt: skip
    return out


def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two time ranges ``(start, end)``."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def snap_to_shots(moments: Sequence[dict[str, Any]], shots: dict[str, Sequence[tuple[float, float]]]) -> list[dict]:
    """Moments widened to the detected shot of their best frame (``shots``: per video, its shots' (start, end)).

    A search hit says which shot matched; the shot is often the moment a person wants. Moments that land in the
    same shot are merged (the better one is kept).
    """
    out, seen = [], set()
    for m in moments:
        spans = shots.get(m["video"], ())
        span = next(((a, b) for a, b in spans if a <= m["t"] < b), None)
        if span is None:
            out.append(m)
            continue
        if (m["video"], span) in seen:
            continue
        seen.add((m["video"], span))
        out.append({**m, "start": round(span[0], 3), "end": round(span[1], 3)})
    return out
