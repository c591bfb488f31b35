"""Evaluate either VQA head on a question set: per-question-type accuracy and the ``OUT/eval/vqa.md`` table.

The answer classifier (``models.vqa.VQAModel``) is scored by ``evaluate_vqa``: a batch is a few images plus every
question about them (``data.vqa.make_batch``), so the image tower runs once per image. The generative answerer
(``models.vqa_generative``) is scored by ``evaluate_generative`` with the same rule (``vqa_metrics.vqa_accuracy``),
plus a count of the answers training never saw. ``write_eval`` writes the table both training tasks end with.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.vqa import QuestionIndex, VQASet, make_batch
from ..decoding import generate
from ..models.vqa import VQAModel
from ..models.vqa_generative import encode_questions, separator_id
from .vqa_metrics import normalize_answer, vqa_accuracy, vqa_score

EVAL_DIR = "eval"  # OUT/eval: the per-type accuracy table of every evaluated split


@torch.no_grad()
def predict_set(model: VQAModel, data: VQASet, tokenizer, answers: list[str], batch_images: int = 64) -> list[str]:
    """The predicted answer of every question of ``data``."""
    model.eval()
    tokens = tokenizer(data.questions)
    qindex = QuestionIndex(data.image_index, len(data.images))
    preds = np.empty(len(data), dtype=object)
    for start in range(0, len(data.images), batch_images):
        imgs = np.arange(start, min(start + batch_images, len(data.images)))
        b = make_batch(data, tokens, qindex, imgs, model.cfg.vision)
        if len(b["questions"]) == 0:
            continue
        logits = model(b["images"], b["tokens"], b["image_index"])["logits"]
        for qi, k in zip(b["questions"], logits.argmax(-1).tolist()):
            preds[qi] = answers[k]
    return list(preds)


def evaluate_vqa(model: VQAModel, data: VQASet, tokenizer, answers: list[str]) -> dict[str, Any]:
    preds = predict_set(model, data, tokenizer, answers)
    return vqa_accuracy(preds, data.answers, data.types)


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    images: np.ndarray,
    image_index: np.ndarray,
    prompts: list[list[int]],
    max_answer_tokens: int,
    batch_size: int = 512,
    beam: int = 1,
) -> list[str]:
    """The answer to each prompt about ``images[image_index[i]]`` (uint8 (N, H, W, C)); prompts are batched by length,
    since the generation prefix of one call has one length."""
    model.eval()
    ctx = model.cfg.text.context_length
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out = [""] * len(prompts)
    for P, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            x = torch.from_numpy(images[image_index[chunk]]).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
            prefix = torch.tensor([prompts[i] for i in chunk], dtype=torch.long)  # (B, P)
            ids = generate(model, x, max_length=min(max_answer_tokens, ctx - 1 - P), beam=beam, prefix=prefix,
                           bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)  # fmt: skip
            for i, row in zip(chunk, ids.tolist()):
                out[i] = tokenizer.decode(row)
    return out


def evaluate_generative(
    model, tokenizer, data: VQASet, answers: Sequence[str], max_answer_tokens: int, beam: int = 1
) -> dict[str, Any]:
    """The classifier's scoring (``vqa_accuracy``, per question type) plus how many answers training never saw."""
    prompts = encode_questions(tokenizer, data.questions, separator_id(tokenizer), model.cfg.text.context_length)
    preds = generate_answers(model, tokenizer, data.images, data.image_index, prompts, max_answer_tokens, beam=beam)
    res = vqa_accuracy(preds, data.answers, data.types)
    known = set(answers)
    new = [(normalize_answer(p), refs) for p, refs in zip(preds, data.answers) if normalize_answer(p) not in known]
    res["new_answers"] = len(new)  # answers outside the training answer vocabulary
    res["new_answers_correct"] = sum(vqa_score(p, refs) > 0 for p, refs in new)
    res["new_answer_examples"] = dict(Counter(p for p, _ in new).most_common(10))
    return res


def write_eval(results: dict[str, Any], out_dir: Path, title: str) -> Path:
    """``OUT/eval/vqa.json`` and ``vqa.md``: accuracy per split and per question type, the table a README cites."""
    splits = [k for k, v in results.items() if isinstance(v, dict) and "per_type" in v]
    types = sorted({t for s in splits for t in results[s]["per_type"]})
    lines = [f"# {title}", "", "| split | questions | overall | " + " | ".join(types) + " |"]
    lines.append("|---" * (3 + len(types)) + "|")
    for s in splits:
        r = results[s]
        cells = [f"{100 * r['per_type'][t]:.1f}" if t in r["per_type"] else "-" for t in types]
        lines.append(f"| {s} | {r['n']} | {100 * r['overall']:.1f} | " + " | ".join(cells) + " |")
    d = out_dir / EVAL_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / "vqa.json").write_text(json.dumps({s: results[s] for s in splits}, indent=2))
    (d / "vqa.md").write_text("\n".join(lines) + "\n\nAccuracy in %; question types as the data labels them.\n")
    return d / "vqa.md"
