"""Decoding captions: greedy, beam search and top-k / top-p sampling, batched, with or without a key/value cache.

The search code knows nothing of the model beyond three calls: ``model.start_decoding(images, use_cache)`` → state,
``model.next_logits(state, prefix)`` → (B, V) logits of the next token, and ``state.select(index)`` to repeat or
reorder batch rows. ``generate`` returns token ids (B, L) without the begin token: the end token, then ``pad_id``.

A ``prefix`` (B, P) of given tokens (a question, for generative VQA) is placed after the begin token and read in one
prefill pass, as Hugging Face ``generate`` reads ``input_ids``; only the continuation after it is searched and
returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data.transforms import normalize


def check_images(images: torch.Tensor, channels: int, image_size: int) -> None:
    """Clear errors for what a caller can get wrong before any compute runs."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor (B, C, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (B, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] != channels or images.shape[2:] != (image_size, image_size):
        raise ValueError(
            f"images of shape {tuple(images.shape[1:])} do not fit the model's ({channels}, {image_size}, "
            f"{image_size}); preprocess them with vislang.image_transforms(model.cfg)"
        )


def check_prefix(prefix: torch.Tensor, batch: int, vocab: int, pad_id: int) -> None:
    """A prefix is (B, P) integer ids, one row per image, with no padding: rows of one batch share a length."""
    if not isinstance(prefix, torch.Tensor) or prefix.ndim != 2 or prefix.dtype.is_floating_point:
        raise ValueError(f"prefix must be integer token ids (B, P), got {getattr(prefix, 'shape', type(prefix))}")
    if prefix.shape[0] != batch:
        raise ValueError(f"prefix has {prefix.shape[0]} rows for {batch} images; give one row per image")
    if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= vocab):
        raise ValueError(f"prefix ids must lie in [0, {vocab}) (the model's vocabulary)")
    if (prefix == pad_id).any():
        raise ValueError(
            "prefix holds padding tokens; rows of one call must have the same length (batch prompts by length)"
        )


