"""Caption metrics the COCO way (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) and text-reading metrics.

BLEU, ROUGE-L and CIDEr-D follow ``pycocoevalcap`` line by line (corpus BLEU with the closest reference length,
ROUGE-L F with beta 1.2 over the best precision and recall, CIDEr-D with sigma 6, clipping and the x10 scale, document
frequencies from the evaluated references); ``tests/test_caption_metrics.py`` checks them against pycocoevalcap's own
``Bleu``/``Cider``/``Rouge`` on the same tokens. METEOR is pycocoevalcap's: its Java jar, run in one process that is
reused; without pycocoevalcap or ``java`` it is omitted with a one-line note (``meteor_unavailable``), never guessed.

Tokenisation: COCO runs Stanford's PTB tokenizer (a Java process per call, which writes a temporary file into the
installed package). We use ``tokenize`` instead: lower-case, runs of letters and digits, punctuation dropped. On the
shapes and rendered-text captions this gives exactly PTB's tokens (tested); on OpenClipart titles about a fifth of the
captions differ, mostly where PTB keeps hyphenated words ("red-eye"), splits "'s", and, lower-casing before its
punctuation filter, leaves brackets in as "-lrb-"/"-rrb-" words, which would score as matches. Numbers here are
therefore comparable with COCO-style numbers on plain captions, and within this project everywhere.
"""

from __future__ import annotations

import atexit
import importlib.util
import math
import re
import shutil
import threading
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..data.shapes import generate_scene, scene_captions
from ..decoding import caption
from .embed import embed_images, image_batch, num_images

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


class _MeteorProcess:
    """One METEOR 1.5 Java process per Python process: starting it loads a 60 MB paraphrase table (~10 s), so every
    later call (each decoding method, each subset) reuses it. A failure is remembered and METEOR is then omitted."""

    def __init__(self) -> None:
        self.scorer: Any = None
        self.failure: str | None = None
        self.lock = threading.Lock()

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("pycocoevalcap") is None:
            return "METEOR omitted: pycocoevalcap is not installed (pip install pycocoevalcap, or `make install`)"
        if shutil.which("java") is None:
            return "METEOR omitted: no `java` on PATH (apt-get install default-jre-headless, or `make java`)"
        return self.failure

    def score(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float | None:
        if self.unavailable():
            return None
        with self.lock:
            try:
                if self.scorer is None:
                    from pycocoevalcap.meteor.meteor import Meteor

                    self.scorer = Meteor()
                score, _ = self.scorer.compute_score(gts, res)
                return float(score)
            except (OSError, ValueError, AssertionError) as e:  # the jar died or answered nothing: omit, never crash
                self.failure = f"METEOR omitted: its Java process failed ({type(e).__name__}: {e})"
                self.close()
                return None

    def close(self) -> None:
        proc = getattr(self.scorer, "meteor_p", None)
        self.scorer = None
        if proc is not None:
            proc.kill()
            proc.wait()


_METEOR = _MeteorProcess()
atexit.register(_METEOR.close)


def meteor_unavailable() -> str | None:
    """Why METEOR cannot be computed here (one line naming the fix), or None when it can."""
    return _METEOR.unavailable()


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """METEOR 1.5 through ``pycocoevalcap`` (its Java jar, with the paraphrase table the wheel ships; runs offline).

    None when the package or ``java`` is missing or the Java process fails; ``meteor_unavailable()`` says why.
    Captions go in tokenised like the other metrics (``tokenize``), one line each.
    """
    _check(candidates, references)
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(tokenize(c))] for i, c in enumerate(candidates)}
    return _METEOR.score(gts, res)


