"""Evaluation figures as PNG files: training curves, confusion matrix, per-class scores, a retrieval gallery.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas directly, never through pyplot: no
display is needed, no global figure state leaks between calls (or into a notebook's backend), and nothing has to be
closed. Every function returns the path it wrote.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

CORRECT, WRONG = "#2ca02c", "#d62728"


def _figure(figsize: tuple[float, float]):
    """A pyplot-free figure on the Agg canvas (matplotlib is imported lazily: it is slow to import)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file, skipping blank or malformed lines (a run killed mid-write leaves half a line)."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry a numeric ``key`` and a ``step``."""
    pts = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and "step" in r
    ]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def eval_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Names of the logged evaluation metrics (``eval/...``), in first-seen order."""
    keys: dict[str, None] = {}
    for r in records:
        for k in r:
            if k.startswith("eval/"):
                keys[k] = None
    return list(keys)


# Panels of the training curves: a title and the logged keys drawn in it. A GAN run logs its two losses and the
# discriminator's mean scores of real, generated and wrong-text pairs instead of one loss and a learning rate.
CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("lr", ("lr",)),
    ("GAN losses", ("loss_d", "loss_g")),
    ("discriminator scores", ("d_real", "d_fake", "d_mismatch")),
)


def plot_curves(metrics_jsonl_path: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Loss and learning rate against step (a GAN run: its losses and D's scores), and the logged eval metrics, if
    any, one panel each.

    Returns:
        The PNG path, or None when the log holds nothing to plot.
    """
    records = read_jsonl(metrics_jsonl_path)
    panels = [(title, [(k, *series(records, k)) for k in keys]) for title, keys in CURVE_PANELS]
    panels = [(title, [c for c in curves if len(c[1])]) for title, curves in panels]
    panels = [p for p in panels if p[1]]
    evals = [(k, *series(records, k)) for k in eval_keys(records)]
    evals = [e for e in evals if len(e[1])]
    n = len(panels) + (1 if evals else 0)
    if n == 0:
        return None
    fig = _figure((4.5 * n, 3.3))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels):
        for key, steps, values in curves:
            ax.plot(steps, values, lw=1.2, label=key)
        ax.set(title=title, xlabel="step")
        values = curves[0][2]
        if title == "loss" and values.min() > 0 and values.max() / values.min() > 20:
            ax.set_yscale("log")
        if len(curves) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][-1]
        for key, steps, values in evals:
            ax.plot(steps, values, marker="o", ms=3, lw=1.2, label=key.removeprefix("eval/"))
        ax.set(title="evaluation", xlabel="step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_tracked_fid(metrics_jsonl_path: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """A GAN run's tracked FID-FM (log scale) and class consistency against step, with the best step marked.

    Returns:
        The PNG path, or None when the log holds no tracked FID-FM.
    """
    records = read_jsonl(metrics_jsonl_path)
    steps, fid = series(records, "tracked_fid_fm")
    if not len(steps):
        return None
    cc_steps, cc = series(records, "tracked_class_consistency")
    fig = _figure((9.0, 3.3))
    ax_fid, ax_cc = fig.subplots(1, 2)
    ax_fid.plot(steps, fid, marker="o", ms=3, lw=1.2)
    best = int(np.argmin(fid))
    ax_fid.plot([steps[best]], [fid[best]], marker="*", ms=12, color=CORRECT, label=f"best {fid[best]:.3f}")
    _, floor = series(records, "tracked_fid_fm_floor")
    if len(floor):
        ax_fid.axhline(floor[-1], ls="--", color="grey", lw=1, label=f"real vs real {floor[-1]:.3f}")
    ax_fid.set(title="tracked FID-FM (train split)", xlabel="step", yscale="log")
    ax_fid.legend(fontsize=7)
    ax_cc.plot(cc_steps, 100 * cc, marker="o", ms=3, lw=1.2)
    ax_cc.set(title="class consistency (%)", xlabel="step")
    for ax in (ax_fid, ax_cc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, classnames: Sequence[str], path: str | os.PathLike, normalize: bool = True) -> Path:
    """Confusion matrix heat map (rows = true class); cells show row-normalised rates, or counts.

    Row normalisation makes classes of different sizes comparable: the diagonal is each class's recall.
    """
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    k = len(classnames)
    side = max(4.0, 0.5 * k + 2)
    fig = _figure((side + 1, side))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(classnames), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=list(classnames), fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="zero-shot confusion" + (" (row-normalised)" if normalize else ""))
    if k <= 20:
        threshold = shown.max() / 2 if shown.size else 0
        for i in range(k):
            for j in range(k):
                text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                color = "white" if shown[i, j] > threshold else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_class(
    values: Sequence[float] | np.ndarray | dict[str, Sequence[float]],
    path: str | os.PathLike,
    classnames: Sequence[str] | None = None,
    title: str = "per-class F1",
) -> Path:
    """Horizontal bars of one score per class, or grouped bars for several (``{"precision": [...], ...}``)."""
    groups = values if isinstance(values, dict) else {"score": values}
    groups = {name: np.asarray(v, dtype=float) for name, v in groups.items()}
    k = len(next(iter(groups.values())))
    names = list(classnames) if classnames is not None else [str(i) for i in range(k)]
    fig = _figure((6, max(2.5, 0.35 * k * max(1, len(groups) / 2) + 1)))
    ax = fig.subplots()
    height = 0.8 / len(groups)
    y = np.arange(k)
    for g, (name, v) in enumerate(groups.items()):
        ax.barh(y + (g - (len(groups) - 1) / 2) * height, v, height=height, label=name)
    ax.set_yticks(y, labels=names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), title=title)
    ax.grid(axis="x", alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _as_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) → (H, W) for grayscale or (H, W, 3) for RGB, as imshow wants."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = np.moveaxis(arr, 0, -1)  # (H, W, C)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def retrieval_gallery(
    query_texts: Sequence[str],
    top_images: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    match_flags: torch.Tensor | np.ndarray | None = None,
) -> Path:
    """One row per text query with its top-k images and their similarity; a green/red frame marks right/wrong.

    Args:
        query_texts: Q queries.
        top_images: uint8 (Q, K, C, H, W) retrieved images, best first.
        scores: (Q, K) similarities shown under each image.
        path: output PNG.
        match_flags: optional bool (Q, K): whether each retrieved image is a correct match.
    """
    q, k = top_images.shape[:2]
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=float)
    flags = None if match_flags is None else np.asarray(match_flags, dtype=bool)
    fig = _figure((1.3 * (k + 1) + 1.2, 1.45 * q))
    axes = fig.subplots(q, k + 1, squeeze=False)
    for r in range(q):
        text_ax = axes[r][0]
        text_ax.axis("off")
        text_ax.text(1.0, 0.5, textwrap.fill(str(query_texts[r]), 22), ha="right", va="center", fontsize=8)
        for c in range(k):
            ax = axes[r][c + 1]
            img = _as_hwc(top_images[r, c])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{scores[r, c]:.2f}", fontsize=7, labelpad=1)
            for spine in ax.spines.values():
                if flags is None:
                    spine.set_visible(False)
                else:
                    spine.set_edgecolor(CORRECT if flags[r, c] else WRONG)
                    spine.set_linewidth(3)
    fig.suptitle("text → image retrieval (top matches)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
