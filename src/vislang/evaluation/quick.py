"""A quick evaluation for use during training: zero-shot top-1 when the data has classes, else text→image R@1;
for captioning models also greedy BLEU-4 and CIDEr on a few hundred validation images."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .caption_metrics import caption_scores, generate_captions
from .embed import embed_images, image_batch
from .retrieval import retrieval_eval
from .run import templates_for
from .zero_shot import zero_shot_eval

CAPTION_EVAL_MAX = 256  # images captioned at each periodic evaluation: about a second for the small configs


def caption_quick_eval(model, tokenizer, dataset: Any, max_images: int, device: torch.device) -> dict[str, float]:
    """Greedy BLEU-4 and CIDEr on the first validation images, each against its own (single) caption.

    One reference per image makes these lower than ``vislang caption-eval``'s numbers on shapes (which count every
    phrasing of a scene as a reference): they are for watching a run improve, not for reporting.
    """

    captions = list(getattr(dataset, "captions", None) or [])
    n = min(len(captions), max_images, CAPTION_EVAL_MAX)
    if n == 0:
        return {}
    images = image_batch(dataset, np.arange(n))  # (n, C, H, W) uint8
    max_length = min(30, model.cfg.text.context_length - 1)
    preds = generate_captions(model, tokenizer, images, device=device, max_length=max_length)
    scores = caption_scores(preds, [[c] for c in captions[:n]], with_meteor=False)  # METEOR: ~10 s of Java start
    return {"BLEU-4": scores["BLEU-4"], "CIDEr": scores["CIDEr"]}


def quick_eval(model, tokenizer, dataset: Any, max_images: int, device: torch.device) -> dict[str, float]:
    """What the training loop logs at each periodic evaluation (as ``eval/<name>`` lines of metrics.jsonl)."""
    metrics = _contrastive_quick_eval(model, tokenizer, dataset, max_images, device)
    if getattr(model.cfg, "decoder", None) is not None:
        metrics.update(caption_quick_eval(model, tokenizer, dataset, max_images, device))
    return metrics


def _contrastive_quick_eval(model, tokenizer, dataset: Any, max_images: int, device: torch.device) -> dict[str, float]:

    n = min(len(dataset), max_images)
    idx = np.arange(n)
    classnames = getattr(dataset, "classnames", None)
    labels = np.asarray(getattr(dataset, "labels", []))
    if classnames and labels.size and (labels[:n] >= 0).any():
        emb = embed_images(model, dataset, 512, device, indices=idx)
        zs = zero_shot_eval(
            model, tokenizer, dataset, classnames, templates_for(dataset), device, labels=labels[:n], image_emb=emb
        )
        return {"zero_shot_top1": float(zs["top1"])}
    caps = getattr(dataset, "captions", None)
    if caps:
        emb = embed_images(model, dataset, 512, device, indices=idx)
        rt = retrieval_eval(model, tokenizer, dataset, device, captions=list(caps[:n]), image_emb=emb)
        return {"text_to_image_R@1": float(rt["text_to_image_R@1"])}
    return {}
