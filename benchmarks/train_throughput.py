"""Training throughput against OpenCLIP: image–text pairs per second, same model config, same data, same run.

One dual encoder — the built-in ``vit-tiny-p4`` config: a ViT image tower (28 px, 1 channel, patch 4, width 128,
4 layers, 4 heads, MLP ratio 4) and a causal Transformer text tower (context 24, width 128, 2 layers, 4 heads, end
token pooling), embed dim 128 — is built twice: by vislang and by OpenCLIP as a custom ``open_clip.CLIP`` from
``CLIPVisionCfg`` / ``CLIPTextCfg``. Both train with the CLIP loss, AdamW (same lr, betas, eps, decay), gradient
clipping at 1.0 and fp32 on the CPU, each with its own training step:

* vislang: the step of ``vislang.train.loop.train`` — ``ContrastiveTask`` (normalise uint8 → float, dedupe the
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

Rows are timed in alternation (A B C, A B C, ...) after warmup steps, so a change of load on the machine hits every
row; the third row is vislang with ``dedupe_text=False`` to show what the caption dedupe contributes (Fashion-MNIST
captions come from 10 templates x 10 classes, so a batch of 256 holds at most 100 distinct texts).

Usage::

    python benchmarks/train_throughput.py                  # ~3 minutes on 2 cores
    python benchmarks/train_throughput.py --smoke          # seconds: checks that everything runs
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
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vislang.data import FashionMNIST, PreparedDataset, normalize, prepare  # noqa: E402
from vislang.factory import build_tokenizer, fit_config_to_tokenizer, get_model_config  # noqa: E402
from vislang.models import CLIP, ModelConfig  # noqa: E402
from vislang.train.config import OptimConfig  # noqa: E402
from vislang.train.data import TokenizedPairs, batch_loader, epoch_batches  # noqa: E402
from vislang.train.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from vislang.train.tasks import ContrastiveTask  # noqa: E402

MODEL_NAME = "vit-tiny-p4"
SEED = 0


# ----------------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """The CPU's marketing name, for the report (Linux /proc/cpuinfo, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def load_data(workdir: Path, limit: int | None, mcfg: ModelConfig) -> tuple[TokenizedPairs, ModelConfig, int, int]:
    """Prepared Fashion-MNIST train pairs tokenized as ``vislang.train.loop.train`` does.

    Returns the pairs, the model config fitted to the tokenizer, the end-token id and the number of distinct captions.
    """
    v = mcfg.vision
    source = SubsetFashionMNIST(FashionMNIST("train"), limit)
    prepare(source, workdir / "fashion-mnist", image_size=v.image_size, channels=v.channels, progress=False)
    images = PreparedDataset(workdir / "fashion-mnist")
    captions = list(images.captions)
    tokenizer = build_tokenizer(mcfg, captions)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncated caption would make the two models see different texts
        tokens = tokenizer(captions).numpy().astype("int32")
    return TokenizedPairs(images, tokens), fit_config_to_tokenizer(mcfg, tokenizer), tokenizer.eos_id, len(set(captions))


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
@dataclass
class Row:
    """One trained model, its step function and what it measured."""

    name: str
    model: nn.Module
    step_fn: object  # (batch) -> loss float
    batches: Iterator[dict[str, torch.Tensor]]
    seconds: list[float] = field(default_factory=list)  # per repeat
    losses: list[float] = field(default_factory=list)

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.losses.append(self.step_fn(next(self.batches)))
        return time.perf_counter() - t0


