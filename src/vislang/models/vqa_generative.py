"""Generative VQA: a CoCa captioner that reads the question and writes the answer, token by token.

Why a second head: the classifier (``models.vqa``) can only pick one of the answers training saw; a decoder spells its
answer, so it can give one training never saw. It reuses the captioning model (``models.captioner.CoCa``) and its
search (``vislang.decoding``) rather than a decoder of its own, and the classifier's data (``data.vqa``), loop
(``train.tasks.vqa``) and scoring (``evaluation.vqa``).

A training row is the token sequence ``[BOS] question [SEP] answer [EOS]``. The separator is the vislang tokenizer's
``[MASK]`` special: no caption uses it and no question can end where an answer starts by accident (a question that
spells "[MASK]" is refused). The caption loss counts only the answer tokens and the end token
(``losses.answer_loss``); the contrastive loss is off, since the ten or so questions of a scene are no image–text
pairs to contrast. At answer time the question and separator are the generation ``prefix``; the answer is the
continuation, and its probability is the product of its tokens' probabilities, the end token included.

The model is saved as a normal CoCa model directory (``factory.save_pretrained``) whose ``config.json`` also holds
``"vqa": {"head": "generative", "separator_id", "max_answer_tokens", "answers"}`` (``models.vqa.GENERATIVE_KEY``), so
``vislang vqa`` answers with it and ``models.vqa.vqa_head`` tells it from a classifier. ``load_answerer`` (and
``predict_answer``, ``answer_probability``) take a directory of either head; they live here, not in ``models.vqa``,
because this head loads through ``vislang.factory``, which sits above ``models.vqa`` (the registry imports it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.transforms import normalize
from ..decoding import generate
from ..evaluation.vqa_metrics import normalize_answer
from ..factory import build_model as build_from_config
from ..factory import fit_config_to_tokenizer, from_pretrained, get_model_config, get_tokenizer, is_model_dir
from ..tokenizers import Tokenizer
from .clip import DecoderConfig
from .vqa import (
    ANSWERS_FILE,
    GENERATIVE_KEY,
    ClassifierAnswerer,
    check_known_answer,
    clean_question,
    image_tensor,
    vqa_head,
)

SEPARATOR = "[MASK]"  # the vislang tokenizer's special that sits between question and answer
MIN_ANSWER_TOKENS = 2  # room an answer needs in the context: one token and the end token


# --------------------------------------------------------------------------------------------------- token layout


def separator_id(tokenizer) -> int:
    """Id of the question–answer separator; only vislang-trained tokenizers have the special it uses."""
    sep = tokenizer.backend.token_to_id(SEPARATOR) if isinstance(tokenizer, Tokenizer) else None
    if sep is None:
        raise ValueError(
            f"generative VQA needs a vislang-trained tokenizer (its {SEPARATOR} token separates question and "
            "answer); set the model's text.tokenizer to bpe or wordpiece"
        )
    return sep


def _prompts(tokenizer, questions: Sequence[str], sep: int) -> list[list[int]]:
    """Question tokens, then the separator; clear errors for a question without tokens or with the separator."""
    out = []
    for q, ids in zip(questions, tokenizer.encode_ids(list(questions))):
        if not ids:
            raise ValueError(f'the question {q!r} is empty; ask something about the image, e.g. "what colour is it?"')
        if sep in ids:
            raise ValueError(f"the question {q!r} contains {SEPARATOR}, the token that ends a question; remove it")
        out.append(ids + [sep])
    return out


def encode_questions(tokenizer, questions: Sequence[str], sep: int, context_length: int) -> list[list[int]]:
    """Prompt ids per question (its tokens, then the separator), each checked to leave room for an answer."""
    limit = context_length - 2 - MIN_ANSWER_TOKENS  # the begin and separator tokens take two places
    prompts = _prompts(tokenizer, questions, sep)
    for q, p in zip(questions, prompts):
        if len(p) - 1 > limit:
            raise ValueError(
                f"the question {q[:60]!r} has {len(p) - 1} tokens but this model reads questions of at most {limit} "
                f"(its context of {context_length} tokens also holds the begin and separator tokens and an answer); "
                "ask a shorter question"
            )
    return prompts


def encode_pairs(
    tokenizer, questions: Sequence[str], answers: Sequence[str], sep: int, context_length: int
) -> torch.Tensor:
    """Training rows ``[BOS] question [SEP] answer [EOS]``, padded (Q, context_length)."""
    prompts = _prompts(tokenizer, questions, sep)
    rows = [[tokenizer.bos_id, *p, *a, tokenizer.eos_id] for p, a in zip(prompts, tokenizer.encode_ids(list(answers)))]
    empty = sum(len(r) == len(p) + 2 for r, p in zip(rows, prompts))
    if empty:
        raise ValueError(f"{empty} answer(s) have no tokens; every training question needs a non-empty answer")
    longest = max(len(r) for r in rows)
    if longest > context_length:
        n = sum(len(r) > context_length for r in rows)
        raise ValueError(
            f"{n} of {len(rows)} question–answer pairs need more than the text context of {context_length} tokens "
            f"(the longest {longest}); raise it with overrides: [text.context_length={longest}]"
        )
    out = torch.full((len(rows), context_length), tokenizer.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


# ------------------------------------------------------------------------------------------------------- answering


def load_generative_vqa(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, tokenizer, marker)`` from a directory written by ``train_vqa_generative``; marker: its "vqa" entry."""
    d = Path(directory)
    if not is_model_dir(d):
        raise FileNotFoundError(
            f"{d} is not a model directory (needs config.json and model.safetensors); train a generative VQA model "
            "with `vislang train --config vqa-gen`"
        )
    if vqa_head(d) != "generative":
        raise ValueError(f"{d} holds no generative VQA model (its config.json has no {GENERATIVE_KEY!r} entry)")
    marker = json.loads((d / "config.json").read_text())[GENERATIVE_KEY]
    return from_pretrained(d, device).eval(), get_tokenizer(d), marker


