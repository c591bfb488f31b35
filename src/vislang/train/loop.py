"""The training loop: generic over tasks, resumable exactly, the same on CPU, CUDA and torchrun.

Run layout (``cfg.out_dir``)::

    config.yaml         the resolved run config        metrics.jsonl   one JSON line per log / eval
    tokenizer/          the run's tokenizer            checkpoints/    last.pt (atomic), written every save_every steps
    model/              the final model directory (save_pretrained): all that embed / eval / serve need
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from .. import distributed as dist
from ..config import to_dict
from ..data.loading import TokenizedPairs, batch_loader, epoch_batches, load_prepared
from ..factory import build_model, build_tokenizer, fit_config_to_tokenizer, get_model_config, save_pretrained
from ..models.clip import CLIP
from ..tokenizers import load_tokenizer
from .checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state
from .config import TrainConfig
from .optim import build_optimizer, lr_at, set_lr
from .tasks import build_task


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} asked for, but no CUDA device is visible; use --device=cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast where it pays (CUDA with bf16); fp32 on CPU unless asked, where autocast is slower."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=dtype), scaler


class MetricsLog:
    """Append-only JSONL; each line is flushed so a crash loses nothing already logged."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _text_of(ds) -> list[str]:
    caps = ds.captions
    return list(caps)


def setup_data(cfg: TrainConfig, image_size: int, channels: int, tokenizer=None, main: bool = True):
    """Prepared train/val sets, the tokenizer (trained on the training captions if needed) and token arrays."""
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


