"""Video summaries: shots, key frames chosen for coverage and diversity, captions, and the files a person looks at.

``summarize`` runs one video through ``analyze`` (decode + embed, streamed), cuts it into shots, takes each shot's
medoid frame, picks ``budget`` of them, re-decodes just those frames (by seeking, so nothing else was kept), captions
or labels them, and writes ``summary.json``, ``storyboard.png``, ``summary.html`` and ``summary.mp4``.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .analyze import FrameTable, analyze
from .reader import fit_size, frame_at, iter_frames, probe, write_video
from .shots import detect_boundaries, medoid, select_key_frames, shot_ranges

TILE = 256  # storyboard tile width in pixels


@dataclass(frozen=True)
class SummaryOptions:
    """What a summary is made of.

    Attributes:
        fps: frames sampled per second (0 = every frame).
        budget: key frames in the summary; None = one per detected shot (or from ``ratio``).
        ratio: summary length as a share of the video's duration (``budget = ratio * duration / clip_seconds``).
        clip_seconds: length of the clip around each key frame in summary.mp4.
        batch_size: frames per forward pass of the image tower.
        threads: FFmpeg decoding threads (0 = its choice).
        device: where the models run.
        write_video: also write summary.mp4.
    """

    fps: float = 2.0
    budget: int | None = None
    ratio: float | None = None
    clip_seconds: float = 2.0
    batch_size: int = 32
    threads: int = 0
    device: str = "cpu"
    write_video: bool = True

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"--budget must be at least 1 key frame, got {self.budget}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.budget is not None and self.ratio is not None:
            raise ValueError("give --budget or --ratio, not both")
        if self.clip_seconds <= 0:
            raise ValueError(f"--clip-seconds must be positive, got {self.clip_seconds}")
        if self.fps < 0:
            raise ValueError(f"--fps must be 0 (every frame) or positive, got {self.fps}")

    def key_frame_budget(self, n_shots: int, duration: float) -> int:
        """How many key frames: ``budget``, or from ``ratio``, or one per shot."""
        if self.budget is not None:
            return self.budget
        if self.ratio is not None:
            return max(1, math.ceil(self.ratio * duration / self.clip_seconds))
        return max(1, n_shots)


def shots_of(table: FrameTable) -> tuple[list[dict[str, Any]], Any]:
    """Shots (start/end seconds, frame range, medoid frame, boundary score) of an analysed video, and the detection."""
    det = detect_boundaries(table.emb, table.grid)
    n = len(table)
    last = float(table.times[-1])
    end_of_video = table.info.duration if table.info.duration > last else last + 1.0 / table.fps
    shots = []
    for k, (a, b) in enumerate(shot_ranges(n, det.index)):
        m = a + medoid(table.emb[a:b])
        shots.append({
            "shot": k, "start": round(float(table.times[a]), 3),
            "end": round(float(table.times[b]) if b < n else end_of_video, 3),
            "frames": [a, b], "medoid": int(m), "boundary_score": round(float(det.score[a]), 3) if a else None,
        })  # fmt: skip
    return shots, det


def summarize(
    path: str | os.PathLike,
    model: Any,
    out_dir: str | os.PathLike,
    opts: SummaryOptions = SummaryOptions(),
    captioner: Callable[[list[Image.Image]], list[str]] | None = None,
    labeler: Callable[[np.ndarray], list[tuple[str, float]]] | None = None,
    bar: Any = None,
) -> dict[str, Any]:
    """Summarise one video into ``out_dir`` (see the module docstring); returns what summary.json holds.

    Args:
        path: the video.
        model: the embedding model (image tower) for shots and key frames.
        out_dir: where the files go (created).
        opts: sampling, budget and output options.
        captioner: images → captions (``load_captioner_fn``), or None.
        labeler: key-frame embeddings (K, E) → (label, score) per frame (``zero_shot_labeler``), or None.
        bar: a progress bar advanced by sampled frames.
    """
    table = analyze(path, model, opts.fps, opts.batch_size, threads=opts.threads, device=opts.device, bar=bar)
    shots, det = shots_of(table)
    budget = opts.key_frame_budget(len(shots), table.info.duration)
    keys = select_key_frames(table.emb, [s["medoid"] for s in shots], budget)
    images = [Image.fromarray(frame_at(path, float(table.times[i]), max_side=2 * TILE)) for i in keys]
    captions = captioner(images) if captioner is not None else [""] * len(keys)
    labels = labeler(table.emb[keys]) if labeler is not None else [None] * len(keys)
    shot_of = {i: s["shot"] for s in shots for i in range(*s["frames"])}
    key_frames = []
    for i, cap, lab in zip(keys, captions, labels):
        kf = {"t": round(float(table.times[i]), 3), "frame": int(i), "shot": shot_of[i], "caption": cap}
        if lab is not None:
            kf["label"], kf["label_score"] = lab[0], round(float(lab[1]), 4)
        key_frames.append(kf)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "video": str(Path(path).resolve()),
        "duration": round(table.info.duration, 3),
        "size": [table.info.width, table.info.height],
        "fps_sampled": table.fps,
        "frames_sampled": len(table),
        "threshold": round(det.threshold, 3),
        "shots": shots,
        "key_frames": key_frames,
        "seconds": {k: round(v, 3) for k, v in table.seconds.items()},
    }
    write_outputs(summary, images, out, opts)
    return summary


def write_outputs(summary: dict[str, Any], images: list[Image.Image], out: Path, opts: SummaryOptions) -> None:
    """summary.json, storyboard.png, summary.html (+ frames/*.jpg) and, when asked, summary.mp4 (atomically)."""
    frames_dir = out / "frames"
    frames_dir.mkdir(exist_ok=True)
    for k, img in enumerate(images):
        atomic_save(img, frames_dir / f"key_{k:03d}.jpg")
        summary["key_frames"][k]["image"] = f"frames/key_{k:03d}.jpg"
    atomic_save(storyboard(images, summary["key_frames"]), out / "storyboard.png")
    atomic_text(out / "summary.html", summary_html(summary, out))
    if opts.write_video:
        times = [kf["t"] for kf in summary["key_frames"]]
        write_summary_video(summary["video"], times, out / "summary.mp4", opts.clip_seconds, summary["duration"])
        summary["summary_video"] = "summary.mp4"
    summary["storyboard"] = "storyboard.png"
    atomic_text(out / "summary.json", json.dumps(summary, indent=2))


def atomic_text(path: Path, text: str) -> None:
    """Write text through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_save(img: Image.Image, path: Path) -> None:
    """Save an image through a temporary file and a rename."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    img.save(tmp)
    os.replace(tmp, path)


def timestamp(t: float) -> str:
    """Seconds as m:ss.s (h:mm:ss past an hour)."""
    h, rest = divmod(t, 3600)
    m, s = divmod(rest, 60)
    return f"{int(h)}:{int(m):02d}:{s:04.1f}" if h else f"{int(m)}:{s:04.1f}"


def font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans when installed (Debian fonts-dejavu-core), else Pillow's built-in font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def wrap(draw: ImageDraw.ImageDraw, text: str, fnt: ImageFont.ImageFont, width: int, max_lines: int = 3) -> list[str]:
    """``text`` broken into at most ``max_lines`` lines of at most ``width`` pixels (the last one ellipsised)."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=fnt) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1] + " …"]
    return lines


def storyboard(images: Sequence[Image.Image], key_frames: Sequence[dict[str, Any]], columns: int = 4) -> Image.Image:
    """Key frames in time order on a grid, each with its timestamp and caption (or label) underneath."""
    fnt, small = font(15), font(13)
    tiles = [img.convert("RGB") for img in images]
    heights = [round(TILE * t.height / t.width) for t in tiles]
    th = max(heights) if heights else TILE
    text_h = 4 + 18 + 3 * 17 + 6
    cols = max(1, min(columns, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / cols))
    pad = 8
    board = Image.new("RGB", (cols * (TILE + pad) + pad, rows * (th + text_h + pad) + pad), (250, 250, 250))
    draw = ImageDraw.Draw(board)
    for k, (tile, kf) in enumerate(zip(tiles, key_frames)):
        x = pad + (k % cols) * (TILE + pad)
        y = pad + (k // cols) * (th + text_h + pad)
        board.paste(tile.resize((TILE, heights[k]), Image.BILINEAR), (x, y))
        draw.text((x, y + th + 4), f"{timestamp(kf['t'])}  ·  shot {kf['shot'] + 1}", fill=(30, 30, 30), font=fnt)
        text = kf.get("caption") or kf.get("label") or ""
        for j, line in enumerate(wrap(draw, text, small, TILE)):
            draw.text((x, y + th + 24 + 17 * j), line, fill=(70, 70, 70), font=small)
    return board


def summary_html(summary: dict[str, Any], out: Path) -> str:
    """The storyboard as a page: a player of the source video and the key frames, each a link that plays from it."""
    src = html.escape(Path(os.path.relpath(summary["video"], out)).as_posix())
    cards = []
    for kf in summary["key_frames"]:
        t = kf["t"]
        text = html.escape(kf.get("caption") or kf.get("label") or "")
        cards.append(
            f'<a class="kf" href="{src}#t={t:.2f}" data-t="{t:.3f}"><img src="{html.escape(kf["image"])}" '
            f'alt="{text}"><span class="t">{timestamp(t)} · shot {kf["shot"] + 1}</span><span>{text}</span></a>'
        )
    n_shots = len(summary["shots"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Summary of {html.escape(Path(summary["video"]).name)}</title>
<style>body{{font-family:sans-serif;margin:1em;background:#fafafa}} video{{max-width:100%;max-height:50vh}}
.grid{{display:flex;flex-wrap:wrap;gap:10px}} .kf{{width:{TILE}px;text-decoration:none;color:#333;display:flex;
flex-direction:column}} .kf img{{width:100%}} .t{{font-weight:bold}}</style></head><body>
<h1>{html.escape(Path(summary["video"]).name)}</h1>
<p>{summary["duration"]:.1f} s, {n_shots} shot(s), {len(summary["key_frames"])} key frame(s). Click a frame to play
the video from it.</p>
<video id="player" src="{src}" controls preload="metadata"></video>
<div class="grid">{"".join(cards)}</div>
<script>
const player = document.getElementById("player");
for (const a of document.querySelectorAll("a.kf")) {{
  a.addEventListener("click", (e) => {{ e.preventDefault(); player.currentTime = parseFloat(a.dataset.t);
    player.play(); player.scrollIntoView(); }});
}}
</script></body></html>
"""


def write_summary_video(video: str, times: Sequence[float], out: Path, clip_seconds: float, duration: float) -> Path:
    """summary.mp4: ``clip_seconds`` around each key frame (clips that overlap are joined), at the source frame rate."""
    info = probe(video)
    w, h = fit_size(info.width, info.height, 640)
    spans: list[list[float]] = []
    for t in sorted(times):
        a = max(0.0, min(t - clip_seconds / 2, max(duration - clip_seconds, 0.0)))
        b = a + clip_seconds
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])

    def frames():
        for a, b in spans:
            for f in iter_frames(video, fps=0, max_side=max(w, h), start=a, end=b):
                if f.t + 1e-6 >= a:
                    yield f.rgb if f.rgb.shape[:2] == (h, w) else np.asarray(Image.fromarray(f.rgb).resize((w, h)))

    return write_video(out, frames(), fps=info.fps)


def load_captioner_fn(model_dir: str | os.PathLike, device: str = "cpu") -> Callable[[list[Image.Image]], list[str]]:
    """A function images → captions from a model directory trained to caption (`vislang train --config caption`)."""
    import torch  # lazy: torch is needed only when a caption model is given

    from ..decoding import caption  # lazy: keeps `import vislang.video` free of torch
    from ..evaluation.caption import default_max_length, load_captioner  # lazy: keeps `import vislang.video` light
    from ..factory import image_transforms  # lazy: keeps `import vislang.video` free of torch

    model, tokenizer = load_captioner(model_dir, device)
    _, preprocess = image_transforms(model.cfg)

    @torch.inference_mode()
    def run(images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        x = torch.stack([preprocess(img) for img in images]).to(device)  # (K, C, H, W)
        return caption(model.eval(), tokenizer, x, max_length=default_max_length(model))

    return run


def zero_shot_labeler(model: Any, tokenizer: Any, labels: Sequence[str], device: str = "cpu"):
    """A function key-frame embeddings (K, E) → (best label, its softmax probability) per frame."""
    from ..inference import embed_texts  # lazy: keeps `import vislang.video` free of torch

    labels = [s.strip() for s in labels if s.strip()]
    if not labels:
        raise ValueError("--labels is empty; give comma-separated labels, e.g. --labels 'a dog,a bike,a street'")
    text = embed_texts(model, tokenizer, labels, device=device)  # (L, E)
    scale = float(model.get_logit_scale().detach()) if hasattr(model, "get_logit_scale") else 100.0

    def run(emb: np.ndarray) -> list[tuple[str, float]]:
        logits = scale * emb @ text.T  # (K, L)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return [(labels[int(j)], float(p[k, j])) for k, j in enumerate(p.argmax(1))]

    return run
