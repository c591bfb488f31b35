"""Per-frame features of a video: embeddings from an image tower and a coarse colour grid, decode overlapping embed.

``analyze`` streams a video once: a decode thread samples frames at ``fps`` and resizes them to the tower's input
size; the main thread embeds them in batches. What is kept per sampled frame is small (an embedding and an 8x8
colour grid), so memory does not grow with the pixels of a long video.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .reader import Frame, VideoInfo, batches, iter_frames, probe, threaded

GRID = 8  # the colour grid is GRID x GRID cells


@dataclass
class FrameTable:
    """The sampled frames of one video: times (N,), embeddings (N, E) and colour grids (N, 64, 3) in [0, 1]."""

    info: VideoInfo
    fps: float
    times: np.ndarray
    emb: np.ndarray
    grid: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of the run and of embedding alone

    def __len__(self) -> int:
        return len(self.times)


def color_grid(rgb: np.ndarray) -> np.ndarray:
    """Mean colour of each cell of a GRID x GRID grid over an (H, W, 3) uint8 frame: (GRID * GRID, 3) in [0, 1]."""
    cells = Image.fromarray(rgb).resize((GRID, GRID), Image.BOX)  # box filter = the mean over each cell
    return np.asarray(cells, np.float32).reshape(GRID * GRID, 3) / 255.0


def tower_input(rgb: np.ndarray, side: int, channels: int) -> np.ndarray:
    """Centre square crop of a frame already resized so its short side is ``side``: (C, side, side) uint8."""
    h, w = rgb.shape[:2]
    y, x = max(0, (h - side) // 2), max(0, (w - side) // 2)
    crop = rgb[y : y + side, x : x + side]
    if crop.shape[:2] != (side, side):  # a frame smaller than the tower: pad with edge pixels
        crop = np.pad(crop, ((0, side - crop.shape[0]), (0, side - crop.shape[1]), (0, 0)), mode="edge")
    if channels == 1:
        gray = crop.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (side, side)
        return gray.round().astype(np.uint8)[None]
    return np.ascontiguousarray(crop.transpose(2, 0, 1))  # (3, side, side)


def short_side_frames(path: str | os.PathLike, info: VideoInfo, side: int, fps: float, threads: int) -> Iterator[Frame]:
    """Sampled frames resized (by FFmpeg, once) so that their short side is ``side``."""
    long_side = int(np.ceil(side * max(info.width, info.height) / max(1, min(info.width, info.height))))
    return iter_frames(path, fps=fps, max_side=max(long_side + (long_side % 2), side), threads=threads)


def analyze(
    path: str | os.PathLike,
    model: Any,
    fps: float = 2.0,
    batch_size: int = 32,
    overlap: bool = True,
    threads: int = 0,
    device: str = "cpu",
    bar: Any = None,
) -> FrameTable:
    """Embed every sampled frame of a video and take its colour grid.

    Args:
        path: the video.
        model: an image tower with ``encode_image`` and ``cfg.vision`` (a vislang embedding model).
        fps: frames sampled per second (0 = every frame).
        batch_size: frames per forward pass.
        overlap: decode in a worker thread while the model embeds (False: one plain decode-then-embed loop, the
            baseline the speed benchmark compares with).
        threads: FFmpeg decoding threads (0 = its choice).
        device: where the model runs.
        bar: a tqdm-like bar advanced by sampled frames (and its ``total`` set from the duration).
    """
    import torch  # lazy: torch is needed only once frames are embedded

    from ..evaluation.embed import embed_images  # lazy: keeps `import vislang.video` free of torch

    info = probe(path)
    v = model.cfg.vision
    frames: Iterable[Frame] = short_side_frames(path, info, v.image_size, fps, threads)
    if overlap:
        frames = threaded(frames, maxsize=4 * batch_size)
    if bar is not None and info.duration:
        bar.total = (bar.total or 0) + int(np.ceil(info.duration * (fps or info.fps) - 1e-6))
        bar.refresh()
    times, embs, grids = [], [], []
    t0 = time.perf_counter()
    embed_s = 0.0
    for batch in batches(frames, batch_size):
        x = torch.from_numpy(np.stack([tower_input(f.rgb, v.image_size, v.channels) for f in batch]))  # (B, C, S, S)
        t1 = time.perf_counter()
        embs.append(embed_images(model, x, batch_size=len(batch), device=device).numpy())
        embed_s += time.perf_counter() - t1
        grids.extend(color_grid(f.rgb) for f in batch)
        times.extend(f.t for f in batch)
        if bar is not None:
            bar.update(len(batch))
    seconds = {"total": time.perf_counter() - t0, "embed": embed_s}
    emb = np.concatenate(embs) if embs else np.zeros((0, model.cfg.embed_dim), np.float32)
    return FrameTable(info, fps or info.fps, np.asarray(times), emb, np.stack(grids), seconds)
