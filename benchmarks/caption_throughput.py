"""Captions per second: greedy and beam search, with and without the key/value cache, in the same run.

The peer of the cached decoder is the uncached one (every step recomputes the whole prefix, as a naive decoder does);
the ratio is printed on its own line. The model is the one `configs/caption.yaml` trains (random weights: speed does
not depend on them, but the caption length does, so every row decodes exactly ``--length`` tokens with the end token
disabled).

    python benchmarks/caption_throughput.py                 # 256 images, 20 tokens
    python benchmarks/caption_throughput.py --smoke         # seconds: checks that it runs
    python benchmarks/caption_throughput.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vislang.config import load_file
from vislang.decoding import generate
from vislang.factory import build_model, get_model_config

CONFIG = "src/vislang/configs/caption.yaml"


def bench(model, images, length: int, beam: int, use_cache: bool, repeats: int) -> float:
    """Captions per second (best of ``repeats``), decoding exactly ``length`` tokens (eos_id=-1 never ends)."""
    best = float("inf")
    for _ in range(repeats):
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ids = generate(model, images, max_length=length, beam=beam, use_cache=use_cache, eos_id=-1)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        assert ids.shape == (images.shape[0], length)
    return images.shape[0] / best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="images per generate call")
    p.add_argument("--length", type=int, default=20, help="tokens decoded per caption")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.smoke:
        a.images, a.batch, a.length, a.repeats = 4, 4, 4, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    run = load_file(CONFIG)
    cfg = get_model_config(run["model_name"], run["model"])
    torch.manual_seed(0)
    model = build_model(cfg).to(a.device).eval()
    v = cfg.vision
    images = torch.randint(0, 256, (a.images, v.channels, v.image_size, v.image_size), dtype=torch.uint8)
    rows = {}
    for name, beam in (("greedy", 1), (f"beam{a.beam}", a.beam)):
        for use_cache in (True, False):
            rates = []
            for i in range(0, a.images, a.batch):
                chunk = images[i : i + a.batch].to(a.device)
                rates.append((chunk.shape[0], bench(model, chunk, a.length, beam, use_cache, a.repeats)))
            total_t = sum(n / r for n, r in rates)
            rows[f"{name}/{'cache' if use_cache else 'no_cache'}"] = a.images / total_t
    for k, r in rows.items():
        print(f"{k:20s} {r:10.1f} captions/s")
    for name in ("greedy", f"beam{a.beam}"):
        print(f"ratio {name} cache / no cache: {rows[f'{name}/cache'] / rows[f'{name}/no_cache']:.2f}x")
    res = {"device": a.device, "images": a.images, "batch": a.batch, "length": a.length, "captions_per_s": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
