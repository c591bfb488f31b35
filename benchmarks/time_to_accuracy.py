"""Time to accuracy against OpenCLIP: wall seconds of training until Fashion-MNIST zero-shot top-1 reaches 80/85/90%.

The same model (default the demo's ``fmnist-cnn``: a compact CNN image tower and a causal Transformer text tower) is
trained on the same data twice, the two arms interleaved five steps at a time in one process, so a change of load
on a shared machine hits both:

* **vislang**: the one training loop's own step, driven step by step (``Loop.apply_lr`` → ``Loop.micro_step`` →
  ``Loop.optimizer_step``) on ``DualEncoderTask`` with the demo run config: its precision choice (``precision:
  auto``: bf16 autocast where this CPU has native bf16 and a trial says it pays), channels_last convolutions, the
  caption dedupe, warmup + cosine to 2% of the peak learning rate.
* **OpenCLIP**: the step of ``open_clip_train.train.train_one_epoch`` — ``cosine_lr`` scheduler (to 0), autocast
  (``amp_bf16`` where the CPU has native bf16, as ``--precision amp_bf16``), ``model(images, texts)`` →
  ``open_clip.ClipLoss`` → backward → ``clip_grad_norm_`` → AdamW → clamp ``logit_scale`` to log(100) — on an
  ``open_clip.CLIP`` with OpenCLIP's own text Transformer (its initialisation, ``pool_type="eos"`` at vislang's end
  token) and, for a CNN config, the same CompactCNN image tower plus a bias-free projection (OpenCLIP has no tower of
  its own of that shape; for a ViT config it builds its own ViT, as ``benchmarks/train_throughput.py`` does).

Both read the same prepared Fashion-MNIST, the same BPE token ids, the same batches in the same order, with the same
peak learning rate, warmup, betas, eps, weight decay and clipping. Every ``--eval-every`` steps each arm is evaluated
(untimed) by the same function: zero-shot top-1 over the first ``--eval-images`` test images with the Fashion-MNIST
prompt templates, in fp32. Only training steps count towards an arm's seconds (batch reading included). The headline
``ratio`` is OpenCLIP's seconds over vislang's at the highest level both reached; ``accuracy`` is that level.

What separates the arms, as found (one thread each, a machine loaded by other jobs, so step-indexed curves):

* **Per step they learn alike.** With a 300-step schedule both reached 90% zero-shot (1,000 test images) by step
  225-250. OpenCLIP's twin looked ahead early in single runs, but the curves swing by up to 35 points between
  evaluations 25 steps apart (both arms, at the peak learning rate), and the lead changes sides with the random
  draws. Swapping OpenCLIP's text initialisation into vislang (token embeddings of std 0.02, scaled projections:
  text features' mean cosine at init 0.63 instead of 0.99) did not make vislang's curve better (89.6% at step 225
  and 91.2% at 250, against 90.0% and 91.1% without). The image towers now start from the same weights
  (``share_image_tower``), so that luck is gone.
* **The step is what differs.** PyTorch's fused CPU attention kernel (SDPA's flash attention for CPU) is 5-8x
  slower in bf16 than the explicit softmax(QKᵀ/√d)V at these lengths: 34% of OpenCLIP's step (its
  ``nn.MultiheadAttention`` calls it), while vislang's attention takes the explicit path in half precision on a
  CPU (``vislang.layers.transformer.attention``). vislang also encodes each distinct caption of a batch once (~92
  of 256 here) with the same gradients. Measured interleaved, one thread: vislang 221 ms a step, OpenCLIP 417 ms
  (1.89x); with ``--openclip-attention math`` (PyTorch's unfused kernel forced, a global PyTorch switch rather
  than an OpenCLIP option) 296 ms (1.34x).
* **What the evaluation sees.** The CNN's BatchNorm running averages trail the weights by ~10 steps, and at the
  demo's learning rate that costs eval-mode zero-shot up to 18 points mid-run (step 75: 64.1% against 82.1% with
  statistics recomputed under the current weights). vislang's loop recomputes them from 2,048 training images before
  each evaluation and before saving (``precise_bn``); here that runs before each of vislang's evaluations and its
  time counts as vislang's training time. OpenCLIP's loop has nothing of the kind, so its model is scored, as its
  own evaluation would score it, with the running averages. One run each under load (one thread, 2,000 images every
  50 steps): 80/85/90% at 3.16/5.22/2.06x OpenCLIP's seconds over vislang's as shipped, 2.55/3.85/1.94x with
  ``--openclip-attention math``.

Usage::

    python benchmarks/time_to_accuracy.py                       # the demo's 4 epochs (936 steps) per arm
    python benchmarks/time_to_accuracy.py --threads 1 --json out.json
    python benchmarks/time_to_accuracy.py --smoke               # seconds: only checks that everything runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vislang import precision as prec  # noqa: E402
from vislang.config import PACKAGED_CONFIGS  # noqa: E402
from vislang.data import normalize  # noqa: E402
from vislang.data.loading import batch_loader, epoch_batches  # noqa: E402
from vislang.evaluation.run import templates_for  # noqa: E402
from vislang.evaluation.zero_shot import zero_shot_eval  # noqa: E402
from vislang.models import ModelConfig  # noqa: E402
from vislang.models.towers import build_vision_tower  # noqa: E402
from vislang.train.config import load_train_config  # noqa: E402
from vislang.train.loop import Loop  # noqa: E402
from vislang.train.tasks.contrastive import DualEncoderTask  # noqa: E402

LEVELS = (0.80, 0.85, 0.90)
CHUNK = 5  # steps each arm trains before the other takes its turn


# ----------------------------------------------------------------------------------------------------- OpenCLIP twin
class CNNTower(nn.Module):
    """vislang's CNN image tower plus a bias-free projection, as an OpenCLIP ``visual`` (``TimmModel``'s shape)."""

    def __init__(self, mcfg: ModelConfig) -> None:
        super().__init__()
        self.trunk = build_vision_tower(mcfg.vision)
        self.proj = nn.Linear(self.trunk.width, mcfg.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(x))


def build_openclip_twin(mcfg: ModelConfig, eos_id: int) -> nn.Module:
    """``mcfg`` as an ``open_clip.CLIP``: OpenCLIP's text Transformer; a ViT config gets OpenCLIP's ViT, a CNN one
    the same CNN tower as vislang."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if mcfg.vision.arch.startswith("vit"):
        from train_throughput import build_openclip

        return build_openclip(mcfg, eos_id)
    t = mcfg.text
    text_cfg = CLIPTextCfg(
        context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads, layers=t.layers,
        mlp_ratio=t.mlp_ratio, pad_id=t.pad_id, eos_id=eos_id, pool_type="eos",
    )  # fmt: skip
    tiny_vit = CLIPVisionCfg(layers=1, width=32, head_width=32, patch_size=4, image_size=mcfg.vision.image_size)
    model = open_clip.CLIP(mcfg.embed_dim, tiny_vit, text_cfg, init_logit_scale=mcfg.init_logit_scale, output_dict=True)
    model.visual = CNNTower(mcfg)  # replaced before any step: the placeholder ViT never trains
    return model


