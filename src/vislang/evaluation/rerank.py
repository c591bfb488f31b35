"""Re-ranking retrieval with an image–text matching head: the dual encoder's top-k, re-scored pair by pair.

The dual encoder ranks every candidate with one dot product each; the ITM head (``models/itm.py``) reads image and
text together through the fusion module and so can tell "a red circle left of a blue square" from its mirror image,
but costs a fusion pass per pair. ALBEF and BLIP therefore score only each query's contrastive top-k with it. This
module measures what that buys: R@k of the contrastive ranking and of the re-ranked one, for text→image and
image→text, on a dataset's own captions (identical captions merged, as in ``retrieval.retrieval_eval``).

Re-ranking only permutes the top-k, so the cut-offs must not exceed k. Two re-ranked orders are reported: by the match
log-odds alone (``itm``, ALBEF) and by match log-odds + contrastive logit (``itm+itc``, BLIP's sum).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.config import DataConfig
from ..data.loading import load_prepared
from ..factory import from_pretrained, get_tokenizer
from .embed import ImageSource, eval_mode, map_images, resolve_device
from .retrieval import DEFAULT_KS, dedupe_captions, relevance_pairs

DEFAULT_RERANK_K = 16


def require_itm(model: nn.Module, what: str = "the model") -> None:
    """A clear error when a model has no match head to re-rank with."""
    if getattr(model, "itm_head", None) is None:
        raise ValueError(
            f"{what} has no image–text matching head (model.itm), so it cannot re-rank; train one with "
            "`vislang train --config itm`"
        )


def recall_from_ranking(
    ranked: torch.Tensor, relevant_codes: np.ndarray, n_cand: int, ks: Sequence[int]
) -> tuple[dict[int, float], int]:
    """R@k of rankings given as candidate indices.

    Args:
        ranked: (Q, K) candidate indices per query, best first.
        relevant_codes: sorted ``query * n_cand + candidate`` codes of the relevant pairs.
        n_cand: number of candidates (the code base).
        ks: cut-offs, each at most K.

    Returns:
        ``{k: R@k}`` over the queries that have a relevant candidate, and their number.
    """
    q = np.arange(ranked.shape[0], dtype=np.int64)[:, None]
    codes = q * n_cand + ranked.numpy().astype(np.int64)  # (Q, K)
    found = np.cumsum(np.isin(codes, relevant_codes), axis=1) > 0  # (Q, K): a hit within the first j+1
    has = np.isin(np.arange(ranked.shape[0]), relevant_codes // n_cand)
    return {k: float(found[has, k - 1].mean()) if has.any() else 0.0 for k in ks}, int(has.sum())


@torch.no_grad()
def pair_scores(
    model: nn.Module,
    image_tokens: torch.Tensor,
    text_ids: torch.Tensor,
    pair_text: torch.Tensor,
    pair_image: torch.Tensor,
    device: torch.device,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Match log-odds (P,) of (text, image) pairs, P at a time in chunks of ``batch_size``.

    Each chunk sends only its distinct images' tokens to the fusion (with an index per pair), so cross-attention keys
    and values are computed once per image, not once per pair.

    Args:
        model: an ``ITMModel``.
        image_tokens: (N, Ntok, Dv) image tower tokens of the gallery.
        text_ids: (U, T) token ids of the texts.
        pair_text: (P,) text index of each pair.
        pair_image: (P,) image index of each pair.
        device: where the fusion runs.
        batch_size: pairs per fusion pass.
    """
    scores = []
    for s in range(0, pair_text.shape[0], batch_size):
        pt, pi = pair_text[s : s + batch_size], pair_image[s : s + batch_size]
        imgs, img_index = torch.unique(pi, return_inverse=True)
        txts, txt_index = torch.unique(pt, return_inverse=True)
        tokens, valid = model.text.forward_tokens(text_ids[txts].to(device))  # (u, T, Dt), (u, T)
        logits = model.itm_logits(
            image_tokens[imgs].to(device),
            tokens[txt_index.to(device)],
            valid[txt_index.to(device)],
            img_index.to(device),
        )  # (p, 2)
        scores.append((logits[:, 1] - logits[:, 0]).float().cpu())
    return torch.cat(scores)


def rerank(
    sim: torch.Tensor,
    k: int,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    logit_scale: float,
) -> dict[str, torch.Tensor]:
    """The contrastive top-k of each query and its two re-ranked orders.

    Args:
        sim: (Q, C) contrastive cosine similarities.
        k: candidates kept per query (clipped to C).
        score: ``score(query_index (P,), candidate_index (P,)) -> (P,)`` match log-odds.
        logit_scale: the model's temperature, putting the cosine on the contrastive logit scale for ``itm+itc``.

    Returns:
        (Q, k) candidate indices, best first, under "contrastive", "itm" and "itm+itc".
    """
    kk = min(k, sim.shape[1])
    top_sim, top = sim.topk(kk, dim=1)  # (Q, kk)
    q = torch.arange(sim.shape[0])[:, None].expand_as(top)
    itm = score(q.reshape(-1), top.reshape(-1)).view_as(top)  # (Q, kk)
    out = {"contrastive": top}
    for name, s in (("itm", itm), ("itm+itc", itm + logit_scale * top_sim)):
        order = s.argsort(dim=1, descending=True, stable=True)  # ties keep the contrastive order
        out[name] = top.gather(1, order)
    return out


