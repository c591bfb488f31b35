"""A short training loop for compressed models: the fine-tune after pruning and the distillation of a student.

It runs in the one training loop (``train.tasks.distill.StepsTask``): a fixed number of steps with a caller-supplied
loss, AdamW with the trainer's warmup + cosine schedule, in memory (no files) unless given an ``out_dir``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..data.config import DataConfig
from ..data.loading import TokenizedPairs, load_prepared
from ..models.clip import CLIP
from ..train.config import OptimConfig
from ..train.loop import fit
from ..train.tasks import ContrastiveTask
from ..train.tasks.distill import StepsTask, memory_config, module_device

LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def training_pairs(
    data: str,
    model: CLIP,
    tokenizer,
    cache_dir: str = ".cache/vislang/prepared",
    max_pairs: int | None = None,
    split: str = "train",
    options: dict | None = None,
) -> TokenizedPairs:
    """The training split of ``data`` prepared at the model's image size, its captions tokenized by ``tokenizer``."""
    v = model.cfg.vision
    dc = DataConfig(train=data, cache_dir=cache_dir, options=dict(options or {}))
    images = load_prepared(data, split, v.image_size, v.channels, dc, progress=False)
    captions = list(images.captions)
    if max_pairs:
        captions = captions[:max_pairs]
    return TokenizedPairs(images, tokenizer(captions).numpy().astype("int32"), max_pairs)


def run_steps(
    model: nn.Module,
    loss_fn: LossFn,
    data: TokenizedPairs,
    steps: int,
    lr: float = 5e-4,
    batch_size: int = 256,
    seed: int = 0,
    warmup_steps: int = 20,
    log_every: int = 0,
    out_dir: str = "",
    resume: bool = False,
) -> list[float]:
    """Train ``model``'s trainable parameters for ``steps`` AdamW steps on ``loss_fn(batch)`` in the one training loop
    (``train.tasks.distill.StepsTask``); returns the losses. In memory unless ``out_dir`` (then resumable)."""

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    batch_size = min(batch_size, len(data))
    if batch_size < 2:
        raise ValueError(f"the training data has {len(data)} pairs; contrastive fine-tuning needs at least 2")
    ocfg = OptimConfig(lr=lr, warmup_steps=min(warmup_steps, steps // 4))
    cfg = memory_config(steps, batch_size, seed, ocfg, module_device(model), out_dir)
    return fit(StepsTask(model, loss_fn, data, log_every), cfg, resume)


def contrastive_loss_fn(model: CLIP) -> LossFn:
    """The model's own training objective (CLIP loss, captions deduplicated), as ``vislang train`` uses it."""

    task = ContrastiveTask(model, "siglip" if model.logit_bias is not None else "clip")
    return lambda batch: task(batch)[0]
