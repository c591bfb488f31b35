"""A short training loop for compressed models: the fine-tune after pruning and the distillation of a student.

It reuses the trainer's pieces (prepared data, ``TokenizedPairs``, ``epoch_batches``, ``build_optimizer``, the warmup +
cosine ``lr_at``) but runs a fixed number of steps with a caller-supplied loss, with no checkpoints or evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..data.config import DataConfig
from ..data.loading import TokenizedPairs, epoch_batches, load_prepared
from ..models.clip import CLIP
from ..train.config import OptimConfig
from ..train.optim import build_optimizer, lr_at, set_lr

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
) -> list[float]:
    """Train ``model``'s trainable parameters for ``steps`` AdamW steps on ``loss_fn(batch)``; returns the losses."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    batch_size = min(batch_size, len(data))
    if batch_size < 2:
        raise ValueError(f"the training data has {len(data)} pairs; contrastive fine-tuning needs at least 2")
    ocfg = OptimConfig(lr=lr, warmup_steps=min(warmup_steps, steps // 4))
    optimizer = build_optimizer(model, ocfg)
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    model.train()
    epoch = 0
    while len(losses) < steps:
        for idx in epoch_batches(len(data), batch_size, seed, epoch):
            set_lr(optimizer, lr_at(len(losses), steps, ocfg))
            loss = loss_fn(data.get_batch(idx))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {len(losses)}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            if log_every and len(losses) % log_every == 0:
                print(f"[vislang] step {len(losses)}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f}")
            if len(losses) >= steps:
                break
        epoch += 1
    model.eval()
    return losses


def contrastive_loss_fn(model: CLIP) -> LossFn:
    """The model's own training objective (CLIP loss, captions deduplicated), as ``vislang train`` uses it."""
    from ..train.tasks import ContrastiveTask

    task = ContrastiveTask(model, "siglip" if model.logit_bias is not None else "clip")
    return lambda batch: task(batch)[0]
