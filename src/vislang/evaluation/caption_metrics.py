"""Caption metrics the COCO way (BLEU-1..4, ROUGE-L, CIDEr-D, METEOR when available) and text-reading metrics.

BLEU, ROUGE-L and CIDEr-D follow ``pycocoevalcap`` line by line (corpus BLEU with the closest reference length,
ROUGE-L F with beta 1.2 over the best precision and recall, CIDEr-D with sigma 6, clipping and the x10 scale, document
frequencies from the evaluated references), so numbers compare with published ones up to tokenisation: COCO runs the
Stanford PTB tokenizer (Java); here text is lower-cased and split on non-alphanumerics, the same thing for plain
captions. METEOR needs ``pycocoevalcap`` and Java; without them it is reported as None, never guessed.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased words without punctuation (what COCO's PTB tokenisation yields for plain captions)."""
    return _WORD.findall(text.lower())


def ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists; give one list per image")
    if not candidates:
        raise ValueError("no captions to score; evaluate at least one image")
    if any(isinstance(r, str) or not r for r in references):
        raise ValueError("each image needs a non-empty list of reference captions (a list of strings, not a string)")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n (pycocoevalcap's ``Bleu``: clipped counts summed over the corpus, closest ref length)."""
    _check(candidates, references)
    correct, guess = np.zeros(max_n), np.zeros(max_n)
    testlen = reflen = 0
    for cand, refs in zip(candidates, references):
        c = tokenize(cand)
        rs = [tokenize(r) for r in refs]
        testlen += len(c)
        reflen += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            max_ref: Counter = Counter()
            for r in rs:
                max_ref |= ngrams(r, n)  # element-wise max over references
            counts = ngrams(c, n)
            correct[n - 1] += sum(min(k, max_ref[g]) for g, k in counts.items())
            guess[n - 1] += max(len(c) - n + 1, 0)
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's guards against log(0) and division by zero
    ratio = (testlen + tiny) / (reflen + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    out, logsum = [], 0.0
    for n in range(max_n):
        logsum += math.log((correct[n] + tiny) / (guess[n] + small))
        out.append(math.exp(logsum / (n + 1)) * brevity)
    return out


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F-score (pycocoevalcap's ``Rouge``: best precision and best recall over the references)."""
    _check(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references):
        c = tokenize(cand)
        lcs = [lcs_length(tokenize(r), c) for r in refs]
        p = max(x / len(c) if c else 0.0 for x in lcs)
        r = max(x / max(len(tokenize(ref)), 1) for x, ref in zip(lcs, refs))
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0)
    return float(np.mean(scores))


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (pycocoevalcap's ``Cider``): tf-idf n-gram cosine, clipped, length-penalised, x10, mean over images."""
    _check(candidates, references)
    refs_tok = [[tokenize(r) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in refs_tok:
        df.update({g for r in refs for k in range(1, n + 1) for g in ngrams(r, k)})
    log_docs = math.log(float(len(references)))

    def vec(words: list[str]) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [defaultdict(float) for _ in range(n)]
        norm, length = [0.0] * n, 0
        for k in range(1, n + 1):
            for g, tf in ngrams(words, k).items():
                v[k - 1][g] = tf * (log_docs - math.log(max(1.0, df[g])))
                norm[k - 1] += v[k - 1][g] ** 2
                if k == 2:  # pycocoevalcap measures length in bigrams
                    length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for cand, refs in zip(candidates, refs_tok):
        vh, nh, lh = vec(tokenize(cand))
        total = np.zeros(n)
        for r in refs:
            vr, nr, lr = vec(r)
            for k in range(n):
                val = sum(min(vh[k][g], vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g in vh[k])
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        scores.append(float(total.mean()) / len(refs) * 10.0)
    return float(np.mean(scores))


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """METEOR 1.5 through ``pycocoevalcap`` (a Java jar); None when the package or ``java`` is missing."""
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None
    if shutil.which("java") is None:
        return None
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(tokenize(c))] for i, c in enumerate(candidates)}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        try:
            scorer.close()
        except Exception:  # noqa: BLE001 - older versions have no close(); the process ends with Python
            pass
    return float(score)


def caption_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]], with_meteor: bool = True
) -> dict[str, float | None]:
    """BLEU-1..4, METEOR (None without pycocoevalcap + Java), ROUGE-L and CIDEr for captions vs references."""
    b = bleu(candidates, references)
    out: dict[str, float | None] = {f"BLEU-{i + 1}": v for i, v in enumerate(b)}
    out["METEOR"] = meteor(candidates, references) if with_meteor else None
    out["ROUGE-L"] = rouge_l(candidates, references)
    out["CIDEr"] = cider_d(candidates, references)
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (characters)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def reading_scores(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Exact match (case-insensitive, surrounding space ignored) and character error rate (edits / target chars)."""
    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"need as many predictions as targets (got {len(predictions)} and {len(targets)}), at least 1")
    p = [s.strip().lower() for s in predictions]
    t = [s.strip().lower() for s in targets]
    edits = sum(edit_distance(a, b) for a, b in zip(p, t))
    return {
        "exact_match": float(np.mean([a == b for a, b in zip(p, t)])),
        "cer": edits / max(1, sum(len(b) for b in t)),
    }


DECODING_METHODS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "beam3": {"beam": 3},
    "top_p0.9": {"sample": True, "top_p": 0.9, "seed": 0},
}


def generate_captions(
    model, tokenizer, images: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu", **kw
) -> list[str]:
    """Captions for uint8 images (N, C, H, W), in batches."""
    from ..generation import caption

    model = model.to(device)
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        out += caption(model, tokenizer, images[i : i + batch_size].to(device), **kw)
    return out


def caption_eval(
    model,
    tokenizer,
    images: torch.Tensor,
    references: Sequence[Sequence[str]],
    methods: Mapping[str, Mapping[str, Any]] | None = None,
    max_length: int = 30,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    with_meteor: bool = True,
) -> dict[str, dict[str, Any]]:
    """Caption metrics per decoding method, e.g. ``{"greedy": {"BLEU-4": ..., "CIDEr": ...}, "beam3": {...}}``."""
    results: dict[str, dict[str, Any]] = {}
    for name, kw in (methods or DECODING_METHODS).items():
        caps = generate_captions(model, tokenizer, images, batch_size, device, max_length=max_length, **kw)
        results[name] = {**caption_scores(caps, references, with_meteor), "examples": caps[:5]}
    return results


def shapes_references(dataset) -> list[list[str]]:
    """Every phrasing of each shapes scene (from the scene's own random stream), as that image's references."""
    from ..data.shapes import generate_scene, scene_captions

    refs = []
    for i in range(len(dataset)):
        rng = dataset.rng(i)
        scene = generate_scene(rng, dataset.cfg, holdout=dataset.split == "holdout")
        caps = scene_captions(scene, rng)
        refs.append(list(dict.fromkeys(caps)))
    return refs