def rerank_eval(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    dataset: ImageSource,
    k: int = DEFAULT_RERANK_K,
    ks: Sequence[int] = DEFAULT_KS,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    captions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """R@k with and without re-ranking the contrastive top-``k`` by the ITM head, both directions.

    The gallery's image tokens are kept in memory for the re-scoring (N × tokens × width floats: 16 MB for 1,000
    shapes scenes); pass a subset (``dataset.head(n)``) for large galleries.

    Args:
        model: an ``ITMModel``.
        tokenizer: its tokenizer.
        dataset: a prepared dataset with captions (or a uint8 image tensor, then pass ``captions``).
        k: candidates re-scored per query.
        ks: R@k cut-offs, each at most ``k``.
        device: where to run; None = the model's device.
        batch_size: images per tower pass and pairs per fusion pass (× 4).
        captions: one caption per image; default ``dataset.captions``.

    Returns:
        ``{"text_to_image": {order: {R@k}}, "image_to_text": {...}, "gain_R@1": {...}, "k", "n_queries", ...}`` with
        orders "contrastive", "itm" and "itm+itc".
    """
    require_itm(model)
    ks = sorted(set(int(x) for x in ks))
    if k < 1 or max(ks) > k:
        raise ValueError(f"re-ranking k={k} must be at least the largest R@k cut-off {max(ks)}: pass k >= {max(ks)}")
    captions = list(captions if captions is not None else (getattr(dataset, "captions", None) or []))
    if not captions:
        raise ValueError("re-ranking evaluation needs captions: this dataset has none")
    dev = resolve_device(model, device)
    with eval_mode(model):
        image_emb, image_tokens = map_images(model.encode_image_and_tokens, model, dataset, batch_size, dev)
        if len(captions) != image_emb.shape[0]:
            raise ValueError(f"{len(captions)} captions for {image_emb.shape[0]} images; expected one per image")
        texts, text_to_images = dedupe_captions(captions)
        ids = tokenizer(texts)  # (U, T)
        text_emb = torch.cat(
            [model.encode_text(ids[s : s + batch_size].to(dev)).float().cpu() for s in range(0, len(texts), batch_size)]
        )  # (U, E)
        scale = float(model.get_logit_scale())
        t_idx, i_idx = relevance_pairs(text_to_images)
        n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
        sim = text_emb @ image_emb.T  # (U, N)
        pairs = 4 * batch_size

        def t2i_score(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return pair_scores(model, image_tokens, ids, q, c, dev, pairs)

        def i2t_score(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return pair_scores(model, image_tokens, ids, c, q, dev, pairs)

        t2i = rerank(sim, k, t2i_score, scale)
        i2t = rerank(sim.T.contiguous(), k, i2t_score, scale)
    ks_t2i = [min(x, n_img) for x in ks]
    ks_i2t = [min(x, n_txt) for x in ks]
    out: dict[str, Any] = {"k": k, "n_images": n_img, "n_texts": n_txt}
    for name, ranked, codes, n_cand, kk in (
        ("text_to_image", t2i, np.sort(t_idx * n_img + i_idx), n_img, ks_t2i),
        ("image_to_text", i2t, np.sort(i_idx * n_txt + t_idx), n_txt, ks_i2t),
    ):
        out[name] = {}
        for order, r in ranked.items():
            recall, n_q = recall_from_ranking(r, codes, n_cand, kk)
            out[name][order] = {f"R@{x}": recall[c] for x, c in zip(ks, kk)}
        out[name]["n_queries"] = n_q
    out["gain_R@1"] = {
        f"{d}/{order}": out[d][order]["R@1"] - out[d]["contrastive"]["R@1"]
        for d in ("text_to_image", "image_to_text")
        for order in ("itm", "itm+itc")
        if 1 in ks
    }
    return out


def rerank_model_dir(
    model_dir: str | os.PathLike,
    data: str = "shapes",
    splits: Sequence[str] = ("test",),
    k: int = DEFAULT_RERANK_K,
    max_images: int | None = None,
    device: str = "cpu",
    cache_dir: str = ".cache/vislang/prepared",
    progress: bool = False,
) -> dict[str, Any]:
    """``rerank_eval`` of a saved ITM model directory on each split of a named dataset (what `vislang rerank-eval`
    runs); shapes has "test" and "holdout" (scenes with colour–shape pairs never seen in training)."""

    model = from_pretrained(model_dir, device=device)
    require_itm(model, str(Path(model_dir)))
    tokenizer = get_tokenizer(model_dir)
    v = model.cfg.vision
    dc = DataConfig(train=data, cache_dir=cache_dir)
    results: dict[str, Any] = {"model": str(model_dir), "data": data}
    for split in splits:
        ds = load_prepared(data, split, v.image_size, v.channels, dc, progress)
        if max_images:
            ds = ds.head(max_images)
        results[split] = rerank_eval(model, tokenizer, ds, k=k, device=device)
    return results
