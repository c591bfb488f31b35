"""Training built on the library: one loop (``loop``), tasks (``tasks``), optimizer/schedule, checkpoints."""

from __future__ import annotations

from typing import Any

from .config import DataConfig, OptimConfig, TrainConfig, load_train_config
from .loop import Run, Task, fit
from .tasks import make_task


def train(cfg: TrainConfig, resume: bool = False) -> Any:
    """Run the task ``cfg.task`` in the one loop; returns what the task returns (its saved model directory)."""

    return fit(make_task(cfg.task), cfg, resume)


__all__ = ["DataConfig", "OptimConfig", "Run", "Task", "TrainConfig", "fit", "load_train_config", "train"]
