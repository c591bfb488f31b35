"""Classification fine-tuning in the one loop: ``vislang finetune``'s full and scratch methods (``train_end_to_end``).

The task is handed a built ``ImageClassifier`` and its splits by ``finetune.run`` (the probe's head is fitted there,
before training), so it runs inside that larger job: it keeps the job's torch random stream (``seeds_globally``
False) and, with ``out_dir`` empty, writes nothing of its own; ``finetune.run`` writes the method's directory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data.labelled import LabelledImages
from ...data.loading import epoch_batches
from ...data.transforms import normalize
from ...models.classifier import ImageClassifier
from ..config import OptimConfig, TrainConfig
from ..loop import Run, Task


@dataclass(frozen=True)
class FinetuneConfig:
    model: str = "runs/demo/model"  # model directory whose image tower is used; scratch: also a named config
    data: str = "fashion-mnist"  # fashion-mnist | shapes | a class-per-folder tree | a .csv/.tsv with a label column
    test_data: str | None = None  # test set for a path dataset; None = the named dataset's test split, or a holdout
    train_split: str = "train"  # splits of a named dataset
    test_split: str = "test"
    img_key: str = "filepath"  # CSV column with image paths
    label_key: str = "label"  # CSV column with class labels
    val_fraction: float = 0.1  # share of the training set held out (per class) to pick C and watch training
    max_train: int | None = None  # use only this many training images (smoke runs)
    epochs: float = 3.0  # full / scratch: passes over the training set
    batch_size: int = 128
    lr: float | None = None  # peak learning rate of the head (scratch: of everything); None = DEFAULT_LR[method]
    tower_lr_scale: float = 0.1  # full: the pretrained tower learns at lr * tower_lr_scale
    weight_decay: float = 0.05
    warmup_steps: int = 100  # linear warmup, then cosine decay (train/optim.py's lr_at)
    label_smoothing: float = 0.0  # 0: the probe's head is confident (logit std ~11 on runs/acc1), and smoothing 0.1
    # lifts its starting loss from 0.11 to 2.26, whose gradients then disturb the pretrained tower in full fine-tuning
    augment: bool = True  # random shifts of a few pixels and horizontal flips (full / scratch)
    probe_cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # probe: inverse regularisation strengths tried
    time_budget_min: float | None = None  # full / scratch: shrink the schedule so training ends within this
    threads: int | None = None  # torch CPU threads; 1 suits a shared machine
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # full / scratch: fp32 | bf16 | fp16 | auto (bf16 autocast on CUDA), as vislang train
    seed: int = 0
    eval_batch_size: int = 1024
    cache_dir: str = ".cache/vislang/prepared"  # prepared copies of named datasets
    out_dir: str = "runs/finetune"
    progress: bool = True


# --- data and towers -------------------------------------------------------------------------------------------------


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ~1/14 of its side (edge pixels repeat) and flip half of them; x (B, C, H, W)."""
    B, C, H, W = x.shape
    pad = max(1, H // 14)
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, C, H + 2p, W + 2p)
    dy = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator)
    rows = dy + torch.arange(H)  # (B, H)
    cols = dx + torch.arange(W)  # (B, W)
    flip = torch.rand(B, 1, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    b = torch.arange(B)[:, None, None, None]
    c = torch.arange(C)[None, :, None, None]
    idx_r, idx_c = rows.to(x.device)[:, None, :, None], cols.to(x.device)[:, None, None, :]
    return xp[b.to(x.device), c.to(x.device), idx_r, idx_c]  # (B, C, H, W)


def param_groups(model: ImageClassifier, cfg: FinetuneConfig, tower_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: tower and head at their own learning-rate scales; norms and biases without weight decay."""
    skip = model.no_weight_decay()
    groups = []
    for prefix, scale in (("visual.", tower_scale), ("head.", 1.0)):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
        for decay in (True, False):
            params = [p for n, p in named if (n not in skip) == decay]
            if params:
                groups.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "scale": scale})
    return groups


@torch.inference_mode()
def predict(model: ImageClassifier, data: LabelledImages, batch_size: int, device: torch.device) -> np.ndarray:
    """Predicted class per image (N,), in eval mode."""
    was_training = model.training
    model.eval()
    preds = []
    v = model.cfg.vision
    for s in range(0, len(data), batch_size):
        x = normalize(data.get_batch(np.arange(s, min(s + batch_size, len(data))))["image"].to(device), v.mean, v.std)
        preds.append(model(x).argmax(-1).cpu())
    model.train(was_training)
    return torch.cat(preds).numpy()


def accuracy_report(pred: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Top-1 and accuracy per class (by name)."""
    per_class = {
        name: float((pred[labels == i] == i).mean()) if (labels == i).any() else None
        for i, name in enumerate(class_names)
    }
    return {"top1": float((pred == labels).mean()), "per_class": per_class}


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

        for idx in epoch_batches(self.n, self.bs, self.cfg.seed, epoch)[start:]:
            batch = self.splits.train.get_batch(idx)
            yield {"image": batch["image"].to(self.run.device), "label": batch["label"].to(self.run.device)}

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        v = self.model.cfg.vision
        x = normalize(batch["image"], v.mean, v.std)  # (B, C, H, W) float
        if self.fcfg.augment:
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
