"""Decode, resize and tokenize a dataset once; train from flat memory-mapped arrays afterwards.

Decoding JPEG/PNG files and resizing them every epoch costs far more than a small model's forward pass, so
``prepare`` writes a folder holding::

    images.u8       raw uint8 (N, H, W, C), read with np.memmap
    tokens.i32      raw int32 (N, context_length), when a tokenizer was given
    labels.npy      int64 (N,), -1 where the source has no label
    captions.jsonl  one {"caption": ...} per line
    meta.json       sizes, class names, skip counts, source description; written last

Everything is written to a hidden temporary folder that is renamed into place only when complete, so a folder with
``meta.json`` is always a whole dataset. ``PreparedDataset`` reads it back; its ``get_batch`` slices a whole batch
from the memmaps at once, which is what the trainer uses.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from .transforms import pil_to_array

FORMAT_VERSION = 1
IMAGES_FILE = "images.u8"
TOKENS_FILE = "tokens.i32"
LABELS_FILE = "labels.npy"
CAPTIONS_FILE = "captions.jsonl"
META_FILE = "meta.json"

Tokenize = Callable[[list[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PreparedInfo:
    """What ``prepare`` wrote: the folder, how many items, their shapes and what was skipped."""

    path: Path
    n: int
    image_size: int
    channels: int
    context_length: int | None
    skipped: dict[str, int]
    seconds: float

    @property
    def skipped_total(self) -> int:
        """Number of source items left out."""
        return sum(self.skipped.values())


@dataclasses.dataclass
class Chunk:
    """A batch of converted items plus the bookkeeping needed to account for the ones dropped."""

    images: np.ndarray
    captions: list[str]
    labels: list[int]
    seen: int
    dropped: dict[str, int]
    worker: int | None = None
    worker_skips: dict[str, int] | None = None


# -------------------------------------------------------------------------------------------------- conversion


def unpack_item(item: Any) -> tuple[Any, str, int]:
    """(image, caption, label) from a reader item ``(img, caption)`` or ``(img, caption, label)``; label -1 if none."""
    image, caption = item[0], item[1]
    label = item[2] if len(item) > 2 else -1
    try:
        label = int(label)
    except (TypeError, ValueError):
        label = -1
    return image, "" if caption is None else str(caption), label


class ConvertBatch:
    """DataLoader ``collate_fn`` that turns reader items into uint8 arrays (runs inside workers, in parallel).

    Items that are ``None`` or fail to convert are dropped and counted; the worker's own ``skips`` counter is
    attached so the main process can report reasons from all workers.
    """

    def __init__(self, image_size: int, channels: int) -> None:
        self.image_size = image_size
        self.channels = channels

    def __call__(self, batch: list) -> Chunk:
        shape = (self.image_size, self.image_size, self.channels)
        arrays, captions, labels, dropped = [], [], [], {}
        for item in batch:
            if item is None:
                dropped["reader returned None"] = dropped.get("reader returned None", 0) + 1
                continue
            image, caption, label = unpack_item(item)
            caption = " ".join(caption.split())
            if not caption:
                dropped["empty caption"] = dropped.get("empty caption", 0) + 1
                continue
            try:
                arrays.append(pil_to_array(image, self.image_size, self.channels))
            except Exception:  # a single undecodable image must not stop a long preparation
                dropped["image conversion failed"] = dropped.get("image conversion failed", 0) + 1
                continue
            captions.append(caption)
            labels.append(label)
        images = np.stack(arrays) if arrays else np.zeros((0, *shape), np.uint8)
        info = get_worker_info()
        worker_skips = None
        if info is not None and hasattr(info.dataset, "skips"):
            worker_skips = dict(info.dataset.skips.counts)
        return Chunk(images, captions, labels, len(batch), dropped, info.id if info else None, worker_skips)


def is_sized(dataset: Any) -> bool:
    """Whether the dataset has a known length (map-style, or an iterable that defines ``__len__``)."""
    if isinstance(dataset, IterableDataset):
        return False
    try:
        len(dataset)
    except TypeError:
        return False
    return True


def fast_chunks(dataset: Any, image_size: int, channels: int, batch_size: int) -> Iterator[Chunk] | None:
    """Chunks straight from ``dataset.fast_arrays()`` when its images already have the wanted size, else None."""
    if not hasattr(dataset, "fast_arrays"):
        return None
    images, captions, labels = dataset.fast_arrays()
    if images.ndim != 4 or images.shape[1:3] != (image_size, image_size) or images.shape[3] not in (1, channels):
        return None

    def generate() -> Iterator[Chunk]:
        for start in range(0, len(images), batch_size):
            block = np.asarray(images[start : start + batch_size], dtype=np.uint8)
            if block.shape[3] != channels:  # grayscale → RGB replicates the channel, exactly as PIL does
                block = np.repeat(block, channels, axis=3)
            stop = start + len(block)
            yield Chunk(block, list(captions[start:stop]), [int(x) for x in labels[start:stop]], len(block), {})

    return generate()


def loader_chunks(dataset: Any, image_size: int, channels: int, batch_size: int, num_workers: int) -> Iterator[Chunk]:
    """Chunks from a DataLoader over the dataset, converting images in ``num_workers`` processes."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=ConvertBatch(image_size, channels),
    )
    yield from loader


