"""Compression fine-tuning in the one loop: a fixed number of steps on a caller's loss (``compress.finetune.run_steps``:
the fine-tune after pruning and the distillation of a student dual encoder) and a generator fitted to its teacher
(``compress.generator.fit_to_teacher``).

Both run inside ``vislang compress``: they keep its random stream (``seeds_globally`` False) and, with ``out_dir``
empty, write nothing; given an ``out_dir`` they checkpoint and resume like any run of the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ...data.loading import epoch_batches
from ...losses import g_loss
from ..config import OptimConfig, TrainConfig
from ..loop import Run, Task
from ..optim import build_optimizer

LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def memory_config(
    steps: int, batch_size: int, seed: int, optim: OptimConfig, device: str, out_dir: str = ""
) -> TrainConfig:
    """The loop's settings of a short in-memory run: ``steps`` steps, no bar, no files (unless ``out_dir``)."""
    return TrainConfig(task="steps", optim=optim, max_steps=steps, batch_size=batch_size, seed=seed, precision="fp32",
                       device=device, log_every=10**9, save_every=0, out_dir=out_dir, progress=False)  # fmt: skip


def module_device(module: nn.Module) -> str:
    return str(next(module.parameters()).device)


class StepsTask(Task):
    """AdamW on ``model``'s trainable parameters, warmup + cosine, clipping at 1, on ``loss_fn(batch)`` over
    ``data`` (``TokenizedPairs``) in shuffled epochs; records every step's loss."""

    name = "fine-tune"
    seeds_globally = False
    nonfinite_hint = "lower the learning rate"

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, log_every: int = 0) -> None:
        self.model, self.loss_fn, self.data, self.log_every = model, loss_fn, data, log_every
        self.losses: list[float] = []

    def setup(self, run: Run) -> None:

        self.run, self.cfg = run, run.cfg
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.model.train()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def clip_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def epoch_length(self, epoch: int) -> int:
        return len(self.data) // self.cfg.batch_size

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:

        for idx in epoch_batches(len(self.data), self.cfg.batch_size, self.cfg.seed, epoch)[start:]:
            yield self.data.get_batch(idx)

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        loss = self.loss_fn(batch)
        self.losses.append(loss.item())
        return loss

    def after_step(self, step: int) -> None:
        if self.log_every and step % self.log_every == 0:
            mean = sum(self.losses[-self.log_every :]) / self.log_every
            print(f"[vislang] step {step}/{self.run.total_steps}: loss {mean:.4f}")

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = list(state["losses"])

    def finish(self) -> list[float]:
        self.model.eval()
        return self.losses


class TeacherFitTask(Task):
    """A student generator learns to draw its teacher's images: L1 on the same noise and conditions (fresh each step
    from the task's own generator), plus ``adv_weight`` times the generator loss under a frozen ``critic``; Adam
    (betas 0.5, 0.999), the learning rate falling by a cosine to zero, no clipping."""

    name = "fit to teacher"
    seeds_globally = False
    nonfinite_hint = "lower the learning rate"

    def __init__(self, student: nn.Module, teacher: nn.Module, conds: torch.Tensor, z_dim: int, lr: float, **kw: Any):
        self.student, self.teacher, self.conds, self.z_dim, self.lr = student, teacher, conds, z_dim, lr
        self.train_norms = kw.get("train_norms", False)
        self.log_every, self.critic = kw.get("log_every", 0), kw.get("critic")
        self.adv_weight, self.loss_kind = kw.get("adv_weight", 0.1), kw.get("loss_kind", "hinge")
        self.losses: list[float] = []

    def setup(self, run: Run) -> None:
        self.run, self.cfg = run, run.cfg
        self.teacher.eval()
        self.student.train(self.train_norms)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=self.lr, betas=(0.5, 0.999))
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.group = max(1, getattr(self.critic, "mbstd", 0)) if self.critic is not None else 1
        bs = self.cfg.batch_size
        self.batch_size = max(self.group, bs - bs % self.group)  # whole groups of one text, as the critic trained

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def epoch_length(self, epoch: int) -> int:
        return self.cfg.max_steps  # one epoch: the whole run draws fresh noise and conditions

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        g, bs = self.group, self.batch_size
        for _ in range(start, self.epoch_length(epoch)):
            pick = torch.randint(len(self.conds), (bs // g,), generator=self.gen)
            c = self.conds[pick].repeat_interleave(g, dim=0)  # (B, E): groups of one text
            z = torch.randn(bs, self.z_dim, generator=self.gen)  # (B, Z)
            yield {"z": z, "c": c}

    def learning_rates(self, step: int, total: int) -> float:
        return self.lr * 0.5 * (1 + np.cos(np.pi * step / total))  # the last steps settle rather than wander

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:

        z, c = batch["z"], batch["c"]
        with torch.no_grad():
            target = self.teacher(z, c)  # (B, C, H, W) in [-1, 1]
        x = self.student(z, c)
        l1 = torch.nn.functional.l1_loss(x, target)
        critic = self.critic
        adversarial = critic is not None and self.adv_weight > 0
        loss = l1 + self.adv_weight * g_loss(critic(x, c), self.loss_kind) if adversarial else l1
        self.losses.append(l1.item())
        return loss

    def after_step(self, step: int) -> None:
        if self.log_every and step % self.log_every == 0:
            mean = np.mean(self.losses[-self.log_every :])
            print(f"[vislang] step {step}/{self.run.total_steps}: L1 to the teacher {mean:.4f}")

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses, _ = list(state["losses"]), self.gen.set_state(state["gen"])

    def finish(self) -> list[float]:
        return self.losses