class GenerativeAnswerer:
    """A generative VQA model directory, loaded once, ready to answer one question at a time.

    Args:
        model_dir: a directory written by ``train_vqa_generative`` (``vislang train --config vqa-gen``).
        device: where the model runs.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu") -> None:
        self.model, self.tokenizer, marker = load_generative_vqa(model_dir, device)
        self.sep = int(marker["separator_id"])
        self.max_answer_tokens = int(marker["max_answer_tokens"])
        self.answers = list(marker.get("answers", []))  # the training answer vocabulary
        self.device = device

    def _inputs(self, image, question: str) -> tuple[torch.Tensor, list[int]]:
        """Normalised pixels (1, C, H, W) and the prompt ids; clear errors for an empty or too long question and an
        unreadable image."""
        question = clean_question(question)
        prompt = encode_questions(self.tokenizer, [question], self.sep, self.model.cfg.text.context_length)[0]
        v = self.model.cfg.vision
        return normalize(image_tensor(image, v), v.mean, v.std).to(self.device), prompt

    @torch.no_grad()
    def _log_probs(self, x: torch.Tensor, prompt: list[int], answers: list[list[int]]) -> list[float]:
        """log p(answer tokens | image, question) per answer (ids, end token included), one teacher-forced pass."""
        tok = self.tokenizer
        rows = [[tok.bos_id, *prompt, *a] for a in answers]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), tok.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        ids = ids.to(self.device)
        zeros = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        logits = self.model.caption_logits(x, ids, zeros).float()  # (A, L-1, V): position j predicts token j+1
        lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (A, L-1)
        keep = (torch.arange(L - 1, device=self.device) >= len(prompt)) & (ids[:, 1:] != tok.pad_id)
        return (lp * keep).sum(1).tolist()

    def answer(self, image, question: str, top_k: int = 1) -> list[tuple[str, float]]:
        """``[(answer, probability), ...]``: the generated (greedy) answer; with ``top_k`` > 1 also the training
        answers, every one scored by the same product of token probabilities, most probable first."""
        x, prompt = self._inputs(image, question)
        tok, ctx = self.tokenizer, self.model.cfg.text.context_length
        room = ctx - 1 - len(prompt)
        ids = generate(self.model, x, max_length=min(self.max_answer_tokens, room), prefix=torch.tensor([prompt]),
                       bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)[0].tolist()  # fmt: skip
        generated = ids[: ids.index(tok.eos_id) + 1] if tok.eos_id in ids else ids
        cands = {tok.decode(generated): generated}
        if top_k > 1:
            for a, a_ids in zip(self.answers, tok.encode_ids(self.answers)):
                if a not in cands and a_ids and len(a_ids) + 1 <= room:
                    cands[a] = [*a_ids, tok.eos_id]
        scored = zip(cands, self._log_probs(x, prompt, list(cands.values())))
        ranked = sorted(((a, float(np.exp(lp))) for a, lp in scored), key=lambda r: -r[1])
        return ranked[:top_k]

    def probability(self, image, question: str, answer: str) -> float:
        """Probability of ``answer`` (any text, seen in training or not): its tokens' and the end token's."""
        x, prompt = self._inputs(image, question)
        ids = self.tokenizer.encode_ids([" ".join(str(answer).split())])[0]
        if not ids:
            raise ValueError("the answer is empty; give the answer whose probability you want, e.g. --answer red")
        room = self.model.cfg.text.context_length - 1 - len(prompt)
        if len(ids) + 1 > room:
            raise ValueError(f"the answer has {len(ids)} tokens; with this question the model has room for {room - 1}")
        return float(np.exp(self._log_probs(x, prompt, [[*ids, self.tokenizer.eos_id]])[0]))


def predict_generative(model_dir: str | os.PathLike, image, question: str, top_k: int = 1) -> list[tuple[str, float]]:
    """``[(answer, probability), ...]`` for one image (path or PIL image) and one question (``vislang vqa``)."""
    return GenerativeAnswerer(model_dir).answer(image, question, top_k)


def generative_answer_probability(model_dir: str | os.PathLike, image, question: str, answer: str) -> float:
    """Probability a generative VQA model gives ``answer`` (``vislang vqa --answer``)."""
    return GenerativeAnswerer(model_dir).probability(image, question, answer)


# -------------------------------------------------------------------------------------------------------- training


def build_model(
    name: str, overrides: list[str] | tuple[str, ...] | dict[str, Any], texts: Sequence[str], make_tokenizer=None
):
    """``(CoCa, tokenizer)``: the model config with a decoder (one of the text tower's width if it has none), and a
    tokenizer trained on the questions and answers (answers must be spellable to be generated)."""
    mcfg = get_model_config(name, overrides if isinstance(overrides, dict) else list(overrides))
    if mcfg.text.tokenizer == "hf" or mcfg.text.arch != "transformer":
        raise ValueError(
            "generative VQA decodes with a causal transformer text tower and its own tokenizer; set text.arch to "
            "transformer and text.tokenizer to bpe or wordpiece"
        )
    tc = mcfg.text
    if make_tokenizer is not None:  # the training task's: kept in the run folder for a resume
        tokenizer = make_tokenizer(list(texts), tc)
    else:
        tokenizer = Tokenizer.train(
            texts, vocab_size=tc.vocab_size, kind=tc.tokenizer, context_length=tc.context_length
        )
    mcfg = fit_config_to_tokenizer(mcfg, tokenizer)
    dec = mcfg.decoder or DecoderConfig(width=tc.width, heads=tc.heads)
    mcfg = dataclasses.replace(mcfg, decoder=dataclasses.replace(dec, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id))
    return build_from_config(mcfg), tokenizer


# ------------------------------------------------------------------------------------------------- either VQA head


def load_answerer(model_dir: str | os.PathLike, device: str = "cpu"):
    """The answerer for a VQA directory: ``ClassifierAnswerer`` or, for ``vislang train --config vqa-gen`` output,
    ``GenerativeAnswerer``; both have ``answer(image, question, top_k)``."""
    if vqa_head(model_dir) == "generative":
        return GenerativeAnswerer(model_dir, device)
    return ClassifierAnswerer(model_dir, device)


def predict_answer(model_dir: str, image, question: str, top_k: int = 1) -> list[tuple[str, float]]:
    """``[(answer, probability), ...]`` for one image (path or PIL image) and one question, either VQA head."""
    return load_answerer(model_dir).answer(image, question, top_k)


def answer_probability(model_dir: str, image, question: str, answer: str) -> float:
    """Probability the model gives ``answer``; a clear error for an answer training never saw (a generative
    answerer scores any answer)."""
    if vqa_head(model_dir) == "generative":
        return generative_answer_probability(model_dir, image, question, answer)
    answers = json.loads((Path(model_dir) / ANSWERS_FILE).read_text())
    check_known_answer(answer, answers)
    return dict(predict_answer(model_dir, image, question, top_k=len(answers)))[normalize_answer(answer)]
