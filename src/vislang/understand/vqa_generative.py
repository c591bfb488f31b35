"""Generative VQA: a CoCa captioner that reads the question and writes the answer, token by token.

Why a second head: the classifier (``vqa_train``) can only pick one of the answers training saw; a decoder spells its
answer, so it can give one training never saw. It reuses the captioning model (``models.captioner.CoCa``) and its
search (``vislang.decoding``) rather than a decoder of its own, and the classifier's data, loop and scoring.

A training row is the token sequence ``[BOS] question [SEP] answer [EOS]``. The separator is the vislang tokenizer's
``[MASK]`` special: no caption uses it and no question can end where an answer starts by accident (a question that
spells "[MASK]" is refused). The caption loss counts only the answer tokens and the end token (``answer_mask``); the
contrastive loss is off, since the ten or so questions of a scene are no image–text pairs to contrast. At answer time
the question and separator are the generation ``prefix``; the answer is the continuation, and its probability is the
product of its tokens' probabilities, the end token included.

The model is saved as a normal CoCa model directory (``factory.save_pretrained``) whose ``config.json`` also holds
``"vqa": {"head": "generative", "separator_id", "max_answer_tokens", "answers"}`` (``models.vqa.GENERATIVE_KEY``), so
``vislang vqa`` answers with it and ``models.vqa.vqa_head`` tells it from a classifier.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.transforms import normalize
from ..data.vqa import VQASet
from ..evaluation.vqa_metrics import normalize_answer, vqa_accuracy, vqa_score
from ..losses import caption_loss
from ..models.vqa import GENERATIVE_KEY, vqa_head
from ..tokenizers import Tokenizer
from ..train.config import VQAGenConfig
from .vqa_train import clean_question, image_tensor, load_run_config

TASK = "vqa-gen"  # the run config's task: key that routes `vislang train` here
SEPARATOR = "[MASK]"  # the vislang tokenizer's special that sits between question and answer
MIN_ANSWER_TOKENS = 2  # room an answer needs in the context: one token and the end token


def load_vqa_gen_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> VQAGenConfig:
    """A generative VQA run config (``task: vqa-gen``) plus ``key=value`` overrides: what ``vislang train`` reads."""
    return load_run_config(path, overrides, TASK, VQAGenConfig)


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


def answer_mask(tokens: torch.Tensor, sep: int, pad: int) -> torch.Tensor:
    """(B, T-1): which next-token targets ``tokens[:, 1:]`` the loss counts — the answer tokens and the end token,
    i.e. every non-padding token after the first separator."""
    is_sep = (tokens == sep).long()
    after = (is_sep.cumsum(1) - is_sep) > 0  # (B, T): strictly after the first separator
    return (after & (tokens != pad))[:, 1:]


def answer_loss(logits: torch.Tensor, tokens: torch.Tensor, sep: int, pad: int) -> torch.Tensor:
    """``losses.caption_loss`` over the answer tokens only: question targets are set to padding, which it ignores."""
    targets = tokens.clone()
    targets[:, 1:] = tokens[:, 1:].masked_fill(~answer_mask(tokens, sep, pad), pad)
    return caption_loss(logits, targets, pad)


# ------------------------------------------------------------------------------------------------------- answering


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
    from ..decoding import generate

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


def load_generative_vqa(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, tokenizer, marker)`` from a directory written by ``train_vqa_generative``; marker: its "vqa" entry."""
    from ..factory import from_pretrained, get_tokenizer, is_model_dir

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
        from ..decoding import generate

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
    from ..factory import build_model as build
    from ..factory import fit_config_to_tokenizer, get_model_config
    from ..models.clip import DecoderConfig

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
    return build(mcfg), tokenizer
