"""Synthetic "shapes movies" with ground truth: shots, their transitions (hard cuts and fades) and a caption each.

Each shot is a shapes scene (``data/shapes.py``: same colours, shapes, rendering and captions a shapes model is trained
on) that lives for a few seconds: its objects drift and bounce, one may appear a little after the shot starts, and
one may change colour near its end. These in-shot changes are what a shot detector must not mistake for a cut. Shots
are joined by hard cuts or, now and then, by a cross-fade. The ground truth records every boundary's time and kind,
and each shot's start, end and reference captions (true of the shot for most of its length: an object that appears
does so in the first fifth of the shot and is named; a colour change happens in the last fifth and is not).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..data.shapes import COLOR_RGB, Scene, ShapesConfig, generate_scene, render, scene_captions
from .reader import write_video


@dataclasses.dataclass(frozen=True)
class MovieConfig:
    """How a synthetic movie is made.

    Attributes:
        shots: number of shots.
        shot_seconds: (shortest, longest) shot length in seconds.
        fps: frames per second of the written video.
        size: frame side in pixels (square frames).
        fade_fraction: share of boundaries that are cross-fades rather than hard cuts.
        fade_seconds: (shortest, longest) cross-fade length in seconds.
        appear_fraction: share of shots in which one object appears after the shot starts.
        recolor_fraction: share of shots in which one object changes colour near the end.
        speed: largest object speed, in image sides per second.
        max_objects: most objects per shot.
    """

    shots: int = 12
    shot_seconds: tuple[float, float] = (3.0, 8.0)
    fps: float = 10.0
    size: int = 128
    fade_fraction: float = 0.2
    fade_seconds: tuple[float, float] = (1.0, 2.0)
    appear_fraction: float = 0.4
    recolor_fraction: float = 0.3
    speed: float = 0.08
    max_objects: int = 3


@dataclasses.dataclass
class Shot:
    """Ground truth of one shot: where it is, how it starts, its scene and the changes inside it."""

    start: float
    end: float
    transition: str  # how the shot begins: "start" (first shot), "cut" or "fade"
    fade: float  # length of the incoming fade in seconds (0 for cuts)
    captions: list[str]
    scene: Scene
    velocity: np.ndarray  # (n_objects, 2) pixels per second
    appear: tuple[int, float] | None  # (object index, time it appears)
    recolor: tuple[int, float, str] | None  # (object index, time, new colour)

    def state(self, t: float) -> Scene:
        """The scene at time ``t``: objects moved (bouncing off the borders), appeared and recoloured."""
        side = self.scene.image_size
        objs = []
        for i, o in enumerate(self.scene.objects):
            if self.appear is not None and self.appear[0] == i and t < self.appear[1]:
                continue
            x, y = (bounce(p, v * (t - self.start), o.r, side) for p, v in zip((o.x, o.y), self.velocity[i]))
            color = (
                self.recolor[2]
                if self.recolor is not None and self.recolor[0] == i and t >= self.recolor[1]
                else o.color
            )
            objs.append(dataclasses.replace(o, x=x, y=y, color=color))
        return dataclasses.replace(self.scene, objects=tuple(objs))

    def to_json(self) -> dict[str, Any]:
        return {"start": round(self.start, 4), "end": round(self.end, 4), "transition": self.transition,
                "fade": round(self.fade, 4), "caption": self.captions[0], "references": self.captions}  # fmt: skip


def bounce(p: float, d: float, r: float, side: int) -> float:
    """Position ``p + d`` reflected off the walls ``[r, side - r]`` (a triangle wave)."""
    lo, hi = r, side - r
    span = max(hi - lo, 1e-6)
    u = (p - lo + d) % (2 * span)
    return lo + (u if u <= span else 2 * span - u)


def plan_movie(cfg: MovieConfig, seed: int) -> list[Shot]:
    """The shots of movie ``seed``: lengths, transitions, scenes, motion and in-shot events (nothing rendered)."""
    rng = np.random.default_rng(seed)
    world = ShapesConfig(image_size=cfg.size, max_objects=cfg.max_objects, holdout=())
    shots: list[Shot] = []
    t = 0.0
    for k in range(cfg.shots):
        length = float(rng.uniform(*cfg.shot_seconds))
        fade = float(rng.uniform(*cfg.fade_seconds)) if k and rng.random() < cfg.fade_fraction else 0.0
        scene = generate_scene(rng, world)
        n = len(scene.objects)
        velocity = rng.uniform(-1, 1, size=(n, 2)) * cfg.speed * cfg.size  # (n, 2) px/s
        appear = recolor = None
        if n > 1 and rng.random() < cfg.appear_fraction:
            appear = (int(rng.integers(n)), t + float(rng.uniform(0.1, 0.2)) * length)
        if rng.random() < cfg.recolor_fraction:
            i = int(rng.integers(n))
            others = [c for c in world.colors if c != scene.objects[i].color]
            recolor = (i, t + float(rng.uniform(0.8, 0.9)) * length, others[int(rng.integers(len(others)))])
        captions = scene_captions(scene, rng)
        transition = "start" if k == 0 else ("fade" if fade else "cut")
        shots.append(Shot(t, t + length, transition, fade, captions, scene, velocity, appear, recolor))
        t += length
    return shots


def shot_at(shots: list[Shot], t: float) -> int:
    """Index of the shot playing at time ``t``."""
    return max(0, int(np.searchsorted([s.start for s in shots], t, side="right")) - 1)


def movie_frames(shots: list[Shot], cfg: MovieConfig, seed: int) -> Iterator[np.ndarray]:
    """The rendered frames (size, size, 3) uint8; a fade blends the two shots across its boundary."""
    n_frames = int(round(shots[-1].end * cfg.fps))
    for f in range(n_frames):
        t = f / cfg.fps
        k = shot_at(shots, t)
        noise = (seed * 1_000_003 + f * 7919) % (2**31)
        img = np.asarray(render(dataclasses.replace(shots[k].state(t), noise_seed=noise)), dtype=np.float32)
        # a fade centred on a boundary: blend with the neighbouring shot
        nxt = shots[k + 1] if k + 1 < len(shots) else None
        if nxt is not None and nxt.fade and t > nxt.start - nxt.fade / 2:
            a = 0.5 - (nxt.start - t) / nxt.fade  # 0 at the fade's start, 0.5 at the boundary
            other = np.asarray(render(dataclasses.replace(nxt.state(t), noise_seed=noise)), dtype=np.float32)
            img = (1 - a) * img + a * other
        elif shots[k].fade and t < shots[k].start + shots[k].fade / 2:
            a = 0.5 + (t - shots[k].start) / shots[k].fade  # 0.5 at the boundary, 1 at the fade's end
            other = np.asarray(render(dataclasses.replace(shots[k - 1].state(t), noise_seed=noise)), np.float32)
            img = a * img + (1 - a) * other
        yield img.round().astype(np.uint8)


def ground_truth(shots: list[Shot], cfg: MovieConfig, seed: int, video: str) -> dict[str, Any]:
    """The JSON-able ground truth of a movie."""
    return {
        "video": video,
        "seed": seed,
        "fps": cfg.fps,
        "size": cfg.size,
        "duration": round(shots[-1].end, 4),
        "shots": [s.to_json() for s in shots],
        "boundaries": [{"t": round(s.start, 4), "kind": s.transition} for s in shots[1:]],
    }


def write_movie(path: str | os.PathLike, seed: int = 0, cfg: MovieConfig | None = None) -> dict[str, Any]:
    """Render movie ``seed`` to ``path`` (MP4) and its ground truth to ``path`` with ``.json``; returns the truth."""
    cfg = cfg or MovieConfig()
    if cfg.size % 2 or cfg.size < 32:
        raise ValueError(f"movie size must be even and at least 32 pixels, got {cfg.size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shots = plan_movie(cfg, seed)
    write_video(path, movie_frames(shots, cfg, seed), fps=cfg.fps)
    truth = ground_truth(shots, cfg, seed, str(path))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(truth, indent=1))
    os.replace(tmp, path.with_suffix(".json"))
    return truth


def write_movies(out_dir: str | os.PathLike, n: int, seed: int = 0, cfg: MovieConfig | None = None) -> list[Path]:
    """``n`` movies ``movie_000.mp4`` ... (with ``.json`` ground truth) under ``out_dir``; existing ones are kept."""
    out = Path(out_dir)
    paths = []
    for i in range(n):
        p = out / f"movie_{i:03d}.mp4"
        if not (p.is_file() and p.with_suffix(".json").is_file()):
            write_movie(p, seed + i, cfg)
        paths.append(p)
    return paths


def color_names() -> list[str]:
    """The colour words a shapes movie uses (for zero-shot label lists)."""
    return list(COLOR_RGB)
