"""Dual-encoder tasks (contrastive / SigLIP, caption, CoCa, ITM): objectives, and the task that runs them in the loop.

An *objective* (``ContrastiveTask``, ``CaptionTask``, ``ITMTask``, built by ``build_task``) is where a model meets its
loss: called on a batch dict (image uint8 (B, C, H, W), tokens (B, T), label (B,)) it returns (loss, extra scalar
metrics). ``DualEncoderTask`` is the loop's task (``train.loop``'s protocol): prepared data, tokenizer, the model,
AdamW, periodic zero-shot / retrieval evaluation and the saved model directory.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ... import distributed as dist
from ... import precision as prec
from ...config import to_dict
from ...data.loading import TokenizedPairs, batch_loader, epoch_batches, load_prepared
from ...data.prepare import summarize_skips
from ...data.shapes import relation_flips
from ...data.transforms import normalize
from ...evaluation.quick import quick_eval
from ...factory import (
    build_model,
    build_tokenizer,
    fit_config_to_tokenizer,
    from_pretrained,
    get_model_config,
    save_pretrained,
)
from ...losses import ClipLoss, SigLipLoss, caption_loss, itm_loss  # caption_loss: re-exported, it moved there
from ...tokenizers import load_tokenizer
from ..loop import Task
from ..optim import build_optimizer, lr_at


def unique_rows(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct token rows and, for each input row, the index of its distinct row."""
    uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    return uniq, inverse


