"""Reading held-out rendered text: a vislang reader against Tesseract 5 on the same images, in the same run.

Both read the images `vislang read-eval` scores (the renderers' fixed test splits: Chinese held-out words and the
held-out font family, or English held-out words), and are scored the same way: exact match and character error rate
after joining Chinese characters (Tesseract spaces them apart), and images per second on this machine. The ratio
vislang / Tesseract of exact match and of images/s is printed on lines of their own.

Tesseract gets its best footing: the LSTM engine (``--oem 1``), ``chi_sim`` or ``eng``, one text line (``--psm 7``),
and each 64-px image upscaled 4x (Lanczos) to 256 px, since it reads best at 20-40 px glyph heights. A fifth of the
Chinese items are written top to bottom: where ``chi_sim_vert`` is installed (Debian ``tesseract-ocr-chi-sim-vert``),
each Chinese image is also read as a vertical block (``chi_sim_vert``, ``--psm 5``) and the reading Tesseract is
more confident of is kept (``--tesseract-vertical auto``, the default; its images/s then pays for both passes).
``--tesseract-vertical off`` reads every image as one horizontal line, as the benchmark did before.

    python benchmarks/read_vs_tesseract.py --model runs/read-zh/model --lang zh --n 200
    python benchmarks/read_vs_tesseract.py --model runs/read-en/model --lang en --n 200
    python benchmarks/read_vs_tesseract.py --model M --smoke        # a few images: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image

from vislang.evaluation.caption_metrics import reading_scores
from vislang.evaluation.reading import LANG_SPLITS, reading_split
from vislang.models.reading import Reader, tidy

TESS_LANG = {"zh": "chi_sim", "en": "eng"}


def has_vertical_model() -> bool:
    """Whether Tesseract has its vertical Chinese model (``chi_sim_vert``)."""
    import pytesseract

    return "chi_sim_vert" in pytesseract.get_languages(config="")


def _confident_text(img: Image.Image, lang: str, config: str) -> tuple[str, float]:
    """Tesseract's text and its mean word confidence (0-100; -1 when it found no word)."""
    import pytesseract

    d = pytesseract.image_to_data(img, lang=lang, config=config, output_type=pytesseract.Output.DICT)
    words = [(w, float(c)) for w, c in zip(d["text"], d["conf"]) if w.strip() and float(c) >= 0]
    return tidy("".join(w for w, _ in words)), (sum(c for _, c in words) / len(words) if words else -1.0)


def tesseract_read(
    images: list[Image.Image], lang: str, upscale: int = 4, vertical: bool = False
) -> tuple[list[str], float]:
    """Tesseract's text for each image and the seconds it took (one call per image, as its CLI reads files).
    ``vertical``: also read each image as a vertical block with ``chi_sim_vert`` and keep the more confident text."""
    import pytesseract

    config = "--oem 1 --psm 7"
    t = time.perf_counter()
    out = []
    for img in images:
        big = img.resize((img.width * upscale, img.height * upscale), Image.LANCZOS)
        if not vertical:
            out.append(tidy(pytesseract.image_to_string(big, lang=TESS_LANG[lang], config=config)))
            continue
        across = _confident_text(big, TESS_LANG[lang], config)
        down = _confident_text(big, "chi_sim_vert", "--oem 1 --psm 5")
        out.append(max(across, down, key=lambda r: r[1])[0])
    return out, time.perf_counter() - t


def vislang_read(reader: Reader, images: list[Image.Image]) -> tuple[list[str], float]:
    t = time.perf_counter()
    texts = [r.text for r in reader.read(images)]
    return texts, time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a reading model directory (vislang train --config read-zh)")
    p.add_argument("--lang", default="zh", choices=sorted(LANG_SPLITS))
    p.add_argument("--n", type=int, default=200, help="images per split")
    p.add_argument("--threads", type=int, default=None, help="torch threads (Tesseract uses OMP_THREAD_LIMIT)")
    p.add_argument("--tesseract-vertical", choices=("auto", "off"), default="auto",
                   help="zh: also read each image as a vertical block with chi_sim_vert and keep the more confident "
                        "reading (auto: where chi_sim_vert is installed)")  # fmt: skip
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.smoke:
        a.n = 3
    if a.threads:
        torch.set_num_threads(a.threads)
    reader = Reader(a.model)
    vertical = a.lang == "zh" and a.tesseract_vertical == "auto" and has_vertical_model()
    results: dict = {"model": a.model, "lang": a.lang, "n": a.n, "tesseract_vertical": vertical, "splits": {}}
    how = "a horizontal line or a vertical block (chi_sim_vert), the more confident" if vertical else "one line"
    print(f"Tesseract reads each image as {how}")
    for split in LANG_SPLITS[a.lang]:
        ds = reading_split(a.lang, split, a.n)
        images, truth = [], []
        for i in range(len(ds)):
            img, text, _ = ds[i]
            images.append(img)
            truth.append(text)
        vis, vis_s = vislang_read(reader, images)
        tes, tes_s = tesseract_read(images, a.lang, vertical=vertical)
        row = {
            "vislang": {**reading_scores(vis, truth), "images_per_s": len(images) / vis_s},
            "tesseract": {**reading_scores(tes, truth), "images_per_s": len(images) / tes_s},
            "samples": [{"truth": t, "vislang": v, "tesseract": s} for t, v, s in zip(truth, vis, tes)][:6],
        }
        results["splits"][split] = row
        print(f"\n{a.lang} {split} ({len(images)} images)")
        print("| reader | exact match | CER | images/s |\n|---|---:|---:|---:|")
        for who in ("vislang", "tesseract"):
            r = row[who]
            print(f"| {who} | {r['exact_match']:.1%} | {r['cer']:.2%} | {r['images_per_s']:.1f} |")
        v, t = row["vislang"], row["tesseract"]
        exact_ratio = v["exact_match"] / t["exact_match"] if t["exact_match"] else float("inf")
        print(f"ratio vislang/tesseract exact match: {exact_ratio:.2f}x")
        print(f"ratio vislang/tesseract images/s: {v['images_per_s'] / t['images_per_s']:.2f}x")
        for s in row["samples"]:
            print(f"  truth {s['truth']!r}  vislang {s['vislang']!r}  tesseract {s['tesseract']!r}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=2)
    return results


if __name__ == "__main__":
    main()
