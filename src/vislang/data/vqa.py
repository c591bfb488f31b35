"""VQA data: question sets from the shapes world or from a user's JSONL/CSV file, and the answer vocabulary.

A ``VQASet`` keeps each image once (uint8 array) and points every question at its image, because a scene has about
ten questions and the image tower should run once per image.

File rows: ``image`` (path, relative to the file or ``image_dir``), ``question`` and ``answer`` — a string, a JSON
list, or in CSV several answers separated by ``|`` (JSONL may also use ``answers``). An optional ``type`` column
groups accuracy. Rows with a missing field or an unreadable image are skipped and counted (``VQASet.skips``).

Batches (``make_batch``) are a few images plus every question about them (``QuestionIndex`` finds them), for training
(``train.tasks.vqa``) and evaluation (``evaluation.vqa``) of both VQA heads alike.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..evaluation.vqa_metrics import normalize_answer, vqa_score
from .readers import SkipCounter, clean_caption, decode_image, resolve_path
from .shapes import ShapesConfig, ShapesDataset, render
from .transforms import normalize, pil_to_array


@dataclass
class VQASet:
    images: np.ndarray  # (N_img, H, W, C) uint8
    image_index: np.ndarray  # (Q,) int64: the image of each question
    questions: list[str]
    answers: list[list[str]]  # reference answers per question (one or several)
    types: list[str]  # question type per question ("colour", "count", ...; "all" when the source has none)
    skips: SkipCounter = field(default_factory=SkipCounter)

    def __len__(self) -> int:
        return len(self.questions)

    def top_answers(self) -> list[str]:
        """The most common reference answer of each question (its training label)."""
        return [Counter(a).most_common(1)[0][0] for a in self.answers]


def shapes_vqa(
    split: str = "train", n: int = 2000, image_size: int = 64, seed: int = 0, cfg: ShapesConfig | None = None
) -> VQASet:
    """All questions of ``n`` shapes scenes (each answer is one exact word)."""
    cfg = dataclasses.replace(cfg or ShapesConfig(), image_size=image_size)
    ds = ShapesDataset(split, n=n, cfg=cfg, seed=seed)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    index, questions, answers, types = [], [], [], []
    for i in range(n):
        images[i] = np.asarray(render(ds.scene(i)))
        for q in ds.questions(i):
            index.append(i)
            questions.append(q["question"])
            answers.append([q["answer"]])
            types.append(q["type"])
    return VQASet(images, np.asarray(index, dtype=np.int64), questions, answers, types)


def _parse_answers(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = value
    else:
        text = str(value).strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                items = [text]
        else:
            items = text.split("|")
    return [a for a in (clean_caption(x) for x in items) if a]


def _rows(path: Path) -> list[dict]:
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append({})  # counted below as a row with missing fields
        return rows
    raise ValueError(f"{path}: VQA files must be .jsonl, .csv or .tsv")


def read_vqa_file(
    path: str | os.PathLike,
    image_size: int = 64,
    channels: int = 3,
    image_dir: str | os.PathLike | None = None,
    img_key: str = "image",
    question_key: str = "question",
    answer_key: str = "answer",
    type_key: str = "type",
) -> VQASet:
    """Rows of image, question, answer(s) from a JSONL or CSV file; unusable rows are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no VQA file at {path}; give a .jsonl or .csv with image, question, answer columns")
    root = Path(image_dir) if image_dir else path.parent
    skips = SkipCounter()
    slot: dict[str, int] = {}
    images, index, questions, answers, types = [], [], [], [], []
    for row in _rows(path):
        img, q = row.get(img_key), clean_caption(row.get(question_key))
        ans = _parse_answers(row.get(answer_key, row.get("answers")))
        if not img or not q or not ans:
            skips.count("row with a missing field", img)
            continue
        file = resolve_path(str(img), root)
        if file not in slot:
            try:
                with open(file, "rb") as f:
                    pil = decode_image(f.read())
                images.append(pil_to_array(pil, image_size, channels))
                slot[file] = len(images) - 1
            except Exception:
                slot[file] = -1
        if slot[file] < 0:
            skips.count("unreadable image", file)
            continue
        index.append(slot[file])
        questions.append(q)
        answers.append(ans)
        types.append(str(row.get(type_key) or "all"))
    if not questions:
        raise ValueError(f"{path}: no usable rows ({skips.summary()}); each row needs image, question and answer")
    arr = np.stack(images) if images else np.zeros((0, image_size, image_size, channels), np.uint8)
    return VQASet(arr, np.asarray(index, dtype=np.int64), questions, answers, types, skips)


def answer_vocab(answers: Sequence[Sequence[str]], max_answers: int | None = None) -> list[str]:
    """Training answers by frequency (ties alphabetical), optionally the ``max_answers`` most common."""
    counts = Counter(normalize_answer(a) for refs in answers for a in refs)
    vocab = sorted(counts, key=lambda a: (-counts[a], a))
    return vocab[:max_answers] if max_answers else vocab


def answer_targets(answers: Sequence[Sequence[str]], vocab: Sequence[str]) -> np.ndarray:
    """Soft targets (Q, A): the VQA score each vocabulary answer would get (one-hot with a single reference)."""
    pos = {a: i for i, a in enumerate(vocab)}
    out = np.zeros((len(answers), len(vocab)), dtype=np.float32)
    for q, refs in enumerate(answers):
        for a in {normalize_answer(r) for r in refs}:
            if a in pos:
                out[q, pos[a]] = vqa_score(a, refs)
    return out


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
