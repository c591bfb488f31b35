"""Locked-tower features, computed once and cached on disk: what LiT (locked-image tuning) trains on.

When a tower is frozen, its output for an item never changes, so running it again every epoch is pure waste: on a
CPU the towers cost about a hundred times what the trained projections do. ``cached_features`` runs the towers once
over a dataset and keeps their outputs in a folder named by a key that covers everything the outputs depend on:

* the towers' weights (a hash of their state dicts),
* the preprocessing (image size, channels, mean/std, crop or pad, tokenizer),
* the data (each item's path, caption, file size and modification time; or the reader's own description).

Change any of these and the key changes, so a stale cache is never read. The folder holds::

    image.npy  float32 (N, D_image)   text.npy  float32 (N, D_text)   index.npy  int64 (N,) item index in the dataset
    captions.jsonl  one caption per line        meta.json  key parts, counts, skip reasons; written last

read back memory-mapped (``np.load(mmap_mode="r")``). Extraction works in chunks of ``chunk`` items, each written
atomically to ``<key>.parts/`` as it completes: a run killed (even ``kill -9``) resumes at the first missing chunk,
and the finished folder is assembled in a hidden temporary folder and renamed into place.

The module never imports a model: callers pass the towers as functions (uint8 images → features, captions →
features), so the data layer stays below the model layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .prepare import unpack_item
from .transforms import pil_to_array

FORMAT_VERSION = 1
ImageFn = Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, C, H, W) -> float (B, D_image)
TextFn = Callable[[list[str]], torch.Tensor]  # captions -> float (B, D_text)


@dataclass
class Features:
    """Tower outputs of one dataset: the inputs of the trained projections, row i for item ``index[i]``."""

    image: np.ndarray  # (N, D_image) float32, memory-mapped when read from the cache; (N, C, h, w) etc. when the
    # cache holds the input of an unlocked block (``lit.unlock_last_image``) instead of the pooled output
    text: np.ndarray  # (N, D_text) float32
    index: np.ndarray  # (N,) int64: item index in the dataset (unreadable items are left out)
    captions: list[str]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, rows: np.ndarray) -> Features:
        """The features of ``rows`` (copied into memory)."""
        rows = np.asarray(rows)
        caps = [self.captions[i] for i in rows]
        return Features(np.asarray(self.image[rows]), np.asarray(self.text[rows]), self.index[rows], caps, self.meta)


# ------------------------------------------------------------------------------------------------------- keys


def tensors_hash(module: torch.nn.Module) -> str:
    """A hash of a module's weights and buffers (names, shapes, dtypes, bytes): changes with any trained value."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(dataset: Any) -> str:
    """A hash of what a dataset holds, cheap enough to take on every run.

    Readers that list their items (``items``: (path, caption, ...) tuples: CSV, JSONL, folders, COCO, OpenClipart)
    are hashed item by item with each file's size and modification time, so an edited caption or a replaced photo
    changes it; other readers (generated or packaged sets, shards) by their length and ``repr``.
    """
    h = hashlib.blake2b(digest_size=16)
    own_repr = type(dataset).__repr__ is not object.__repr__  # the default one holds a memory address
    h.update(f"{type(dataset).__name__}|{repr(dataset) if own_repr else ''}".encode())
    items = getattr(dataset, "items", None)
    if not isinstance(items, list):
        try:
            h.update(f"|n={len(dataset)}".encode())
        except TypeError:
            pass
        return h.hexdigest()
    caption_of = getattr(dataset, "caption", None)  # FolderDataset reads its .txt captions lazily: ask for them
    for i, it in enumerate(items):
        path = str(it[0])
        caption = caption_of(i) if callable(caption_of) else (it[1] if len(it) > 1 else "")
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{path}\0{caption}\0{stamp}\n".encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """The cache folder's name: a readable prefix and a hash of every part the features depend on."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    tag = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(parts.get("name", "features")))[:40]
    return f"{tag}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# ----------------------------------------------------------------------------------------------------- reading


