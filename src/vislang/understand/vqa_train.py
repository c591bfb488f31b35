"""Train and evaluate a VQA answer classifier: a small loop of its own on image-level batches.

A batch is ``batch_images`` images plus every question about them, so the image tower runs once per image. The
optimizer and schedule are the trainer's (``train.optim``); the checkpoint is written atomically at the end. The loop
(``train_loop``), the data (``load_sets``, ``make_batch``), the input checks and the evaluation files (``write_eval``)
are shared with the generative answerer (``vqa_generative``), which trains a captioner on the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ..config import apply_overrides, from_dict, load_file, to_dict
from ..data.transforms import normalize
from ..data.vqa import VQASet, answer_targets, answer_vocab, read_vqa_file, shapes_vqa
from ..evaluation.vqa_metrics import vqa_accuracy
from ..models.fusion import FUSIONS
from ..models.towers import VisionConfig
from ..models.vqa import MODEL_TYPE as VQA_TYPE
from ..models.vqa import VQAConfig, VQAModel, load_vqa, num_parameters, save_vqa
from ..tokenizers import Tokenizer
from ..train.config import OptimConfig
from ..train.optim import build_optimizer, lr_at, set_lr

EVAL_DIR = "eval"  # OUT/eval: the per-type accuracy table of every evaluated split
RunConfig = TypeVar("RunConfig")


@dataclass(frozen=True)
class VQATrainConfig:
    model: str = "shapes-vqa"  # a VQA config name (model_configs/, model_type vislang-vqa) or a JSON path
    overrides: tuple[str, ...] = ()  # dotted model overrides: "fusion.kind=gated"
    data: str = "shapes"  # "shapes" or a JSONL/CSV file of image, question, answer
    test_data: str | None = None  # file for evaluation (shapes: the test split)
    image_dir: str | None = None  # where relative image paths of the files resolve (default: the file's folder)
    n_train: int = 3000  # shapes: training scenes
    n_test: int = 500  # shapes: test (and holdout) scenes
    epochs: int = 6
    batch_images: int = 32  # images per step; all their questions come along
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50, weight_decay=0.05))
    time_budget_s: float | None = None  # stop training after this many seconds (a fair budget in ablations)
    out_dir: str = "runs/vqa"
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's default)


def load_vqa_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> VQATrainConfig:
    """A VQA run config (YAML/JSON with ``task: vqa``) plus ``key=value`` overrides: what ``vislang train`` reads.

    ``task`` only routes the file here; every other key is a ``VQATrainConfig`` field (``overrides`` lists dotted
    model-config changes, e.g. ``fusion.kind=gated``).
    """
    return load_run_config(path, overrides, "vqa", VQATrainConfig)


def load_run_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...], task: str, cls: type[RunConfig]
) -> RunConfig:
    """A run config file of ``task`` (``vqa``, ``vqa-gen``) plus ``key=value`` overrides, as dataclass ``cls``."""
    data = load_file(path) if path else {}
    if overrides:
        data = apply_overrides(data, list(overrides))
    got = data.pop("task", task)
    if got != task:
        raise ValueError(f"this run config needs task: {task}, got task: {got!r}")
    if isinstance(data.get("overrides"), list):
        data["overrides"] = tuple(data["overrides"])
    return from_dict(cls, data)


def load_vqa_config(name_or_path: str, overrides: tuple[str, ...] | list[str] = ()) -> VQAConfig:
    from ..registry import named_config, named_configs

    p = Path(name_or_path)
    if name_or_path in named_configs(VQA_TYPE):
        data = named_config(name_or_path, VQA_TYPE)
    elif p.is_file():
        data = json.loads(p.read_text())
        data.pop("model_type", None)
    else:
        names = sorted(named_configs(VQA_TYPE))
        raise ValueError(f"unknown VQA model config {name_or_path!r}; use one of {names} or a JSON file")
    if overrides:
        data = apply_overrides(data, list(overrides))
    cfg = from_dict(VQAConfig, data, "model")
    if cfg.fusion.kind not in FUSIONS:
        raise ValueError(f"unknown fusion {cfg.fusion.kind!r}; choose one of {list(FUSIONS)}")
    return cfg


def load_sets(cfg: VQATrainConfig, image_size: int, channels: int) -> dict[str, VQASet]:
    if cfg.data == "shapes":
        return {
            "train": shapes_vqa("train", cfg.n_train, image_size, seed=cfg.seed),
            "test": shapes_vqa("test", cfg.n_test, image_size, seed=cfg.seed),
            "holdout": shapes_vqa("holdout", cfg.n_test, image_size, seed=cfg.seed),
        }
    sets = {"train": read_vqa_file(cfg.data, image_size, channels, cfg.image_dir)}
    if cfg.test_data:
        sets["test"] = read_vqa_file(cfg.test_data, image_size, channels, cfg.image_dir)
    return sets


def image_batches(n_images: int, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n_images)
    return [np.sort(perm[i : i + batch]) for i in range(0, n_images, batch)]


class QuestionIndex:
    """Which questions belong to which images, so a batch of images gathers its questions in one slice each."""

    def __init__(self, image_index: np.ndarray, n_images: int) -> None:
        self.order = np.argsort(image_index, kind="stable")
        self.starts = np.searchsorted(image_index[self.order], np.arange(n_images + 1))

    def questions_of(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([self.order[self.starts[i] : self.starts[i + 1]] for i in images])


def make_batch(data: VQASet, tokens: torch.Tensor, qindex: QuestionIndex, images: np.ndarray, vcfg) -> dict:
    """Images (B_img, C, H, W) normalised, question tokens (B_q, T), image_index (B_q,), question ids (B_q,)."""
    q = qindex.questions_of(images)
    local = {int(g): i for i, g in enumerate(images)}
    img = torch.from_numpy(data.images[images]).permute(0, 3, 1, 2)  # (B_img, C, H, W) uint8
    return {
        "images": normalize(img, vcfg.mean, vcfg.std),
        "tokens": tokens[torch.from_numpy(q)],
        "image_index": torch.tensor([local[int(data.image_index[j])] for j in q], dtype=torch.long),
        "questions": q,
    }


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy: targets are VQA scores normalised per question (one-hot for one answer)."""
    t = targets / targets.sum(1, keepdim=True).clamp(min=1e-6)  # (B, A)
    return -(t * F.log_softmax(logits, dim=-1)).sum(1).mean()


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


