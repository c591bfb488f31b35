"""Scoring a reader: exact match and character error rate per held-out split, and translation through CC-CEDICT.

Splits come straight from the renderers (item ``i`` is the same in every run), so the numbers here, the training
run and the Tesseract benchmark all see the same images:

* ``zh``: ``test`` (held-out words in the training fonts) and ``test-font`` (training words in the held-out font
  family), from :class:`vislang.data.rendered_zh.RenderedChinese`;
* ``en``: ``test`` (held-out English words), from :class:`vislang.data.rendered_text.RenderedText`.

Pictures without text (``no_text``): shapes scenes and OpenClipart drawings no training image used; a reader should
answer "no text" for them (readers train on blank images and, for zh, on other drawings), not invent characters.

Translation accuracy (zh ``test``): the English ``vislang translate`` shows for an image is one of CC-CEDICT's senses
of the true word; ``translation_if_read_right`` is the same with the true text as the reading (the ceiling that
segmentation and lookup leave).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from PIL import Image

from ..data.cedict import load_dictionary
from ..data.rendered_text import RenderedText
from ..data.rendered_zh import RenderedChinese, clipart_files
from ..data.shapes import ShapesDataset
from ..models.reading import MIN_CONFIDENCE, Reader, translate
from ..tokenizers import detokenize
from .caption_metrics import reading_scores

LANG_SPLITS = {"zh": ("test", "test-font"), "en": ("test",)}
ABOUT = {
    ("zh", "test"): "held-out words (HSK 3-6 words in training characters), training fonts",
    ("zh", "test-font"): "training words in the held-out font family",
    ("en", "test"): "held-out English words",
}


def reading_split(lang: str, split: str, n: int):
    """The rendered dataset of a language's split (``n`` items)."""
    if lang not in LANG_SPLITS or split not in LANG_SPLITS[lang]:
        raise ValueError(f"no split {split!r} for language {lang!r}; choose from {LANG_SPLITS}")
    return RenderedChinese(split, n=n) if lang == "zh" else RenderedText(split, n=n)


def no_text_images(n: int) -> list[Image.Image]:
    """``n`` pictures without text: shapes scenes (``shapes`` test split) and, when OpenClipart is installed,
    drawings from a slice of it the Chinese renderer never draws from (:func:`clipart_files` offset 5), half each."""
    drawings = []
    for p in clipart_files(5, n // 2):
        with Image.open(p) as im:
            drawings.append(im.convert("RGB"))
    shapes = ShapesDataset("test", n=n - len(drawings))
    return [shapes[i][0] for i in range(len(shapes))] + drawings


def _sense_key(text: str) -> str:
    """A sense as compared: lower case, spaces as written (a word tokenizer lower-cases and spaces brackets)."""
    return " ".join(detokenize(text).lower().split())


def gloss_correct(shown: str, truth: str) -> bool:
    """Whether the English ``shown`` is one of CC-CEDICT's senses of the word ``truth``, up to case and the spaces
    around punctuation (an end-to-end model that writes "(business) Company" in lower case wrote the sense)."""
    senses = {_sense_key(s) for e in load_dictionary().lookup(truth) for s in e.senses}
    return bool(shown) and _sense_key(shown) in senses


def translation_correct(predicted: str, truth: str) -> bool:
    """Whether the English shown for ``predicted`` is one of CC-CEDICT's senses of ``truth``."""
    return gloss_correct(translate(predicted)["english"], truth)


def evaluate_reader(model_dir: str, lang: str = "zh", n: int = 500, splits: Sequence[str] | None = None,
                    device: str = "cpu", min_confidence: float = MIN_CONFIDENCE,
                    gloss: bool = False) -> dict[str, Any]:  # fmt: skip
    """Read each split's images with the model; exact match, CER, images/s (and translation accuracy for zh test).

    ``gloss``: the model writes English (``train --config read-zh-gloss``, image to English end to end): exact match
    and CER are against the gloss ``translate`` shows for the true word, and translation accuracy is whether what
    the model wrote is one of the word's senses, on every split."""
    if gloss and lang != "zh":
        raise ValueError("gloss scoring is for Chinese readers (--lang zh)")
    reader = Reader(model_dir, device, min_confidence)  # a refused reading ("no legible text") scores as wrong
    out: dict[str, Any] = {"model": str(model_dir), "lang": lang, "gloss": gloss, "splits": {}}
    for split in splits or LANG_SPLITS[lang]:
        ds = reading_split(lang, split, n)
        images, truth = zip(*((im, t) for im, t, _ in (ds[i] for i in range(len(ds)))))
        t0 = time.perf_counter()
        readings = reader.read(list(images))
        seconds = time.perf_counter() - t0
        texts = [r.text for r in readings]
        target = [load_dictionary().gloss(t) for t in truth] if gloss else list(truth)
        row: dict[str, Any] = {"about": ABOUT[lang, split], "n": len(ds), **reading_scores(texts, target)}
        row["images_per_s"] = len(ds) / seconds
        if gloss:
            row["translation"] = sum(gloss_correct(p, t) for p, t in zip(texts, truth)) / len(ds)
        elif lang == "zh" and split == "test":
            row["translation"] = sum(translation_correct(p, t) for p, t in zip(texts, truth)) / len(ds)
            row["translation_if_read_right"] = sum(translation_correct(t, t) for t in truth) / len(ds)
        row["samples"] = [{"truth": t, "read": p} for p, t in list(zip(texts, target))[:8]]
        out["splits"][split] = row
    if splits is None:
        readings = reader.read(no_text_images(n))
        invented = [r.text for r in readings if r.has_text]
        out["no_text"] = {"about": "pictures without text (shapes scenes, unseen clip art)", "n": len(readings),
                          "answered_no_text": 1 - len(invented) / len(readings), "invented": invented[:8]}  # fmt: skip
    return out


def reading_table(result: dict[str, Any]) -> str:
    """A markdown table of ``evaluate_reader``'s result."""
    lines = ["| split | images | exact match | CER | translation | images/s |", "|---|---:|---:|---:|---:|---:|"]
    for split, r in result["splits"].items():
        tr = f"{r['translation']:.1%}" if "translation" in r else "-"
        if "translation_if_read_right" in r:
            tr += f" (read right: {r['translation_if_read_right']:.1%})"
        lines.append(f"| {split}: {r['about']} | {r['n']} | {r['exact_match']:.1%} | {r['cer']:.2%} | {tr} | "
                     f"{r['images_per_s']:.0f} |")  # fmt: skip
    if "no_text" in result:
        r = result["no_text"]
        said = f'answered "no text": {r["answered_no_text"]:.1%}'
        lines.append(f"| no text: {r['about']} | {r['n']} | {said} | - | - | - |")
    return "\n".join(lines)
