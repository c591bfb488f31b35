"""`vislang read IMAGE...`, `translate IMAGE...` and `read-eval`: thin layers over vislang.models.reading."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

READ_EXAMPLES = """
    Examples:
      vislang read docs/img/read-zh-sample.png --model runs/read-zh/model
      vislang read signs/ --model runs/read-zh/model --json          # a folder; confidence and notes in JSON
    Train a reader first: vislang train --config read-zh (or read-en, read-mixed)"""
TRANSLATE_EXAMPLES = """
    Examples:
      vislang translate docs/img/read-zh-sample.png --model runs/read-zh/model
      vislang translate photo.jpg --model runs/read-zh/model --json  # every sense of every word
    The English is CC-CEDICT's first sense of each word (longest-match segmentation); --json keeps them all."""
EVAL_EXAMPLES = """
    Examples:
      vislang read-eval --model runs/read-zh/model --lang zh              # held-out words, held-out font
      vislang read-eval --model runs/read-en/model --lang en --n 1000
      vislang read-eval --model runs/read-zh-gloss/model --gloss        # image to English, end to end
    Rendered test images are the same in every run; benchmarks/read_vs_tesseract.py scores Tesseract on them."""


def _read_all(args: argparse.Namespace):
    """(path, Reading) per image; an unreadable or oversized file is reported and skipped, never a traceback."""
    from ..inference import list_images  # lazy: `vislang --help` starts without loading torch
    from ..models.reading import ImageInputError, Reader, open_checked  # lazy: `vislang --help` starts without torch

    reader = Reader(args.model, args.device, min_confidence=args.min_confidence)
    paths, images, failed = [], [], 0
    for p in list_images(args.images):
        try:
            images.append(open_checked(p))
            paths.append(str(p))
        except ImageInputError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return list(zip(paths, reader.read(images) if images else [])), failed


def _line(path: str, text: str, many: bool) -> str:
    return f"{path}\t{text}" if many else text


def cmd_read(args: argparse.Namespace, extra: list[str]) -> int:
    pairs, failed = _read_all(args)
    if args.json:
        print(json.dumps([{"image": p, **r.as_dict()} for p, r in pairs], ensure_ascii=False, indent=2))
    else:
        for p, r in pairs:
            print(_line(p, r.text if r.has_text else f"[{r.note}]", len(pairs) > 1))
            if r.has_text and r.note:
                print(f"note: {r.note}", file=sys.stderr)
    return 1 if failed else 0


def cmd_translate(args: argparse.Namespace, extra: list[str]) -> int:
    from ..models.reading import translate  # lazy: `vislang --help` starts without loading torch

    pairs, failed = _read_all(args)
    rows = [{"image": p, **r.as_dict(), **(translate(r.text) if r.has_text else {})} for p, r in pairs]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 1 if failed else 0
    for row in rows:
        head = f"{row['image']}: " if len(rows) > 1 else ""
        if not row["has_text"]:
            print(f"{head}[{row['note']}]")
            continue
        print(f"{head}{row['text']}\t{row['pinyin']}\t{row['english'] or '(not in CC-CEDICT)'}")
    return 1 if failed else 0


def cmd_read_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from ..evaluation.reading import evaluate_reader, reading_table  # lazy: `vislang --help` starts without torch

    res = evaluate_reader(args.model, args.lang, args.n, device=args.device, min_confidence=args.min_confidence,
                          gloss=args.gloss)  # fmt: skip
    print(json.dumps(res, ensure_ascii=False, indent=2) if args.json else reading_table(res))
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return int(text)


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _reading_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("images", nargs="+", help="image files or folders of images")
    sp.add_argument("--model", required=True, help="reading model directory (train --config read-zh)")
    sp.add_argument("--min-confidence", type=_probability, default=0.3,
                    help="readings with less probability are reported as 'no legible text' (default 0.3)")  # fmt: skip
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--json", action="store_true", help="print JSON (confidence, notes, every sense)")


def register(add) -> None:
    """Add `read`, `translate` and `read-eval` (``add(name, help, fn) -> ArgumentParser``)."""
    sp = add("read", "print the text in each image (Chinese or English, as the reading model was trained)", cmd_read)
    sp.epilog = textwrap.dedent(READ_EXAMPLES)
    _reading_options(sp)

    sp = add("translate", "read the Chinese in each image and print it with pinyin and English (CC-CEDICT)",
             cmd_translate)  # fmt: skip
    sp.epilog = textwrap.dedent(TRANSLATE_EXAMPLES)
    _reading_options(sp)

    sp = add("read-eval", "exact match and character error rate of a reader on held-out rendered words and fonts",
             cmd_read_eval)  # fmt: skip
    sp.epilog = textwrap.dedent(EVAL_EXAMPLES)
    sp.add_argument("--model", required=True, help="reading model directory")
    sp.add_argument("--lang", default="zh", choices=["zh", "en"], help="which renderer's held-out splits")
    sp.add_argument("--n", type=_positive_int, default=500, help="images per split (default 500)")
    sp.add_argument("--min-confidence", type=_probability, default=0.3,
                    help="as `read`: weaker readings count as 'no text' (0: score every reading)")  # fmt: skip
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--gloss", action="store_true",
                    help="the model writes English (read-zh-gloss): score it against CC-CEDICT's senses")  # fmt: skip
    sp.add_argument("--json", action="store_true", help="print JSON (with sample readings)")
