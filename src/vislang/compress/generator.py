"""Compression of a text-to-image GAN's generator: int8 (dynamic or static), magnitude pruning and distillation.

A generator is judged by the images it draws, not by a loss on labelled data, so every method here works from the
generator itself and the conditions it was trained on (the text tower's embeddings of the training captions, drawn
as often as each caption occurs), with fresh Gaussian noise:

* ``dynamic-int8``: the Linear layers (the map of [z, c] to the first feature map, the conditional BatchNorms'
  scale and shift) in int8; the transposed convolutions stay fp32, so it saves size more than time.
* ``static-int8``: the generator as an FX graph of int8 Linear layers and transposed convolutions, activation ranges
  calibrated on generated batches (:func:`generator_qconfig` says what stays fp32 and why). FX's quantised
  BatchNorm needs an affine one, so each ``BatchNorm2d(affine=False)`` becomes an affine one with scale 1 and shift
  0 first (the same function). A mixture generator has each component quantised on the noise the mixture routes to it.
* ``prune``: unstructured magnitude pruning of the Linear, Conv2d and ConvTranspose2d weights, the same fraction of
  each layer (:func:`vislang.compress.prune.prune_model` says why not one global threshold), then a short
  fine-tune that pulls the pruned generator's images back to the unpruned one's on the same noise and text (L1 on
  pixels, BatchNorm statistics frozen), sharpened by the frozen discriminator of the training run when the run's
  last checkpoint is there (:func:`fit_to_teacher` says why; a model directory alone gets L1 only).
  Structured (per-channel) pruning is refused: a conditional BatchNorm adds a text-dependent shift to every channel,
  so a channel whose weights are zero still draws.
* ``distill``: a narrower generator (``g_width`` halved unless ``--student`` says otherwise) trained from scratch
  to draw what the teacher draws for the same noise and text (L1 on pixels, as in Aguinaldo et al. 2019,
  "Compressing GANs using knowledge distillation"), then standing BatchNorm statistics over its own outputs. The
  frozen discriminator that helps pruning made the student worse here (:func:`compress_generator`).

Each output is a GAN model directory (``model_type`` ``vislang-gan``) with the teacher's text tower, loadable by
``TextToImage.from_pretrained`` and so by ``vislang generate``, ``generate-eval`` and ``compare``; int8 ones run on
the CPU only.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import apply_overrides, from_dict, to_dict
from ..data.config import DataConfig
from ..data.loading import load_prepared
from ..evaluation.embed import embed_texts
from ..models.gan.build import build_gan, build_generator
from ..models.gan.networks import INTERFACE_FIELDS, GANModelConfig, require_single_generator, standing_stats
from ..models.gan.pipeline import TextToImage
from ..models.gan.quantized import quantize_generator_static
from ..models.int8_io import quantized_state_dict
from ..models.quantized import quantize_dynamic
from ..train.checkpoint import load_checkpoint
from ..train.config import OptimConfig
from ..train.loop import fit
from ..train.tasks.distill import TeacherFitTask, memory_config, module_device
from .distill import param_count
from .prune import make_permanent, prune_model, sparsity_of


def training_conditions(
    model: TextToImage,
    data: str,
    cache_dir: str = ".cache/vislang/prepared",
    max_pairs: int | None = None,
    options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """(N, E) text embeddings of the training captions of ``data``, one row per training image (so a caption is drawn
    as often as it occurs), each distinct caption embedded once."""

    cfg = model.cfg
    dc = DataConfig(train=data, cache_dir=cache_dir, options=dict(options or {}))
    ds = load_prepared(data, "train", cfg.image_size, cfg.channels, dc, progress=False)
    captions = list(ds.captions)[: max_pairs or None]
    if not captions:
        raise ValueError(f"{data} has no captions to condition the generator on; pass --data with captioned images")
    uniq, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    table = embed_texts(model.encoder, model.tokenizer, list(uniq), batch_size=512)  # (U, E), on the CPU
    return table[torch.from_numpy(inverse.astype(np.int64))]  # (N, E)


def save_generator(
    model: TextToImage, generator: nn.Module, cfg: GANModelConfig, out: Path, compression: dict[str, Any]
) -> Path:
    """A GAN model directory of ``generator`` (fp32, or int8 with its stored integer values) beside ``model``'s text
    tower and sample prompts, its config recording ``compression``; written atomically like any model directory."""

    state = quantized_state_dict(generator) if compression.get("method", "").endswith("int8") else None
    student = TextToImage(cfg, generator, model.encoder, model.tokenizer, model.meta)
    return student.save_pretrained(out, extra={"compression": compression}, state=state)


# --- pruning and distillation -----------------------------------------------------------------------------------------
def run_critic(run_dir: Path | None, cfg: GANModelConfig) -> tuple[nn.Module | None, str, Path | None]:
    """(the discriminator the generator was trained against, frozen; its loss kind; the checkpoint) from the last
    checkpoint of ``run_dir``, the training run the user named, or (None, "hinge", None) without one.

    Only a run the user named is read (a model directory's parent is not looked into), and with ``weights_only``
    (``load_checkpoint``): a model someone sent must not bring a checkpoint that runs code."""
    if run_dir is None:
        return None, "hinge", None
    ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        return None, "hinge", None
    state = load_checkpoint(ckpt)
    if "D" not in state:
        return None, "hinge", None
    critic = build_gan(cfg)[1]
    critic.load_state_dict(state["D"])
    kind = ((state.get("config") or {}).get("gan") or {}).get("loss", "hinge")
    return critic.eval().requires_grad_(False), kind, ckpt


def fit_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    conds: torch.Tensor,
    z_dim: int,
    steps: int,
    lr: float,
    batch_size: int = 128,
    seed: int = 0,
    train_norms: bool = False,
    log_every: int = 0,
    critic: nn.Module | None = None,
    adv_weight: float = 0.1,
    loss_kind: str = "hinge",
) -> list[float]:
    """Train ``student`` for ``steps`` Adam steps to draw ``teacher``'s images: L1 between the two on the same noise
    and conditions (fresh each step), plus ``adv_weight`` times the generator loss under ``critic`` (the frozen
    discriminator of the teacher's training run) when there is one.

    Why the critic: L1 alone pulls the student towards a smooth average of what it cannot reproduce exactly, and
    blur is what FID punishes: a Fashion-MNIST generator pruned to 50% and fine-tuned 300 steps measured FID-FM 0.78
    with L1 alone, 0.66 / 0.57 with the critic at weight 0.03 / 0.1 (the unpruned one: 0.37). The L1 term keeps
    the student near the teacher only while the critic's weight is small: at 0.3 and 1.0 the student learnt to
    fool the frozen critic instead (L1 to the teacher rose to 0.5-0.8, FID-FM 48 and 61). Conditions come in
    groups of the critic's minibatch-std size, as its training batches did (class-ordered groups). A student from
    scratch gets no critic (see :func:`compress_generator`).

    ``train_norms`` False keeps the student's BatchNorm statistics frozen (eval mode): a pruned generator keeps the
    teacher's; a student from scratch has none yet and trains them. Returns the per-step L1 losses."""

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    task = TeacherFitTask(student, teacher, conds, z_dim, lr, train_norms=train_norms, log_every=log_every,
                          critic=critic, adv_weight=adv_weight, loss_kind=loss_kind)  # fmt: skip
    cfg = memory_config(steps, batch_size, seed, OptimConfig(lr=lr, grad_clip=None), module_device(student))
    return fit(task, cfg)


def student_gan_config(teacher: GANModelConfig, overrides: list[str] | dict[str, Any] | None) -> GANModelConfig:
    """The teacher's config with ``g_width`` halved, then ``overrides`` (``["g_width=4"]``); the noise, text and image
    sizes must stay the teacher's."""

    data = to_dict(dataclasses.replace(teacher, g_width=max(2, teacher.g_width // 2)))
    if overrides:
        data = apply_overrides(data, overrides)
    cfg = from_dict(GANModelConfig, data, "student")
    changed = [k for k in INTERFACE_FIELDS if getattr(cfg, k) != getattr(teacher, k)]
    if changed:
        raise ValueError(f"the student must keep the teacher's {', '.join(changed)}: only widths and layers may change")
    return cfg


def prune_critic(
    src: Path, cfg: GANModelConfig, adv_weight: float, info: dict[str, Any], run_dir: Path | None = None
) -> tuple[nn.Module | None, str]:
    """(critic, loss kind) for a pruned generator's fine-tune: the frozen discriminator of ``run_dir`` (the run the
    user named), or None (L1 alone) without one; records which in ``info`` (``critic``, ``adv_weight``, a note)."""
    critic, loss_kind, ckpt = run_critic(run_dir, cfg)
    info.update(critic=str(ckpt) if ckpt else None, adv_weight=adv_weight if ckpt else 0.0)
    if ckpt is None:
        beside = src.parent / "checkpoints" / "last.pt"
        hint = "; compress the run directory when you have it"
        if run_dir is None and beside.is_file():
            hint = f"; a checkpoint lies beside it: name the run ({src.parent}) to use its discriminator"
        info["notes"] = [
            f"no training run named for {src} (RUN/checkpoints/last.pt with the discriminator): the student learnt "
            f"from L1 to the teacher's images alone, which blurs{hint}"
        ]
    return critic, loss_kind


def compress_generator(
    src: Path,
    method: str,
    out: Path,
    data: str,
    data_options: dict[str, Any] | None = None,
    sparsity: float = 0.5,
    prune_kind: str = "unstructured",
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 128,
    student: list[str] | dict[str, Any] | None = None,
    calibration_images: int = 2048,
    max_pairs: int | None = None,
    cache_dir: str = ".cache/vislang/prepared",
    seed: int = 0,
    log_every: int = 0,
    adv_weight: float = 0.1,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """``vislang compress`` of a GAN model directory: see the module docstring. Returns what it did. ``run_dir``: the
    training run the user named (its discriminator checkpoint may be read), None when a model directory was named."""

    if method == "prune" and prune_kind != "unstructured":
        raise ValueError(
            "a generator is pruned unstructured only: its conditional BatchNorm shifts every channel by the text, so "
            "a channel with zero weights still draws; use --prune-kind unstructured"
        )
    model = TextToImage.from_pretrained(src, "cpu")  # an int8 source was refused by compress_model_dir
    require_single_generator(model.cfg, src, "compressing")
    cfg, teacher = model.cfg, model.generator.eval()
    torch.manual_seed(seed)
    conds = training_conditions(model, data, cache_dir, max_pairs, data_options)
    info: dict[str, Any] = {"method": method, "family": "generator", "source": str(src), "data": data}
    critic, loss_kind = None, "hinge"
    # The critic sharpens a pruned generator, which starts at the teacher; a student from scratch did worse with it
    # (FID-FM 1.60 with the critic for the second half of 3,000 steps, 0.95 with L1 alone), so distillation is L1.
    if method == "prune" and adv_weight > 0:
        critic, loss_kind = prune_critic(src, cfg, adv_weight, info, run_dir)
    fit = dict(critic=critic, adv_weight=adv_weight, loss_kind=loss_kind, log_every=log_every)
    t0 = time.time()
    if method == "dynamic-int8":
        g = quantize_dynamic(teacher)
        info["modules"] = g._compression["modules"]
        out_cfg = cfg
    elif method == "static-int8":
        g = quantize_generator_static(teacher, cfg, conds, calibration_images, seed)
        info.update(g._compression, calibration_images=calibration_images)
        out_cfg = cfg
    elif method == "prune":
        g = copy.deepcopy(teacher)
        prune_model(g, sparsity, prune_kind, per_layer=True)  # BatchNorm follows most layers: see prune_model
        info.update(kind=prune_kind, target_sparsity=sparsity, sparsity_before_finetune=sparsity_of(g))
        steps = 300 if steps is None else steps
        if steps:
            losses = fit_to_teacher(g, teacher, conds, cfg.z_dim, steps, lr or 2e-4, batch_size, seed, **fit)
            info.update(finetune_steps=steps, first_loss=losses[0], last_loss=float(np.mean(losses[-10:])))
        make_permanent(g)
        info["sparsity"] = sparsity_of(g)
        out_cfg = cfg
    elif method == "distill":
        out_cfg = student_gan_config(cfg, student)
        g = build_generator(out_cfg)
        steps = 3000 if steps is None else steps
        losses = fit_to_teacher(g, teacher, conds, cfg.z_dim, steps, lr or 1e-3, batch_size, seed, True, log_every)
        standing_stats(g, conds, cfg.z_dim, batches=32, batch_size=256, seed=seed)
        info.update(
            steps=steps,
            student={k: getattr(out_cfg, k) for k in ("arch", "g_width", "mixture")},
            teacher_params=param_count(teacher),
            student_params=param_count(g),
            first_loss=float(np.mean(losses[:10])),
            last_loss=float(np.mean(losses[-10:])),
        )
    else:
        raise ValueError(f"unknown compression method {method!r}")
    info["seconds"] = round(time.time() - t0, 1)
    save_generator(model, g.eval(), out_cfg, out, {k: v for k, v in info.items() if v is not None})
    return info