def caption_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]], with_meteor: bool = True
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr for captions vs references.

    METEOR is left out (not reported as 0 or guessed) when ``with_meteor`` is off or it cannot run here; the caller
    says so with ``meteor_unavailable()``.
    """
    b = bleu(candidates, references)
    out: dict[str, float] = {f"BLEU-{i + 1}": v for i, v in enumerate(b)}
    m = meteor(candidates, references) if with_meteor else None
    if m is not None:
        out["METEOR"] = m
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


# Decoding methods as ``caption-eval`` reports them: name → ``generate`` keyword arguments.
DECODING_METHODS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "beam3": {"beam": 3},
    "top_p0.9": {"sample": True, "top_p": 0.9, "seed": 0},
}
CAPTION_RESULTS = "captions.json"  # what `caption-eval` writes into a run's eval/ folder and `vislang report` reads
CAPTION_SAMPLES_DIR = "caption_samples"  # beside it: sample images, named in captions.json's "samples"
NN_BASELINE = "nn_baseline"  # the method name of the nearest-neighbour baseline in result tables
TABLE_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "exact_match", "cer")


def generate_captions(
    model, tokenizer, images, batch_size: int = 256, device: str | torch.device = "cpu", **kw
) -> list[str]:
    """Captions for a prepared dataset or a uint8 (N, C, H, W) tensor, in batches."""

    model = model.to(device)
    n = num_images(images)
    out: list[str] = []
    for i in range(0, n, batch_size):
        out += caption(model, tokenizer, image_batch(images, np.arange(i, min(i + batch_size, n))).to(device), **kw)
    return out


def caption_eval(
    model,
    tokenizer,
    images,
    references: Sequence[Sequence[str]],
    methods: Mapping[str, Mapping[str, Any]] | None = None,
    max_length: int = 30,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    with_meteor: bool = True,
    reading: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """Caption metrics per decoding method, and the captions each method wrote.

    Args:
        images: a prepared dataset or uint8 (N, C, H, W) tensor; ``references`` holds one list per image.
        methods: name → ``generate`` keyword arguments (default ``DECODING_METHODS``).
        reading: also exact match and character error rate against each image's first reference (reading text).

    Returns:
        ``({"greedy": {"BLEU-4": ..., "CIDEr": ...}, ...}, {"greedy": [caption, ...], ...})``.
    """
    scores: dict[str, dict[str, float]] = {}
    captions: dict[str, list[str]] = {}
    for name, kw in (methods or DECODING_METHODS).items():
        caps = generate_captions(model, tokenizer, images, batch_size, device, max_length=max_length, **kw)
        scores[name] = caption_scores(caps, references, with_meteor)
        if reading:
            scores[name].update(reading_scores(caps, [r[0] for r in references]))
        captions[name] = caps
    return scores, captions


def nearest_neighbour_captions(
    model,
    train_images,
    train_captions: Sequence[str],
    test_images,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> tuple[list[str], np.ndarray]:
    """The caption-retrieval baseline: for each test image, the caption of the most similar training image.

    Similarity is the cosine of ``model.encode_image`` embeddings (a dual encoder's, or a CoCa captioner's own
    contrastive image embedding). A captioner that does not beat this has learned to retrieve, not to describe.

    Returns:
        The borrowed captions and the index of the training image each came from.
    """

    if num_images(train_images) != len(train_captions):
        raise ValueError(f"{num_images(train_images)} training images but {len(train_captions)} captions")
    if not len(train_captions):
        raise ValueError("the nearest-neighbour baseline needs at least one training image")
    train_emb = embed_images(model, train_images, batch_size, device)  # (N, E), L2-normalised
    test_emb = embed_images(model, test_images, batch_size, device)  # (M, E)
    nearest = torch.cat([(chunk @ train_emb.T).argmax(dim=1) for chunk in test_emb.split(1024)])  # (M,)
    idx = nearest.numpy()
    return [train_captions[i] for i in idx], idx


def markdown_table(subsets: Mapping[str, Mapping[str, Any]], notes: Sequence[str] = ()) -> str:
    """One markdown table, a row per (subset, method), a column per metric present; notes follow as lines."""
    rows = [
        (sub, part.get("images"), method, m) for sub, part in subsets.items() for method, m in part["methods"].items()
    ]
    cols = [c for c in TABLE_METRICS if any(c in m for *_, m in rows)]
    lines = ["| subset | images | method | " + " | ".join(cols) + " |", "|---|---:|---|" + "---:|" * len(cols)]
    for sub, n, method, m in rows:
        cells = [f"{m[c]:.4f}" if isinstance(m.get(c), (int, float)) else "" for c in cols]
        lines.append(f"| {sub} | {n} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [f"\n{n}" for n in notes])


def shapes_references(dataset) -> list[list[str]]:
    """Every phrasing of each shapes scene (from the scene's own random stream), as that image's references."""

    refs = []
    for i in range(len(dataset)):
        rng = dataset.rng(i)
        scene = generate_scene(rng, dataset.cfg, holdout=dataset.split == "holdout")
        caps = scene_captions(scene, rng)
        refs.append(list(dict.fromkeys(caps)))
    return refs