def precise_batchnorm(model: nn.Module, batches: Iterator[torch.Tensor]) -> int:
    """Set the running mean and variance of every BatchNorm in ``model.visual`` to the statistics of ``batches``
    (normalised image batches) under the current weights ("precise BN"); returns how many layers were set.

    Why: the running averages trail the weights by ~1/momentum = 10 steps, and at a high learning rate the weights
    move faster than that, so an evaluation in eval mode sees stale statistics. Measured on the demo model
    (fmnist-cnn, lr 2e-3, zero-shot on 1,000 test images): step 75 64.1% with the running averages, 82.1% with
    statistics of 2,048 training images; step 100 76.3 / 86.3%; step 150 83.5 / 87.6%. Training is unaffected (it
    normalises by batch statistics); a locked image tower keeps its pretrained statistics.
    """
    if getattr(model, "_locked_image", False):
        return 0
    bns = [m for m in model.visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bns = [m for m in bns if m.track_running_stats]
    if not bns:
        return 0
    was, momenta = model.visual.training, [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.visual.train()
    with torch.no_grad(), dist.local_statistics(model.visual):  # the main process alone: no all-reduce to wait in
        for images in batches:
            model.visual(images)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.visual.train(was)
    return len(bns)


class ContrastiveTask(nn.Module):
    """Image–text contrastive pretraining (CLIP softmax or SigLIP sigmoid loss).

    With ``dedupe_text`` each distinct caption in a batch is encoded once and its embedding reused: the loss and the
    gradients are identical, and datasets whose captions repeat (class templates, alt-texts) train much faster.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str = "clip",
        dedupe_text: bool = True,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        relation_negatives: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model  # possibly DDP-wrapped
        self.relation_negatives = relation_negatives
        core = getattr(model, "module", model)
        self.mean, self.std = core.cfg.vision.mean, core.cfg.vision.std
        if loss == "clip":
            self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
        elif loss == "siglip":
            if core.logit_bias is None:
                raise ValueError("loss=siglip needs a logit bias: set --model.init_logit_bias=-10")
            self.loss = SigLipLoss(gather_with_grad=gather_with_grad)
        else:
            raise ValueError(f"unknown loss {loss!r}; choose clip or siglip")
        self.dedupe_text = dedupe_text

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        images = normalize(batch["image"], self.mean, self.std)  # (B, C, H, W) float
        tokens = batch["tokens"]  # (B, T)
        negs = batch.get("neg_tokens") if self.relation_negatives > 0 else None
        has_neg = (negs != 0).any(dim=1) if negs is not None else None  # (B,) rows with a hard-negative caption
        n_neg = int(has_neg.sum()) if has_neg is not None else 0
        texts = torch.cat([tokens, negs[has_neg]]) if n_neg else tokens  # negatives ride in the same forward
        if self.dedupe_text:
            uniq, inverse = unique_rows(texts)
            out = self.model(images, uniq)
            out["text_features"] = out["text_features"][inverse]  # (B + n_neg, E)
        else:
            out = self.model(images, texts)
        text_f = out["text_features"]
        b = tokens.shape[0]
        loss = self.loss(out["image_features"], text_f[:b], out["logit_scale"], out.get("logit_bias"))
        extra = {"logit_scale": out["logit_scale"].detach()}
        if n_neg:
            rel_loss, rel_acc = relation_negative_loss(
                out["image_features"][has_neg], text_f[:b][has_neg], text_f[b:], out["logit_scale"]
            )
            loss = loss + self.relation_negatives * rel_loss
            extra.update(rel_loss=float(rel_loss.detach()), rel_acc=rel_acc)
        return loss, extra


def relation_negative_loss(
    image: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Two-way softmax per image between its caption and the same caption with the relation flipped (normalised
    features (N, E) each): only word order tells them apart. Returns (loss, share of images preferring their own)."""
    logits = logit_scale * torch.stack([(image * pos).sum(1), (image * neg).sum(1)], dim=1)  # (N, 2)
    loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
    return loss, float((logits[:, 0] > logits[:, 1]).float().mean())


class CaptionTask(nn.Module):
    """Captioning alone (``contrastive=None``), or CoCa: contrastive loss + ``caption_weight`` * caption loss."""

    def __init__(self, model: nn.Module, contrastive: ContrastiveTask | None = None) -> None:
        super().__init__()
        self.model = model
        core = getattr(model, "module", model)
        if getattr(core.cfg, "decoder", None) is None:
            raise ValueError("caption tasks need a model with a decoder: set model.decoder (see configs/caption.yaml)")
        self.mean, self.std = core.cfg.vision.mean, core.cfg.vision.std
        self.pad_id, self.weight = core.cfg.text.pad_id, core.cfg.decoder.caption_weight
        self.contrastive = contrastive

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        images = normalize(batch["image"], self.mean, self.std)  # (B, C, H, W) float
        tokens = batch["tokens"].long()  # (B, T): [BOS] ... [EOS] pad
        out = self.model(images, tokens)
        cap = caption_loss(out["caption_logits"], tokens, self.pad_id)
        if self.contrastive is None:
            return cap, {"caption_loss": float(cap.detach())}
        con = self.contrastive.loss(
            out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
        )
        extras = {"caption_loss": float(cap.detach()), "contrastive_loss": float(con.detach())}
        return con + self.weight * cap, {**extras, "logit_scale": float(out["logit_scale"].detach())}


class ITMTask(nn.Module):
    """ALBEF's pair of objectives: contrastive loss (ITC) + ``itm_weight`` * image–text matching on hard negatives.

    The model samples the ITM negatives from its own contrastive similarities inside ``forward(..., itm=True)`` (so
    DDP sees every parameter used in one forward); under DDP they are drawn from every rank's batch (BLIP's way).
    """

    def __init__(self, model: nn.Module, contrastive: ContrastiveTask) -> None:
        super().__init__()
        self.model = model
        core = getattr(model, "module", model)
        if getattr(core.cfg, "itm", None) is None:
            raise ValueError("task itm needs a model with an ITM head: set model.itm (see configs/itm.yaml)")
        self.mean, self.std = core.cfg.vision.mean, core.cfg.vision.std
        self.weight = core.cfg.itm.itm_weight
        self.contrastive = contrastive

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        images = normalize(batch["image"], self.mean, self.std)  # (B, C, H, W) float
        out = self.model(images, batch["tokens"].long(), itm=True)
        con = self.contrastive.loss(
            out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
        )
        itm = itm_loss(out["itm_logits"], out["itm_labels"])
        acc = (out["itm_logits"].detach().argmax(-1) == out["itm_labels"]).float().mean()
        extras = {"contrastive_loss": float(con.detach()), "itm_loss": float(itm.detach()), "itm_acc": float(acc)}
        return con + self.weight * itm, {**extras, "logit_scale": float(out["logit_scale"].detach())}


# Objectives by name: TrainConfig.task picks one. Built as OBJECTIVES[name](model, cfg) and called on a batch dict
# (image uint8 (B, C, H, W), tokens (B, T), label (B,)) returning (loss, extra scalar metrics).
OBJECTIVES = {
    "contrastive": lambda model, cfg: ContrastiveTask(
        model, cfg.loss, cfg.dedupe_text, cfg.local_loss, cfg.gather_with_grad, cfg.relation_negatives
    ),
    "caption": lambda model, cfg: CaptionTask(model),
    "coca": lambda model, cfg: CaptionTask(
        model, ContrastiveTask(model, cfg.loss, False, cfg.local_loss, cfg.gather_with_grad)
    ),
    "itm": lambda model, cfg: ITMTask(
        model, ContrastiveTask(model, cfg.loss, False, cfg.local_loss, cfg.gather_with_grad)
    ),
}


def build_task(name: str, model: nn.Module, cfg) -> nn.Module:
    """The objective ``name`` on ``model`` (possibly DDP-wrapped): a module called on a batch dict."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](model, cfg)


# --- the loop's task --------------------------------------------------------------------------------------------------
def _text_of(ds) -> list[str]:
    return list(ds.captions)


def setup_data(cfg, image_size: int, channels: int, main: bool = True):
    """Prepared train/val sets and the training captions; rank 0 prepares, the others wait and then read the cache."""

    d = cfg.data
    progress = cfg.progress and main
    if main:
        train_imgs = load_prepared(d.train, d.train_split, image_size, channels, d, progress)
    dist.barrier()
    if not main:
        train_imgs = load_prepared(d.train, d.train_split, image_size, channels, d, False)
    val_spec = d.val or d.train
    val_imgs = None
    try:
        if main:
            val_imgs = load_prepared(val_spec, d.val_split, image_size, channels, d, progress)
        dist.barrier()
        if not main:
            val_imgs = load_prepared(val_spec, d.val_split, image_size, channels, d, False)
    except (ValueError, FileNotFoundError, KeyError) as e:
        if d.val:
            raise
        print(f"[vislang] no validation split ({e}); training without periodic evaluation")
    train_caps = _text_of(train_imgs)
    if d.max_train:
        train_caps = train_caps[: d.max_train]
    return train_imgs, val_imgs, train_caps


def relation_negative_tokens(tokenizer, captions: list[str], main: bool = True) -> np.ndarray:
    """Token ids of each caption with its spatial relation flipped (an all-zero row where it has none, which the
    contrastive task reads as "no negative"), for ``relation_negatives``."""

    flipped = relation_flips(captions, "relation_negatives")
    has = np.array([f is not None for f in flipped])
    tokens = tokenizer([f or "" for f in flipped]).numpy().astype("int32")
    tokens[~has] = 0
    if main:
        print(f"[vislang] relation negatives: {int(has.sum())} of {len(captions)} captions state a relation")
    return tokens


class DualEncoderTask(Task):
    """``vislang train`` of a dual encoder / captioner (tasks contrastive, caption, coca, itm) in the one loop."""

    name = "train"

    def setup(self, run) -> None:

        cfg, main, out = run.cfg, run.main, run.out_dir
        self.run, self.cfg = run, cfg
        mcfg = get_model_config(cfg.model_name, cfg.model)
        train_imgs, self.val, train_caps = setup_data(cfg, mcfg.vision.image_size, mcfg.vision.channels, main)
        tok_dir = out / "tokenizer"
        if run.resume and tok_dir.is_dir():
            tokenizer = load_tokenizer(tok_dir)
        elif main:
            tokenizer = build_tokenizer(mcfg, train_caps)
            tokenizer.save(tok_dir)
        dist.barrier()
        if not main:
            tokenizer = load_tokenizer(tok_dir)
        self.tokenizer = tokenizer
        mcfg = self.mcfg = fit_config_to_tokenizer(mcfg, tokenizer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_tokens = tokenizer(train_caps).numpy().astype("int32")
        if caught and main:
            print(f"[vislang] {caught[0].message}")
        neg = relation_negative_tokens(tokenizer, train_caps, main) if cfg.relation_negatives > 0 else None
        self.data = TokenizedPairs(train_imgs, train_tokens, cfg.data.max_train, neg)

        skipped = summarize_skips(train_imgs.meta.get("skipped", {}))
        self.skip_note = f"{len(self.data)} pairs; at preparation {skipped}"
        per_step = cfg.batch_size * run.world * cfg.accum_steps
        if len(self.data) // per_step == 0:
            raise ValueError(
                f"the training set has {len(self.data)} pairs, fewer than one step's {per_step}; lower --batch_size"
            )

        torch.manual_seed(cfg.seed)  # model init depends on the seed alone, not on what data preparation consumed
        model = build_model(mcfg)
        if cfg.pretrained:
            model.load_state_dict(from_pretrained(cfg.pretrained).state_dict())
        model.to(run.device)
        self.channels_last = run.device.type == "cpu" and mcfg.vision.arch in ("cnn", "cnn-text", "cnn-grid")
        if self.channels_last:  # vislang CNNs: NHWC convs are faster on a CPU
            model.visual.to(memory_format=torch.channels_last)
        self.core = model
        self.objective = build_task(cfg.task, run.ddp(model), cfg)
        if cfg.compile:  # the model and its loss as one graph (the caption dedupe's torch.unique splits it in two)
            self.objective = torch.compile(self.objective)
        self.optimizer = build_optimizer(model, cfg.optim)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "model_config.json").write_text(json.dumps(to_dict(mcfg), indent=2))
        model.train()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.core}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def _epoch(self, epoch: int) -> list[np.ndarray]:

        return epoch_batches(len(self.data), self.cfg.batch_size, self.cfg.seed, epoch, self.run.rank, self.run.world)

    def epoch_length(self, epoch: int) -> int:
        return len(self._epoch(epoch))

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:

        steps = len(self._epoch(epoch)) // self.cfg.accum_steps * self.cfg.accum_steps
        dev = self.run.device
        loader = batch_loader(self.data, self._epoch(epoch)[start:steps], self.cfg.data.num_workers)
        # A DataLoader draws its base seed from torch's global generator when iterated. An uninterrupted run made
        # that draw at the epoch's start, before the checkpoint's RNG state was taken: a run resumed mid-epoch must
        # not draw again, or every later draw of the run (ITM's hard negatives, dropout) shifts by one.
        if start > 0:
            state = torch.get_rng_state()
            it = iter(loader)
            torch.set_rng_state(state)
        else:
            it = iter(loader)
        for batch in it:
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            if self.channels_last and batch["image"].ndim == 4:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            yield batch

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(batch)

    def learning_rates(self, step: int, total: int) -> float:

        return lr_at(step, total, self.cfg.optim)

    def clip_parameters(self) -> list[nn.Parameter]:
        return list(self.core.parameters())

    def samples(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["image"].shape[0])

    def evaluate(self, step: int) -> dict[str, float] | None:
        """A quick look during training: zero-shot top-1 if the data has classes, else text→image R@1."""
        if not self.run.main or self.val is None:
            return None

        was_training = self.core.training
        self.calibrate()
        metrics = quick_eval(self.core, self.tokenizer, self.val, self.cfg.eval_max, self.run.device)
        self.core.train(was_training)
        return {f"eval/{k}": v for k, v in metrics.items()} if metrics else None

    def calibrate(self) -> int:
        """``precise_bn``: the image tower's BatchNorm statistics from ``cfg.precise_bn`` training images (the same
        seeded pick every time), before an evaluation or saving; the number of layers set (0: none, or off)."""
        n = min(self.cfg.precise_bn, len(self.data))
        if n <= 0:
            return 0
        pick = np.sort(np.random.default_rng(self.cfg.seed).choice(len(self.data), n, replace=False))
        v = self.mcfg.vision

        def batches() -> Iterator[torch.Tensor]:
            for i in range(0, n, self.cfg.batch_size):
                images = self.data.get_batch(pick[i : i + self.cfg.batch_size])["image"].to(self.run.device)
                if self.channels_last and images.ndim == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                yield normalize(images, v.mean, v.std)  # (b, C, H, W) float

        with prec.autocast(self.run.precision, self.run.device):  # as training computes them: bf16 halves the time
            return precise_batchnorm(self.core, batches())

    def epoch_note(self) -> str:
        return self.skip_note

    def finish(self) -> Path:

        model_dir = self.run.out_dir / "model"
        if self.run.main:
            extra = {"train": {"steps": self.run.global_step, "epochs_seen": self.run.epoch}}
            self.calibrate()
            save_pretrained(self.core.eval(), model_dir, self.tokenizer, extra=extra)
            steps, secs = self.run.global_step, self.run.elapsed()
            print(f"[vislang] trained {steps} steps in {secs:.0f} s; model saved to {model_dir}")
        return model_dir