def share_image_tower(twin: nn.Module, core: nn.Module) -> bool:
    """Start the twin's CNN image tower and projection from vislang's initial weights (same modules, same shapes),
    so the arms differ only in what each library does itself (text tower and its initialisation, loss, step) and
    not in the luck of two random draws; False (nothing copied) for a ViT, whose towers are different modules."""
    if not isinstance(twin.visual, CNNTower):
        return False
    with torch.no_grad():
        twin.visual.trunk.load_state_dict(core.visual.state_dict())
        twin.visual.proj.weight.copy_(core.image_proj.weight)
        twin.logit_scale.copy_(core.logit_scale)
    return True


def openclip_optimizer(model: nn.Module, lr: float, wd: float, betas: tuple[float, float], eps: float):
    """The AdamW of ``open_clip_train.main``: no decay on gains, biases, norms and the temperature."""

    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


class OpenClipStep:
    """One step of ``open_clip_train.train.train_one_epoch`` (accum_freq 1, no grad scaler: bf16 needs none)."""

    def __init__(
        self, model: nn.Module, mcfg: ModelConfig, optim: Any, total: int, precision: str, attention: str = "sdpa"
    ) -> None:
        import open_clip
        from open_clip_train.scheduler import cosine_lr
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self.model, self.clip = model, optim.grad_clip
        self.mean, self.std = mcfg.vision.mean, mcfg.vision.std
        self.loss = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True)
        self.optimizer = openclip_optimizer(model, optim.lr, optim.weight_decay, optim.betas, optim.eps)
        self.scheduler = cosine_lr(self.optimizer, optim.lr, optim.warmup_steps, total)
        self.amp = prec.autocast(precision, torch.device("cpu"))
        # "math": PyTorch's unfused attention for OpenCLIP's nn.MultiheadAttention (a global PyTorch switch, not an
        # OpenCLIP option), to show how much of the gap is the fused CPU kernel vislang's own attention avoids
        self.kernel = (lambda: sdpa_kernel(SDPBackend.MATH)) if attention == "math" else contextlib.nullcontext
        self.step = 0
        model.train()

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.scheduler(self.step)
        images = normalize(batch["image"], self.mean, self.std)
        self.optimizer.zero_grad()
        with self.kernel():
            with self.amp:
                losses = self.loss(**self.model(images, batch["tokens"]), output_dict=True)
                total_loss = sum(losses.values())
            total_loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, norm_type=2.0)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        self.step += 1
        return total_loss.detach()


