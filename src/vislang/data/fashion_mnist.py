"""Fashion-MNIST as an image–caption dataset, read from the Debian package ``dataset-fashion-mnist``.

Each 28×28 grayscale article gets a caption built from one of several templates ("a photo of a sneaker."), so a
contrastive model trained on it can later be evaluated zero-shot with the 10 class names and a partly different set
of prompt templates.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .readers import DatasetMissingError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_COMMAND = "sudo apt-get install dataset-fashion-mnist"
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049

# The official label names, for tables and confusion matrices.
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Names as they read in a sentence ("a photo of a pair of trousers."); used in captions and zero-shot prompts.
FASHION_MNIST_CLASSES = [
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
CAPTION_TEMPLATES = [
    "a photo of a {}.",
    "a black and white picture of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale image of a {}.",
    "a picture of a {}, a fashion item.",
    "a small photo of a {}.",
    "a product photo of a {}.",
    "an image showing a {}.",
    "a {} on a black background.",
    "a centered photo of a {}.",
]
# Prompts for zero-shot evaluation: some shared with training captions, some unseen phrasings.
ZERO_SHOT_TEMPLATES = [
    "a photo of a {}.",
    "a black and white picture of a {}.",
    "a grayscale image of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a catalogue photo of a {}.",
    "a pixelated photo of a {}.",
]


def format_caption(template: str, name: str) -> str:
    """Fill a template and fix the article ("a ankle boot" → "an ankle boot")."""
    text = template.format(name)
    if name[:1].lower() in "aeiou":
        # a function, not a template: a name is text, and "a\\d" in a template is a bad escape (it was a 500)
        text = re.sub(rf"\b([Aa]) {re.escape(name)}", lambda m: f"{m.group(1)}n {name}", text)
    return text


def missing_error(root: Path, missing: list[str]) -> DatasetMissingError:
    """The error for an absent dataset; says exactly how to install it."""
    return DatasetMissingError(
        f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). Install it with: {INSTALL_COMMAND} "
        "(as root: apt-get install dataset-fashion-mnist; or run `make fashion-mnist`), or pass root=<folder with "
        "the *-ubyte.gz files>."
    )


def split_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(images file, labels file) of a split; DatasetMissingError if either is absent."""
    if split not in SPLIT_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {list(SPLIT_FILES)}, got {split!r}")
    root = Path(root)
    paths = tuple(root / name for name in SPLIT_FILES[split])
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise missing_error(root, missing)
    return paths  # type: ignore[return-value]


def read_idx(path: Path, magic: int, header_bytes: int) -> np.ndarray:
    """Read a gzipped IDX file as uint8; the dimensions come from its header."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {found}, expected {magic})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range((header_bytes - 4) // 4)]
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dims)


@functools.lru_cache(maxsize=4)
def load_split(images_path: Path, labels_path: Path, mtime: float) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×28×28, labels uint8 N), cached per process (``mtime`` invalidates the cache)."""
    images = read_idx(images_path, _IMAGES_MAGIC, 16)
    labels = read_idx(labels_path, _LABELS_MAGIC, 8)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels


def template_choices(n: int, seed: int, split: str) -> np.ndarray:
    """Template index per item, a fixed function of (seed, split, index)."""
    split_id = list(SPLIT_FILES).index(split)
    return np.random.default_rng([seed, split_id]).integers(0, len(CAPTION_TEMPLATES), size=n)


class FashionMNIST(Dataset):
    """Fashion-MNIST items as ``(PIL "L" 28×28 image, caption, label)``.

    Args:
        split: "train" (60,000) or "test" (10,000).
        root: folder with the four ``*-ubyte.gz`` files.
        seed: which caption template each item gets.
    """

    classnames = FASHION_MNIST_CLASSES
    labelnames = FASHION_MNIST_LABELS
    image_size = 28
    channels = 1

    def __init__(self, split: str = "train", root: str | os.PathLike = DEFAULT_ROOT, seed: int = 0) -> None:
        images_path, labels_path = split_paths(root, split)
        self.split = split
        self.root = Path(root)
        self.seed = seed
        self.images, raw_labels = load_split(images_path, labels_path, images_path.stat().st_mtime)
        self.labels = raw_labels.astype(np.int64)
        self.template_ids = template_choices(len(self.labels), seed, split)

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, index: int) -> str:
        """The caption of item ``index``."""
        template = CAPTION_TEMPLATES[int(self.template_ids[index])]
        return format_caption(template, self.classnames[int(self.labels[index])])

    def __getitem__(self, index: int) -> tuple[Image.Image, str, int]:
        return Image.fromarray(self.images[index]), self.caption(index), int(self.labels[index])

    def fast_arrays(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(images uint8 N×28×28×1, captions, labels int64) without building PIL images, for ``prepare``."""
        captions = [self.caption(i) for i in range(len(self))]
        return self.images[:, :, :, None], captions, self.labels

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, root={str(self.root)!r}, seed={self.seed}, n={len(self)})"
