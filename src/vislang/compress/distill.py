"""Knowledge distillation of a dual encoder into a smaller student that matches the teacher's similarity distributions.

For each batch the teacher's image→text and text→image softmax distributions (over the batch's distinct captions and
its images, at the teacher's learned temperature) are the targets; the student's distributions (at its own learned
temperature) are pulled towards them with KL divergence, as in CLIP-KD's relation distillation. Distinct captions
matter: Fashion-MNIST batches repeat captions, and the soft targets give every copy of the right caption its share
where CLIP's one-hot labels would call all but one of them wrong. The student may have any widths and embedding size,
since only similarities are compared; it shares the teacher's tokenizer.

The teacher sees no augmentation, so its embeddings of the whole training set are computed once up front, which
keeps a distillation step as cheap as a student training step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ..config import apply_overrides, from_dict, to_dict
from ..data.loading import TokenizedPairs
from ..data.transforms import normalize
from ..evaluation.embed import embed_images, eval_mode
from ..models.clip import CLIP, ModelConfig
from ..train.tasks import unique_rows
from .finetune import run_steps


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def student_config(teacher: ModelConfig, overrides: dict[str, Any] | list[str] | None = None) -> ModelConfig:
    """The default student: the teacher with the image and text widths, the text MLP ratio and the embedding size
    halved (about 1/5 of the parameters), then ``overrides`` as dotted keys (``["text.layers=1"]``)."""
    v, t = teacher.vision, teacher.text
    if v.arch != "cnn" or t.arch not in ("transformer", "lstm", "gru"):
        if not overrides:
            raise ValueError(
                f"no default student for a {v.arch} image tower with a {t.arch} text tower; "
                "describe the student with --student.KEY=VALUE overrides"
            )
        data = to_dict(teacher)
    else:
        heads = max(1, t.heads // 2) if (t.width // 2) % max(1, t.heads // 2) == 0 else 1
        data = to_dict(
            dataclasses.replace(
                teacher,
                embed_dim=max(8, teacher.embed_dim // 2),
                vision=dataclasses.replace(v, width=max(4, v.width // 2)),
                text=dataclasses.replace(t, width=max(8, t.width // 2), heads=heads, mlp_ratio=t.mlp_ratio / 2),
            )
        )
    if overrides:
        data = apply_overrides(data, overrides)
    cfg = from_dict(ModelConfig, data, "student")
    if cfg.text.vocab_size != t.vocab_size or cfg.text.context_length != t.context_length:
        raise ValueError("the student must keep the teacher's tokenizer: do not change text.vocab_size/context_length")
    return cfg


class _Indexed:
    """A ``TokenizedPairs`` whose batches also carry their item indices (to look up cached teacher embeddings)."""

    def __init__(self, data: TokenizedPairs) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def get_batch(self, indices) -> dict[str, torch.Tensor]:
        return {**self.data.get_batch(indices), "index": torch.as_tensor(indices)}


def teacher_targets(teacher: CLIP, data: TokenizedPairs, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """The teacher's normalised image embeddings (N, E), distinct caption rows (U, T), their embeddings (U, E), the
    caption index of every item (N,), and its logit scale."""
    tokens = data.tokens[: len(data)].long()  # (N, T)
    uniq, inverse = unique_rows(tokens)  # (U, T), (N,)
    image_emb = embed_images(teacher, data, batch_size)  # (N, E)
    with eval_mode(teacher):
        text_emb = torch.cat([teacher.encode_text(uniq[i : i + 1024]) for i in range(0, len(uniq), 1024)])  # (U, E)
        scale = teacher.get_logit_scale().detach().float()
    return {"image": image_emb, "tokens": uniq, "text": text_emb, "caption_of": inverse, "scale": scale}


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Symmetric KL(teacher ‖ student) of image→text (rows) and text→image (columns) distributions, × T²."""
    t = temperature
    loss = 0.0
    for dim in (1, 0):
        target = F.softmax(teacher_logits / t, dim=dim)
        loss = loss + F.kl_div(F.log_softmax(student_logits / t, dim=dim), target, reduction="sum") * t * t
    return loss / (2 * student_logits.shape[0])


def distill_loss_fn(student: CLIP, targets: dict[str, torch.Tensor], temperature: float = 1.0):
    """``loss_fn(batch)`` for ``run_steps``: student logits vs cached teacher logits over the batch's distinct
    captions."""
    mean, std = student.cfg.vision.mean, student.cfg.vision.std

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        idx = batch["index"]  # (B,)
        caps = torch.unique(targets["caption_of"][idx])  # (U,) distinct captions of the batch
        images = normalize(batch["image"], mean, std)  # (B, C, H, W)
        out = student(images, targets["tokens"][caps])
        s_logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T  # (B, U)
        t_logits = targets["scale"] * targets["image"][idx] @ targets["text"][caps].T  # (B, U)
        return distill_loss(s_logits, t_logits, temperature)

    return loss_fn


def distill(
    teacher: CLIP,
    student_cfg: ModelConfig,
    data: TokenizedPairs,
    steps: int = 500,
    lr: float = 2e-3,
    batch_size: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
    log_every: int = 0,
) -> tuple[CLIP, list[float]]:
    """Train a fresh student of ``student_cfg`` to match ``teacher``; returns the student (eval mode) and losses."""

    torch.manual_seed(seed)
    student = CLIP(student_cfg)
    targets = teacher_targets(teacher, data)
    losses = run_steps(
        student,
        distill_loss_fn(student, targets, temperature),
        _Indexed(data),
        steps,
        lr,
        batch_size,
        seed,
        warmup_steps=50,
        log_every=log_every,
    )
    return student, losses