# ------------------------------------------------------------------------------------------------------ writing


class ChunkWriter:
    """Appends chunks to the raw files of a prepared folder (works without knowing the final count)."""

    def __init__(self, folder: Path, tokenize: Tokenize | None, tokenize_batch: int) -> None:
        self.folder = folder
        self.tokenize = tokenize
        self.tokenize_batch = tokenize_batch
        self.images = open(folder / IMAGES_FILE, "wb")
        self.captions = open(folder / CAPTIONS_FILE, "w", encoding="utf-8")
        self.tokens = open(folder / TOKENS_FILE, "wb") if tokenize is not None else None
        self.labels: list[int] = []
        self.context_length: int | None = None
        self.n = 0

    def tokenize_captions(self, captions: list[str]) -> np.ndarray:
        """int32 (n, context_length) tokens; the context length must stay the same across chunks."""
        assert self.tokenize is not None
        parts = [
            np.asarray(self.tokenize(captions[i : i + self.tokenize_batch]))
            for i in range(0, len(captions), self.tokenize_batch)
        ]
        tokens = np.concatenate(parts).astype(np.int32, copy=False)
        if tokens.ndim != 2 or len(tokens) != len(captions):
            raise ValueError(f"tokenize must return an (n, context_length) array, got shape {tokens.shape}")
        if self.context_length is None:
            self.context_length = int(tokens.shape[1])
        elif tokens.shape[1] != self.context_length:
            raise ValueError(f"tokenize returned context length {tokens.shape[1]}, earlier {self.context_length}")
        return tokens

    def write(self, chunk: Chunk) -> None:
        """Append one chunk's images, tokens, captions and labels."""
        if not chunk.captions:
            return
        if self.tokens is not None:
            self.tokens.write(np.ascontiguousarray(self.tokenize_captions(chunk.captions)).tobytes())
        self.images.write(np.ascontiguousarray(chunk.images, dtype=np.uint8).tobytes())
        self.captions.writelines(json.dumps({"caption": c}, ensure_ascii=False) + "\n" for c in chunk.captions)
        self.labels.extend(chunk.labels)
        self.n += len(chunk.captions)

    def discard(self) -> None:
        """Close the files without finishing them (the caller deletes the folder)."""
        for f in (self.images, self.captions, self.tokens):
            if f is not None and not f.closed:
                f.close()

    def close(self) -> None:
        """Flush and close the files and write ``labels.npy``."""
        for f in (self.images, self.captions, self.tokens):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        if self.tokens is not None and self.n == 0:  # nothing was tokenized: no context length to record
            (self.folder / TOKENS_FILE).unlink(missing_ok=True)
        np.save(self.folder / LABELS_FILE, np.asarray(self.labels, dtype=np.int64))


class SkipTally:
    """Combines the reader's own skip reasons (from every worker) with items dropped during conversion."""

    def __init__(self, dataset: Any) -> None:
        counter = getattr(dataset, "skips", None)
        self.counter = counter if hasattr(counter, "counts") else None
        self.before = dict(self.counter.counts) if self.counter is not None else {}
        self.dropped: dict[str, int] = {}
        self.workers: dict[int, dict[str, int]] = {}

    def add(self, chunk: Chunk) -> None:
        """Record one chunk's drops and its worker's latest counter snapshot."""
        for reason, n in chunk.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        if chunk.worker is not None and chunk.worker_skips is not None:
            self.workers[chunk.worker] = chunk.worker_skips

    def reasons(self) -> dict[str, int]:
        """Skip counts by reason: before the run (e.g. bad rows found at load), during it, and unexplained Nones."""
        during: dict[str, int] = {}
        snapshots = list(self.workers.values()) or ([dict(self.counter.counts)] if self.counter is not None else [])
        for snap in snapshots:
            for reason, n in snap.items():
                during[reason] = during.get(reason, 0) + n - self.before.get(reason, 0)
        out = dict(self.before)
        for reason, n in during.items():
            out[reason] = out.get(reason, 0) + n
        nones = self.dropped.get("reader returned None", 0)
        unexplained = nones - sum(during.values())
        if unexplained > 0:
            out["unreadable item"] = out.get("unreadable item", 0) + unexplained
        for reason, n in self.dropped.items():
            if reason != "reader returned None":
                out[reason] = out.get(reason, 0) + n
        return {k: v for k, v in out.items() if v > 0}