def check_options(max_length: int, beam: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 token, got {max_length}")
    if beam < 1:
        raise ValueError(f"beam width must be at least 1 (1 = greedy), got {beam}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}; use sample=False for greedy decoding")
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (off) or positive, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest nucleus of mass ``top_p`` to -inf (B, V)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    images: torch.Tensor,
    max_length: int = 20,
    beam: int = 1,
    length_penalty: float = 1.0,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    seed: int | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Caption token ids (B, L <= max_length) for a batch of images; with ``prefix``, its continuation.

    Args:
        model: a captioning model (``CoCa``).
        images: uint8 pixels (normalised here with the model's mean/std) or already normalised floats (B, C, H, W).
        max_length: most tokens generated after the begin token, the end token included.
        beam: beam width; 1 decodes greedily (or samples, with ``sample``).
        length_penalty: beam hypotheses are ranked by sum log p / length ** length_penalty.
        sample: draw tokens from the (temperature, top-k, top-p filtered) distribution instead of the argmax.
        use_cache: reuse keys/values of earlier positions; the tokens are the same, it is only faster.
        seed: makes sampling repeatable.
        bos_id, eos_id, pad_id: default to the model config's (the vislang tokenizer's specials).
        prefix: token ids (B, P) given after the begin token (no begin token, no padding: one length per call); the
            returned ids are what follows them.
    """
    cfg = model.cfg
    check_images(images, cfg.vision.channels, cfg.vision.image_size)
    check_options(max_length, beam, temperature, top_k, top_p)
    if sample and beam > 1:
        raise ValueError("choose beam search (beam > 1) or sampling (sample=True), not both")
    bos = cfg.decoder.bos_id if bos_id is None else bos_id
    eos = cfg.decoder.eos_id if eos_id is None else eos_id
    pad = cfg.text.pad_id if pad_id is None else pad_id
    if prefix is not None:
        check_prefix(prefix, images.shape[0], cfg.text.vocab_size, pad)
    P = 0 if prefix is None else prefix.shape[1]
    if 1 + P + max_length > cfg.text.context_length:
        given = f" plus the prefix of {P} tokens" if P else ""
        raise ValueError(
            f"max_length {max_length}{given} plus the begin token exceeds the text context of "
            f"{cfg.text.context_length} tokens; lower max_length"
            + (f" to at most {cfg.text.context_length - 1 - P} or shorten the prefix" if P else "")
        )
    device = next(model.parameters()).device
    images = images.to(device)
    start = torch.full((images.shape[0], 1), bos, dtype=torch.long, device=device)  # (B, 1)
    if prefix is not None:
        start = torch.cat([start, prefix.to(device=device, dtype=torch.long)], dim=1)  # (B, 1 + P)
    if images.dtype == torch.uint8:
        images = normalize(images, cfg.vision.mean, cfg.vision.std)
    was_training = model.training
    model.eval()
    try:
        state = model.start_decoding(images, use_cache=use_cache)
        if beam > 1:
            return _beam_search(model, state, images.shape[0], max_length, beam, length_penalty, bos, eos, pad, start)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        sampler = (lambda lg: _sample(lg, temperature, top_k, top_p, gen)) if sample else None
        return _greedy(model, state, images.shape[0], max_length, bos, eos, pad, sampler, start)
    finally:
        model.train(was_training)


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen) -> torch.Tensor:
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (B,)


@torch.no_grad()
def _greedy(
    model, state, B: int, max_length: int, bos: int, eos: int, pad: int, sampler=None, start: torch.Tensor | None = None
) -> torch.Tensor:
    """``start`` (B, S): the given tokens (begin token, then any prefix); default the begin token alone."""
    device = state.context.device
    seq = torch.full((B, 1), bos, dtype=torch.long, device=device) if start is None else start  # (B, S + t)
    S = seq.shape[1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_length):
        logits = model.next_logits(state, seq)  # (B, V)
        nxt = sampler(logits) if sampler else logits.argmax(-1)  # (B,)
        nxt = nxt.masked_fill(done, pad)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done |= nxt == eos
        if done.all():
            break
    return seq[:, S:]


@torch.no_grad()
def _beam_search(
    model,
    state,
    B: int,
    max_length: int,
    W: int,
    alpha: float,
    bos: int,
    eos: int,
    pad: int,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard beam search: keep the W best unfinished prefixes; a beam that emits EOS among the top W becomes a
    finished hypothesis; an image is done once it has W of them (or at max_length), and returns its best by
    sum log p / length ** alpha (length and scores count generated tokens only, never the given ``start`` (B, S)).
    With W = 1 this is exactly greedy decoding."""
    device = state.context.device
    rows0 = torch.arange(B, device=device).repeat_interleave(W)  # (B*W,)
    state = state.select(rows0)
    seq = torch.full((B * W, 1), bos, dtype=torch.long, device=device) if start is None else start[rows0]
    S = seq.shape[1]
    scores = torch.full((B, W), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start equal: let only the first one expand at step one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(1, max_length + 1):
        logp = F.log_softmax(model.next_logits(state, seq).float(), dim=-1)  # (B*W, V)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(B, W, V)).view(B, W * V)  # (B, W*V)
        top_scores, top_idx = cand.topk(2 * W, dim=-1)  # (B, 2W): enough to find W non-EOS continuations
        rows, new_scores, new_tokens = [], torch.full((B, W), float("-inf"), device=device), []
        for b in range(B):
            kept = 0
            for rank in range(2 * W):
                s, idx = float(top_scores[b, rank]), int(top_idx[b, rank])
                w, tok = divmod(idx, V)
                if done[b] or s == float("-inf"):
                    break
                if tok == eos:
                    if rank < W:  # an end is a hypothesis only if it ranks among the beam's width
                        hyp = seq[b * W + w, S:].tolist() + [eos]
                        finished[b].append((s / step**alpha, hyp))
                    continue
                rows.append(b * W + w)
                new_tokens.append(tok)
                new_scores[b, kept] = s
                kept += 1
                if kept == W:
                    break
            if not done[b] and len(finished[b]) >= W:
                done[b] = True
            if done[b] or kept < W:  # pad the beam with copies of row 0 (scores -inf keep them out)
                rows.extend([b * W] * (W - kept))
                new_tokens.extend([pad] * (W - kept))
                if done[b]:
                    new_scores[b] = float("-inf")
        if all(done):
            break
        index = torch.tensor(rows, device=device)
        seq = torch.cat([seq[index], torch.tensor(new_tokens, device=device)[:, None]], dim=1)
        state = state.select(index)
        scores = new_scores
    out = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:  # max_length reached: unfinished beams compete too
            for w in range(W):
                if scores[b, w] > float("-inf"):
                    hyps.append((float(scores[b, w]) / max_length**alpha, seq[b * W + w, S:].tolist()))
        out.append(max(hyps, key=lambda h: h[0])[1] if hyps else [])
    L = max(1, max(len(h) for h in out))
    ids = torch.full((B, L), pad, dtype=torch.long)
    for b, h in enumerate(out):
        ids[b, : len(h)] = torch.tensor(h, dtype=torch.long)
    return ids.to(device)


def decode(tokenizer, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
    """Token ids (B, L) → texts (the tokenizer drops begin/pad tokens and cuts at the end token)."""
    return [tokenizer.decode(row) for row in ids]


def caption(model, tokenizer, images: torch.Tensor, **kw) -> list[str]:
    """Captions for a batch of images: ``generate`` then ``decode``."""
    ids = generate(model, images, eos_id=getattr(tokenizer, "eos_id", None), bos_id=getattr(tokenizer, "bos_id", None),
                   pad_id=tokenizer.pad_id, **kw)  # fmt: skip
    return decode(tokenizer, ids)
