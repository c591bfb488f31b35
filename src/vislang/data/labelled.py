"""Labelled images for classification: the named datasets, class-per-folder trees and CSV tables with a label column.

Everything becomes one shape, :class:`LabelledImages` (uint8 pixels at the tower's size + int labels + class names),
so the trainer never knows where the images came from. Named datasets go through the prepared (memory-mapped) cache
the dual-encoder trainer uses, so Fashion-MNIST is decoded once for both; folders and tables are small enough to
decode into memory.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .loading import load_prepared
from .readers import IMAGE_EXTENSIONS, csv_separator, find_images, resolve_path
from .sources import _NAME_ALIASES, NAMED_DATASETS
from .transforms import pil_to_array

LABEL_HELP = (
    "give a dataset with class labels: fashion-mnist or shapes, a folder with one sub-folder of images per class, "
    "or a .csv/.tsv with an image column (--img-key) and a label column (--label-key)"
)


class NoLabelsError(ValueError):
    """A dataset without class labels was given to a command that trains a classifier."""


@dataclass
class LabelledImages:
    """uint8 images (N, H, W, C) (an array or a memmap), int64 labels (N,) in [0, K), and the K class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> LabelledImages:
        """The items at ``indices`` (read into memory), with the same class names."""
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        return LabelledImages(np.ascontiguousarray(self.images[indices]), self.labels[indices], self.class_names)

    def get_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """``{"image": uint8 (B, C, H, W), "label": long (B,)}`` for ``indices``."""
        images = torch.from_numpy(np.ascontiguousarray(self.images[indices])).permute(0, 3, 1, 2)  # (B, C, H, W)
        return {"image": images, "label": torch.from_numpy(self.labels[indices])}


def split_holdout(n: int, fraction: float, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: ``fraction`` of each class held out, so a small validation set keeps every class."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(len(idx) * fraction))
        if k:
            held.append(rng.choice(idx, k, replace=False))
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    if len(held_idx) == 0 or len(held_idx) == n:
        raise ValueError(f"cannot hold out {fraction:.0%} of {n} images; use more images or another fraction")
    return np.setdiff1d(np.arange(n), held_idx), held_idx


def _decode(paths: list[str], image_size: int, channels: int, progress: bool) -> tuple[np.ndarray, list[int]]:
    """Decode image files to uint8 (N, S, S, C); returns the pixels and the positions that could be read."""
    from PIL import Image

    if progress:
        from tqdm.auto import tqdm

        paths = tqdm(paths, desc="decoding images", unit="img")
    arrays, ok = [], []
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as img:
                arrays.append(pil_to_array(img, image_size, channels))
            ok.append(i)
        except (OSError, ValueError):
            continue
    if not arrays:
        raise ValueError("none of the dataset's images could be read")
    return np.stack(arrays), ok


def _sorted_names(values: list[str]) -> list[str]:
    """Class names in a natural order: numerically when every label is an integer, else alphabetically."""
    uniq = sorted(set(values))
    try:
        return sorted(uniq, key=int)
    except ValueError:
        return uniq


def _from_names(images: np.ndarray, names: list[str], class_names: list[str] | None, spec: str) -> LabelledImages:
    """Labels from per-image class names; with ``class_names`` given (a test set), the training set's order."""
    if class_names is None:
        class_names = _sorted_names(names)
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(f"{spec} has classes the training set lacks: {unknown[:5]}; train on data with all of them")
    return LabelledImages(images, np.asarray([index[n] for n in names], dtype=np.int64), class_names)


def read_class_folders(
    root: Path, image_size: int, channels: int, class_names: list[str] | None = None, progress: bool = False
) -> LabelledImages:
    """``root/<class>/**/*.png`` (torchvision's ImageFolder layout): the sub-folder name is the label."""
    files = find_images(root)
    names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in files]
    if not files or any(n is None for n in names):
        loose = sum(n is None for n in names)
        raise NoLabelsError(
            f"{root} has {loose} image(s) directly inside it and {len(files) - loose} in sub-folders: a folder "
            f"dataset needs every image inside a sub-folder named after its class; {LABEL_HELP}"
        )
    images, ok = _decode([str(f) for f in files], image_size, channels, progress)
    return _from_names(images, [names[i] for i in ok], class_names, str(root))