class VislangStep:
    """One optimizer step of vislang's loop (``Loop`` methods, the loop's own order), on its task's batches."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loop = self.loop
        loop.apply_lr()
        metrics = loop.micro_step(batch, sync=True)
        loop.optimizer_step()
        loop.step += 1
        return metrics["loss"]


# ------------------------------------------------------------------------------------------------------------ arms
@dataclass
class Arm:
    name: str
    model: nn.Module  # what is evaluated
    step: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    batches: Iterator[dict[str, torch.Tensor]]
    precision: str
    seconds: float = 0.0  # training time so far (steps only)
    steps: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)  # {step, seconds, accuracy, loss}
    before_eval: Callable[[], Any] | None = None  # what the library's loop does before it evaluates (timed)

    def train(self, n: int) -> float:
        """``n`` timed steps; the last step's loss."""
        loss = torch.zeros(())
        for _ in range(n):
            t0 = time.perf_counter()
            loss = self.step(next(self.batches))
            self.seconds += time.perf_counter() - t0
            self.steps += 1
        return float(loss)

    def ready(self) -> None:
        """The library's own preparation for an evaluation, counted as training time."""
        if self.before_eval is not None:
            t0 = time.perf_counter()
            self.before_eval()
            self.seconds += time.perf_counter() - t0

    def reached(self, level: float) -> dict[str, float] | None:
        return next((p for p in self.curve if p["accuracy"] >= level), None)


def stream(batches: Callable[[int], Iterator[dict[str, torch.Tensor]]]) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        yield from batches(epoch)
        epoch += 1