class VislangStep:
    """One optimizer step exactly as ``vislang.train.loop.train`` runs it on the CPU (accum_steps=1, fp32)."""

    def __init__(self, model: CLIP, cfg: OptimConfig, dedupe_text: bool, total_steps: int) -> None:
        self.core, self.cfg, self.total_steps = model, cfg, total_steps
        self.task = ContrastiveTask(model, "clip", dedupe_text)
        self.optimizer = build_optimizer(model, cfg)
        self.step = 0
        model.train()

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        batch = {k: v.to("cpu", non_blocking=True) for k, v in batch.items()}
        if batch["image"].ndim == 4:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
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

    def __init__(self, model: nn.Module, mcfg: ModelConfig, cfg: OptimConfig, total_steps: int) -> None:
        import open_clip
        from open_clip_train.scheduler import cosine_lr

        self.model, self.cfg = model, cfg
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


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row and repeat (default 15; smoke 2)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 256; smoke 32)")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds over the rows (default 4; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (default 3; smoke 1)")
    p.add_argument("--max-pairs", type=int, default=None, help="use the first N training pairs (default all; smoke 2048)")
    p.add_argument("--smoke", action="store_true", help="tiny run that only checks that everything works")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    defaults = dict(steps=2, batch_size=32, repeats=1, warmup=1, max_pairs=2048) if args.smoke else {}
    defaults = {**dict(steps=15, batch_size=256, repeats=4, warmup=3, max_pairs=None), **defaults}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import open_clip
    import timm

    mcfg = get_model_config(MODEL_NAME)
    optim_cfg = OptimConfig()
    total_steps = args.warmup + args.steps * args.repeats
    with tempfile.TemporaryDirectory(prefix="vislang-bench-") as tmp:
        data, mcfg, eos_id, n_texts = load_data(Path(tmp), args.max_pairs, mcfg)

        torch.manual_seed(SEED)
        vl_model = CLIP(mcfg)
        vl_nodedupe = copy.deepcopy(vl_model)
        torch.manual_seed(SEED)
        oc_model = build_openclip(mcfg, eos_id)
        rows = [
            Row("vislang", vl_model, VislangStep(vl_model, optim_cfg, True, total_steps), batch_stream(data, args.batch_size)),
            Row(
                "vislang dedupe_text=False",
                vl_nodedupe,
                VislangStep(vl_nodedupe, optim_cfg, False, total_steps),
                batch_stream(data, args.batch_size),
            ),
            Row("openclip", oc_model, OpenClipStep(oc_model, mcfg, optim_cfg, total_steps), batch_stream(data, args.batch_size)),
        ]

        v, t, kw = mcfg.vision, mcfg.text, mcfg.vision.timm_kwargs
        n_vl, n_oc = param_count(vl_model), param_count(oc_model)
        print("train_throughput: CLIP training, vislang vs OpenCLIP, same config and data, CPU fp32")
        print(
            f"torch {torch.__version__}, open_clip {open_clip.__version__}, timm {timm.__version__}, "
            f"python {platform.python_version()}; {torch.get_num_threads()} torch threads; CPU: {cpu_model()} "
            f"({os.cpu_count()} logical)"
        )
        print(
            f"model {MODEL_NAME}: ViT {v.image_size}px/{v.channels}ch patch {kw['patch_size']} width {kw['embed_dim']} "
            f"depth {kw['depth']} heads {kw['num_heads']} | text ctx {t.context_length} width {t.width} "
            f"layers {t.layers} heads {t.heads} vocab {t.vocab_size} | embed {mcfg.embed_dim}"
        )
        print(f"params: vislang {n_vl:,}  openclip {n_oc:,}  ({100 * (n_vl - n_oc) / n_oc:+.2f}%)")
        print(
            f"data: Fashion-MNIST train, {len(data):,} pairs, {n_texts} distinct captions; batch {args.batch_size}; "
            f"lr {optim_cfg.lr} AdamW, grad clip {optim_cfg.grad_clip}"
        )
        print(f"timing: {args.warmup} warmup steps per row, then {args.repeats} rounds x {args.steps} steps, rows alternating")
        sys.stdout.flush()

        for row in rows:
            row.run(args.warmup)
        for r in range(args.repeats):
            for row in rows:
                row.seconds.append(row.run(args.steps))
            rates = "  ".join(f"{row.name} {args.steps * args.batch_size / row.seconds[-1]:7.1f}" for row in rows)
            print(f"round {r + 1}: pairs/s  {rates}", flush=True)

    timed = args.steps * args.repeats
    results = {
        row.name: {
            "pairs_per_s": timed * args.batch_size / sum(row.seconds),
            "s_per_step": sum(row.seconds) / timed,
            "round_pairs_per_s": [args.steps * args.batch_size / s for s in row.seconds],
            "loss_first": row.losses[0],
            "loss_last": statistics.fmean(row.losses[-min(5, len(row.losses)) :]),
        }
        for row in rows
    }
    oc = results["openclip"]["pairs_per_s"]
    ratio = results["vislang"]["pairs_per_s"] / oc
    ratio_nodedupe = results["vislang dedupe_text=False"]["pairs_per_s"] / oc
    print(f"{'row':28s} {'pairs/s':>9s} {'s/step':>8s} {'loss first→last':>17s}")
    for name, res in results.items():
        loss = f"{res['loss_first']:.3f}→{res['loss_last']:.3f}"
        print(f"{name:28s} {res['pairs_per_s']:9.1f} {res['s_per_step']:8.3f} {loss:>17s}")
    print(f"ratio vislang(dedupe_text=False)/openclip = {ratio_nodedupe:.2f}")
    print(f"ratio vislang/openclip = {ratio:.2f}")

    report = {
        "benchmark": "train_throughput",
        "model": MODEL_NAME,
        "params": {"vislang": n_vl, "openclip": n_oc},
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "pairs": len(data),
        "distinct_captions": n_texts,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "smoke": args.smoke,
        "results": results,
        "ratio": ratio,
        "ratio_no_dedupe": ratio_nodedupe,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
