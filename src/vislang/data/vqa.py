"""VQA data: question sets from the shapes world or from a user's JSONL/CSV file, and the answer vocabulary.

A ``VQASet`` keeps each image once (uint8 array) and points every question at its image, because a scene has about
ten questions and the image tower should run once per image.

File rows: ``image`` (path, relative to the file or ``image_dir``), ``question`` and ``answer`` — a string, a JSON
list, or in CSV several answers separated by ``|`` (JSONL may also use ``answers``). An optional ``type`` column
groups accuracy. Rows with a missing field or an unreadable image are skipped and counted (``VQASet.skips``).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .readers import SkipCounter, clean_caption, decode_image, resolve_path
from .shapes import ShapesConfig, ShapesDataset, render
from .transforms import pil_to_array


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
    import dataclasses

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
    from ..evaluation.vqa_metrics import normalize_answer

    counts = Counter(normalize_answer(a) for refs in answers for a in refs)
    vocab = sorted(counts, key=lambda a: (-counts[a], a))
    return vocab[:max_answers] if max_answers else vocab


def answer_targets(answers: Sequence[Sequence[str]], vocab: Sequence[str]) -> np.ndarray:
    """Soft targets (Q, A): the VQA score each vocabulary answer would get (one-hot with a single reference)."""
    from ..evaluation.vqa_metrics import normalize_answer, vqa_score

    pos = {a: i for i, a in enumerate(vocab)}
    out = np.zeros((len(answers), len(vocab)), dtype=np.float32)
    for q, refs in enumerate(answers):
        for a in {normalize_answer(r) for r in refs}:
            if a in pos:
                out[q, pos[a]] = vqa_score(a, refs)
    return out