def relation_negative_tokens(tokenizer, captions: list[str], main: bool = True):
    """Token ids of each caption with its spatial relation flipped (an all-zero row where it has none, which the
    contrastive task reads as "no negative"), for ``relation_negatives``."""
    import numpy as np

    from ..data.shapes import relation_flips

    flipped = relation_flips(captions, "relation_negatives")
    has = np.array([f is not None for f in flipped])
    tokens = tokenizer([f or "" for f in flipped]).numpy().astype("int32")
    tokens[~has] = 0
    if main:
        print(f"[vislang] relation negatives: {int(has.sum())} of {len(captions)} captions state a relation")
    return tokens


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train a dual encoder as ``cfg`` says; returns the path of the saved model directory."""
    rank, world, device = dist.init_distributed()
    if cfg.device != "auto" and world == 1:
        device = pick_device(cfg.device)
    main = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoints" / "last.pt"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt_path.exists():
            raise FileExistsError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out-dir"
            )
    torch.manual_seed(cfg.seed + rank)

    mcfg = get_model_config(cfg.model_name, cfg.model)
    train_imgs, val_imgs, train_caps = setup_data(cfg, mcfg.vision.image_size, mcfg.vision.channels, main=main)

    tok_dir = out / "tokenizer"
    if resume and tok_dir.is_dir():
        tokenizer = load_tokenizer(tok_dir)
    elif main:
        tokenizer = build_tokenizer(mcfg, train_caps)
        tokenizer.save(tok_dir)
    dist.barrier()
    if not main:
        tokenizer = load_tokenizer(tok_dir)
    mcfg = fit_config_to_tokenizer(mcfg, tokenizer)

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_tokens = tokenizer(train_caps).numpy().astype("int32")
    if caught and main:
        print(f"[vislang] {caught[0].message}")
    neg_tokens = relation_negative_tokens(tokenizer, train_caps, main) if cfg.relation_negatives > 0 else None
    train_data = TokenizedPairs(train_imgs, train_tokens, cfg.data.max_train, neg_tokens)

    torch.manual_seed(cfg.seed)  # model init depends on the seed alone, not on what data preparation consumed
    model = build_model(mcfg)
    if cfg.pretrained:
        from ..factory import from_pretrained

        model.load_state_dict(from_pretrained(cfg.pretrained).state_dict())
    model.to(device)
    if device.type == "cpu" and mcfg.vision.arch in ("cnn", "cnn-text"):  # vislang CNNs: NHWC convs are faster
        model.visual.to(memory_format=torch.channels_last)
    core = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    task = build_task(cfg.task, model, cfg)
    optimizer = build_optimizer(core, cfg.optim)
    amp, scaler = autocast_for(cfg.precision, device)

    per_step = cfg.batch_size * world * cfg.accum_steps
    steps_per_epoch = len(train_data) // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training set has {len(train_data)} pairs, fewer than one step's {per_step}; lower --batch_size"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    step, epoch, batch_in_epoch = 0, 0, 0
    if resume:
        state = load_checkpoint(ckpt_path)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        total_steps = state["total_steps"]
        set_rng_state(state["rng"])
        if main:
            print(f"[vislang] resumed {ckpt_path} at step {step}/{total_steps} (epoch {epoch})")

    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (out / "model_config.json").write_text(json.dumps(to_dict(mcfg), indent=2))
    log = MetricsLog(out / "metrics.jsonl", main)

    def save_checkpoint() -> None:
        if not main:
            return
        atomic_torch_save(
            {
                "model": core.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "total_steps": total_steps,
                "rng": rng_state(),
                "config": to_dict(cfg),
            },
            ckpt_path,
        )

    from ..data.prepare import summarize_skips

    skip_note = f"{len(train_data)} pairs; at preparation " + summarize_skips(train_imgs.meta.get("skipped", {}))
    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and main), desc="train", unit="step")
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    t_start = time.time()
    t_log, samples_since = time.time(), 0
    loss_sum, loss_n = 0.0, 0
    budget_checked = resume
    fit_from, next_fit = (t_start, 0), 30  # budget refits: pace measured from (time, step), next one at next_fit
    model.train()
    while step < total_steps:
        batches = epoch_batches(len(train_data), cfg.batch_size, cfg.seed, epoch, rank, world)
        batches = batches[: steps_per_epoch * cfg.accum_steps]
        loader = batch_loader(train_data, batches[batch_in_epoch:], cfg.data.num_workers)
        micro = 0
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if device.type == "cpu" and batch["image"].ndim == 4:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            sync = micro + 1 == cfg.accum_steps
            ctx = model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx, amp:
                loss, extras = task(batch)
                loss_scaled = loss / cfg.accum_steps
            (scaler.scale(loss_scaled) if scaler else loss_scaled).backward()
            micro += 1
            batch_in_epoch += 1
            samples_since += batch["image"].shape[0] * world
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"loss became {loss.item()} at step {step}; lower --optim.lr or use --precision=fp32"
                )
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if not sync:
                continue
            micro = 0
            lr = lr_at(step, total_steps, cfg.optim)
            set_lr(optimizer, lr)
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.optim.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if budget_s and not budget_checked and step >= next_fit:
                # Fit the schedule to the time budget from the pace of recent steps, so the cosine decay completes;
                # refitted every few percent of the run, because a shared machine can slow down later on.
                now = time.time()
                per_step = (now - fit_from[0]) / max(1, step - fit_from[1])
                fit = step + int((budget_s - (now - t_start)) / per_step)
                fit = dist.agree_min(fit, device)  # every rank must stop at the same step
                if fit < total_steps:
                    total_steps = max(step + 1, fit)
                    bar.total = total_steps
                    if main:
                        print(f"[vislang] time budget {cfg.time_budget_min} min: schedule set to {total_steps} steps")
                fit_from, next_fit = (now, step), step + max(30, total_steps // 20)
            if step % cfg.log_every == 0 or step == total_steps:
                dt = time.time() - t_log
                rec = {
                    "step": step,
                    "epoch": round(epoch + batch_in_epoch / max(1, len(batches)), 4),
                    "loss": loss_sum / max(1, loss_n),
                    "lr": lr,
                    "samples_per_s": samples_since / max(dt, 1e-9),
                    "elapsed_s": round(time.time() - t_start, 2),
                    **extras,
                }
                log.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{rec['samples_per_s']:.0f}")
                t_log, samples_since, loss_sum, loss_n = time.time(), 0, 0.0, 0
            if cfg.eval_every and step % cfg.eval_every == 0:
                _periodic_eval(core, tokenizer, val_imgs, cfg, step, log, device, main)
                model.train()
            if step % cfg.save_every == 0:
                save_checkpoint()
            if step >= total_steps:
                break
        if batch_in_epoch >= len(batches):  # the epoch ran to its end (not cut by the step limit)
            epoch, batch_in_epoch = epoch + 1, 0
            if main:
                print(f"[vislang] epoch {epoch} done at step {step}: {skip_note}")
            if not cfg.eval_every and step < total_steps:
                _periodic_eval(core, tokenizer, val_imgs, cfg, step, log, device, main)
                model.train()
            save_checkpoint()
    bar.close()
    save_checkpoint()
    _periodic_eval(core, tokenizer, val_imgs, cfg, step, log, device, main)
    model_dir = out / "model"
    if main:
        save_pretrained(core.eval(), model_dir, tokenizer, extra={"train": {"steps": step, "epochs_seen": epoch}})
        print(f"[vislang] trained {step} steps in {time.time() - t_start:.0f} s; model saved to {model_dir}")
    dist.barrier()
    return model_dir


def _periodic_eval(model: CLIP, tokenizer, val, cfg: TrainConfig, step: int, log: MetricsLog, device, main) -> None:
    """A quick look during training: zero-shot top-1 if the data has classes, else text→image R@1."""
    if not main or val is None:
        return
    from ..evaluation.quick import quick_eval

    was_training = model.training
    metrics = quick_eval(model, tokenizer, val, cfg.eval_max, device)
    model.train(was_training)
    if metrics:
        log.write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        print(f"[vislang] step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