def summarize_skips(skipped: dict[str, int]) -> str:
    """``skipped 3 items: 2 unreadable image, 1 empty caption``."""
    total = sum(skipped.values())
    if not total:
        return "skipped 0 items"
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return f"skipped {total} item{'s' if total != 1 else ''}: {parts}"


def describe_source(dataset: Any) -> str:
    """A short human-readable description of where the data came from (stored in meta.json)."""
    if type(dataset).__repr__ is not object.__repr__:
        return repr(dataset)
    for attr in ("path", "root", "urls"):
        if hasattr(dataset, attr):
            return f"{type(dataset).__name__}({getattr(dataset, attr)!s})"
    return type(dataset).__name__


def build_meta(
    dataset: Any, writer: ChunkWriter, image_size: int, channels: int, skipped: dict[str, int], extra: dict[str, Any]
) -> dict[str, Any]:
    """The meta.json contents."""
    classnames = getattr(dataset, "classnames", None)
    return {
        "format_version": FORMAT_VERSION,
        "n": writer.n,
        "image_size": image_size,
        "channels": channels,
        "context_length": writer.context_length,
        "classnames": list(classnames) if classnames is not None else None,
        "has_labels": bool(writer.labels) and max(writer.labels) >= 0,
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "source": describe_source(dataset),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with the finished ``tmp`` folder; the old one is removed only after the swap."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare(
    dataset: Dataset | IterableDataset,
    out_dir: str | os.PathLike,
    image_size: int,
    channels: int,
    tokenize: Tokenize | None = None,
    num_workers: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    tokenizer_id: str | None = None,
    source: str | None = None,
) -> PreparedInfo:
    """Decode, resize (``pil_to_array``) and tokenize every item once, writing a prepared folder atomically.

    Args:
        dataset: map-style or iterable dataset of ``(image, caption[, label])`` items (``None`` = skip).
        out_dir: the folder to create (replaced if it exists, only once the new one is complete).
        image_size: side of the stored square images.
        channels: 1 or 3.
        tokenize: ``list[str] → int array (n, context_length)``; None stores no tokens.
        num_workers: DataLoader worker processes for decoding (an iterable dataset must split its own work
            across workers, as ``WebDatasetShards`` does).
        batch_size: items per conversion/tokenization batch.
        progress: show a tqdm bar and print a summary.
        tokenizer_id: recorded in meta.json so a cache can tell tokenizations apart.
        source: description recorded in meta.json (default: derived from the dataset).

    Returns:
        A ``PreparedInfo`` describing what was written.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    tally = SkipTally(dataset)
    writer: ChunkWriter | None = None
    try:
        chunks = fast_chunks(dataset, image_size, channels, batch_size)
        if chunks is None:
            chunks = loader_chunks(dataset, image_size, channels, batch_size, num_workers)
        writer = ChunkWriter(tmp, tokenize, batch_size)
        total = len(dataset) if is_sized(dataset) else None  # type: ignore[arg-type]
        with tqdm(total=total, disable=not progress, unit="img", desc=f"prepare {out_dir.name}") as bar:
            for chunk in chunks:
                writer.write(chunk)
                tally.add(chunk)
                bar.update(chunk.seen)
        writer.close()
        skipped = tally.reasons()
        extra = {"tokenizer_id": tokenizer_id, "seconds": round(time.perf_counter() - start, 3)}
        if source is not None:
            extra["source_spec"] = source
        meta = build_meta(dataset, writer, image_size, channels, skipped, extra)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        move_into_place(tmp, out_dir)
    except BaseException:  # also KeyboardInterrupt: never leave a half-written folder behind
        if writer is not None:
            writer.discard()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = PreparedInfo(
        out_dir, meta["n"], image_size, channels, meta["context_length"], skipped, time.perf_counter() - start
    )
    if skipped:
        print(f"prepare {out_dir}: {summarize_skips(skipped)}", file=sys.stderr)
    if progress:
        print(f"prepared {info.n} items ({image_size}px, {channels}ch) in {out_dir}", file=sys.stderr)
    return info


# ------------------------------------------------------------------------------------------------------ reading


class NotPreparedError(FileNotFoundError):
    """A folder that is not (or not yet completely) a prepared dataset."""


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete prepared dataset (meta.json is written last, so its presence suffices)."""
    return (Path(path) / META_FILE).is_file()


