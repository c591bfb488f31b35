"""The tasks the one loop (``train.loop``) runs, by name: ``TrainConfig.task`` picks one.

``TASKS`` maps a task name to ``"module:Class"``, imported only when that task runs, so ``vislang train`` of a dual
encoder does not import the GAN or VQA code. ``DEFAULTS`` holds the ``TrainConfig`` values a task starts from where
the trainer's defaults do not suit it (a VQA run's learning rate, epochs and output folder); a config file and
``--a.b=value`` overrides then apply on top.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..config import DEFAULTS
from .contrastive import (  # noqa: F401  (re-exported: the objectives' old home was vislang.train.tasks)
    OBJECTIVES,
    CaptionTask,
    ContrastiveTask,
    ITMTask,
    build_task,
    caption_loss,
    relation_negative_loss,
    unique_rows,
)

TASKS: dict[str, str] = {
    "contrastive": "vislang.train.tasks.contrastive:DualEncoderTask",
    "caption": "vislang.train.tasks.contrastive:DualEncoderTask",
    "coca": "vislang.train.tasks.contrastive:DualEncoderTask",
    "itm": "vislang.train.tasks.contrastive:DualEncoderTask",
    "gan": "vislang.train.tasks.gan:GANTask",
    "vqa": "vislang.train.tasks.vqa:VQAClassifierTask",
    "vqa-gen": "vislang.train.tasks.vqa:VQAGenerativeTask",
    "lit": "vislang.train.tasks.lit:LiTTask",
}


def task_class(name: str) -> type:
    """The task class of ``name``; a clear error for an unknown one."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_task(name: str) -> Any:
    """A fresh task object of ``name``, ready for ``train.loop.fit``."""
    return task_class(name)()


__all__ = [
    "DEFAULTS",
    "OBJECTIVES",
    "TASKS",
    "CaptionTask",
    "ContrastiveTask",
    "ITMTask",
    "build_task",
    "caption_loss",
    "make_task",
    "relation_negative_loss",
    "task_class",
]
