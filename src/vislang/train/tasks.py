"""Tasks: where a model meets its loss. The loop calls ``task(batch)`` and never knows which task it runs."""

from __future__ import annotations

import torch
from torch import nn

from ..data.transforms import normalize
from ..losses import ClipLoss, SigLipLoss, caption_loss, itm_loss  # caption_loss: re-exported, it moved there


def unique_rows(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct token rows and, for each input row, the index of its distinct row."""
    uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    return uniq, inverse


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
        extra = {"logit_scale": float(out["logit_scale"].detach())}
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


# Tasks by name: TrainConfig.task picks one. A task is built as TASKS[name](model, cfg) and called on a batch dict
# (image uint8 (B, C, H, W), tokens (B, T), label (B,)) returning (loss, extra scalar metrics).
TASKS = {
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
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](model, cfg)