class FirstN(Dataset):
    """The first ``n`` items of a map-style dataset (``data.max_train`` / ``max_val``), limited before extraction so
    a quick run pays for ``n`` tower passes, not for the whole set; its fingerprint covers those items only."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.dataset, self.n = dataset, min(int(n), len(dataset))
        items = getattr(dataset, "items", None)
        self.items = items[: self.n] if isinstance(items, list) else None
        if hasattr(dataset, "caption"):
            self.caption = dataset.caption

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]

    def __repr__(self) -> str:
        inner = (
            repr(self.dataset) if type(self.dataset).__repr__ is not object.__repr__ else type(self.dataset).__name__
        )
        return f"FirstN({inner}, {self.n})"


class _Indexed(Dataset):
    """Items ``start .. stop`` of a map-style dataset as (index, uint8 (H, W, C) array, caption); None if unusable."""

    def __init__(self, dataset: Any, start: int, stop: int, image_size: int, channels: int, fit: str) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop
        self.image_size, self.channels, self.fit = image_size, channels, fit

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, str] | tuple[int, str]:
        idx = self.start + i
        item = self.dataset[idx]
        if item is None:
            return idx, "unreadable image"
        image, caption, _ = unpack_item(item)
        caption = " ".join(caption.split())
        if not caption:
            return idx, "empty caption"
        try:
            return idx, pil_to_array(image, self.image_size, self.channels, self.fit), caption
        except Exception:  # one undecodable photo must not stop a long extraction
            return idx, "image conversion failed"


def _collate(batch: list) -> list:
    return batch


def read_chunk(
    dataset: Any, start: int, stop: int, image_size: int, channels: int, fit: str, batch: int, workers: int
) -> Iterator[list]:
    """Batches of converted items of ``start .. stop``, decoded in ``workers`` processes."""
    ds = _Indexed(dataset, start, stop, image_size, channels, fit)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=_collate)
    yield from loader


# ----------------------------------------------------------------------------------------------------- writing


def atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to a temporary name, then renamed: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.inference_mode()
def extract_chunk(
    dataset: Any, start: int, stop: int, image_fn: ImageFn, text_fn: TextFn, opts: dict[str, Any], bar: Any = None
) -> dict[str, np.ndarray]:
    """Tower outputs of items ``start .. stop`` as the arrays of one chunk file (with skip reasons)."""
    images, texts, kept, captions, skipped = [], [], [], [], []
    for batch in read_chunk(dataset, start, stop, opts["image_size"], opts["channels"], opts["fit"],
                            opts["batch_size"], opts["workers"]):  # fmt: skip
        good = [b for b in batch if len(b) == 3]
        skipped.extend(b[1] for b in batch if len(b) == 2)
        if bar is not None:
            bar.update(len(batch))
        if not good:
            continue
        x = torch.from_numpy(np.stack([b[1] for b in good])).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
        caps = [b[2] for b in good]
        images.append(image_fn(x).float().cpu().numpy())  # (B, D_image)
        texts.append(text_fn(caps).float().cpu().numpy())  # (B, D_text)
        kept.extend(b[0] for b in good)
        captions.extend(caps)
    return {
        "image": np.concatenate(images) if images else np.zeros((0, *_shape(opts["image_dim"])), np.float32),
        "text": np.concatenate(texts) if texts else np.zeros((0, *_shape(opts["text_dim"])), np.float32),
        "index": np.asarray(kept, dtype=np.int64),
        "captions": np.asarray(captions, dtype=np.str_),
        "skipped": np.asarray(skipped, dtype=np.str_),
    }


def _shape(dim: int | tuple[int, ...]) -> tuple[int, ...]:
    return (dim,) if isinstance(dim, int) else tuple(dim)


def assemble(parts_dir: Path, starts: list[int], folder: Path, meta: dict[str, Any]) -> None:
    """Join the chunk files into the cache folder (built hidden, then renamed into place) and drop the parts."""
    chunks = [np.load(parts_dir / f"{s:010d}.npz") for s in starts]
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    for name in ("image", "text", "index"):
        np.save(tmp / f"{name}.npy", np.concatenate([c[name] for c in chunks]))
    captions = [str(c) for ch in chunks for c in ch["captions"]]
    with open(tmp / "captions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in captions)
    reasons: dict[str, int] = {}
    for ch in chunks:
        for r in ch["skipped"]:
            reasons[str(r)] = reasons.get(str(r), 0) + 1
    meta = {**meta, "n": len(captions), "skipped": reasons}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))  # last: marks the folder whole
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    shutil.rmtree(parts_dir, ignore_errors=True)


def load_features(folder: str | os.PathLike) -> Features:
    """A finished cache folder, memory-mapped."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    with open(folder / "captions.jsonl", encoding="utf-8") as f:
        captions = [json.loads(line) for line in f]
    load = lambda name: np.load(folder / f"{name}.npy", mmap_mode="r")  # noqa: E731
    return Features(load("image"), load("text"), np.asarray(load("index")), captions, meta)


def cached_features(
    dataset: Any,
    image_fn: ImageFn,
    text_fn: TextFn,
    cache_dir: str | os.PathLike,
    key_parts: dict[str, Any],
    image_size: int,
    channels: int,
    image_dim: int | tuple[int, ...],
    text_dim: int | tuple[int, ...],
    fit: str = "crop",
    batch_size: int = 64,
    chunk: int = 1024,
    workers: int = 0,
    progress: bool = True,
) -> Features:
    """The towers' outputs for every item of a map-style ``dataset``, from the cache or extracted into it.

    Args:
        dataset: ``dataset[i]`` → (PIL image, caption[, label]) or None (an unreadable item: skipped and counted).
        image_fn: the locked image tower on uint8 (B, C, H, W) images (it normalises them itself).
        text_fn: the locked text tower on a list of captions.
        cache_dir: where cache folders live (``.cache/vislang/features``).
        key_parts: what else the outputs depend on (tower weights hash, tokenizer, ...); the data fingerprint,
            sizes and ``fit`` are added here.
        image_size, channels, fit: how each image becomes the tower's input (``pil_to_array``).
        image_dim, text_dim: feature sizes (or a row's shape), for chunks in which nothing was readable.
        batch_size: items per tower call.
        chunk: items per resumable chunk file.
        workers: DataLoader processes decoding images.
        progress: show a progress bar.
    """
    parts = {**key_parts, "data": data_fingerprint(dataset), "image_size": image_size, "channels": channels,
             "fit": fit}  # fmt: skip
    folder = Path(cache_dir) / cache_key(parts)
    if (folder / "meta.json").is_file():
        return load_features(folder)
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset holds no items to extract features from")
    parts_dir = folder.with_name(folder.name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, n, chunk))
    done = {s for s in starts if (parts_dir / f"{s:010d}.npz").is_file()}
    opts = {"image_size": image_size, "channels": channels, "fit": fit, "batch_size": batch_size,
            "workers": workers, "image_dim": image_dim, "text_dim": text_dim}  # fmt: skip
    bar = tqdm(total=n, desc=f"features {parts.get('name', '')}".strip(), unit="img", disable=not progress)
    bar.update(sum(min(chunk, n - s) for s in done))
    for s in starts:
        if s in done:
            continue
        arrays = extract_chunk(dataset, s, min(s + chunk, n), image_fn, text_fn, opts, bar)
        atomic_npz(parts_dir / f"{s:010d}.npz", **arrays)
    bar.close()
    assemble(parts_dir, starts, folder, {"key": parts, "items": n})
    return load_features(folder)
