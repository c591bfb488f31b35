"""A quick evaluation for use during training: zero-shot top-1 when the data has classes, else text→image R@1."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .run import templates_for


def quick_eval(model, tokenizer, dataset: Any, max_images: int, device: torch.device) -> dict[str, float]:
    from .retrieval import retrieval_eval
    from .zero_shot import zero_shot_eval

    n = min(len(dataset), max_images)
    idx = np.arange(n)
    classnames = getattr(dataset, "classnames", None)
    labels = np.asarray(getattr(dataset, "labels", []))
    if classnames and labels.size and (labels[:n] >= 0).any():
        from .embed import embed_images

        emb = embed_images(model, dataset, 512, device, indices=idx)
        zs = zero_shot_eval(
            model, tokenizer, dataset, classnames, templates_for(dataset), device, labels=labels[:n], image_emb=emb
        )
        return {"zero_shot_top1": float(zs["top1"])}
    caps = getattr(dataset, "captions", None)
    if caps:
        from .embed import embed_images

        emb = embed_images(model, dataset, 512, device, indices=idx)
        rt = retrieval_eval(model, tokenizer, dataset, device, captions=list(caps[:n]), image_emb=emb)
        return {"text_to_image_R@1": float(rt["text_to_image_R@1"])}
    return {}
