"""Classification fine-tuning in the one loop: ``vislang finetune``'s full and scratch methods (``train_end_to_end``).

The task is handed a built ``ImageClassifier`` and its splits by ``finetune.run`` (the probe's head is fitted there,
before training), so it runs inside that larger job: it keeps the job's torch random stream (``seeds_globally``
False) and, with ``out_dir`` empty, writes nothing of its own; ``finetune.run`` writes the method's directory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data.transforms import normalize
from ..config import OptimConfig, TrainConfig
from ..loop import Run, Task


class FinetuneTask(Task):
    """Cross-entropy over tower and head (AdamW groups at their own learning-rate scales), validation per epoch."""

    seeds_globally = False
    budget_fit_from = 20  # the schedule is fitted to the budget on the pace of the first 20 steps
    nonfinite_hint = "lower --lr"

    def __init__(self, model: nn.Module, splits: Any, fcfg: Any, tower_scale: float, method: str) -> None:
        self.model, self.splits, self.fcfg, self.tower_scale, self.name = model, splits, fcfg, tower_scale, method
        self.history: list[dict[str, Any]] = []
        self.loss_avg: float | None = None

    def setup(self, run: Run) -> None:
        from ...finetune.run import param_groups

        self.run, self.cfg = run, run.cfg
        fcfg, model = self.fcfg, self.model
        o, groups = self.cfg.optim, param_groups(model, fcfg, self.tower_scale)
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
        self.n, self.bs = len(self.splits.train), self.cfg.batch_size
        self.gen = torch.Generator().manual_seed(self.cfg.seed)  # the augmentations' own random stream
        self.channels_last = run.device.type == "cpu" and model.cfg.vision.arch == "cnn"
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.forward_model = run.ddp(model)
        model.train()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def epoch_length(self, epoch: int) -> int:
        return self.n // self.bs

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        from ...data.loading import epoch_batches

        for idx in epoch_batches(self.n, self.bs, self.cfg.seed, epoch)[start:]:
            batch = self.splits.train.get_batch(idx)
            yield {"image": batch["image"].to(self.run.device), "label": batch["label"].to(self.run.device)}

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        v = self.model.cfg.vision
        x = normalize(batch["image"], v.mean, v.std)  # (B, C, H, W) float
        if self.fcfg.augment:
            from ...finetune.run import augment

            x = augment(x, self.gen)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(self.forward_model(x), batch["label"], label_smoothing=self.fcfg.label_smoothing)
        value = loss.item()
        self.loss_avg = value if self.loss_avg is None else 0.98 * self.loss_avg + 0.02 * value
        return loss

    def clip_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def evaluate(self, step: int) -> None:
        """Validation top-1 at each epoch end and at the end, kept in the history (``metrics.json``)."""
        from ...finetune.run import accuracy_report, predict

        splits, run = self.splits, self.run
        pred = predict(self.model, splits.val, self.fcfg.eval_batch_size, run.device)
        val = accuracy_report(pred, splits.val.labels, [])
        epoch = math.ceil(step / self.epoch_length(0))
        self.history.append({"epoch": epoch, "step": step, "loss": self.loss_avg, "val_top1": val["top1"]})
        if run.main:
            print(f"[finetune] {self.name} epoch {epoch} (step {step}/{run.total_steps}): val top-1 {val['top1']:.4f}")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "history": self.history, "loss_avg": self.loss_avg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.history, self.loss_avg = state["history"], state["loss_avg"]

    def finish(self) -> dict[str, Any]:
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
        step = self.run.global_step
        epochs = round(step / self.epoch_length(0), 3)
        return {"peak_lr": self.cfg.optim.lr, "steps": step, "epochs": epochs, "history": self.history}


def finetune_train_config(fcfg: Any, method: str, lr: float, batch_size: int, device: torch.device) -> TrainConfig:
    """The loop's settings of one fine-tuning method, from ``vislang finetune``'s config; in memory (no out_dir)."""
    optim = OptimConfig(lr=lr, weight_decay=fcfg.weight_decay, warmup_steps=fcfg.warmup_steps, grad_clip=1.0)
    return TrainConfig(
        task="finetune",
        optim=optim,
        epochs=fcfg.epochs,
        batch_size=batch_size,
        time_budget_min=fcfg.time_budget_min,
        precision=fcfg.precision,
        device=str(device),
        seed=fcfg.seed,
        threads=fcfg.threads,
        log_every=10**9,
        save_every=0,
        out_dir="",
        progress=fcfg.progress,
    )
