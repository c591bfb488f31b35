"""Training throughput against OpenCLIP: image–text pairs per second, same model config, same data, same run.

One dual encoder — the built-in ``vit-tiny-p4`` config: a ViT image tower (28 px, 1 channel, patch 4, width 128,
4 layers, 4 heads, MLP ratio 4) and a causal Transformer text tower (context 24, width 128, 2 layers, 4 heads, end
token pooling), embed dim 128 — is built twice: by vislang and by OpenCLIP as a custom ``open_clip.CLIP`` from
``CLIPVisionCfg`` / ``CLIPTextCfg``. Both train with the CLIP loss, AdamW (same lr, betas, eps, decay), gradient
clipping at 1.0 and the same precision on the CPU (``--precision``: auto is bf16 autocast, OpenCLIP's ``amp_bf16``,
where the CPU has native bf16, else fp32), each with its own training step:

* vislang: the step of ``vislang.train.train`` — ``ContrastiveTask`` (normalise uint8 → float, dedupe the
  batch's captions, forward, ``ClipLoss``), backward, ``lr_at``/``set_lr``, ``clip_grad_norm_``, AdamW step.
* OpenCLIP: the step of ``open_clip_train.train.train_one_epoch`` — scheduler, ``model(images, texts)`` →
  ``open_clip.ClipLoss`` → backward → ``clip_grad_norm_`` → AdamW step → clamp ``logit_scale`` to log(100).

The data path is the same object for both: Fashion-MNIST prepared once (``vislang.data.prepare``) into uint8 memmaps,
captions tokenized once by one BPE tokenizer trained on them, batches read by ``TokenizedPairs.get_batch`` through
``batch_loader`` in the same order, and normalised per step by the same ``normalize`` (inside ``ContrastiveTask`` on
the vislang side, in the step on the OpenCLIP side). Batch reading is inside the timed loop on both sides.

Two details make the OpenCLIP model the same model:

* OpenCLIP's ViT hard-codes a 3-channel patch embedding; its ``visual.conv1`` is replaced by the same convolution
  with 1 input channel, so both read the same grayscale pixels (no replicated RGB copy on one side).
* OpenCLIP pools the text at ``argmax(ids)`` by default, which is the end token only for OpenAI's vocabulary (where
  ``<end_of_text>`` has the highest id). vislang's BPE puts ``[EOS]`` at id 3, so the OpenCLIP text tower is built
  with ``pool_type="eos"`` and ``eos_id=tokenizer.eos_id``: it pools at the first end token, as vislang does.

Rows are timed in turn (A B C, A B C, ...) after warmup steps, a few steps per round, so a change of load on the
machine hits every row. Each step is timed on its own; a row's pairs/s is the batch size over its median step time,
which a shared machine's occasional stalls do not move, and the ratio of those is the headline ``ratio`` line (the
plain total-time throughput and its ratio are printed too). The middle row is vislang with ``dedupe_text=False``, to
show what the caption dedupe contributes: Fashion-MNIST captions come from 10 templates x 10 classes, so a batch of
256 holds at most 100 distinct texts; the two vislang rows start from the same weights and see the same batches, so
their losses agree and only the time differs.

Usage::

    python benchmarks/train_throughput.py                  # ~60 s of timed steps per row, ~4 minutes in all
    python benchmarks/train_throughput.py --threads 1      # on a machine shared with other jobs (see README)
    python benchmarks/train_throughput.py --smoke          # seconds: only checks that everything runs
    python benchmarks/train_throughput.py --json out.json  # also write the results
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vislang import precision as prec  # noqa: E402
from vislang.data import FashionMNIST, PreparedDataset, normalize, prepare  # noqa: E402
from vislang.data.loading import TokenizedPairs, batch_loader, epoch_batches  # noqa: E402
from vislang.factory import build_tokenizer, fit_config_to_tokenizer, get_model_config  # noqa: E402
from vislang.models import CLIP, ModelConfig  # noqa: E402
from vislang.train.config import OptimConfig  # noqa: E402
from vislang.train.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from vislang.train.tasks import ContrastiveTask  # noqa: E402

MODEL_NAME = "vit-tiny-p4"
SEED = 0


# ----------------------------------------------------------------------------------------------------- environment
def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------------ data
class SubsetFashionMNIST:
    """The first ``n`` Fashion-MNIST items through ``fast_arrays`` (what ``prepare`` reads), for smoke runs."""

    def __init__(self, ds: FashionMNIST, n: int | None) -> None:
        self.ds, self.n = ds, min(n or len(ds), len(ds))

    def __len__(self) -> int:
        return self.n

    def fast_arrays(self):
        images, captions, labels = self.ds.fast_arrays()
        return images[: self.n], captions[: self.n], labels[: self.n]


def open_source(name: str, limit: int | None):
    """The training pairs: Fashion-MNIST (templated captions) or OpenClipart (real titles + keywords, all distinct)."""
    if name == "fashion-mnist":
        return SubsetFashionMNIST(FashionMNIST("train"), limit)
    from vislang.data import OpenClipart

    ds = OpenClipart(split="train")
    return torch.utils.data.Subset(ds, range(min(limit, len(ds)))) if limit else ds


def load_data(
    workdir: Path, limit: int | None, mcfg: ModelConfig, source_name: str = "fashion-mnist"
) -> tuple[TokenizedPairs, ModelConfig, int, int]:
    """Prepared train pairs tokenized as ``vislang.train.train`` does.

    Returns the pairs, the model config fitted to the tokenizer, the end-token id and the number of distinct captions.
    """
    v = mcfg.vision
    source = open_source(source_name, limit)
    prepare(source, workdir / source_name, image_size=v.image_size, channels=v.channels, progress=False)
    images = PreparedDataset(workdir / source_name)
    captions = list(images.captions)
    tokenizer = build_tokenizer(mcfg, captions)
    with warnings.catch_warnings():
        # Both models get the same token ids, so truncation (long clip-art titles) treats them alike; on
        # Fashion-MNIST no caption should ever be cut.
        warnings.simplefilter("error" if source_name == "fashion-mnist" else "ignore")
        tokens = tokenizer(captions).numpy().astype("int32")
    return (
        TokenizedPairs(images, tokens),
        fit_config_to_tokenizer(mcfg, tokenizer),
        tokenizer.eos_id,
        len(set(captions)),
    )


def batch_stream(data: TokenizedPairs, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches in the training loop's order: an epoch permutation, then the next epoch's."""
    for epoch in itertools.count():
        yield from batch_loader(data, epoch_batches(len(data), batch_size, SEED, epoch), num_workers=0)


