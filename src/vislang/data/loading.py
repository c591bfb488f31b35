"""Datasets for training: prepared (memory-mapped) images plus captions tokenized by the run's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DataConfig
from .prepare import PreparedDataset, prepare, prepared_dir_for
from .sources import open_dataset


def _source_key(spec: str, kw: dict[str, Any]) -> str:
    """What identifies the prepared copy besides size: reader options, and a file source's size and mtime, so an
    edited CSV or a different ``n`` gets a fresh copy instead of a stale one."""
    key: dict[str, Any] = {"options": kw}
    p = Path(spec)
    if p.exists():
        st = p.stat()
        key["file"] = [st.st_size, int(st.st_mtime)]
    return json.dumps(key, sort_keys=True, default=str)


def load_prepared(
    spec: str,
    split: str,
    image_size: int,
    channels: int,
    cfg: DataConfig,
    progress: bool = True,
    tokenizer: Any = None,
    tokenizer_id: str = "",
) -> PreparedDataset:
    """The prepared copy of a dataset split, made on first use and reused by every later run.

    With ``tokenizer`` the captions are tokenized into the copy too (``vislang prepare --tokenizer``); the trainer
    leaves it out and tokenizes in memory, so one image cache serves every tokenizer.
    """
    kw: dict[str, Any] = dict(cfg.options)
    if spec.endswith((".csv", ".tsv", ".jsonl")):
        kw.update(img_key=cfg.img_key, caption_key=cfg.caption_key)
    if cfg.image_dir:
        kw["image_dir"] = cfg.image_dir
    out = prepared_dir_for(Path(cfg.cache_dir), spec, split, image_size, channels, tokenizer_id + _source_key(spec, kw))
    if not (out / "meta.json").is_file():
        ds = open_dataset(spec, split=split, **kw)
        tokenize = (lambda texts: tokenizer(texts).numpy()) if tokenizer is not None else None
        prepare(ds, out, image_size=image_size, channels=channels, tokenize=tokenize, progress=progress)
    return PreparedDataset(out)


class TokenizedPairs:
    """A prepared dataset (images) + token ids for its captions; ``get_batch`` is one vectorised slice."""

    def __init__(
        self,
        images: PreparedDataset,
        tokens: np.ndarray,
        limit: int | None = None,
        neg_tokens: np.ndarray | None = None,
    ) -> None:
        self.images = images
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens))
        # neg_tokens: a hard-negative caption per item (an all-padding row where there is none), e.g. flip_relation
        self.neg_tokens = None if neg_tokens is None else torch.from_numpy(np.ascontiguousarray(neg_tokens))
        self.n = min(len(images), limit) if limit else len(images)

    def __len__(self) -> int:
        return self.n

    def get_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self.images.get_batch(indices)
        batch["tokens"] = self.tokens[torch.as_tensor(indices)]
        if self.neg_tokens is not None:
            batch["neg_tokens"] = self.neg_tokens[torch.as_tensor(indices)]  # (B, T)
        return batch


class _BatchView(torch.utils.data.Dataset):
    """Lets a DataLoader (with workers) fetch whole batches by index arrays."""

    def __init__(self, data: TokenizedPairs, batches: list[np.ndarray]) -> None:
        self.data, self.batches = data, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.data.get_batch(self.batches[i])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """This rank's batches for an epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same order.

    Incomplete last batches are dropped (contrastive losses want full batches); with several ranks each takes
    every world-th sample of the permutation.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_step = batch_size * world
    steps = n // per_step
    perm = perm[: steps * per_step].reshape(steps, world, batch_size)  # (steps, world, B)
    return [np.sort(perm[s, rank]) for s in range(steps)]


def batch_loader(data: TokenizedPairs, batches: list[np.ndarray], num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _BatchView(data, batches),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
