"""VQA scoring: exact match for one reference answer, the VQA rule min(#matches / 3, 1) for several.

Answers are compared after light normalisation (case, surrounding spaces, a trailing full stop), so "Red." and "red"
count as the same answer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


def normalize_answer(answer: str) -> str:
    """Lower-cased, whitespace-collapsed, without a trailing '.' or '!'."""
    return " ".join(str(answer).lower().split()).rstrip(".!").strip()


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Score of one prediction against its reference answers (1.0 / 0.0 with one reference)."""
    if not answers:
        raise ValueError("a question needs at least one reference answer to be scored")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    if len(answers) == 1:
        return float(matches)
    return min(matches / 3.0, 1.0)


def vqa_accuracy(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], types: Sequence[str] | None = None
) -> dict:
    """``{"overall", "per_type": {type: accuracy}, "count": {type: n}, "n"}``, accuracies in [0, 1]."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    types = types if types is not None else ["all"] * len(predictions)
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for p, a, t in zip(predictions, answers, types):
        s = vqa_score(p, a)
        total[t] += s
        count[t] += 1
    n = sum(count.values())
    return {
        "overall": sum(total.values()) / max(n, 1),
        "per_type": {t: total[t] / count[t] for t in sorted(count)},
        "count": dict(sorted(count.items())),
        "n": n,
    }
