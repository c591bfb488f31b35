"""Does the model read word order? Each test image whose caption states a spatial relation is scored against that
caption and against the same caption with the relation turned round ("a red circle to the left of a blue square" vs
"... to the right of ..."): the share that prefers its own caption. Chance is 50%; a bag-of-words text tower, which
gives both captions the same embedding, sits there whatever its retrieval scores (the ARO / VL-Checklist probe)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..data.shapes import flip_relation
from .embed import embed_texts


def relation_flip_eval(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    captions: Sequence[str],
    image_emb: torch.Tensor,
    device: str | torch.device | None = None,
) -> dict[str, float] | None:
    """Share of images (normalised embeddings (N, E), one per caption) closer to their caption than to its relation
    flipped, with the mean text cosine of the two; None when no caption states a relation."""
    flips = [(i, f) for i, f in enumerate(flip_relation(c) for c in captions) if f is not None]
    if not flips:
        return None
    idx = torch.tensor([i for i, _ in flips])
    own = embed_texts(model, tokenizer, [captions[i] for i in idx.tolist()], device=device)  # (M, E)
    flipped = embed_texts(model, tokenizer, [f for _, f in flips], device=device)  # (M, E)
    img = image_emb[idx].float()
    s_own, s_flip = (img * own).sum(1), (img * flipped).sum(1)
    return {
        "accuracy": float((s_own > s_flip).float().mean()),
        "n": len(flips),
        "chance": 0.5,
        "text_cosine": float((own * flipped).sum(1).mean()),
    }
