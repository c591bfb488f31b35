"""Evaluation of a saved model directory on a named dataset: what `vislang eval`, `demo` and `zero-shot` call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..data.config import DataConfig
from ..data.fashion_mnist import ZERO_SHOT_TEMPLATES
from ..data.loading import load_prepared
from ..factory import create_model_and_transforms, from_pretrained, get_tokenizer
from ..inference import open_image
from .report import evaluate_run
from .zero_shot import DEFAULT_TEMPLATES, zero_shot_predict


def templates_for(dataset: Any) -> tuple[str, ...]:
    """Zero-shot prompt templates for a dataset: its own if it has them (Fashion-MNIST), else generic photo prompts."""
    meta = getattr(dataset, "meta", {}) or {}
    if meta.get("zero_shot_templates"):
        return tuple(meta["zero_shot_templates"])
    if "fashion" in str(meta.get("source", "")).lower():
        return tuple(ZERO_SHOT_TEMPLATES)
    return DEFAULT_TEMPLATES


def evaluate_model_dir(
    model_dir: str | os.PathLike,
    data: str = "fashion-mnist",
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    train_split: str | None = "train",
    max_images: int | None = None,
    device: str = "cpu",
    cache_dir: str = ".cache/vislang/prepared",
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot, retrieval and linear probe for a model directory; writes results.json + PNGs to ``out_dir``."""

    model = from_pretrained(model_dir, device=device)
    tokenizer = get_tokenizer(model_dir)
    v = model.cfg.vision
    dc = DataConfig(train=data, cache_dir=cache_dir)
    test = load_prepared(data, split, v.image_size, v.channels, dc, progress)
    if max_images:
        test = test.head(max_images)
    train = None
    if train_split:
        try:
            train = load_prepared(data, train_split, v.image_size, v.channels, dc, progress)
        except (ValueError, FileNotFoundError) as e:
            print(f"[vislang] no linear probe: {e}")
    out = Path(out_dir) if out_dir else Path(model_dir).parent / "eval"
    return evaluate_run(
        model,
        tokenizer,
        test,
        out,
        templates=templates_for(test),
        train_dataset=train,
        device=device,
        progress=progress,
    )


def zero_shot_image(
    model_dir: str | os.PathLike, image: str, labels: list[str], templates: list[str] | None = None
) -> list[tuple[str, float]]:
    """Candidate labels for one image file, most probable first."""

    if len(labels) < 2:
        raise ValueError("give at least two candidate labels, e.g. --labels 'sneaker,sandal'")
    model, _, preprocess = create_model_and_transforms(model_dir)
    probs = zero_shot_predict(
        model,
        get_tokenizer(model_dir),
        preprocess(open_image(image)),
        labels,
        tuple(templates) if templates else DEFAULT_TEMPLATES,
    )[0]
    order = probs.argsort(descending=True).tolist()
    return [(labels[i], float(probs[i])) for i in order]