def train_loop(
    model: torch.nn.Module,
    data: VQASet,
    tokens: torch.Tensor,
    cfg: VQATrainConfig,
    loss_of: Callable[[dict], torch.Tensor],
    vision: VisionConfig,
    log_path: Path,
    progress: bool = True,
) -> tuple[int, float]:
    """The loop both VQA heads train with; returns ``(steps, seconds)``.

    Each step takes ``cfg.batch_images`` images and all their questions (``make_batch`` over ``tokens``, one row per
    question), asks ``loss_of(batch)`` for the loss, and steps AdamW on the trainer's warmup + cosine schedule with
    gradient clipping; every 20 steps a record goes to ``log_path``. With ``cfg.time_budget_s`` the schedule is
    shortened, once the first 20 steps are timed, to the steps the budget holds, so the cosine decay completes (as
    ``vislang train`` does) instead of being cut at a high learning rate.
    """
    qindex = QuestionIndex(data.image_index, len(data.images))
    opt = build_optimizer(model, cfg.optim)
    total = math.ceil(len(data.images) / cfg.batch_images) * cfg.epochs
    rng = np.random.default_rng(cfg.seed)
    step, t_train = 0, time.perf_counter()
    model.train()
    with open(log_path, "w") as log:
        for epoch in range(cfg.epochs):
            for imgs in image_batches(len(data.images), cfg.batch_images, rng):
                b = make_batch(data, tokens, qindex, imgs, vision)
                set_lr(opt, lr_at(step, total, cfg.optim))
                loss = loss_of(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                opt.step()
                step += 1
                elapsed = time.perf_counter() - t_train
                if cfg.time_budget_s and step == 20:
                    total = min(total, max(step + 1, int(cfg.time_budget_s / (elapsed / step))))
                if step % 20 == 0:
                    rec = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "time_s": elapsed}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if progress:
                        print(json.dumps(rec), flush=True)
                if step >= total or (cfg.time_budget_s and elapsed > cfg.time_budget_s):
                    return step, time.perf_counter() - t_train
    return step, time.perf_counter() - t_train


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


