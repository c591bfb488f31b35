"""The text-conditioned GAN (``task: gan``) in the one loop, with manual optimisation: two optimizers, EMA, FID.

Each step is ``gan_step.gan_step`` (one discriminator update, one generator update through the updated D, the
EMA update), whose optimizers step through the loop's ``Run.step``; the learning rates follow ``gan.lr_decay_from``
(``gan_step.lr_factor``). The task adds what the loop does not know about: the frozen text tower's condition
tables, IC-GAN instance banks, sample grids (``samples/``), tracked FID-FM with a judge (``fid.png``, ``keep_best``),
the EMA generator's standing BatchNorm statistics and the ``TextToImage`` model directory. A time budget simply
ends the run when it is spent (``budget_fit_from`` None). Run layout: see ``gan_step``.

Under torchrun a step is one process's step on the global batch (``batch_size`` × ranks): each rank takes its rows
of that batch, G trains through its DDP wrapper (BatchNorm over the global batch), D's update pass through
``Calls(D)``'s, and noise, wrong-text pairs and the text-matching softmax are the global batch's (``gan_step``).
Rank 0 alone tracks FID, writes samples and saves.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import distributed as dist
from ...config import from_dict, to_dict
from ...data.fashion_mnist import format_caption
from ...data.loading import epoch_batches, load_prepared
from ...data.shapes import relation_flips
from ...evaluation.embed import embed_texts
from ...evaluation.gan import FIDTracker
from ...evaluation.plots import plot_tracked_fid
from ...factory import from_pretrained, get_tokenizer
from ...models.gan.build import build_gan
from ...models.gan.instance import instance_features, neighbours
from ...models.gan.networks import GANModelConfig, from_uint8, parse_augment, standing_stats, to_uint8
from ...models.gan.pipeline import TextToImage, save_grid
from ..config import GANConfig, TrainConfig
from ..loop import Calls, Run, Task, fit
from .gan_step import default_prompts, gan_step, instance_dim, lr_factor


def check_gan_config(gan: GANConfig) -> None:
    """Refuse inconsistent GAN settings before anything loads, saying which to change."""

    if gan.group_by_label and gan.relation_negatives:
        raise ValueError("gan.group_by_label and gan.relation_negatives each order the batch; choose one")
    parse_augment(gan.augment)  # an unknown augmentation fails before anything loads
    if (gan.fid_every or gan.keep_best) and not gan.judge:
        raise ValueError(
            "gan.fid_every and gan.keep_best track FID-FM with a fixed classifier: pass --gan.judge=DIR "
            "(train one with `vislang finetune --model fmnist-cnn --method scratch --out runs/finetune`)"
        )
    if gan.coverage > 0 and min(gan.coverage_candidates, gan.coverage_images) < 1:
        raise ValueError(
            f"gan.coverage_candidates={gan.coverage_candidates} and gan.coverage_images={gan.coverage_images} "
            "must be at least 1 (fakes drawn per real image, real images per batch) when gan.coverage is on"
        )
    if gan.r1 < 0 or gan.r1_every < 1:
        raise ValueError(
            f"gan.r1={gan.r1} must be >= 0 (0 = off) and gan.r1_every={gan.r1_every} >= 1 (R1 on every k-th step)"
        )
    if gan.d_steps < 1:
        raise ValueError(f"gan.d_steps={gan.d_steps} must be at least 1 (discriminator updates per generator update)")
    if not 0.0 <= gan.lr_decay_from <= 1.0:
        raise ValueError(
            f"gan.lr_decay_from={gan.lr_decay_from} must lie in [0, 1] (the fraction of the steps "
            "after which the learning rates fall linearly to 0; 1 keeps them constant)"
        )


class GANTask(Task):
    """``vislang train`` with ``task: gan``: generator G, discriminator D, EMA copy G_ema, Adam for each of G and D."""

    name = "train gan"
    automatic_optimization = False
    budget_fit_from = None  # the budget ends the run when spent (a decaying rate is cut where it stands)
    nonfinite_hint = "lower --gan.lr_d/--gan.lr_g"

    def check(self, cfg: TrainConfig) -> None:
        """A missing text tower is refused before the run folder is made: a fresh clone has none until `make demo`."""
        gan = cfg.gan or GANConfig()
        if not Path(gan.text_model).is_dir():
            raise FileNotFoundError(
                f"gan.text_model {gan.text_model!r} is not a model directory; make one with `make demo` or "
                "`vislang train --config demo` (both write runs/demo/model), or pass --gan.text_model=DIR"
            )

    def setup(self, run: Run) -> None:

        self.cudnn_before = torch.backends.cudnn.benchmark  # close() puts it back, also after an error
        cfg = run.cfg
        self.run, self.cfg = run, cfg
        gan = self.gan = cfg.gan or GANConfig()
        check_gan_config(gan)
        if run.device.type == "cuda":  # the same shapes every step: let cuDNN time its convolution algorithms once
            torch.backends.cudnn.benchmark = True
        self.check(cfg)
        self.encoder = from_pretrained(gan.text_model, run.device).eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.tokenizer = get_tokenizer(gan.text_model)
        self.mcfg = self._model_config()
        self._conditions()
        self._build()
        if run.out_dir is not None and run.main:
            (run.out_dir / "gan_model_config.json").write_text(json.dumps(to_dict(self.mcfg), indent=2))

    def _model_config(self):

        gan, enc, cfg = self.gan, self.encoder, self.cfg
        v = enc.cfg.vision
        inst = {"instance_dim": instance_dim(gan.model, enc.cfg.embed_dim)} if gan.model.get("instance_bank") else {}
        base = {"cond_dim": enc.cfg.embed_dim, "image_size": v.image_size, "channels": v.channels}
        mcfg = from_dict(GANModelConfig, {**gan.model, **base, **inst}, "gan.model")
        if mcfg.instance_bank > 0 and gan.relation_negatives:
            raise ValueError(
                "gan.relation_negatives is not supported with instance conditioning (gan.model.instance_bank)"
            )
        if mcfg.minibatch_std > 0 and cfg.batch_size % mcfg.minibatch_std:
            raise ValueError(
                f"gan.model.minibatch_std={mcfg.minibatch_std} must divide --batch_size={cfg.batch_size}, or a "
                "group of the minibatch-std channel would mix real and generated images; use a batch size it divides"
            )
        return mcfg

    def _conditions(self) -> None:
        """The data, the frozen tower's embedding of every distinct caption, relation flips, the instance bank."""

        cfg, gan, device, enc, tok = self.cfg, self.gan, self.run.device, self.encoder, self.tokenizer
        d, v = cfg.data, enc.cfg.vision
        main = self.run.main
        if main:  # rank 0 prepares (and caches) the data, the others then read it
            self.data = load_prepared(d.train, d.train_split, v.image_size, v.channels, d, cfg.progress)
        dist.barrier()
        if not main:
            self.data = load_prepared(d.train, d.train_split, v.image_size, v.channels, d, False)
        n = self.n = min(len(self.data), d.max_train) if d.max_train else len(self.data)
        self.captions = self.data.captions[:n]
        uniq, inverse = np.unique(np.asarray(self.captions, dtype=object).astype(str), return_inverse=True)
        if main:
            print(f"[vislang] embedding {len(uniq)} distinct captions of {n} images with the frozen text tower")
        self.cond_table = embed_texts(enc, tok, list(uniq), batch_size=512).to(device)  # (U, E)
        self.cap_index = torch.from_numpy(inverse.astype(np.int64))  # (N,)
        self.flip_table = self.has_flip = None
        if gan.relation_negatives:
            flipped = relation_flips(list(uniq), "gan.relation_negatives", off="false")
            self.has_flip = torch.tensor([f is not None for f in flipped])  # (U,)
            self.flip_table = torch.zeros_like(self.cond_table)  # (U, E): rows without a relation stay unused
            rows = self.has_flip.nonzero().squeeze(1)
            flips = embed_texts(enc, tok, [flipped[i] for i in rows.tolist()], batch_size=512).to(device)
            self.flip_table[rows.to(device)] = flips
            if main:
                print(f"[vislang] relation negatives: {int(self.has_flip.sum())} of {len(uniq)} distinct captions "
                      "state a relation")  # fmt: skip
        self._instances()
        self.sort_labels = None
        if gan.group_by_label:
            if not self.data.classnames:
                raise ValueError(f"gan.group_by_label needs a dataset with class labels; {d.train} has none")
            self.sort_labels = np.asarray(self.data.labels)
        self._tracker()

    def _instances(self) -> None:
        """IC-GAN: features of the training images, a bank of them and each image's nearest bank instances."""
        mcfg, n, device = self.mcfg, self.n, self.run.device
        self.bank = self.bank_keys = self.nn_table = None
        if mcfg.instance_bank <= 0:
            return
        if mcfg.instance_bank > n:
            raise ValueError(f"gan.model.instance_bank={mcfg.instance_bank} exceeds the {n} training images")

        if self.run.main:
            print(
                f"[vislang] instance conditioning: {mcfg.instance_features} features of {n} training images, "
                f"a bank of {mcfg.instance_bank}, {mcfg.instance_k} neighbours each"
            )
        feats = instance_features(mcfg.instance_features, self.encoder, self.data, mcfg.instance_dim, n).to(device)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed))[: mcfg.instance_bank]
        self.bank, self.bank_keys = feats[pick.to(device)], self.cond_table[self.cap_index[pick].to(device)]
        self.nn_table = neighbours(
            feats, self.cond_table[self.cap_index.to(device)], self.bank, self.bank_keys, mcfg.instance_k
        )  # (N, k) fmt: skip

    def _tracker(self) -> None:

        gan, cfg, d, v = self.gan, self.cfg, self.cfg.data, self.encoder.cfg.vision
        self.prompts = default_prompts(gan, self.data.classnames, self.captions)
        self.tracker = None
        if gan.judge and self.run.main:  # tracked on rank 0 only: it alone logs and saves
            if not self.data.classnames:
                raise ValueError(f"gan.judge tracks FID-FM per class, so it needs class names; {d.train} has none")
            texts = [format_caption("a photo of a {}.", c) for c in self.data.classnames]
            class_cond = embed_texts(self.encoder, self.tokenizer, texts, batch_size=512)
            self.tracker = FIDTracker(gan.judge, class_cond.to(self.run.device), d.train, d.train_split, v.image_size,
                                      v.channels, gan.fid_images, cfg.seed)  # fmt: skip
        prompt_cond = embed_texts(self.encoder, self.tokenizer, self.prompts, batch_size=512)  # (P, E)
        self.prompt_cond = prompt_cond.to(self.run.device)

    def _build(self) -> None:
        """G, D, the EMA copy, both Adams, the fixed sample noise, the wrong-text generator, the standing conditions."""

        cfg, gan, mcfg, device = self.cfg, self.gan, self.mcfg, self.run.device
        per_step = cfg.batch_size * self.run.world
        if self.n // per_step == 0:
            raise ValueError(
                f"the training set has {self.n} images, fewer than one step's {per_step}; lower --batch_size"
            )
        # Also makes every rank's stream one: under torchrun each rank draws the global batch's noise and keeps its
        # own rows (gan_step.noise), so the step is one process's on the global batch.
        torch.manual_seed(cfg.seed)
        G, D = build_gan(mcfg)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in G.modules())
        if self.run.world > 1 and mcfg.mixture > 1 and has_bn:
            raise ValueError(
                f"gan.model.mixture={mcfg.mixture} with a BatchNorm generator cannot run under torchrun: a component "
                "that draws no image on one rank would leave the others waiting in its BatchNorm; use one process"
            )
        G, D = G.to(device), D.to(device)
        if self.bank is not None:
            G.set_bank(self.bank, self.bank_keys)
        # ~1.4x faster small convs on a CPU (measured); the projected D's frozen EfficientNet ~2x
        self.channels_last = device.type == "cpu" and mcfg.arch in ("dcgan", "projected")
        if self.channels_last:
            G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
        G_ema = copy.deepcopy(G).eval() if gan.ema_decay > 0 else G
        for p in G_ema.parameters():
            p.requires_grad_(G_ema is G)
        self.G, self.D, self.G_ema = G, D, G_ema
        self.opt_g = torch.optim.Adam(G.parameters(), lr=gan.lr_g, betas=gan.betas)
        self.opt_d = torch.optim.Adam(D.parameters(), lr=gan.lr_d, betas=gan.betas)
        fixed_z = torch.randn(gan.sample_per_prompt, mcfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
        self.fixed_z = fixed_z.repeat(len(self.prompts), 1).to(device)  # (P*K, Z): the same K noises in every row
        self.fixed_c = self.prompt_cond.repeat_interleave(gan.sample_per_prompt, dim=0)  # (P*K, E)
        self.mis_gen = torch.Generator().manual_seed(cfg.seed + 2)
        # Captions drawn as in the data: the conditions of the standing BatchNorm statistics of every saved generator.
        draw = torch.randint(self.n, (4096,), generator=torch.Generator().manual_seed(cfg.seed))
        self.stand_c = self.cond_table[self.cap_index[draw]]
        self.best: dict[str, Any] = {}  # with a judge: {"step", "fid_fm", "G_ema"} of the lowest tracked FID-FM so far
        self.f = 1.0
        G.train(), D.train()
        # Under torchrun G's and D's gradients are averaged by DDP: G's forward goes through its wrapper (its BatchNorms
        # then normalise over the global batch), D's update pass through Calls (it uses features, score and match).
        # Mixtures and optional terms leave some parameters out of a step. On one process: G itself, Calls(D).
        self.G_train = self.run.ddp(G, find_unused_parameters=True)
        self.D_call = self.run.ddp(Calls(D), find_unused_parameters=True)

    # --- the loop's protocol -----------------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        mods = {"G": self.G, "D": self.D}
        return mods if self.G_ema is self.G else {**mods, "G_ema": self.G_ema}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt_g": self.opt_g, "opt_d": self.opt_d}

    def epoch_length(self, epoch: int) -> int:
        return self.n // (self.cfg.batch_size * self.run.world)

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """One process's batch of ``batch_size`` × world items per step, ordered as one process orders it (by class,
        items with a flipped relation first), its conditions drawn for all of it; this rank keeps rows
        ``[rank·B, (rank+1)·B)`` and, under torchrun, the whole batch's conditions (``c_all``, ``c_flip_all``)."""

        cfg, device, run = self.cfg, self.run.device, self.run
        b = cfg.batch_size
        mine = slice(run.rank * b, (run.rank + 1) * b)
        for idx in epoch_batches(self.n, b * run.world, cfg.seed, epoch)[: self.epoch_length(epoch)][start:]:
            if self.sort_labels is not None:  # one class per minibatch-std group: D compares spread within a class
                idx = np.asarray(idx)
                idx = idx[np.argsort(self.sort_labels[idx], kind="stable")]
            cap = self.cap_index[torch.as_tensor(idx)]  # (world·B,) distinct-caption ids
            c_flip = None
            if self.flip_table is not None:  # items whose caption states a relation go first, with their flipped text
                order = torch.argsort((~self.has_flip[cap]).to(torch.int8), stable=True)
                idx, cap = np.asarray(idx)[order.numpy()], cap[order]
                c_flip = self.flip_table[cap[self.has_flip[cap]].to(device)]  # (F, E): of the whole batch
            real = from_uint8(self.data.get_batch(idx[mine])["image"]).to(device)  # (B, C, H, W) in [-1, 1]
            if self.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            c = self.cond_table[cap.to(device)]  # (world·B, E)
            if self.nn_table is not None:  # IC-GAN: each real image with one of its k nearest bank instances
                k = torch.randint(self.mcfg.instance_k, (len(idx),)).to(device)
                near = self.nn_table[torch.as_tensor(idx).to(device), k]
                c = torch.cat([c, self.bank[near]], dim=1)  # (world·B, E + Ei)
            batch = {"real": real, "c": c[mine], "c_flip": c_flip}
            if run.world > 1:  # flipped items come first in the whole batch: this rank's are those among its rows
                flips = None if c_flip is None else c_flip[min(mine.start, len(c_flip)) : min(mine.stop, len(c_flip))]
                batch.update(c_flip=flips, c_all=c, c_flip_all=c_flip)
            yield batch

    def learning_rates(self, step: int, total: int) -> dict[str, float]:

        self.f = lr_factor(step, total, self.gan.lr_decay_from)
        return {"opt_g": self.gan.lr_g * self.f, "opt_d": self.gan.lr_d * self.f}

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:

        gan = self.gan
        update_g = (step + 1) % gan.d_steps == 0  # the last of every d_steps batches also updates G
        regularize = step % gan.r1_every == 0
        run = self.run
        return gan_step(self.G, self.D, self.G_ema, self.opt_g, self.opt_d, batch["real"], batch["c"], gan,
                        self.mis_gen, batch["c_flip"], update_g, regularize, stepper=run.step, G_train=self.G_train,
                        D_call=self.D_call, rank=run.rank, world=run.world, c_all=batch.get("c_all"),
                        c_flip_all=batch.get("c_flip_all"))  # fmt: skip

    def samples(self, batch: dict[str, Any]) -> int:
        return int(batch["real"].shape[0])

    def log_fields(self, step: int) -> dict[str, Any]:
        return {"lr_factor": round(self.f, 4)}

    def after_step(self, step: int) -> None:
        gan = self.gan
        if self.tracker is not None and ((gan.fid_every and step % gan.fid_every == 0) or step == self.run.total_steps):
            self.track(step)
        if gan.sample_every and step % gan.sample_every == 0 and self.run.main:
            self.write_samples(step)

    def close(self) -> None:
        if hasattr(self, "cudnn_before"):
            torch.backends.cudnn.benchmark = self.cudnn_before

    def state_dict(self) -> dict[str, Any]:
        return {"mis_rng": self.mis_gen.get_state(), "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mis_gen.set_state(state["mis_rng"])
        self.best = state.get("best") or {}

    # --- samples, tracking, the saved model --------------------------------------------------------------------------
    def write_samples(self, step: int) -> None:

        self.G_ema.eval()
        with torch.no_grad():
            imgs = to_uint8(self.G_ema(self.fixed_z, self.fixed_c)).cpu()
        if self.run.out_dir is not None:
            path = self.run.out_dir / "samples" / f"step_{step:07d}.png"
            save_grid(imgs, path, ncol=self.gan.sample_per_prompt, scale=2)
        if self.G_ema is self.G:
            self.G.train()

    def track(self, step: int) -> None:
        """Tracked FID-FM of the EMA generator as it would be saved now (standing statistics on a copy)."""

        gan, cfg = self.gan, self.cfg
        snap = copy.deepcopy(self.G_ema)
        if gan.standing_stats and self.G_ema is not self.G:
            standing_stats(snap, self.stand_c, self.mcfg.z_dim, gan.standing_stats, cfg.batch_size, cfg.seed)
        r = self.tracker(snap, self.mcfg.z_dim)
        rec = {"step": step, "tracked_fid_fm": r["fid_fm"], "tracked_class_consistency": r["class_consistency"]}
        self.run.log(rec if self.tracker.floor is None else {**rec, "tracked_fid_fm_floor": self.tracker.floor})
        if not self.best or r["fid_fm"] < self.best["fid_fm"]:
            state = {k: t.clone() for k, t in snap.state_dict().items()}
            self.best = {"step": step, "fid_fm": r["fid_fm"], "G_ema": state}
        if cfg.progress:
            print(f"[vislang] step {step}: FID-FM {r['fid_fm']:.3f}, best {self.best['fid_fm']:.3f} at "
                  f"{self.best['step']}")  # fmt: skip
        if self.run.out_dir is not None:
            plot_tracked_fid(self.run.out_dir / "metrics.jsonl", self.run.out_dir / "fid.png")

    def finish(self) -> Path:
        """Keep the best (or last) EMA generator with its standing statistics, the last samples, the model dir."""

        gan, cfg, run, best = self.gan, self.cfg, self.run, self.best
        if not run.main:  # rank 0 alone tracks, samples and saves
            return run.out_dir / "model"
        step = chosen = run.global_step
        if best and (gan.keep_best or best["step"] == step):  # the snapshot already has its standing statistics
            self.G_ema.load_state_dict(best["G_ema"])
            chosen = best["step"]
            if chosen != step:
                print(f"[vislang] keeping the EMA generator of step {chosen} (tracked FID-FM {best['fid_fm']:.4f})")
        elif gan.standing_stats and self.G_ema is not self.G:  # after the checkpoint: a resume goes on from training
            standing_stats(self.G_ema, self.stand_c, self.mcfg.z_dim, gan.standing_stats, cfg.batch_size, cfg.seed)
        self.write_samples(step)
        model = TextToImage(self.mcfg, self.G_ema, self.encoder, self.tokenizer, {"sample_prompts": self.prompts})
        d = cfg.data
        secs = round(run.elapsed(), 1)
        extra = {
            "train": {"steps": step, "seconds": secs, "data": d.train, "text_model": gan.text_model},
            "data": {"train": d.train, "train_split": d.train_split, "val_split": d.val_split},
        }
        extra["train"]["generator_step"] = chosen  # the step whose EMA generator was saved (keep_best may go back)
        if best:
            extra["train"]["tracked_fid_fm"] = {"best": best["fid_fm"], "best_step": best["step"], "judge": gan.judge}
        model_dir = model.save_pretrained(run.out_dir / "model", extra)
        print(f"[vislang] trained {step} GAN steps in {math.floor(secs + 0.5)} s; model saved to {model_dir}")
        return model_dir


def train_gan(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train a text-conditioned GAN as ``cfg`` says (whatever its ``task``), in the one loop; returns the saved model
    directory."""
    return fit(GANTask(), cfg, resume)