def read_label_table(
    path: Path,
    image_size: int,
    channels: int,
    img_key: str = "filepath",
    label_key: str = "label",
    class_names: list[str] | None = None,
    progress: bool = False,
) -> LabelledImages:
    """A CSV/TSV with a header: image paths (relative to the file's folder) in ``img_key``, labels in ``label_key``."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=csv_separator(path, None))
        header = reader.fieldnames or []
        if label_key not in header:
            raise NoLabelsError(
                f"{path} has no label column {label_key!r} (its columns are {header}); name the column with "
                f"--label-key, or {LABEL_HELP}"
            )
        if img_key not in header:
            raise ValueError(f"{path} has no image column {img_key!r} (its columns are {header}); set --img-key")
        rows = [(r[img_key], (r[label_key] or "").strip()) for r in reader if r.get(img_key)]
    rows = [(resolve_path(p, path.parent), lab) for p, lab in rows if lab]
    if not rows:
        raise NoLabelsError(f"{path} has no rows with both an image and a label; {LABEL_HELP}")
    images, ok = _decode([p for p, _ in rows], image_size, channels, progress)
    return _from_names(images, [rows[i][1] for i in ok], class_names, str(path))


def read_named(
    name: str, split: str, image_size: int, channels: int, cache_dir: str, progress: bool = False
) -> LabelledImages:
    """A built-in dataset's split, through the prepared cache shared with ``vislang train``."""

    ds = load_prepared(name, split, image_size, channels, DataConfig(train=name, cache_dir=cache_dir), progress)
    labels = np.asarray(ds.labels, dtype=np.int64)
    if len(labels) == 0 or labels.max() < 0:
        raise NoLabelsError(f"the {name!r} dataset ({split} split) has no class labels; {LABEL_HELP}")
    keep = np.flatnonzero(labels >= 0)
    class_names = list(ds.classnames or [str(i) for i in range(int(labels.max()) + 1)])
    images = ds.images if len(keep) == len(labels) else np.ascontiguousarray(ds.images[keep])
    return LabelledImages(images, labels[keep], class_names)


def load_labelled(
    spec: str,
    split: str,
    image_size: int,
    channels: int,
    cache_dir: str = ".cache/vislang/prepared",
    img_key: str = "filepath",
    label_key: str = "label",
    class_names: list[str] | None = None,
    progress: bool = False,
) -> LabelledImages:
    """Labelled images from a named dataset (``split`` applies), a class-per-folder tree, or a CSV/TSV table.

    Args:
        spec: ``fashion-mnist``, ``shapes``, a folder, or a .csv/.tsv file.
        split: split of a named dataset ("train", "test"); ignored for paths.
        image_size: side the images are resized to (the tower's input size).
        channels: 1 or 3.
        cache_dir: where named datasets are prepared.
        img_key: CSV column with image paths.
        label_key: CSV column with labels.
        class_names: for a test set: the training set's classes, so label ids agree.
        progress: show a progress bar while decoding.
    """
    name = _NAME_ALIASES.get(spec.lower(), spec.lower())
    if name in NAMED_DATASETS:
        return read_named(name, split, image_size, channels, cache_dir, progress)
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        raise FileNotFoundError(f"dataset {spec!r} not found: named datasets are {list(NAMED_DATASETS)}; {LABEL_HELP}")
    if path.is_dir():
        return read_class_folders(path, image_size, channels, class_names, progress)
    if path.suffix.lower() in (".csv", ".tsv"):
        return read_label_table(path, image_size, channels, img_key, label_key, class_names, progress)
    kind = "an image" if path.suffix.lower() in IMAGE_EXTENSIONS else f"a {path.suffix or 'plain'} file"
    raise NoLabelsError(f"{spec} is {kind}, not a labelled dataset; {LABEL_HELP}")
