"""AdamW with decay only where it helps, and a warmup + cosine schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, scales: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW with two groups: weights decay; norms, biases, embeddings and the temperature do not (as CLIP trains).

    ``scales`` maps a parameter-name prefix to a learning-rate scale (``set_lr`` reads a group's ``"scale"``): LiT's
    unlocked pretrained blocks learn slower than its fresh projections. Each prefix gets its own pair of groups."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    scales = scales or {}
    grouped: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = next((k for k in scales if n.startswith(k)), None)
        grouped.setdefault((prefix, not (n in skip or p.ndim < 2)), []).append(p)
    if not grouped:
        raise ValueError("the model has no trainable parameters; unlock a tower or add a trainable head")
    groups = []
    for prefix in [None, *scales]:
        for decays in (True, False):
            group = {"params": grouped.get((prefix, decays), []), "weight_decay": cfg.weight_decay if decays else 0.0}
            if prefix is not None:
                if not group["params"]:
                    continue
                group["scale"] = scales[prefix]
            groups.append(group)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate at ``step``: linear warmup to ``cfg.lr``, then cosine decay to ``min_lr_ratio * lr``."""
    # Warmup never takes more than a fifth of the run, so a schedule shrunk by a time budget still decays.
    warm = min(cfg.warmup_steps, max(total_steps // 5, 1))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr``, times the group's ``"scale"`` where it has one (a tower learning slower than a head)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["scale"] if "scale" in g else lr
