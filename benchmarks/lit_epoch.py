"""A LiT epoch on cached features against the same epoch through the locked towers, and feature extraction speed.

``vislang train --model_name=effnet-lite0-minilm`` (task contrastive) runs both locked towers on every image of every
epoch; ``vislang train --config lit`` runs them once into the feature cache and trains the same heads on it. Both
epochs here train the same heads with the same loss on the same ``--n`` OpenClipart pairs (batch ``--batch``), the
uncached one through the contrastive task's real objective on 224 px images already decoded (as a prepared dataset
holds them), the cached one through the LiT task's heads on the towers' outputs. Epochs alternate, ``--rounds``
each, and the ratio is the median of the per-round ratios: a load that comes and goes hits both alike.

Extraction is timed once, by ``cached_features`` itself (decoding the PNGs included) into a temporary cache.

    python benchmarks/lit_epoch.py                  # 128 pairs, 3 rounds
    python benchmarks/lit_epoch.py --smoke          # 16 pairs at 64 px, 1 round: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

import vislang
from vislang.data.features import FirstN, cached_features
from vislang.data.sources import open_dataset
from vislang.data.transforms import pil_to_array
from vislang.losses import ClipLoss
from vislang.train.tasks.contrastive import ContrastiveTask
from vislang.train.tasks.lit import Heads, feature_key, tower_functions


def uncached_epoch(task: ContrastiveTask, images: torch.Tensor, tokens: torch.Tensor, batch: int) -> float:
    """Seconds for forward + backward of every batch through the towers and heads."""
    t0 = time.perf_counter()
    for s in range(0, len(images) - batch + 1, batch):
        loss, _ = task({"image": images[s : s + batch], "tokens": tokens[s : s + batch]})
        loss.backward()
    return time.perf_counter() - t0


def cached_epoch(heads: Heads, img: torch.Tensor, txt: torch.Tensor, batch: int) -> float:
    """Seconds for forward + backward of every batch through the heads alone."""
    loss_fn = ClipLoss()
    t0 = time.perf_counter()
    for s in range(0, len(img) - batch + 1, batch):
        out = heads(img[s : s + batch], txt[s : s + batch])
        loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=128, help="OpenClipart training pairs (default 128)")
    p.add_argument("--batch", type=int, default=64, help="pairs per step (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="alternating epochs of each kind (default 3)")
    p.add_argument("--image-size", type=int, default=224, help="tower input size (default 224)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="16 pairs at 64 px, one round: checks that it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.batch, args.rounds, args.image_size = 16, 8, 1, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = {"vision.image_size": args.image_size}
    model, _, _ = vislang.create_model_and_transforms("effnet-lite0-minilm", **overrides)
    tokenizer = vislang.get_tokenizer("effnet-lite0-minilm")
    data = FirstN(open_dataset("openclipart", split="train"), args.n)
    cache = tempfile.mkdtemp(prefix="lit-epoch-")
    try:
        image_fn, text_fn = tower_functions(model, tokenizer)
        t0 = time.perf_counter()
        feats = cached_features(
            data, image_fn, text_fn, cache, feature_key(model, tokenizer, "bench"), args.image_size, 3,
            model.visual.width, model.text.width, batch_size=args.batch, workers=0, progress=not args.smoke,
        )  # fmt: skip
        extract_s = time.perf_counter() - t0
        img, txt = torch.from_numpy(np.array(feats.image)), torch.from_numpy(np.array(feats.text))  # (N, D) copies
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    keep = feats.index  # readable items, in order
    images = torch.from_numpy(np.stack([pil_to_array(data[int(i)][0], args.image_size, 3) for i in keep]))
    images = images.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # (N, 3, H, W) uint8
    tokens = tokenizer(list(feats.captions))
    model.visual.to(memory_format=torch.channels_last)
    task, heads = ContrastiveTask(model, dedupe_text=False), Heads(model)
    model.train()  # the locked towers stay in eval mode (CLIP.train keeps them there)
    uncached, cached = [], []
    for _ in range(args.rounds):
        uncached.append(uncached_epoch(task, images, tokens, args.batch))
        cached.append(cached_epoch(heads, img, txt, args.batch))
    ratios = [u / c for u, c in zip(uncached, cached)]
    result = {
        "pairs": len(keep),
        "batch": args.batch,
        "image_size": args.image_size,
        "threads": torch.get_num_threads(),
        "extraction_images_per_s": round(len(data) / extract_s, 2),
        "uncached_epoch_s": [round(x, 4) for x in uncached],
        "cached_epoch_s": [round(x, 5) for x in cached],
        "uncached_over_cached": round(float(np.median(ratios)), 1),
    }
    print(
        f"feature extraction: {result['extraction_images_per_s']} images/s ({len(data)} PNGs, decoding included, "
        f"{args.image_size} px, {result['threads']} threads)"
    )
    print(
        f"epoch of {len(keep)} pairs: through the locked towers {np.median(uncached):.2f} s, on cached features "
        f"{np.median(cached) * 1e3:.1f} ms: cached is {result['uncached_over_cached']}x faster (median of "
        f"{args.rounds} alternating rounds)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