def zero_shot(model: nn.Module, tokenizer, val, images: torch.Tensor, labels, batch: int = 500) -> float:
    """Zero-shot top-1 on ``images`` (already normalised floats), fp32, the same function for both arms."""
    was = model.training
    model.eval()
    with torch.inference_mode():
        emb = torch.cat(
            [model.encode_image(images[i : i + batch], normalize=True) for i in range(0, len(images), batch)]
        )
        top1 = zero_shot_eval(
            model, tokenizer, val, val.classnames, templates_for(val), labels=labels, image_emb=emb.float()
        )["top1"]
    model.train(was)
    return float(top1)


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="fmnist-cnn", help="a built-in CNN or ViT dual-encoder config (default the demo's)"
    )
    p.add_argument("--steps", type=int, help="most steps per arm; also the schedules' length (default 936: 4 epochs)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 256; smoke 32)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default 50; smoke 2)")
    p.add_argument("--eval-images", type=int, help="test images per evaluation (default 2000; smoke 64)")
    p.add_argument("--levels", default=",".join(f"{x:g}" for x in LEVELS), help="accuracy levels to time")
    p.add_argument("--precision", default="auto", help="vislang's precision (auto follows the CPU)")
    p.add_argument("--openclip-precision", default="auto", help="OpenCLIP's: amp_bf16, fp32, or auto (amp_bf16 "
                   "where the CPU has native bf16)")  # fmt: skip
    p.add_argument("--openclip-attention", choices=("sdpa", "math"), default="sdpa", help="sdpa: OpenCLIP as "
                   "shipped (nn.MultiheadAttention on SDPA's fused kernel); math: with PyTorch's unfused attention "
                   "forced (sdpa_kernel(MATH)), what vislang's own attention picks on a CPU in bf16")  # fmt: skip
    p.add_argument("--max-minutes", type=float, help="stop after this much wall time (both arms, evaluations "
                   "included) and report the levels reached so far; default no limit")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (default torch's own choice; smoke 1)")
    p.add_argument("--smoke", action="store_true", help="a few tiny steps on a data subset: only checks that it runs")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    defaults = dict(steps=936, batch_size=256, eval_every=50, eval_images=2000, threads=None)
    if args.smoke:
        defaults.update(steps=4, batch_size=32, eval_every=2, eval_images=64, threads=1)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.levels = tuple(sorted(float(x) for x in args.levels.split(",")))
    if args.openclip_precision == "auto":
        args.openclip_precision = "amp_bf16" if prec.native_bf16(torch.device("cpu")) else "fp32"
    if args.openclip_precision not in ("amp_bf16", "fp32"):
        p.error("--openclip-precision must be amp_bf16, fp32 or auto")
    return args


def vislang_arm(args: argparse.Namespace, out: Path) -> tuple[Arm, DualEncoderTask]:
    overrides = [
        f"model_name={args.model}", f"batch_size={args.batch_size}", f"max_steps={args.steps}",
        "time_budget_min=null", f"precision={args.precision}", "progress=false", f"out_dir={out}",
    ]  # fmt: skip
    if args.smoke:  # a subset, prepared in the temporary folder
        overrides += ["data.max_train=512", f"data.cache_dir={out.parent / 'prepared'}"]
    cfg = load_train_config(PACKAGED_CONFIGS / "demo.yaml", overrides)
    task = DualEncoderTask()
    loop = Loop(task, cfg, resume=False)
    loop.prepare()  # data, tokenizer, model, AdamW, and the precision choice (a trial on first use)
    batches = stream(lambda epoch: task.batches(epoch, 0))
    arm = Arm("vislang", task.core, VislangStep(loop), batches, loop.choice.precision, before_eval=task.calibrate)
    return arm, task


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import open_clip

    with tempfile.TemporaryDirectory(prefix="vislang-tta-") as tmp:
        vis, task = vislang_arm(args, Path(tmp) / "run")
        mcfg, cfg = task.mcfg, task.cfg
        torch.manual_seed(cfg.seed)
        oc_model = build_openclip_twin(mcfg, task.tokenizer.eos_id)
        shared = share_image_tower(oc_model, task.core)  # before either arm's first step
        oc_prec = "bf16" if args.openclip_precision == "amp_bf16" else "fp32"
        oc_step = OpenClipStep(oc_model, mcfg, cfg.optim, args.steps, oc_prec, args.openclip_attention)
        seed, workers = cfg.seed, cfg.data.num_workers  # the same batches in the same order as vislang's
        oc_batches = stream(
            lambda e: batch_loader(task.data, epoch_batches(len(task.data), args.batch_size, seed, e), workers)
        )
        arms = [vis, Arm("openclip", oc_model, oc_step, oc_batches, oc_prec)]

        val = task.val
        n = min(args.eval_images, len(val))
        images = normalize(val.get_batch(list(range(n)))["image"], mcfg.vision.mean, mcfg.vision.std)
        labels = val.labels[:n]
        print("time_to_accuracy: Fashion-MNIST zero-shot, vislang's loop vs OpenCLIP's train_one_epoch step")
        print(
            f"torch {torch.__version__}, open_clip {open_clip.__version__}; threads {torch.get_num_threads()}; CPU: "
            f"{prec.cpu_name()} (native bf16: {prec.native_bf16(torch.device('cpu'))})"
        )
        print(
            f"model {args.model}; batch {args.batch_size}; up to {args.steps} steps; eval every {args.eval_every} "
            f"steps on {n} test images; precision vislang {vis.precision} ({vis.step.loop.choice.reason}), "
            f"openclip {args.openclip_precision} (attention kernel: {args.openclip_attention}); image tower "
            f"{'starts from the same weights in both' if shared else 'initialised by each library'}; before each "
            f"evaluation vislang's loop recomputes BatchNorm statistics (precise_bn {task.cfg.precise_bn} images, "
            "timed as training), OpenCLIP's has nothing of the kind",
            flush=True,
        )
        top, t0 = args.levels[-1], time.time()
        while any(a.steps < args.steps for a in arms):
            active = [a for a in arms if a.steps < args.steps and not a.reached(top)]
            n = min(args.eval_every, args.steps - min(a.steps for a in active))
            losses = {a.name: 0.0 for a in active}
            for done in range(0, n, CHUNK):  # interleaved a few steps at a time: load changes hit both arms
                for arm in active:
                    losses[arm.name] = arm.train(min(CHUNK, n - done, args.steps - arm.steps))
            for arm in active:
                arm.ready()
                acc = zero_shot(arm.model, task.tokenizer, val, images, labels)
                arm.curve.append(
                    dict(step=arm.steps, seconds=round(arm.seconds, 2), accuracy=acc, loss=losses[arm.name])
                )
                print(
                    f"  {arm.name:8s} step {arm.steps:5d}  {arm.seconds:8.1f} s  loss {losses[arm.name]:.3f}  "
                    f"zero-shot {acc:.2%}"
                )
            if all(a.reached(top) or a.steps >= args.steps for a in arms):
                break
            if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
                print(f"  --max-minutes {args.max_minutes:g} spent: stopping here")
                break
    return report(args, arms, shared)


def report(args: argparse.Namespace, arms: list[Arm], shared: bool) -> dict[str, Any]:
    vis, oc = arms
    levels: dict[str, Any] = {}
    ratio = accuracy = None
    print(f"{'level':>6s} {'vislang s (step)':>18s} {'openclip s (step)':>18s} {'openclip/vislang':>17s}")
    for level in args.levels:
        a, b = vis.reached(level), oc.reached(level)
        r = b["seconds"] / a["seconds"] if a and b else None
        levels[f"{level:g}"] = {"vislang": a, "openclip": b, "ratio": r}
        cell = lambda p: f"{p['seconds']:9.1f} ({p['step']:5d})" if p else f"{'not reached':>18s}"  # noqa: E731
        print(f"{level:6.0%} {cell(a):>18s} {cell(b):>18s} {f'{r:.2f}x' if r else '-':>17s}")
        if r is not None:
            ratio, accuracy = r, level
    per_step = {a.name: a.seconds / max(1, a.steps) for a in arms}
    print(f"seconds per step: vislang {per_step['vislang']:.3f}, openclip {per_step['openclip']:.3f} "
          f"({per_step['openclip'] / per_step['vislang']:.2f}x)")  # fmt: skip
    print(f"best zero-shot: vislang {max(p['accuracy'] for p in vis.curve):.2%}, "
          f"openclip {max(p['accuracy'] for p in oc.curve):.2%}")  # fmt: skip
    print(
        f"ratio openclip/vislang seconds to {accuracy:.0%} = {ratio:.2f}"
        if ratio
        else "ratio: no level reached by both"
    )
    result = {
        "benchmark": "time_to_accuracy",
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "eval_images": args.eval_images,
        "max_minutes": args.max_minutes,
        "threads": torch.get_num_threads(),
        "cpu": prec.cpu_name(),
        "torch": torch.__version__,
        "precision": {"vislang": vis.precision, "openclip": args.openclip_precision},
        "openclip_attention": args.openclip_attention,
        "shared_image_init": shared,
        "smoke": args.smoke,
        "levels": levels,
        "seconds_per_step": per_step,
        "curves": {a.name: a.curve for a in arms},
        "ratio": ratio,
        "accuracy": accuracy,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