# ----------------------------------------------------------------------------------------------------- the models
def build_openclip(mcfg: ModelConfig, eos_id: int) -> nn.Module:
    """``mcfg`` as an OpenCLIP custom model config (``open_clip.CLIP`` from vision/text config dataclasses)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    v, t, kw = mcfg.vision, mcfg.text, mcfg.vision.timm_kwargs
    if not v.arch.startswith("vit") or t.arch != "transformer" or not t.causal or t.pool != "eot":
        raise ValueError(f"{MODEL_NAME!r} is not a ViT + causal end-token Transformer; this benchmark maps only those")
    width, heads = kw["embed_dim"], kw["num_heads"]
    vision_cfg = CLIPVisionCfg(
        layers=kw["depth"],
        width=width,
        head_width=width // heads,
        mlp_ratio=kw.get("mlp_ratio", 4.0),
        patch_size=kw["patch_size"],
        image_size=v.image_size,
    )
    text_cfg = CLIPTextCfg(
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        width=t.width,
        heads=t.heads,
        layers=t.layers,
        mlp_ratio=t.mlp_ratio,
        pad_id=t.pad_id,
        eos_id=eos_id,
        pool_type="eos",  # pool at the first end token; the default "argmax" assumes EOT has the highest id
    )
    model = open_clip.CLIP(
        mcfg.embed_dim, vision_cfg, text_cfg, init_logit_scale=mcfg.init_logit_scale, output_dict=True
    )
    if v.channels != 3:  # OpenCLIP's ViT always embeds 3 channels; give it the same patch conv on v.channels
        conv = model.visual.conv1
        model.visual.conv1 = nn.Conv2d(v.channels, width, conv.kernel_size, conv.stride, bias=False)
    return model


def openclip_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """The AdamW of ``open_clip_train.main``: no decay on gains, biases and the temperature."""

    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


# ------------------------------------------------------------------------------------------------------ the steps
class VislangStep:
    """One optimizer step exactly as ``vislang.train.train`` runs it on the CPU (accum_steps=1, fp32)."""

    def __init__(self, model: CLIP, cfg: OptimConfig, dedupe_text: bool, total_steps: int, amp: Any) -> None:
        self.core, self.cfg, self.total_steps, self.amp = model, cfg, total_steps, amp
        self.task = ContrastiveTask(model, "clip", dedupe_text)
        self.optimizer = build_optimizer(model, cfg)
        self.step = 0
        model.train()

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        batch = {k: v.to("cpu", non_blocking=True) for k, v in batch.items()}
        if batch["image"].ndim == 4:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with self.amp:
            loss, _ = self.task(batch)
        loss.backward()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"vislang loss became {loss.item()}")
        set_lr(self.optimizer, lr_at(self.step, self.total_steps, self.cfg))
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.core.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()


class OpenClipStep:
    """One optimizer step as ``open_clip_train.train.train_one_epoch`` runs it (accum_freq=1, fp32, no scaler)."""

    def __init__(self, model: nn.Module, mcfg: ModelConfig, cfg: OptimConfig, total_steps: int, amp: Any) -> None:
        import open_clip
        from open_clip_train.scheduler import cosine_lr

        self.model, self.cfg, self.amp = model, cfg, amp
        self.mean, self.std = mcfg.vision.mean, mcfg.vision.std
        self.loss = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True)
        self.optimizer = openclip_optimizer(model, cfg)
        self.scheduler = cosine_lr(self.optimizer, cfg.lr, cfg.warmup_steps, total_steps)
        self.step = 0
        model.train()

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        self.scheduler(self.step)
        images = normalize(batch["image"], self.mean, self.std)  # the same uint8 batch and normalisation as vislang
        texts = batch["tokens"]
        self.optimizer.zero_grad()
        with self.amp:  # open_clip_train's autocast (--precision amp_bf16)
            model_out = self.model(images, texts)
            losses = self.loss(**model_out, output_dict=True)
            total_loss = sum(losses.values())
        total_loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip, norm_type=2.0)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        self.step += 1
        return total_loss.item()


# --------------------------------------------------------------------------------------------------------- timing
@dataclass
class Row:
    """One trained model with its step function, its own batch stream, and what it measured."""

    name: str
    model: nn.Module
    step: Callable[[dict[str, torch.Tensor]], float]  # one optimizer step on a batch → loss
    batches: Iterator[dict[str, torch.Tensor]]
    times: list[float] = field(default_factory=list)  # wall-clock seconds of each timed step
    losses: list[float] = field(default_factory=list)

    def run(self, steps: int, timed: bool = True) -> float:
        """Train ``steps`` steps, each timed from reading its batch to the end of the optimizer step."""
        total = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            self.losses.append(self.step(next(self.batches)))
            dt = time.perf_counter() - t0
            total += dt
            if timed:
                self.times.append(dt)
        return total


def build_rows(
    data: TokenizedPairs, mcfg: ModelConfig, eos_id: int, batch_size: int, total_steps: int, precision: str = "fp32"
) -> list[Row]:
    """vislang, vislang without caption dedupe (same initial weights) and OpenCLIP, each with its own optimizer, all
    three under ``precision``'s autocast."""
    optim = OptimConfig()
    amp = prec.autocast(precision, torch.device("cpu"))
    torch.manual_seed(SEED)
    vislang = CLIP(mcfg)
    nodedupe = copy.deepcopy(vislang)
    torch.manual_seed(SEED)
    openclip = build_openclip(mcfg, eos_id)
    return [
        Row("vislang", vislang, VislangStep(vislang, optim, True, total_steps, amp), batch_stream(data, batch_size)),
        Row(
            "vislang dedupe_text=False",
            nodedupe,
            VislangStep(nodedupe, optim, False, total_steps, amp),
            batch_stream(data, batch_size),
        ),
        Row(
            "openclip", openclip, OpenClipStep(openclip, mcfg, optim, total_steps, amp), batch_stream(data, batch_size)
        ),
    ]


