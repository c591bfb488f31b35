"""bf16 against fp32 on this machine: one training step of a built-in dual encoder, and embedding (what ``index build``
runs), each precision measured in the same run, interleaved round by round.

The training step is ``vislang train``'s for a dual encoder: ``ContrastiveTask`` (normalise, caption dedupe, forward,
CLIP loss) under the precision's autocast, backward, gradient clipping, AdamW. Rows: fp32 and bf16, each with
AdamW's default ``foreach`` kernels and with ``fused=True`` (the fused CPU kernel), each row its own model and optimizer
from the same initial weights, on the same batch (random images, 100 distinct captions as Fashion-MNIST's templates
give). Model FLOPs per step are counted once (``torch.utils.flop_counter``); MFU divides the achieved FLOP/s by the
measured matmul peak of the precision (``vislang.precision.peak_flops``: a 2048² matmul, the best ever probed on
this machine at this thread count, cached: delete ``~/.cache/vislang/precision.json`` to probe again on a quiet
machine), and, for a machine other jobs share, also by the same matmul timed once per round between the steps
(median): both slow down alike, so that ratio holds under load where the first does not. Embedding:
``embed_images`` of random images in fp32 and bf16, images/s and the smallest cosine between the two precisions'
embeddings.

Usage::

    python benchmarks/precision_speed.py --model fmnist-cnn --batch-size 256 --threads 1
    python benchmarks/precision_speed.py --model vit-small-p7 --batch-size 128
    python benchmarks/precision_speed.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vislang import precision as prec
from vislang.evaluation.embed import embed_images
from vislang.factory import build_model, get_model_config
from vislang.layers import transformer
from vislang.train.config import OptimConfig
from vislang.train.optim import build_optimizer
from vislang.train.tasks import ContrastiveTask

CPU = torch.device("cpu")
PEAK_N = 2048  # the matmul size MFU's peak is measured on (as the issue measured it: 776 GFLOP/s bf16 then)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """SDPA's fused kernel everywhere, as before vislang computed attention explicitly in half precision on a CPU."""
    saved, transformer.EXPLICIT_MAX_SCORES = transformer.EXPLICIT_MAX_SCORES, -1
    try:
        yield
    finally:
        transformer.EXPLICIT_MAX_SCORES = saved


def make_row(mcfg, fused: bool) -> tuple[torch.nn.Module, ContrastiveTask, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(mcfg).train()
    if mcfg.vision.arch == "cnn":
        model.visual.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, OptimConfig())
    for g in opt.param_groups:
        g["fused"], g["foreach"] = fused, not fused
    return model, ContrastiveTask(model), opt


def make_batch(mcfg, batch_size: int) -> dict[str, torch.Tensor]:
    v, t = mcfg.vision, mcfg.text
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, v.channels, v.image_size, v.image_size), dtype=torch.uint8, generator=g)
    if v.arch == "cnn":
        images = images.contiguous(memory_format=torch.channels_last)
    captions = torch.randint(4, t.vocab_size, (100, t.context_length), generator=g)
    captions[:, 0], captions[:, 12], captions[:, 13:] = 1, 2, 0  # begin, end, padding
    return {"image": images, "tokens": captions[torch.randint(0, 100, (batch_size,), generator=g)]}


