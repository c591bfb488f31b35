"""``open_dataset``: any dataset from a short spec, a built-in source's name or a file, folder or shard pattern.

The one module that knows every source: the readers (:mod:`.readers`) and the built-in datasets (Fashion-MNIST,
OpenClipart, shapes) import nothing from here, so the imports run one way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .fashion_mnist import FashionMNIST
from .openclipart import OpenClipart
from .readers import (
    CocoCaptions,
    CsvDataset,
    FolderDataset,
    JsonlDataset,
    WebDatasetShards,
    check_shards_exist,
    expand_urls,
    looks_like_shards,
)
from .rendered_zh import RenderedChinese
from .shapes import ShapesDataset

NAMED_SOURCES: dict[str, type[Dataset]] = {
    "fashion-mnist": FashionMNIST,
    "shapes": ShapesDataset,
    "openclipart": OpenClipart,
    "rendered-zh": RenderedChinese,  # Chinese words rendered on the fly: splits train, val, test, test-font
}
NAMED_DATASETS = tuple(NAMED_SOURCES)
_NAME_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}


def open_path(path: Path, **kw: Any) -> Dataset:
    """A dataset from a file or folder, chosen by its type."""
    suffix = path.suffix.lower()
    if path.is_dir():
        return FolderDataset(path, **kw)
    if suffix in (".csv", ".tsv"):
        return CsvDataset(path, **kw)
    if suffix == ".jsonl":
        return JsonlDataset(path, **kw)
    if suffix == ".json":
        if "image_dir" not in kw:
            raise ValueError(
                f"{path} looks like COCO captions; pass the folder holding its images as image_dir=... "
                "(e.g. image_dir='coco/train2017')"
            )
        return CocoCaptions(path, **kw)
    raise ValueError(
        f"don't know how to read {path}: use a .csv/.tsv, .jsonl, COCO .json, .tar shards or a folder of "
        f"images with .txt captions, or one of {list(NAMED_DATASETS)}"
    )


def open_dataset(spec: str | os.PathLike, split: str = "train", **kw: Any) -> Dataset:
    """Open a dataset from a short spec.

    Args:
        spec: ``fashion-mnist``, ``shapes``, ``openclipart``, ``rendered-zh``, or a path: ``.csv``/``.tsv`` →
            CsvDataset, ``.jsonl`` → JsonlDataset, ``.json`` → CocoCaptions (``image_dir`` keyword required),
            ``.tar`` or brace pattern → WebDatasetShards, a directory → FolderDataset.
        split: split of a named dataset (a path already is one split, so it is ignored there).
        **kw: passed to the reader's constructor.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: an unknown name or file type; the message lists the valid ones.
    """
    text = str(spec)
    name = _NAME_ALIASES.get(text.lower(), text.lower())
    if name in NAMED_DATASETS:
        return NAMED_SOURCES[name](split=split, **kw)
    if looks_like_shards(text):
        shards = expand_urls(text)
        check_shards_exist(shards)
        return WebDatasetShards(shards, **kw)
    path = Path(os.path.expanduser(text))
    if not path.exists():
        looks_like_name = not any(c in text for c in "/\\.")
        hint = f"; named datasets are {list(NAMED_DATASETS)}" if looks_like_name else ""
        raise FileNotFoundError(
            f"dataset {text!r} not found: no such file or folder{hint}. Give a .csv/.tsv, .jsonl, COCO .json, "
            ".tar shard pattern, or a folder of images with .txt captions"
        )
    return open_path(path, **kw)
