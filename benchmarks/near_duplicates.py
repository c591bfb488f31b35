"""Near-duplicate detection (``vislang index duplicates``) against exact-hash matching, on OpenClipart with edits.

From ``--n`` OpenClipart test images (evenly spaced, so every category appears) it writes a folder holding each
original and four edited copies (resized to half, centre-cropped to 80%, re-saved as JPEG quality 30, colour and
brightness shifted), plus a byte-identical copy of every fifth original, the one case exact hashing can find.
The folder is indexed with ``vislang index build``'s own function, and both detectors run on that index:

* exact: groups of identical bytes (``find_duplicates(..., near=False)``);
* near: the exact pass plus groups of embeddings with cosine >= threshold, for each ``--thresholds`` value ("groups":
  what the report lists, chains joined; "pairs": only the image pairs whose own cosine passes, each image's 10
  nearest neighbours).

Scores are over pairs: a predicted pair is two images in one reported group; a true pair is two images made from the
same original. OpenClipart comes in series (the same drawing in several colours, icon sets): those pairs count as
false positives here, so precision is a lower bound of what a person would judge.

    python benchmarks/near_duplicates.py                          # 150 originals, the LiT model of runs/lit
    python benchmarks/near_duplicates.py --model runs/demo/model --n 60
    python benchmarks/near_duplicates.py --smoke --model DIR      # 6 originals: checks that it runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from vislang.data import OpenClipart
from vislang.data.transforms import to_mode
from vislang.index import build_index, open_index
from vislang.index.duplicates import find_duplicates, near_pairs


def edits(img: Image.Image) -> dict[str, tuple[Image.Image, str]]:
    """The edited copies of one RGB image: name → (image, format)."""
    w, h = img.size
    cw, ch = int(w * 0.8), int(h * 0.8)
    crop = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    shifted = ImageEnhance.Brightness(ImageEnhance.Color(img).enhance(1.6)).enhance(1.15)
    return {
        "resize": (img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC), "PNG"),
        "crop": (crop, "PNG"),
        "jpeg": (img, "JPEG"),
        "colour": (shifted, "PNG"),
    }


def write_folder(folder: Path, n: int) -> dict[str, int]:
    """Originals, edits and exact copies under ``folder``; returns file name → family (original) number."""
    ds = OpenClipart(split="test")
    picks = np.unique(np.linspace(0, len(ds) - 1, n).round().astype(int))
    family: dict[str, int] = {}
    for f, i in enumerate(picks):
        item = ds[int(i)]
        if item is None:
            continue
        img = to_mode(item[0], 3)  # clip-art composited on white, as the tower sees it
        img.save(folder / f"{f:04d}_orig.png")
        family[f"{f:04d}_orig.png"] = f
        for name, (edited, fmt) in edits(img).items():
            ext = "jpg" if fmt == "JPEG" else "png"
            edited.save(folder / f"{f:04d}_{name}.{ext}", fmt, **({"quality": 30} if fmt == "JPEG" else {}))
            family[f"{f:04d}_{name}.{ext}"] = f
        if f % 5 == 0:
            shutil.copyfile(folder / f"{f:04d}_orig.png", folder / f"{f:04d}_copy.png")
            family[f"{f:04d}_copy.png"] = f
    return family


def pairs_of(groups, name_of: dict[int, str]) -> set[tuple[str, str]]:
    """Every unordered pair of file names inside a reported group."""
    out = set()
    for g in groups:
        names = sorted(name_of[i] for i in g.ids)
        out.update(itertools.combinations(names, 2))
    return out


def score(pred: set, truth: set) -> dict[str, float]:
    tp = len(pred & truth)
    return {
        "pairs_found": len(pred),
        "precision": tp / len(pred) if pred else 1.0,
        "recall": tp / len(truth) if truth else 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/lit/model", help="model directory that embeds the images")
    p.add_argument("--n", type=int, default=150, help="OpenClipart originals (default 150)")
    p.add_argument("--thresholds", default="0.8,0.85,0.9,0.95", help="cosine thresholds to score")
    p.add_argument("--smoke", action="store_true", help="6 originals, one threshold: checks that it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.thresholds = 6, "0.9"
    if not Path(args.model).is_dir():
        raise SystemExit(
            f"error: no model directory {args.model}; train one (vislang train --config lit) or pass --model"
        )
    work = Path(tempfile.mkdtemp(prefix="near-dups-"))
    try:
        folder = work / "images"
        folder.mkdir()
        family = write_folder(folder, args.n)
        t0 = time.perf_counter()
        counts = build_index(str(folder), work / "index", args.model, progress=not args.smoke)
        build_s = time.perf_counter() - t0
        with open_index(work / "index") as ix:
            ids = ix.all_ids() if hasattr(ix, "all_ids") else None
            name_of = {m["id"]: Path(m["path"]).name for m in ix.get([int(i) for i in ids])}
            by_family: dict[int, list[str]] = {}
            for name, f in family.items():
                by_family.setdefault(f, []).append(name)
            truth = {pair for names in by_family.values() for pair in itertools.combinations(sorted(names), 2)}
            rows = {"exact hash": score(pairs_of(find_duplicates(ix, near=False), name_of), truth)}
            for t in (float(x) for x in args.thresholds.split(",")):
                rows[f"groups, cosine >= {t}"] = score(pairs_of(find_duplicates(ix, threshold=t), name_of), truth)
                direct = {tuple(sorted((name_of[a], name_of[b]))) for a, b, _ in near_pairs(ix, ids, t, 10)}
                rows[f"pairs, cosine >= {t}"] = score(direct, truth)
        print(
            f"{len(family)} images from {len(by_family)} OpenClipart originals ({len(truth)} true duplicate pairs); "
            f"indexed with {args.model} at {counts['added'] / max(build_s, 1e-9):.1f} images/s"
        )
        print(f"{'detector':32s} {'pairs':>6s} {'precision':>10s} {'recall':>8s}")  # pairs: how many it reports
        for name, r in rows.items():
            print(f"{name:32s} {r['pairs_found']:6d} {100 * r['precision']:9.1f}% {100 * r['recall']:7.1f}%")
        print(json.dumps({"n_images": len(family), "true_pairs": len(truth), "rows": rows}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
