"""Train and evaluate a VQA answer classifier: the pieces of ``task: vqa``, which trains in the one loop.

A batch is ``batch_images`` images plus every question about them, so the image tower runs once per image. Training
runs in ``train.loop`` as ``train.tasks.vqa.VQAClassifierTask`` (resume, torchrun, budgets and checkpoints come from
the loop); ``train_vqa`` keeps the old entry point and flat run config (``VQATrainConfig``). The data (``load_sets``,
``make_batch``), the input checks and the evaluation files (``write_eval``) are shared with the generative answerer
(``vqa_generative``), which trains a captioner on the same batches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ..config import apply_overrides, from_dict, load_file
from ..data.transforms import normalize
from ..data.vqa import VQASet, read_vqa_file, shapes_vqa
from ..evaluation.vqa_metrics import vqa_accuracy
from ..models.fusion import FUSIONS
from ..models.vqa import VQAConfig, VQAModel, load_vqa
from ..train.config import OptimConfig, VQATrainConfig  # noqa: F401  (VQATrainConfig: re-exported)

EVAL_DIR = "eval"  # OUT/eval: the per-type accuracy table of every evaluated split
RunConfig = TypeVar("RunConfig")


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


def load_vqa_config(name_or_path: str, overrides: tuple[str, ...] | list[str] | dict[str, Any] = ()) -> VQAConfig:
    from ..models.vqa import MODEL_TYPE as VQA_TYPE
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
        data = apply_overrides(data, overrides if isinstance(overrides, dict) else list(overrides))
    cfg = from_dict(VQAConfig, data, "model")
    if cfg.fusion.kind not in FUSIONS:
        raise ValueError(f"unknown fusion {cfg.fusion.kind!r}; choose one of {list(FUSIONS)}")
    return cfg


def load_sets(cfg, seed: int, image_size: int, channels: int) -> dict[str, VQASet]:
    """Train and held-out sets of a VQA run (``cfg``: a ``VQATaskConfig`` or ``VQATrainConfig``)."""
    if cfg.data == "shapes":
        return {
            "train": shapes_vqa("train", cfg.n_train, image_size, seed=seed),
            "test": shapes_vqa("test", cfg.n_test, image_size, seed=seed),
            "holdout": shapes_vqa("holdout", cfg.n_test, image_size, seed=seed),
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
