"""OpenClipart retrieval with LiT (locked towers, trained projections) against chance and random towers.

The recipe is the library's: ``vislang train --config lit`` (``src/vislang/configs/lit.yaml``) locks the ImageNet
EfficientNet-Lite0 and all-MiniLM-L6-v2 towers of ``effnet-lite0-minilm``, computes their outputs once into the
feature cache (``.cache/vislang/features``, keyed by weights, preprocessing and data), trains ``image_proj``,
``text_proj`` and the temperature on it in the one training loop, keeps the epoch that scores best on 10% of the
training pairs held back (whole captions, none of them among the kept pairs), adds a caption memory (an image is
also described by the captions of its nearest training images: the kept ones while training, every pair once the
best epoch is chosen, ``lit.memory_all``), and measures the OpenClipart test split once,
at the end. This script runs that config
twice, with the pretrained towers and with random ones (``vision.pretrained=null``, ``text.hf_load_weights=false``,
same seed: how much comes from pretraining rather than from the trained projections), prints one table, and checks
that the saved model's ``encode_image``/``encode_text`` equal its projections of the cached features.

Usage::

    python examples/openclipart_frozen.py                 # the full run (same as `vislang train --config lit`)
    python examples/openclipart_frozen.py --smoke         # seconds: a few items at 64 px (used by tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vislang  # noqa: E402
from vislang.config import PACKAGED_CONFIGS  # noqa: E402
from vislang.data.features import load_features, tensors_hash  # noqa: E402
from vislang.data.sources import open_dataset  # noqa: E402
from vislang.train import load_train_config, train  # noqa: E402

# Random towers have no classifier either: lit.yaml's class view off, and 512 trained dims as lit.yaml's.
RANDOM_TOWERS = ["model.vision.pretrained=null", "model.text.hf_load_weights=false", "model.memory.class_weight=0",
                 "model.embed_dim=896"]  # fmt: skip
SMOKE = ["data.max_train=24", "data.max_val=12", "epochs=2", "batch_size=8", "model.vision.image_size=64",
         "lit.workers=0", "progress=false"]  # fmt: skip
KS = (1, 5, 10)


def run(name: str, overrides: list[str], out: Path) -> dict:
    """Train the lit config with ``overrides`` into ``out/name``; its eval/retrieval.json."""
    cfg = load_train_config(PACKAGED_CONFIGS / "lit.yaml", [*overrides, f"out_dir={out / name}"])
    train(cfg)
    return json.loads((out / name / "eval" / "retrieval.json").read_text())


def check_saved_model(model_dir: Path, cache_dir: Path, n: int = 3) -> float:
    """Max |difference| between the saved model's encoders and the heads on cached test features of ``n`` items."""
    model, _, preprocess = vislang.create_model_and_transforms(model_dir)
    tokenizer = vislang.get_tokenizer(model_dir)
    tower = tensors_hash(model.visual)  # the cache entry of this model's towers on the test split
    metas = {p: json.loads((p / "meta.json").read_text()) for p in cache_dir.iterdir() if (p / "meta.json").is_file()}
    entry = next(p for p, m in metas.items() if m["key"]["image_tower"] == tower and "test" in m["key"]["name"])
    feats = load_features(entry)
    test = open_dataset("openclipart", split="test")
    rows = list(range(min(n, len(feats))))
    images = torch.stack([preprocess(test[int(feats.index[r])][0]) for r in rows])
    with torch.inference_mode():
        full = torch.cat([model.encode_image(images), model.encode_text(tokenizer([feats.captions[r] for r in rows]))])
        path = torch.cat([
            model.project_image(torch.from_numpy(np.asarray(feats.image[rows]))),  # heads (+ the caption memory)
            model.project_text(torch.from_numpy(np.asarray(feats.text[rows]))),
        ])  # fmt: skip
    err = float((full - path).abs().max())
    assert err < 2e-4, f"the saved model differs from the feature path by {err:.2e}"
    return err


def table(rows: dict[str, dict]) -> list[str]:
    """R@1/5/10 (%) both ways per model, then chance."""
    cell = lambda r, key: "".join(f"{100 * r[f'{key}_R@{k}']:8.1f}" for k in KS)  # noqa: E731
    lines = [f"{'':36s}{'text→image R@1/5/10 (%)':>26s}   {'image→text R@1/5/10 (%)':>26s}"]
    for name, r in rows.items():
        lines.append(f"{name:36s}  {cell(r, 'text_to_image')}   {cell(r, 'image_to_text')}")
    r = next(iter(rows.values()))
    lines.append(
        f"{'chance (random ranking)':36s}  {cell(r, 'text_to_image_chance')}   {cell(r, 'image_to_text_chance')}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few items at 64 px, two epochs: checks that it runs")
    p.add_argument("--out-dir", type=Path, default=Path("runs/openclipart-lit"), help="one run folder per model")
    args = p.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="openclipart-smoke-")) if args.smoke else args.out_dir
    cache = out / "cache" if args.smoke else Path(".cache/vislang/features")
    extra = [*SMOKE, f"lit.cache_dir={cache}"] if args.smoke else []
    try:
        results = {
            "pretrained towers (locked)": run("pretrained", extra, out),
            "random towers (locked, same seed)": run("random", [*extra, *RANDOM_TOWERS], out),
        }
        err = check_saved_model(out / "pretrained" / "model", cache)
        print(f"saved model: its encode_image/encode_text match the feature path (max |diff| {err:.1e})")
        test = results["pretrained towers (locked)"]["test"]
        print(f"\nOpenClipart test split: {test['n_images']} images, {test['n_texts']} distinct captions as queries")
        print("\n".join(table({name: r["test"] for name, r in results.items()})))
    finally:
        if args.smoke:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