def warm_up(rows: list[Row], steps: int) -> float:
    """Untimed steps for every row; the mean seconds of one settled step (each row's last warmup step)."""
    last = []
    for row in rows:
        row.run(steps - 1, timed=False)
        last.append(row.run(1, timed=False))
    return statistics.fmean(last)


def summarize(rows: list[Row], batch_size: int) -> dict[str, dict[str, Any]]:
    """pairs/s per row from the median step time (robust to stalls) and from the total time (plain throughput)."""
    return {
        row.name: {
            "pairs_per_s": batch_size / statistics.median(row.times),
            "pairs_per_s_total": batch_size * len(row.times) / sum(row.times),
            "median_step_s": statistics.median(row.times),
            "min_step_s": min(row.times),
            "step_times_s": row.times,
            "loss_first": row.losses[0],
            "loss_last": row.losses[-1],
        }
        for row in rows
    }


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, help="timed steps per row in each round (default 2; smoke 2)")
    p.add_argument(
        "--repeats",
        type=int,
        help="rounds; each runs --steps steps of every row in turn (default: enough for --seconds; smoke 1)",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="timed seconds per row when --repeats is not given")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 256; smoke 32)")
    p.add_argument("--warmup", type=int, help="untimed steps per row before timing (default 3; smoke 1)")
    p.add_argument("--max-pairs", type=int, help="train on the first N pairs only (default all 60,000; smoke 2048)")
    p.add_argument("--threads", type=int, help="torch threads (default torch's own choice; smoke 1)")
    p.add_argument(
        "--data",
        default="fashion-mnist",
        choices=["fashion-mnist", "openclipart"],
        help="training pairs: Fashion-MNIST (100 distinct captions) or OpenClipart (real, distinct titles)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="autocast for all rows; auto = bf16 where the CPU has native bf16 (avx512_bf16 / AMX), else fp32",
    )
    p.add_argument("--smoke", action="store_true", help="a few tiny steps that only check that everything runs")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    defaults = dict(steps=2, repeats=None, batch_size=256, warmup=3, max_pairs=None, threads=None)
    if args.smoke:
        defaults.update(repeats=1, batch_size=32, warmup=1, max_pairs=2048, threads=1)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "repeats", "batch_size", "warmup", "max_pairs", "threads"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import open_clip
    import timm

    mcfg = get_model_config(MODEL_NAME)
    optim = OptimConfig()
    with tempfile.TemporaryDirectory(prefix="vislang-bench-") as tmp:
        data, mcfg, eos_id, n_texts = load_data(Path(tmp), args.max_pairs, mcfg, args.data)
        if len(data) < args.batch_size:
            raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(data)} pairs; lower it")
        schedule_steps = 10_000  # the lr schedules' length: it changes the lr values, not the work per step
        if args.precision == "auto":
            args.precision = "bf16" if prec.native_bf16(torch.device("cpu")) else "fp32"
        rows = build_rows(data, mcfg, eos_id, args.batch_size, schedule_steps, args.precision)
        n_vislang, n_openclip = param_count(rows[0].model), param_count(rows[-1].model)

        v, t, kw = mcfg.vision, mcfg.text, mcfg.vision.timm_kwargs
        print(f"train_throughput: CLIP training, vislang vs OpenCLIP, same model config and data, CPU {args.precision}")
        print(
            f"torch {torch.__version__}, open_clip {open_clip.__version__}, timm {timm.__version__}, "
            f"python {platform.python_version()}; torch threads {torch.get_num_threads()}; "
            f"CPU: {prec.cpu_name()} ({os.cpu_count()} logical)"
        )
        print(
            f"model {MODEL_NAME}: ViT {v.image_size}px/{v.channels}ch patch {kw['patch_size']} width "
            f"{kw['embed_dim']} depth {kw['depth']} heads {kw['num_heads']} | text ctx {t.context_length} width "
            f"{t.width} layers {t.layers} heads {t.heads} vocab {t.vocab_size} | embed {mcfg.embed_dim}"
        )
        print(
            f"params: vislang {n_vislang:,}  openclip {n_openclip:,}  "
            f"({100 * (n_vislang - n_openclip) / n_openclip:+.2f}%)"
        )
        print(
            f"data: {args.data} train, {len(data):,} pairs, {n_texts} distinct captions; batch {args.batch_size}; "
            f"AdamW lr {optim.lr}, grad clip {optim.grad_clip}",
            flush=True,
        )

        step_s = warm_up(rows, args.warmup)
        repeats = args.repeats or max(3, round(args.seconds / (step_s * args.steps)))
        print(
            f"timing: {args.warmup} warmup steps per row (~{step_s:.2f} s/step), then {repeats} rounds of "
            f"{args.steps} steps per row, rows in turn (A B C A B C ...)",
            flush=True,
        )
        for r in range(repeats):
            took = [row.run(args.steps) for row in rows]
            rates = "  ".join(f"{row.name} {args.steps * args.batch_size / s:.1f}" for row, s in zip(rows, took))
            print(f"round {r + 1}/{repeats} pairs/s: {rates}", flush=True)

    results = summarize(rows, args.batch_size)
    vis, nodedupe, oc = (results[row.name] for row in rows)
    ratio = vis["pairs_per_s"] / oc["pairs_per_s"]
    ratio_total = vis["pairs_per_s_total"] / oc["pairs_per_s_total"]
    ratio_nodedupe = nodedupe["pairs_per_s"] / oc["pairs_per_s"]

    print(f"{'row':27s} {'pairs/s':>8s} {'(total)':>8s} {'median s/step':>14s}  loss first -> last")
    for name, res in results.items():
        print(
            f"{name:27s} {res['pairs_per_s']:8.1f} {res['pairs_per_s_total']:8.1f} {res['median_step_s']:14.3f}  "
            f"{res['loss_first']:.3f} -> {res['loss_last']:.3f}"
        )
    print("pairs/s = batch / median step time; (total) = all timed pairs / all timed seconds")
    print(f"ratio from total time vislang/openclip = {ratio_total:.2f}")
    print(f"ratio vislang(dedupe_text=False)/openclip = {ratio_nodedupe:.2f}")
    print(f"ratio vislang/openclip = {ratio:.2f}")

    report = {
        "benchmark": "train_throughput",
        "model": MODEL_NAME,
        "params": {"vislang": n_vislang, "openclip": n_openclip},
        "pairs": len(data),
        "distinct_captions": n_texts,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "steps_per_round": args.steps,
        "repeats": repeats,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "precision": args.precision,
        "cpu": prec.cpu_name(),
        "smoke": args.smoke,
        "results": results,
        "ratio": ratio,
        "ratio_total_time": ratio_total,
        "ratio_no_dedupe": ratio_nodedupe,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
