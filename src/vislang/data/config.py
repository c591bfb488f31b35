"""Where a run's images and captions come from: the ``data:`` section of every run config (training, evaluation,
fine-tuning, compression), so each reads its data the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataConfig:
    train: str = (
        "fashion-mnist"  # dataset: fashion-mnist | shapes | openclipart | a .csv/.tsv/.jsonl/.json, folder, shards
    )
    val: str | None = None  # evaluation dataset; None = the same source as train
    train_split: str = "train"
    val_split: str = "test"
    img_key: str = "filepath"  # CSV/JSONL column with the image path (OpenCLIP's --csv-img-key)
    caption_key: str = "caption"  # CSV/JSONL column with the caption (OpenCLIP's --csv-caption-key)
    image_dir: str | None = None  # COCO captions: the folder of images
    cache_dir: str = (
        ".cache/vislang/prepared"  # decoded, resized images as memory-mapped arrays (see `vislang prepare`)
    )
    max_train: int | None = None  # use only the first N training pairs (smoke runs, quick experiments)
    max_val: int | None = None  # evaluate on only the first N pairs
    num_workers: int = 0  # DataLoader worker processes; 0 suits memory-mapped small images
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the dataset reader