def open_raw(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """Read-only memmap of a raw array file; an empty array for zero rows (np.memmap rejects empty files)."""
    if shape[0] == 0:
        return np.zeros(shape, dtype=dtype)
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if path.stat().st_size != expected:
        raise ValueError(f"{path} has {path.stat().st_size} bytes, expected {expected} for shape {shape}")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class PreparedDataset(Dataset):
    """A folder written by ``prepare``: uint8 images, optional tokens and labels, read through memmaps.

    Items are dicts ``{"image": uint8 (C, H, W), "tokens": long (ctx,), "label": int, "index": int}`` (no
    "tokens" key when none were stored). ``get_batch`` returns the same keys batched, in one vectorised read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise NotPreparedError(
                f"{self.path} is not a prepared dataset (no {META_FILE}); run `vislang prepare` to create it"
                + (" (a partial folder from an interrupted run is never used)" if self.path.exists() else "")
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        self.n = int(self.meta["n"])
        self.image_size = int(self.meta["image_size"])
        self.channels = int(self.meta["channels"])
        self.context_length = self.meta.get("context_length")
        self.labels = np.load(self.path / LABELS_FILE)
        self._captions: list[str] | None = None
        self._open()

    def _open(self) -> None:
        """Open the memmaps (also after unpickling in a DataLoader worker)."""
        rows = getattr(self, "_head_of", self.n)
        shape = (rows, self.image_size, self.image_size, self.channels)
        self.images = open_raw(self.path / IMAGES_FILE, np.uint8, shape)[: self.n]
        self.tokens = (
            open_raw(self.path / TOKENS_FILE, np.int32, (rows, int(self.context_length)))[: self.n]
            if self.context_length
            else None
        )

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies its whole contents; workers reopen the files instead.
        state = self.__dict__.copy()
        state["images"] = state["tokens"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self.n

    @property
    def classnames(self) -> list[str] | None:
        """Class names of the source dataset, when it had them."""
        return self.meta.get("classnames")

    @property
    def captions(self) -> list[str]:
        """All captions, read on first use (they are not needed for training from tokens)."""
        if self._captions is None:
            with open(self.path / CAPTIONS_FILE, encoding="utf-8") as f:
                self._captions = [json.loads(line)["caption"] for line in f]
        return self._captions

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        index = index % self.n
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1).contiguous(),
            "label": int(self.labels[index]),
            "index": index,
        }
        if self.tokens is not None:
            item["tokens"] = torch.from_numpy(self.tokens[index].astype(np.int64))
        return item

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Items ``indices`` stacked: image uint8 (B, C, H, W), tokens long (B, ctx), label long (B,), index (B,)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise IndexError(f"indices out of range for {self.n} items")
        idx = idx % max(self.n, 1)
        images = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).contiguous()
        batch = {
            "image": images,
            "label": torch.from_numpy(self.labels[idx].astype(np.int64)),
            "index": torch.from_numpy(idx),
        }
        if self.tokens is not None:
            batch["tokens"] = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return batch

    def head(self, n: int) -> PreparedDataset:
        """A view of the first ``n`` items (no copy): quick evaluations and smoke runs."""
        view = copy.copy(self)
        view.n = min(int(n), self.n)
        view.labels = self.labels[: view.n]
        view._captions = self.captions[: view.n]
        view.images = self.images[: view.n]
        view.tokens = None if self.tokens is None else self.tokens[: view.n]
        view._head_of = self.n  # the files hold more rows than this view shows
        return view

    def __repr__(self) -> str:
        return (
            f"PreparedDataset({str(self.path)!r}, n={self.n}, image_size={self.image_size}, channels={self.channels})"
        )


# ------------------------------------------------------------------------------------------------------- caching


def slug(text: str, max_len: int = 40) -> str:
    """A filesystem-safe readable fragment of a spec ("data/{000..009}.tar" → "data-000..009-.tar")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[-max_len:] or "data"


def canonical_spec(source_spec: str) -> str:
    """Existing paths become absolute, so the same data reached from two working directories shares a cache."""
    expanded = os.path.expanduser(source_spec)
    return str(Path(expanded).resolve()) if os.path.exists(expanded) else source_spec


def prepared_dir_for(
    cache_root: str | os.PathLike,
    source_spec: str,
    split: str,
    image_size: int,
    channels: int,
    tokenizer_id: str | None,
) -> Path:
    """The cache folder for one (source, split, image size, channels, tokenizer) combination.

    The name is readable (``shapes-train-64px3c-<hash>``) and the hash covers every argument plus the file format
    version, so a change to any of them gets a fresh folder instead of a stale one.
    """
    spec = canonical_spec(str(source_spec))
    key = json.dumps([FORMAT_VERSION, spec, split, int(image_size), int(channels), tokenizer_id])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = f"{slug(Path(spec).name or spec)}-{slug(split)}-{image_size}px{channels}c-{digest}"
    return Path(os.path.expanduser(cache_root)) / name