def train_step(row, batch: dict[str, torch.Tensor], precision: str) -> None:
    model, task, opt = row
    with prec.autocast(precision, CPU):
        loss, _ = task(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fmnist-cnn", help="a built-in dual-encoder config (vislang models)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (each row one step per round) after one warmup")
    p.add_argument("--embed-images", type=int, default=2048, help="images embedded per precision and round; 0 = skip")
    p.add_argument("--threads", type=int, help="torch threads (default torch's own choice)")
    p.add_argument("--sdpa-row", action="store_true", help="one more bf16 row with SDPA's fused attention kernel "
                   "(what vislang used before its explicit CPU attention), interleaved with the others")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that it runs")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.rounds, args.embed_images, args.threads, args.sdpa_row = 16, 1, 32, 1, True
    if args.threads:
        torch.set_num_threads(args.threads)
    mcfg = get_model_config(args.model, {"text": {"vocab_size": 1000}})
    batch = make_batch(mcfg, args.batch_size)
    rows = {(pr, fused): make_row(mcfg, fused) for pr in ("fp32", "bf16") for fused in (False, True)}
    model, task, _ = rows[("fp32", False)]
    flops = prec.count_flops(lambda: task(batch)[0].backward())
    model.zero_grad(set_to_none=True)
    times: dict[tuple[str, bool], list[float]] = {k: [] for k in rows}
    matmul = {pr: torch.randn(PEAK_N, PEAK_N).to(prec.DTYPES.get(pr, torch.float32)) for pr in ("fp32", "bf16")}
    now: dict[str, list[float]] = {pr: [] for pr in matmul}  # a 2048² matmul's FLOP/s in the same rounds
    sdpa_row, sdpa_times = (make_row(mcfg, False) if args.sdpa_row else None), []
    for r in range(args.rounds + 1):
        for (pr, fused), row in rows.items():
            t0 = time.perf_counter()
            train_step(row, batch, pr)
            if r:
                times[(pr, fused)].append(time.perf_counter() - t0)
        if sdpa_row is not None:
            with fused_attention():
                t0 = time.perf_counter()
                train_step(sdpa_row, batch, "bf16")
                if r:
                    sdpa_times.append(time.perf_counter() - t0)
        for pr, m in matmul.items():
            t0 = time.perf_counter()
            m @ m
            if r:
                now[pr].append(2 * PEAK_N**3 / (time.perf_counter() - t0))
    peak = {pr: prec.peak_flops(pr, CPU, PEAK_N) for pr in ("fp32", "bf16")}
    peak_now = {pr: statistics.median(v) for pr, v in now.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"precision_speed: {args.model}, batch {args.batch_size}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, CPU {prec.cpu_name()} (native bf16: {prec.native_bf16(CPU)})")  # fmt: skip
    print(f"{flops / 1e9:.1f} GFLOP per step; measured peak (best probe on this machine) fp32 "
          f"{peak['fp32'] / 1e9:.0f}, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; a {PEAK_N}² matmul timed between the "
          f"steps of each round: fp32 {peak_now['fp32'] / 1e9:.0f}, bf16 {peak_now['bf16'] / 1e9:.0f}")  # fmt: skip
    rows_out = {}
    for (pr, fused), t in med.items():
        name = f"{pr} {'fused' if fused else 'foreach'} AdamW"
        mfu, mfu_now = flops / t / peak[pr], flops / t / peak_now[pr]
        rows_out[name] = dict(ms_per_step=1000 * t, gflop_per_s=flops / t / 1e9, mfu=mfu, mfu_same_rounds=mfu_now)
        print(f"  {name:22s} {1000 * t:8.0f} ms/step {flops / t / 1e9:8.1f} GFLOP/s  MFU {mfu:.1%} of the best "
              f"probe, {mfu_now:.1%} of the matmul in the same rounds")  # fmt: skip
    ratio = med[("fp32", False)] / med[("bf16", False)]
    fused = {pr: med[(pr, False)] / med[(pr, True)] for pr in ("fp32", "bf16")}
    print(f"fused/foreach AdamW: fp32 {fused['fp32']:.2f}x, bf16 {fused['bf16']:.2f}x")
    sdpa = None
    if sdpa_times:
        t = statistics.median(sdpa_times)
        sdpa = {"ms_per_step": 1000 * t, "mfu": flops / t / peak["bf16"], "explicit_speedup": t / med[("bf16", False)]}
        print(f"  bf16 with SDPA's fused attention {1000 * t:8.0f} ms/step: explicit attention "
              f"{sdpa['explicit_speedup']:.2f}x its steps/s")  # fmt: skip
    embed = embed_speed(mcfg, args.embed_images, args.rounds) if args.embed_images else None
    print(f"ratio bf16/fp32 training steps/s = {ratio:.2f}")
    result = {"benchmark": "precision_speed", "model": args.model, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "cpu": prec.cpu_name(), "gflop_per_step": flops / 1e9,
              "peak_gflop_per_s": {k: v / 1e9 for k, v in peak.items()},
              "peak_same_rounds_gflop_per_s": {k: v / 1e9 for k, v in peak_now.items()}, "rows": rows_out,
              "fused_ratio": fused, "sdpa_attention": sdpa,
              "embed": embed, "ratio": ratio, "smoke": args.smoke}  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def embed_speed(mcfg, n: int, rounds: int) -> dict[str, float]:
    """Images/s of ``embed_images`` in fp32 and bf16 (interleaved) and the smallest cosine between them."""
    torch.manual_seed(0)
    model = build_model(mcfg).eval()
    v = mcfg.vision
    images = torch.randint(0, 256, (n, v.channels, v.image_size, v.image_size), dtype=torch.uint8)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    out = {}
    for r in range(rounds + 1):
        for pr in times:
            t0 = time.perf_counter()
            out[pr] = embed_images(model, images, batch_size=256, precision=pr)
            if r:
                times[pr].append(time.perf_counter() - t0)
    rate = {pr: n / statistics.median(t) for pr, t in times.items()}
    cos = float(torch.nn.functional.cosine_similarity(out["fp32"], out["bf16"]).min())
    print(f"embedding {n} images: fp32 {rate['fp32']:.0f} img/s, bf16 {rate['bf16']:.0f} img/s "
          f"({rate['bf16'] / rate['fp32']:.2f}x), min cosine {cos:.5f} (random weights)")  # fmt: skip
    return {"fp32_images_per_s": rate["fp32"], "bf16_images_per_s": rate["bf16"], "min_cosine": cos}


if __name__ == "__main__":
    main()
