"""LiT (locked-image tuning) in the one loop: towers locked, their outputs cached once, heads trained on the cache.

With both towers of a dual encoder frozen (``lock_image``/``lock_text``, e.g. ``effnet-lite0-minilm``: ImageNet
EfficientNet-Lite0 + all-MiniLM-L6-v2), only ``image_proj``, ``text_proj`` and the temperature train. Their inputs,
the towers' pooled outputs, never change, so ``data.features.cached_features`` computes them once per dataset and
keeps them on disk (keyed by tower weights, preprocessing and data; resumable; memory-mapped). An epoch then costs
a few matrix products instead of a pass of both towers over every image: about a second instead of minutes.

A share of the training pairs (``lit.val_fraction``) is held back to pick the best epoch (LiT heads overfit a few
thousand pairs within a few epochs), so a test split is touched once, at the end, where its R@k both ways, with
chance, go to ``eval/retrieval.json``. The saved model is the whole dual encoder (towers + trained heads): it loads
with ``vislang.load`` and serves, indexes and evaluates like any other.

``lit.val_by: caption`` holds back whole captions (none of them among the kept pairs), as a held-out split's captions
are mostly new; random pairs share captions and duplicate drawings with the kept ones and score far above such a
split. ``model.memory`` (``models.clip.MemoryConfig``) is filled here with the kept pairs' features: the model then
also describes an image by the captions of its nearest kept images, which needs no training and reaches captions
the projections never saw; evaluation goes through the model's own ``project_image``/``project_text``, so every
number is the saved model's. Once the best epoch is chosen, ``lit.memory_all`` (on by default) refills the memory with
every training pair, the held-back ones too, before the test split is scored and the model saved: the refit on all
the data that usually follows a fixed recipe, here without retraining (the memory is not trained), so the held-back
captions become captions the served model can recall. Its effect cannot be measured on the held-back pairs, which it
contains; the test split measures it.

``lit.unlock_last_image: N`` (CLI ``--unlock-last N``) trains the image tower's last N blocks too: the cache then
holds the input of the first unlocked block (the trunk's output, ``VisionTower.split_last``; the cut point is part of
the cache key), and each step runs those blocks, the layers after them and the pooling, then the projection. The
blocks stay in eval mode (BatchNorm keeps its pretrained statistics, so the cache and the saved model agree) and
learn at ``lit.unlock_lr_scale`` times the heads' rate; they are saved into the whole model with the heads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed as dist
from ...config import to_dict
from ...data.features import Features, FirstN, cached_features, tensors_hash
from ...data.loading import epoch_batches
from ...data.sources import NAMED_DATASETS, open_dataset
from ...data.transforms import normalize
from ...evaluation.retrieval import dedupe_captions, retrieval_metrics
from ...factory import (
    build_model,
    build_tokenizer,
    from_pretrained,
    get_model_config,
    get_tokenizer,
    save_pretrained,
)
from ...losses import ClipLoss, SigLipLoss
from ...models.towers import check_split
from ...pretrained import read_classifier
from ..config import LiTConfig
from ..loop import Task
from ..optim import build_optimizer

KS = (1, 5, 10)


class Heads(nn.Module):
    """What a LiT run trains, as one module over the model's own parameters (shared, not copied): the projections,
    the temperature and the SigLIP bias. Checkpoints hold these few weights, not the frozen towers."""

    def __init__(self, model: nn.Module, feature_dropout: float = 0.0, image_tail: nn.Module | None = None) -> None:
        super().__init__()
        self.dropout = nn.Dropout(feature_dropout)  # training only: the saved model projects features as they are
        self.image_tail = image_tail  # unlocked last blocks of the image tower (shared with the model), or None
        self.image_proj, self.text_proj = model.image_proj, model.text_proj
        self.logit_scale, self.logit_bias = model.logit_scale, model.logit_bias
        self.max_logit_scale = model.cfg.max_logit_scale
        # The saved model's own maps from pooled features to embeddings (bound methods, not submodules: the
        # checkpoint keeps the heads only): evaluation goes through them, so it scores what the model serves.
        self.embed_image, self.embed_text = model.project_image, model.project_text

    def train(self, mode: bool = True) -> Heads:
        """The unlocked blocks always run as in eval mode (pretrained BatchNorm statistics, no drop-path): what they
        compute in training is what the saved model computes."""
        super().train(mode)
        if self.image_tail is not None:
            self.image_tail.eval()
        return self

    def pooled_image(self, image: torch.Tensor) -> torch.Tensor:
        """Cached image rows → pooled image features: the unlocked blocks' output, or the rows themselves."""
        if self.image_tail is None:
            return image
        if image.ndim == 4:  # a CNN's feature map: channels-last runs its convolutions about 1.7x faster on a CPU
            image = image.contiguous(memory_format=torch.channels_last)
        return self.image_tail(image)  # (B, D_image)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.project(self.pooled_image(image), text)

    def project(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled image (B, D_image) and text (B, D_text) features → what the loss takes."""
        out = {
            "image_features": F.normalize(self.image_proj(self.dropout(image)), dim=-1),  # (B, E)
            "text_features": F.normalize(self.text_proj(self.dropout(text)), dim=-1),  # (B, E)
            "logit_scale": self.logit_scale.exp().clamp(max=self.max_logit_scale),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def tower_functions(model: nn.Module, tokenizer: Any, image_trunk: Any = None) -> tuple[Any, Any]:
    """The locked towers as the feature cache calls them: uint8 images → pooled features (or, with ``image_trunk``,
    the input of the first unlocked block), captions → pooled features.

    Captions are padded to the context length; padding is masked out of attention and pooling, so it is trimmed to
    the longest caption of the batch first (same features, a fraction of the work).
    """
    v = model.cfg.vision
    visual = model.visual.to(memory_format=torch.channels_last) if v.arch != "cnn-text" else model.visual
    visual = image_trunk or visual
    pad = model.cfg.text.pad_id

    def image_fn(x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, v.mean, v.std).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
        return visual(x).contiguous()  # (B, D_image), or the trunk's (B, C', h, w)

    def text_fn(captions: list[str]) -> torch.Tensor:
        ids = tokenizer(captions)  # (B, T)
        longest = max(1, int((ids != pad).sum(1).max()))
        return model.text(ids[:, :longest])  # (B, D_text)

    return image_fn, text_fn


def imagenet_class_view(model: nn.Module, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(classifier weight (1000, D_image), bias (1000,), text-tower features of "a picture of a {class}" (1000,
    D_text)) for ``model.memory.class_weight``: the image tower's packaged ImageNet classifier and the ImageNet class
    names (torchvision's list, the standard order), through the model's own text tower."""
    from torchvision.models import ResNet50_Weights  # lazy: the class names' only home; most runs never need it

    if not model.cfg.vision.pretrained:
        raise ValueError("model.memory.class_weight needs a pretrained image tower with a classifier "
                         "(vision.pretrained); set --model.memory.class_weight=0")  # fmt: skip
    weight, bias = read_classifier(model.cfg.vision.pretrained)
    names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    if weight.shape[0] != len(names):
        raise ValueError(f"{model.cfg.vision.pretrained}'s classifier has {weight.shape[0]} classes, not ImageNet's "
                         f"{len(names)}: set --model.memory.class_weight=0")  # fmt: skip
    _, text_fn = tower_functions(model, tokenizer)
    prompts = [f"a picture of a {c}" for c in names]
    with torch.no_grad():
        text = torch.cat([text_fn(prompts[i : i + 100]) for i in range(0, len(prompts), 100)])
    return weight, bias, text


def feature_key(model: nn.Module, tokenizer: Any, name: str, image_cut: int = 0) -> dict[str, Any]:
    """Everything besides the data that the cached features depend on (``image_cut``: how many of the image tower's
    last blocks are left out, i.e. where its cached output is taken; 0, the pooled output, keeps older keys)."""
    v, t = model.cfg.vision, model.cfg.text
    cut = {"image_cut": image_cut} if image_cut else {}
    return {
        **cut,
        "name": name,
        "image_tower": tensors_hash(model.visual),
        "text_tower": tensors_hash(model.text),
        "vision": {"arch": v.arch, "mean": list(v.mean), "std": list(v.std)},
        "text": {"arch": t.arch, "pool": t.pool, "context_length": t.context_length, "pad_id": t.pad_id},
        "tokenizer": f"{type(tokenizer).__name__}|{getattr(tokenizer, 'vocab_size', '')}",
    }


@torch.no_grad()
def feature_retrieval(heads: Heads, feats: Features) -> dict[str, float]:
    """R@k both ways on cached features, identical captions merged into one query (as ``vislang eval`` does)."""
    was = heads.training
    heads.eval()
    chunks = [torch.from_numpy(np.array(feats.image[i : i + 256])) for i in range(0, len(feats), 256)]
    image = torch.cat([heads.pooled_image(c) for c in chunks])  # (N, D_image): the unlocked blocks in slices
    out = {
        "image_features": heads.embed_image(image),
        "text_features": heads.embed_text(torch.from_numpy(np.array(feats.text))),
    }
    heads.train(was)
    return pair_retrieval(out["image_features"], out["text_features"], feats.captions)


def pair_retrieval(
    image: torch.Tensor, text: torch.Tensor, captions: list[str], ks: tuple[int, ...] = KS
) -> dict[str, float]:
    """R@k both ways of embedded pairs (row i: image i, caption i), each distinct caption one query (its first
    pair's embedding) that finds every image it describes, as ``vislang eval`` counts them."""
    texts, text_to_images = dedupe_captions(captions)
    first: dict[str, int] = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    return retrieval_metrics(image, text[[first[t] for t in texts]], text_to_images, ks)


def split_rows(n: int, fraction: float, seed: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-back rows): a seeded random ``fraction`` held back, none when too few pairs to spare.

    With ``groups`` (a group id per row, e.g. its caption's), whole groups are held back, in seeded random order
    until ``fraction`` of the rows are: no held-back group has a row among the kept ones."""
    n_val = int(round(fraction * n))
    if fraction <= 0 or n_val < 2 or n - n_val < 2:
        return np.arange(n), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    if groups is None:
        perm = rng.permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = rng.permutation(len(ids))
    taken = order[: int(np.searchsorted(np.cumsum(counts[order]), n_val)) + 1]  # groups until n_val rows are held
    held = np.isin(inverse.reshape(-1), taken)
    if held.all() or held.sum() < 2:
        return np.arange(n), np.zeros(0, np.int64)
    return np.flatnonzero(~held), np.flatnonzero(held)


class LiTTask(Task):
    """``vislang train --config lit``: locked towers, cached features, trained projections + temperature."""

    name = "lit"

    def check(self, cfg) -> None:
        mcfg = get_model_config(cfg.model_name, cfg.model)
        if not (mcfg.lock_image and mcfg.lock_text):
            raise ValueError(
                f"task lit trains on cached tower outputs, so both towers must be locked; {cfg.model_name} has "
                f"lock_image={mcfg.lock_image}, lock_text={mcfg.lock_text}: set --model.lock_image=true "
                "--model.lock_text=true, or use --task=contrastive to train a tower"
            )
        if getattr(mcfg, "decoder", None) is not None or getattr(mcfg, "itm", None) is not None:
            raise ValueError("task lit trains a plain dual encoder; drop model.decoder / model.itm or use their tasks")
        lit = cfg.lit or LiTConfig()
        if lit.fit not in ("crop", "pad"):
            raise ValueError(f"lit.fit must be 'crop' or 'pad', got {lit.fit!r}")
        if lit.same_caption not in ("negative", "positive"):
            raise ValueError(f"lit.same_caption must be 'negative' or 'positive', got {lit.same_caption!r}")
        if mcfg.vision.fit != "crop" and lit.fit != mcfg.vision.fit:
            raise ValueError(
                f"{cfg.model_name} letterboxes (vision.fit={mcfg.vision.fit!r}) but lit.fit is {lit.fit!r}: the lit "
                f"task extracts and saves with lit.fit, so pass --lit.fit={mcfg.vision.fit}"
            )
        if lit.val_by not in ("pair", "caption"):
            raise ValueError(f"lit.val_by must be 'pair' or 'caption', got {lit.val_by!r}")
        if getattr(mcfg, "memory", None) is not None and lit.unlock_last_image:
            raise ValueError(
                "model.memory stores pooled image features, which --unlock-last changes as it trains: drop one of "
                "model.memory and lit.unlock_last_image"
            )
        if lit.unlock_last_image < 0 or lit.unlock_lr_scale <= 0:
            raise ValueError(
                f"lit.unlock_last_image must be >= 0 (got {lit.unlock_last_image}) and lit.unlock_lr_scale > 0 "
                f"(got {lit.unlock_lr_scale})"
            )

    def setup(self, run) -> None:
        cfg = run.cfg
        self.run, self.cfg, self.lit = run, cfg, cfg.lit or LiTConfig()
        mcfg = get_model_config(cfg.model_name, cfg.model)
        self.tokenizer = get_tokenizer(cfg.pretrained) if cfg.pretrained else build_tokenizer(mcfg)
        torch.manual_seed(cfg.seed)  # the heads' initial weights (and random towers) depend on the seed alone
        if self.lit.fit != mcfg.vision.fit:  # the saved model's preprocess does what the cache was extracted with
            mcfg = dataclasses.replace(mcfg, vision=dataclasses.replace(mcfg.vision, fit=self.lit.fit))
        model = build_model(mcfg)
        if cfg.pretrained:  # a stored caption memory is not carried over: this run fills its own
            state = {
                k: v for k, v in from_pretrained(cfg.pretrained).state_dict().items() if not k.startswith("memory_")
            }
            missing, unexpected = model.load_state_dict(state, strict=False)
            if [k for k in missing if not k.startswith("memory_")] or unexpected:
                raise ValueError(f"{cfg.pretrained} does not match model {cfg.model_name}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")  # fmt: skip
        self.core = model.eval()
        self.image_trunk, self.image_tail, self.image_row = self.unlock(self.lit.unlock_last_image)
        if run.main:  # rank 0 extracts; under torchrun the others wait, then read the finished cache
            train, test = self.features(cfg.data.train, cfg.data.train_split, cfg.data.max_train), self.held_out()
        dist.barrier()
        if not run.main:
            train, test = self.features(cfg.data.train, cfg.data.train_split, cfg.data.max_train), self.held_out()
        # Extraction draws from torch's generator (each DataLoader takes a seed) and reading the cache does not: reseed,
        # so the training draws (feature dropout) are the same whether the cache was there or not.
        torch.manual_seed(cfg.seed + run.rank)
        groups = np.unique(train.captions, return_inverse=True)[1] if self.lit.val_by == "caption" else None
        fit_rows, val_rows = split_rows(len(train), self.lit.val_fraction, cfg.seed, groups)
        self.fit_feats = train.subset(fit_rows)
        self.train_feats = train  # every usable pair: the memory's final contents with lit.memory_all
        if mcfg.memory is not None:  # the kept pairs only: the held-back ones must stay unseen captions
            model.fill_memory(torch.from_numpy(self.fit_feats.image), torch.from_numpy(self.fit_feats.text))
            if mcfg.memory.class_weight > 0:
                model.fill_classes(*imagenet_class_view(model, self.tokenizer))
        self.caption_ids = np.unique(self.fit_feats.captions, return_inverse=True)[1].astype(np.int64)  # (N_fit,)
        self.val_feats = train.subset(val_rows) if len(val_rows) else None
        self.test_feats = test
        self.skip_note = f"{len(train)} pairs with features ({len(self.fit_feats)} fit, {len(val_rows)} held back)"
        self.batch_size = self.fit_batch(len(self.fit_feats))
        self.heads = Heads(model, self.lit.feature_dropout, self.image_tail).train()
        self.wrapped = run.ddp(self.heads)
        self.loss = SigLipLoss() if cfg.loss == "siglip" else ClipLoss()
        self.optimizer = build_optimizer(self.heads, cfg.optim, {"image_tail.": self.lit.unlock_lr_scale})
        self.threads = torch.get_num_threads()
        if self.lit.train_threads:  # small matrices: a second thread mostly waits on a shared CPU
            torch.set_num_threads(self.lit.train_threads)
        self.best: dict[str, Any] = {"score": -1.0, "step": 0, "state": None}
        if run.main and run.out_dir is not None:
            run.out_dir.mkdir(parents=True, exist_ok=True)
            (run.out_dir / "model_config.json").write_text(json.dumps(to_dict(mcfg), indent=2))

    def unlock(self, n: int) -> tuple[Any, nn.Module | None, int | tuple[int, ...]]:
        """``(trunk, tail, cached row shape)`` for ``n`` unlocked image blocks; ``(None, None, width)`` for none.

        The tail's parameters train (they are the model's own, so the saved model holds them); the cut is checked
        to reproduce the tower's output before anything is cached."""
        visual = self.core.visual
        if not n:
            return None, None, visual.width
        v = self.core.cfg.vision
        trunk, tail = visual.split_last(n)
        row = check_split(visual, trunk, tail, v.image_size, v.channels)  # (1, ...) the first tail block's input
        for p in tail.parameters():
            p.requires_grad_(True)
        return trunk, tail.eval(), tuple(row.shape[1:])

    def fit_batch(self, n: int) -> int:
        """``batch_size``, or less when a small folder holds fewer pairs than one step takes (said, not refused)."""
        cfg, run = self.cfg, self.run
        shares = run.world * cfg.accum_steps
        if n >= cfg.batch_size * shares:
            return cfg.batch_size
        if n < 2 * shares:
            raise ValueError(f"{n} training pairs with features: a contrastive step needs at least {2 * shares}")
        if run.main:
            print(
                f"[vislang] {n} training pairs, fewer than one step's {cfg.batch_size * shares}: "
                f"batch size {n // shares}"
            )
        return n // shares

    def features(self, spec: str, split: str, limit: int | None = None) -> Features:
        """The cached tower outputs of one dataset split (its first ``limit`` items), extracted on first use."""
        d = self.cfg.data
        kw: dict[str, Any] = dict(d.options)
        if spec.endswith((".csv", ".tsv", ".jsonl")):
            kw.update(img_key=d.img_key, caption_key=d.caption_key)
        if d.image_dir:
            kw["image_dir"] = d.image_dir
        dataset = open_dataset(spec, split=split, **kw)
        if limit:
            dataset = FirstN(dataset, limit)
        image_fn, text_fn = tower_functions(self.core, self.tokenizer, self.image_trunk)
        v = self.core.cfg.vision
        lit = self.lit
        key = feature_key(self.core, self.tokenizer, f"{spec}-{split}", lit.unlock_last_image)
        return cached_features(
            dataset, image_fn, text_fn, lit.cache_dir, key, v.image_size, v.channels, self.image_row,
            self.core.text.width, lit.fit, lit.extract_batch, lit.chunk, lit.workers,
            self.cfg.progress and self.run.main,
        )  # fmt: skip

    def held_out(self) -> Features | None:
        """Test features: ``data.val`` if given, else the named dataset's ``val_split``; None for a single file or
        folder (its "test split" would be the training data itself)."""
        d = self.cfg.data
        if d.val:
            return self.features(d.val, d.val_split, d.max_val)
        if d.train.lower() in NAMED_DATASETS and d.val_split != d.train_split:
            return self.features(d.train, d.val_split, d.max_val)
        return None

    def modules(self) -> dict[str, nn.Module]:
        return {"heads": self.heads}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        return epoch_batches(len(self.fit_feats), self.batch_size, self.cfg.seed, epoch, self.run.rank,
                             self.run.world)  # fmt: skip

    def epoch_length(self, epoch: int) -> int:
        return len(self._epoch(epoch))

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        dev, f = self.run.device, self.fit_feats
        for rows in self._epoch(epoch)[start:]:
            yield {"image": torch.from_numpy(f.image[rows]).to(dev), "text": torch.from_numpy(f.text[rows]).to(dev),
                   "caption": torch.from_numpy(self.caption_ids[rows]).to(dev)}  # fmt: skip

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.wrapped(batch["image"], batch["text"])
        positives = same_caption(batch["caption"], self.cfg.loss) if self.lit.same_caption == "positive" else None
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"),
                         positives=positives)  # fmt: skip
        return loss, {"logit_scale": float(out["logit_scale"].detach())}

    def evaluate(self, step: int) -> dict[str, float] | None:
        """R@k on the held-back pairs; the heads of the best text→image R@10 so far are kept for the end."""
        if not self.run.main or self.val_feats is None:
            return None
        r = feature_retrieval(self.heads, self.val_feats)
        score = r["text_to_image_R@10"]
        if score > self.best["score"]:
            state = {k: v.detach().clone() for k, v in self.heads.state_dict().items()}
            self.best = {"score": score, "step": step, "state": state}
        return {f"eval/val_{k}": v for k, v in r.items() if "chance" not in k and not k.startswith("n_")}

    def state_dict(self) -> dict[str, Any]:
        return {"lit_best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("lit_best", self.best)

    def epoch_note(self) -> str:
        return self.skip_note

    def close(self) -> None:
        if getattr(self, "threads", None):
            torch.set_num_threads(self.threads)

    def finish(self) -> Path | None:
        """Restore the best heads, refill the memory with every pair (``lit.memory_all``), evaluate on the test
        split, save the whole model."""
        if self.best["state"] is not None:
            self.heads.load_state_dict(self.best["state"])
        result = {"best_step": self.best["step"], "val_text_to_image_R@10": self.best["score"]}
        memory = self.core.cfg.memory
        if memory is not None:
            if self.lit.memory_all and len(self.train_feats) > len(self.fit_feats):
                # The epoch is chosen; the held-back captions have done their job (scoring unseen captions) and
                # now join the memory, as a refit on all the data would: the test split and the saved model use it.
                self.core.fill_memory(torch.from_numpy(np.array(self.train_feats.image)),
                                      torch.from_numpy(np.array(self.train_feats.text)))  # fmt: skip
            result["memory_size"] = self.core.cfg.memory.size
        if self.test_feats is not None:
            result["test"] = feature_retrieval(self.heads, self.test_feats)
        self.result = result
        out = self.run.out_dir
        if not self.run.main or out is None:
            return None
        model_dir = out / "model"
        extra = {"train": {"steps": self.run.global_step, "task": "lit", "best_step": self.best["step"]}}
        save_pretrained(self.core.eval(), model_dir, self.tokenizer, extra=extra)
        (out / "eval").mkdir(parents=True, exist_ok=True)
        (out / "eval" / "retrieval.json").write_text(json.dumps(result, indent=2))
        best = f" (heads of step {self.best['step']}, best on the held-back pairs)" if self.best["state"] else ""
        print(f"[vislang] trained {self.run.global_step} steps in {self.run.elapsed():.0f} s{best}; model saved to "
              f"{model_dir}")  # fmt: skip
        if "test" in result:
            print(retrieval_line(result["test"]))
        return model_dir


def same_caption(ids: torch.Tensor, loss: str) -> torch.Tensor:
    """Which pairs of the (global) batch share a caption, in the shape of the loss's logits: ``[N, N]`` for CLIP's
    global loss, ``[B, N]`` (this rank's images against every text) for SigLIP; ``[B, B]`` on one process."""
    every = dist.gather_tensor(ids, gather_with_grad=False, keep_local_grad=False)  # (N,)
    rows = ids if loss == "siglip" else every
    return rows[:, None] == every[None, :]


def retrieval_line(r: dict[str, float]) -> str:
    """One line of held-out R@k both ways with chance, in percent."""
    cell = lambda key: "/".join(f"{100 * r[f'{key}_R@{k}']:.1f}" for k in KS)  # noqa: E731
    return (
        f"[vislang] test split ({r['n_images']} images, {r['n_texts']} distinct captions): text→image R@1/5/10 "
        f"{cell('text_to_image')}% (chance {cell('text_to_image_chance')}%), image→text {cell('image_to_text')}% "
        f"(chance {cell('image_to_text_chance')}%)"
    )
