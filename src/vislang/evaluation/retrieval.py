"""Image↔text retrieval recall (R@k), the standard dual-encoder benchmark (Flickr30k/COCO style).

A query is a hit at k when at least one relevant item is among its k most similar candidates; R@k is the fraction of
queries that hit (torchmetrics calls this the hit rate). Relevance is a set of (text, image) pairs, so one image may
have several captions (COCO: five) and, after identical captions are merged, one text may belong to several images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .embed import ImageSource, embed_images, embed_texts

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def relevance_pairs(text_to_image: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> tuple[np.ndarray, ...]:
    """(text index, image index) arrays of relevant pairs.

    Args:
        text_to_image: per text, its image index, or a sequence of image indices when a text describes several.
    """
    if isinstance(text_to_image, np.ndarray) and text_to_image.ndim == 1 and text_to_image.dtype != object:
        return np.arange(len(text_to_image)), text_to_image.astype(np.int64)
    texts, images = [], []
    for t, rel in enumerate(text_to_image):
        rel = np.atleast_1d(np.asarray(rel, dtype=np.int64))
        texts.append(np.full(len(rel), t, dtype=np.int64))
        images.append(rel)
    if not texts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(texts), np.concatenate(images)


def hits_at_k(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_idx: np.ndarray,
    cand_idx: np.ndarray,
    ks: Sequence[int],
    chunk: int = 1024,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per-query hit flags for each k, from similarity top-k over chunks of queries.

    Args:
        queries: (Q, E) normalised embeddings.
        candidates: (C, E) normalised embeddings.
        query_idx: query side of the relevant pairs.
        cand_idx: candidate side of the relevant pairs.
        ks: cut-offs; each is clipped to C.
        chunk: queries per similarity block, bounding memory at chunk × C floats.

    Returns:
        ``{k: bool (Q,)}`` and a bool (Q,) mask of queries that have at least one relevant candidate.
    """
    n_q, n_c = queries.shape[0], candidates.shape[0]
    k_max = min(max(ks), n_c)
    q_pairs, c_pairs = torch.as_tensor(query_idx), torch.as_tensor(cand_idx)
    hits = {k: torch.zeros(n_q, dtype=torch.bool) for k in ks}
    for s in range(0, n_q, chunk):
        e = min(s + chunk, n_q)
        in_chunk = (q_pairs >= s) & (q_pairs < e)
        relevant = torch.zeros(e - s, n_c, dtype=torch.bool)  # (q, C)
        relevant[q_pairs[in_chunk] - s, c_pairs[in_chunk]] = True
        top = (queries[s:e] @ candidates.T).topk(k_max, dim=1).indices  # (q, k_max)
        found = relevant.gather(1, top).cumsum(dim=1) > 0  # (q, k_max): a hit within the first j+1
        for k in ks:
            hits[k][s:e] = found[:, min(k, n_c) - 1]
    has_relevant = torch.zeros(n_q, dtype=torch.bool)
    has_relevant[q_pairs] = True
    return hits, has_relevant


def chance_recall(n_images: int, k: int) -> float:
    """R@k of a random ranking when each query has one relevant item among ``n_images``: k / n."""
    return min(k, n_images) / n_images


