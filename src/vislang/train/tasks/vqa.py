"""VQA tasks in the one loop: the answer classifier (``task: vqa``) and the generative answerer (``task: vqa-gen``).

A batch is ``batch_size`` images (per process, as in every task) plus every question about them
(``data.vqa.make_batch``), so the image tower runs once per image; the images of an epoch come in the
order of one ``numpy`` generator seeded with ``cfg.seed`` and drawn once per epoch (a resumed run replays the draws up
to its epoch). Under torchrun a step holds ``batch_size`` × world images; each rank takes every ``world``-th with its
questions and scales its mean loss by its share of the step's questions (answer tokens for vqa-gen;
``distributed.global_share``), so that DDP's average of the ranks' gradients is one process's on the whole batch.
Training ends with the evaluation on the test (and shapes holdout) sets, the model directory, ``results.json`` and
``eval/vqa.md`` (``finish``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import distributed as dist
from ...config import to_dict
from ...data.vqa import QuestionIndex, answer_targets, answer_vocab, image_batches, load_sets, make_batch
from ...evaluation.vqa import evaluate_generative, evaluate_vqa, write_eval
from ...factory import get_model_config, load_vqa_config, save_pretrained
from ...losses import answer_loss, answer_mask, vqa_loss
from ...models.vqa import GENERATIVE_KEY, VQAModel, num_parameters, save_vqa
from ...models.vqa_generative import build_model, encode_pairs, separator_id
from ...tokenizers import Tokenizer, load_tokenizer
from ..config import VQATaskConfig, to_train_config
from ..loop import Calls, Run, Task, fit
from ..optim import build_optimizer


class _VQABase(Task):
    """Batches, schedule and bookkeeping the two VQA heads share; subclasses build the model and the loss."""

    name = "train vqa"
    budget_fit_from = 20  # the schedule is fitted to the budget once 20 steps are timed, as the old VQA loop did
    nonfinite_hint = "lower --optim.lr"

    def setup(self, run: Run) -> None:
        self.run, self.cfg = run, run.cfg
        self.vqa = run.cfg.vqa or VQATaskConfig()
        t0 = time.perf_counter()
        self.build()  # sets self.sets, self.tokens, self.model (core)
        self.data_s = time.perf_counter() - t0
        n, b = len(self.sets["train"].images), self.per_step()
        if run.world > 1 and 0 < n % b < run.world:
            raise ValueError(
                f"under torchrun every rank needs an image of every step: the {n} training images leave a last step "
                f"of {n % b} for {run.world} ranks; choose n_train or --batch_size so that it has at least one each"
            )
        train = self.sets["train"]
        self.qindex = QuestionIndex(train.image_index, len(train.images))
        self.model.to(run.device)
        self.forward_model = self.wrap(run)  # the module the training forward goes through (DDP's under torchrun)
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self._order: tuple[int, list[np.ndarray]] | None = None
        self.model.train()

    def build(self) -> None:
        raise NotImplementedError

    def wrap(self, run: Run) -> nn.Module:
        return run.ddp(self.model)

    def share(self, count: int) -> float:
        """This rank's factor for a mean over ``count`` loss terms (1 on one process: the loss is left untouched)."""

        return dist.global_share(count, self.run.device)

    def question_tokenizer(self, texts: list[str], text_cfg: Any):
        """The run's tokenizer: trained on ``texts`` and kept in OUT/tokenizer, read back from there on resume (a
        WordPiece trainer may split ties differently from one call to the next, and a resumed run must keep ids)."""

        out, run = self.run.out_dir, self.run
        if run.resume and out is not None and (out / "tokenizer").is_dir():
            return load_tokenizer(out / "tokenizer")
        if run.world > 1 and out is None:
            raise ValueError("a VQA run under torchrun needs an out_dir: rank 0 leaves its tokenizer there for others")
        t = text_cfg
        if run.main:  # under torchrun the other ranks read rank 0's: a retrained one might split ties differently
            kw = dict(vocab_size=t.vocab_size, kind=t.tokenizer, context_length=t.context_length)
            tokenizer = Tokenizer.train(texts, **kw)
            if out is not None:
                tokenizer.save(out / "tokenizer")
        dist.barrier()
        if not run.main:
            tokenizer = load_tokenizer(out / "tokenizer")
        return tokenizer

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def epoch_length(self, epoch: int) -> int:
        return math.ceil(len(self.sets["train"].images) / self.per_step())

    def per_step(self) -> int:
        """Images of one step: ``batch_size`` per process."""
        return self.cfg.batch_size * self.run.world

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        """The image batches of ``epoch``: one permutation per epoch from a generator seeded once, replayed."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng(self.cfg.seed)
            for _ in range(epoch + 1):
                order = image_batches(len(self.sets["train"].images), self.per_step(), rng)
            self._order = (epoch, order)
        return self._order[1]

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        run = self.run
        for imgs in self._epoch(epoch)[start:]:
            imgs = imgs[run.rank :: run.world]  # (B_img / world,): this rank's share of the step's images
            b = make_batch(self.sets["train"], self.tokens, self.qindex, imgs, self.model.cfg.vision)
            yield {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in b.items()}

    def samples(self, batch: dict[str, Any]) -> int:
        return int(batch["images"].shape[0])

    def clip_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def results_head(self) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate_sets(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_model(self, out: Path, results: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self) -> Path | None:
        """Evaluate on every held-out set, save the model, ``results.json`` and ``eval/vqa.md``; the model dir."""
        run, train = self.run, self.sets["train"]
        results: dict[str, Any] = {
            **self.results_head(),
            "parameters": num_parameters(self.model),
            "train_time_s": round(run.elapsed(), 1),
            "data_time_s": round(self.data_s, 1),
            "steps": run.global_step,
            "train_questions": len(train),
            "answers": len(self.answers),
            "skipped_rows": train.skips.counts,
        }
        if not run.main:
            return None
        results.update(self.evaluate_sets())
        out = run.out_dir
        self.save_model(out, results)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        write_eval(results, out, self.title)
        self.results = results
        return out / "model"


class VQAClassifierTask(_VQABase):
    """``task: vqa``: image tower + question tower + fusion + a classifier over the training answers."""

    title = ""

    def build(self) -> None:
        mcfg = load_vqa_config(self.cfg.model_name, self.cfg.model)
        self.sets = load_sets(self.vqa, self.cfg.seed, mcfg.vision.image_size, mcfg.vision.channels)
        train = self.sets["train"]
        self.answers = answer_vocab(train.answers)
        t = mcfg.text
        self.tokenizer = self.question_tokenizer(train.questions, t)
        text = dataclasses.replace(t, vocab_size=self.tokenizer.vocab_size, pad_id=self.tokenizer.pad_id)
        mcfg = dataclasses.replace(mcfg, text=text, num_answers=len(self.answers))
        self.model = VQAModel(mcfg)
        self.tokens = self.tokenizer(train.questions)
        self.targets = torch.from_numpy(answer_targets(train.answers, self.answers))
        self.title = f"VQA answer classifier ({mcfg.fusion.kind} fusion)"

    def training_step(self, b: dict[str, Any], step: int) -> torch.Tensor:
        logits = self.forward_model(b["images"], b["tokens"], b["image_index"])["logits"]  # (B_q, A)
        loss = vqa_loss(logits, self.targets[torch.from_numpy(b["questions"])].to(logits.device))
        return loss * self.share(len(b["questions"])) if self.run.world > 1 else loss

    def results_head(self) -> dict[str, Any]:
        return {"fusion": self.model.cfg.fusion.kind}

    def evaluate_sets(self) -> dict[str, Any]:
        model = self.model.cpu()
        return {n: evaluate_vqa(model, d, self.tokenizer, self.answers) for n, d in self.sets.items() if n != "train"}

    def save_model(self, out: Path, results: dict[str, Any]) -> None:
        extra = {"train": to_dict(self.cfg), "results": results}
        save_vqa(self.model, out / "model", self.tokenizer, self.answers, extra=extra)


class VQAGenerativeTask(_VQABase):
    """``task: vqa-gen``: a CoCa captioner reads ``[BOS] question [SEP]`` and writes the answer."""

    title = "Generative VQA (CoCa decoder)"

    def build(self) -> None:
        v = get_model_config(self.cfg.model_name, self.cfg.model).vision
        self.sets = load_sets(self.vqa, self.cfg.seed, v.image_size, v.channels)
        train = self.sets["train"]
        self.answers = answer_vocab(train.answers)
        labels = train.top_answers()  # one answer per question to teach (the most common reference)
        texts = [*train.questions, *self.answers]
        self.model, self.tokenizer = build_model(self.cfg.model_name, self.cfg.model, texts, self.question_tokenizer)
        self.sep, self.pad = separator_id(self.tokenizer), self.tokenizer.pad_id
        ctx = self.model.cfg.text.context_length
        self.tokens = encode_pairs(self.tokenizer, train.questions, labels, self.sep, ctx)  # (Q, ctx)

    def wrap(self, run: Run) -> nn.Module:
        """Training reads ``caption_logits``, not ``forward``: under torchrun it runs inside DDP through ``Calls``
        (the contrastive parts of the model sit the step out, hence ``find_unused_parameters``)."""
        return run.ddp(Calls(self.model), find_unused_parameters=True)

    def training_step(self, b: dict[str, Any], step: int) -> torch.Tensor:
        ids = b["tokens"]
        ids = ids[:, : int((ids != self.pad).sum(1).max())]  # drop columns that are padding in every row
        logits = self.forward_model(type(self.model).caption_logits, b["images"], ids, b["image_index"])
        loss = answer_loss(logits, ids, self.sep, self.pad)
        if self.run.world == 1:
            return loss
        return loss * self.share(int(answer_mask(ids, self.sep, self.pad).sum()))  # a mean over answer tokens

    def results_head(self) -> dict[str, Any]:
        return {"head": "generative"}

    def evaluate_sets(self) -> dict[str, Any]:
        t_eval, n = time.perf_counter(), self.vqa.max_answer_tokens
        model = self.model.cpu()
        sets = {k: d for k, d in self.sets.items() if k != "train"}
        res = {k: evaluate_generative(model, self.tokenizer, d, self.answers, n) for k, d in sets.items()}
        return {**res, "eval_time_s": round(time.perf_counter() - t_eval, 1)}

    def save_model(self, out: Path, results: dict[str, Any]) -> None:
        marker = {"head": "generative", "separator_id": self.sep, "max_answer_tokens": self.vqa.max_answer_tokens,
                  "answers": self.answers}  # fmt: skip
        extra = {GENERATIVE_KEY: marker, "train": to_dict(self.cfg), "results": results}
        save_pretrained(self.model.eval(), out / "model", self.tokenizer, extra=extra)


def train_vqa(cfg: Any, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """A VQA classifier from the flat ``train.config.VQATrainConfig``: trained in the one loop, evaluated on the test
    (and shapes holdout) sets, saved; returns the results."""
    task = VQAClassifierTask()
    fit(task, to_train_config(cfg, "vqa", progress), resume)
    return task.results


def train_vqa_generative(cfg: Any, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """The generative answerer from the flat ``train.config.VQAGenConfig``, like :func:`train_vqa`."""
    task = VQAGenerativeTask()
    fit(task, to_train_config(cfg, "vqa-gen", progress), resume)
    return task.results