def train_vqa(cfg: VQATrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate on the test (and shapes holdout) sets, save the model; returns the results dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mcfg = load_vqa_config(cfg.model, cfg.overrides)
    t0 = time.perf_counter()
    sets = load_sets(cfg, mcfg.vision.image_size, mcfg.vision.channels)
    train_set = sets["train"]
    answers = answer_vocab(train_set.answers)
    tokenizer = Tokenizer.train(
        train_set.questions,
        vocab_size=mcfg.text.vocab_size,
        kind=mcfg.text.tokenizer,
        context_length=mcfg.text.context_length,
    )
    text = dataclasses.replace(mcfg.text, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    mcfg = dataclasses.replace(mcfg, text=text, num_answers=len(answers))
    model = VQAModel(mcfg)
    data_s = time.perf_counter() - t0

    tokens = tokenizer(train_set.questions)
    targets = torch.from_numpy(answer_targets(train_set.answers, answers))

    def loss_of(b: dict) -> torch.Tensor:
        logits = model(b["images"], b["tokens"], b["image_index"])["logits"]
        return vqa_loss(logits, targets[torch.from_numpy(b["questions"])])

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step, train_s = train_loop(model, train_set, tokens, cfg, loss_of, mcfg.vision, out / "metrics.jsonl", progress)

    results: dict[str, Any] = {
        "fusion": mcfg.fusion.kind,
        "parameters": num_parameters(model),
        "train_time_s": round(train_s, 1),
        "data_time_s": round(data_s, 1),
        "steps": step,
        "train_questions": len(train_set),
        "answers": len(answers),
        "skipped_rows": train_set.skips.counts,
    }
    for name, data in sets.items():
        if name != "train":
            results[name] = evaluate_vqa(model, data, tokenizer, answers)
    save_vqa(model, out / "model", tokenizer, answers, extra={"train": to_dict(cfg), "results": results})
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_eval(results, out, f"VQA answer classifier ({mcfg.fusion.kind} fusion)")
    return results


def clean_question(question: str) -> str:
    """The question with its whitespace collapsed; a clear error for an empty one."""
    question = " ".join(str(question).split())
    if not question:
        raise ValueError('the question is empty; ask something about the image, e.g. "what colour is the circle?"')
    return question


def image_tensor(image, vision) -> torch.Tensor:
    """One image (path or PIL image) as uint8 pixels (1, C, H, W) at the model's size; clear errors for bad files."""
    from PIL import Image

    from ..data.transforms import pil_to_array

    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except FileNotFoundError:
            raise FileNotFoundError(f"no image at {image}; give the path of a PNG or JPEG file") from None
        except Exception as e:
            raise ValueError(f"cannot read {image} as an image ({type(e).__name__}); give a PNG or JPEG file") from e
    return torch.from_numpy(pil_to_array(image, vision.image_size, vision.channels)).permute(2, 0, 1)[None]


class ClassifierAnswerer:
    """An answer-classifier VQA directory, loaded once, ready to answer one question at a time (the CLI and the
    server share it; ``vqa_generative.GenerativeAnswerer`` is its generative twin)."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu") -> None:
        self.model, self.tokenizer, self.answers = load_vqa(model_dir, device)
        self.device = device

    @torch.no_grad()
    def answer(self, image, question: str, top_k: int = 1) -> list[tuple[str, float]]:
        """``[(answer, probability), ...]``, the ``top_k`` most probable training answers, best first."""
        question = clean_question(question)
        n_tokens = len(self.tokenizer.encode_ids([question])[0]) + 2  # + begin and end tokens
        if n_tokens > self.tokenizer.context_length:
            raise ValueError(
                f"the question has {n_tokens} tokens but the model reads at most {self.tokenizer.context_length}; "
                "ask a shorter question"
            )
        v = self.model.cfg.vision
        x = normalize(image_tensor(image, v), v.mean, v.std).to(self.device)
        probs = self.model(x, self.tokenizer([question]).to(self.device))["logits"][0].softmax(-1)  # (A,)
        p, k = probs.topk(min(top_k, len(self.answers)))
        return [(self.answers[i], float(q)) for q, i in zip(p.tolist(), k.tolist())]


def load_answerer(model_dir: str | os.PathLike, device: str = "cpu"):
    """The answerer for a VQA directory: ``ClassifierAnswerer`` or, for ``vislang train --config vqa-gen`` output,
    ``GenerativeAnswerer``; both have ``answer(image, question, top_k)``."""
    from ..models.vqa import vqa_head

    if vqa_head(model_dir) == "generative":
        from .vqa_generative import GenerativeAnswerer

        return GenerativeAnswerer(model_dir, device)
    return ClassifierAnswerer(model_dir, device)


def predict_answer(model_dir: str, image, question: str, top_k: int = 1) -> list[tuple[str, float]]:
    """``[(answer, probability), ...]`` for one image (path or PIL image) and one question, either VQA head."""
    return load_answerer(model_dir).answer(image, question, top_k)


def check_known_answer(answer: str, answers: list[str]) -> int:
    """Index of ``answer`` in the training vocabulary; a clear error when training never saw it."""
    from ..evaluation.vqa_metrics import normalize_answer

    a = normalize_answer(answer)
    if a not in answers:
        raise ValueError(
            f"the answer {answer!r} never appeared in training, so the model cannot give it; it knows "
            f"{len(answers)} answers, e.g. {', '.join(answers[:8])}"
        )
    return answers.index(a)


def answer_probability(model_dir: str, image, question: str, answer: str) -> float:
    """Probability the model gives ``answer``; a clear error for an answer training never saw (a generative
    answerer scores any answer)."""
    from ..models.vqa import ANSWERS_FILE, vqa_head

    if vqa_head(model_dir) == "generative":
        from .vqa_generative import generative_answer_probability

        return generative_answer_probability(model_dir, image, question, answer)
    answers = json.loads((Path(model_dir) / ANSWERS_FILE).read_text())
    check_known_answer(answer, answers)
    from ..evaluation.vqa_metrics import normalize_answer

    return dict(predict_answer(model_dir, image, question, top_k=len(answers)))[normalize_answer(answer)]