def chance_hit_rate(n_candidates: int, n_relevant: np.ndarray | int, k: int) -> float:
    """Mean R@k of a random ranking for queries with ``n_relevant`` relevant items each among ``n_candidates``.

    P(hit) = 1 − C(n − r, k) / C(n, k): reduces to :func:`chance_recall` for r = 1 and is what the score of a query
    with several relevant items should be read against.
    """
    r = np.atleast_1d(np.asarray(n_relevant, dtype=np.float64))
    j = np.arange(min(k, n_candidates), dtype=np.float64)[:, None]  # (k, 1)
    miss = np.clip((n_candidates - r[None, :] - j) / (n_candidates - j), 0.0, 1.0).prod(axis=0)  # (R,)
    return float((1.0 - miss).mean())


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Image→text and text→image R@k, with the chance level of each.

    An image→text query hits when any of the image's texts is in its top k; a text→image query when any of the
    text's images is. Queries without a relevant item (images no text describes) are left out of the mean.

    Args:
        image_emb: (N_i, E) normalised image embeddings.
        text_emb: (N_t, E) normalised text embeddings.
        text_to_image: per text, its image index (or several indices).
        ks: cut-offs.

    Returns:
        ``image_to_text_R@k``, ``text_to_image_R@k``, their ``..._chance_R@k`` and ``n_images``/``n_texts``.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    t_idx, i_idx = relevance_pairs(text_to_image)
    if len(text_to_image) != text_emb.shape[0]:
        raise ValueError(f"text_to_image has {len(text_to_image)} entries for {text_emb.shape[0]} text embeddings")
    if i_idx.size and (i_idx.min() < 0 or i_idx.max() >= image_emb.shape[0]):
        raise ValueError(f"text_to_image refers to images outside [0, {image_emb.shape[0]})")
    ks = sorted(set(int(k) for k in ks))
    i2t, img_has = hits_at_k(image_emb, text_emb, i_idx, t_idx, ks)
    t2i, txt_has = hits_at_k(text_emb, image_emb, t_idx, i_idx, ks)
    texts_per_image = np.bincount(i_idx, minlength=image_emb.shape[0])[img_has.numpy()]
    images_per_text = np.bincount(t_idx, minlength=text_emb.shape[0])[txt_has.numpy()]
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float(i2t[k][img_has].float().mean())
        out[f"text_to_image_R@{k}"] = float(t2i[k][txt_has].float().mean())
    for k in ks:
        out[f"image_to_text_chance_R@{k}"] = chance_hit_rate(text_emb.shape[0], texts_per_image, k)
        out[f"text_to_image_chance_R@{k}"] = chance_hit_rate(image_emb.shape[0], images_per_text, k)
    out["n_images"] = int(img_has.sum())
    out["n_texts"] = int(txt_has.sum())
    return out


def dedupe_captions(captions: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
    """Merge identical captions: (unique captions in first-seen order, per unique caption the images it belongs to)."""
    uniq, first, inverse = np.unique(np.asarray(captions, dtype=object), return_index=True, return_inverse=True)
    order = np.argsort(first)  # unique id (sorted) → position in first-seen order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    text_of_image = rank[inverse.reshape(-1)]  # (N,) unique-caption position per image
    by_text = np.argsort(text_of_image, kind="stable")
    bounds = np.cumsum(np.bincount(text_of_image, minlength=len(order)))[:-1]
    return [str(uniq[i]) for i in order], np.split(by_text, bounds)


def retrieval_eval(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    dataset: ImageSource,
    device: str | torch.device | None = None,
    batch_size: int = 512,
    ks: Sequence[int] = DEFAULT_KS,
    captions: Sequence[str] | None = None,
    image_emb: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Retrieval R@k on a dataset's own captions, identical captions merged.

    When every item has its own caption (COCO-like data), text i is relevant to image i only: the usual benchmark.
    When captions repeat (Fashion-MNIST's templated captions: about 100 distinct texts for 10,000 images), each
    distinct caption is one text query whose relevant images are all images carrying exactly that caption, and an
    image→text query ranks the distinct captions. Read the numbers then as "finds an image with this exact caption"
    and against the chance levels returned alongside — and prefer zero-shot accuracy for class-level quality,
    because images of the same class but another template count as misses.

    Args:
        model: a dual encoder.
        tokenizer: the model's tokenizer.
        dataset: a prepared dataset with ``captions`` (or an image tensor, then pass ``captions``).
        device: where to run; None = the model's device.
        batch_size: images per forward pass.
        ks: cut-offs.
        captions: one caption per image; default ``dataset.captions``.
        image_emb: precomputed normalised image embeddings (N, E).

    Returns:
        :func:`retrieval_metrics` plus ``unique_captions`` and ``images_per_caption`` (1 = no merging happened).
    """
    captions = list(captions if captions is not None else (getattr(dataset, "captions", None) or []))
    if not captions:
        raise ValueError("retrieval evaluation needs captions: this dataset has none (use zero-shot evaluation)")
    if image_emb is None:
        image_emb = embed_images(model, dataset, batch_size, device)
    if len(captions) != image_emb.shape[0]:
        raise ValueError(f"{len(captions)} captions for {image_emb.shape[0]} images; expected one caption per image")
    texts, text_to_images = dedupe_captions(captions)
    text_emb = embed_texts(model, tokenizer, texts, device=device)
    out: dict[str, Any] = retrieval_metrics(image_emb, text_emb, text_to_images, ks)
    out["unique_captions"] = len(texts)
    out["images_per_caption"] = len(captions) / len(texts)
    return out
