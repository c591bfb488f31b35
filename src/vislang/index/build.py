"""Fill an index from a source of images: a folder, a CSV/TSV or JSONL of paths, or WebDataset tar shards.

A build reads the source in order, skips every item whose key is already indexed, embeds the rest in batches and
commits every ``commit_every`` batches as one transaction. An interrupted build therefore resumes by running it
again: committed items are skipped, the uncommitted tail is embedded again, and nothing is lost or indexed twice.
``add`` is the same operation on an existing index; ``remove`` takes ids, files or folders.

A build records the folders it reads from (``files.ROOTS_STATE``); the server sends only files inside them, and an
image path that leaves them (absolute, ``~``, ``..``, a symlink out) is refused unless ``allow_outside_root``.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.readers import (
    SkipCounter,
    check_shards_exist,
    csv_separator,
    expand_urls,
    jsonl_rows,
    looks_like_shards,
    sample_key,
)
from ..evaluation.embed import embed_images, inference_precision
from ..factory import get_model_config, load_embedding_model
from ..inference import IMAGE_EXTS, list_images, open_image
from ..models.onnx_runtime import is_onnx_dir
from ..video.reader import list_videos
from .base import HEADER, Index, create_index, open_index
from .files import ROOTS_STATE, confine, track_roots
from .video import build_video_index, forget_videos, is_video_source

IMG_COLUMNS = ("filepath", "path", "image", "file", "filename", "img")  # tried in order when img_key is not given
CAPTION_COLUMNS = ("caption", "text", "title", "label")
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_CAPTION_EXTS = ("txt", "caption")


@dataclass
class SourceItem:
    """One image of a source: where to read it and the key that identifies it across builds."""

    key: str  # unique: the resolved file path, or "shard.tar#sample"
    path: str  # the file holding the image
    caption: str = ""
    offset: int | None = None  # byte offset of the image inside `path` (a tar member); None = the whole file
    size: int | None = None  # length in bytes when `offset` is set

    def metadata(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.path, "caption": self.caption, "offset": self.offset, "size": self.size}


def read_item_image(path: str | os.PathLike, offset: int | None = None, size: int | None = None) -> Image.Image:
    """The image of an item: a whole file, or ``size`` bytes at ``offset`` of a tar shard. ValueError if unreadable."""
    if offset is None:
        return open_image(path)
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    return open_image(io.BytesIO(data))


def read_item_bytes(path: str | os.PathLike, offset: int | None = None, size: int | None = None) -> bytes:
    """The raw bytes of an item's image (what ``/v1/images/{id}`` sends)."""
    with open(path, "rb") as f:
        if offset is None:
            return f.read()
        f.seek(offset)
        return f.read(size)


# ------------------------------------------------------------------------------------------------------- sources


def is_shard_spec(src: str) -> bool:

    return looks_like_shards(src)


def folder_items(root: Path, allow_outside_root: bool = False) -> Iterator[SourceItem]:
    """Images under a folder (recursive, sorted); a same-named ``.txt`` file is the caption."""
    for p in list_images([root]):
        text = p.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else ""
        key = str(confine(p, root, str(root), allow_outside_root))
        yield SourceItem(key, key, caption)


def pick_column(header: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, path: Path) -> str:
    if wanted is not None:
        if wanted not in header:
            raise ValueError(f"{path}: no column {wanted!r} for the {what}; the file has {list(header)}")
        return wanted
    for c in candidates:
        if c in header:
            return c
    if what == "caption":
        return ""
    raise ValueError(f"{path}: no image column (tried {list(candidates)}) among {list(header)}; pass --img-key NAME")


def table_items(
    path: Path, img_key: str | None = None, caption_key: str | None = None, allow_outside_root: bool = False
) -> Iterator[SourceItem]:
    """Rows of a CSV/TSV (header row) or JSONL file; relative image paths resolve against the file's folder, and
    must stay inside it unless ``allow_outside_root``."""

    if path.suffix.lower() == ".jsonl":
        rows = (row for _, row in jsonl_rows(path, SkipCounter()))
        first = next(rows, None)
        if first is not None:
            yield from rows_to_items(path, [first], img_key, caption_key, list(first), allow_outside_root)
            yield from rows_to_items(path, rows, img_key, caption_key, list(first), allow_outside_root)
        return
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(f, delimiter=csv_separator(path, None))
        yield from rows_to_items(path, reader, img_key, caption_key, reader.fieldnames or [], allow_outside_root)


def rows_to_items(
    path: Path,
    rows,
    img_key: str | None,
    caption_key: str | None,
    header: Sequence[str],
    allow_outside_root: bool = False,
) -> Iterator[SourceItem]:
    img = pick_column(header, img_key, IMG_COLUMNS, "image", path)
    cap = pick_column(header, caption_key, CAPTION_COLUMNS, "caption", path)
    for row in rows:
        value = row.get(img)
        if not isinstance(value, str) or not value.strip():
            continue
        file = str(confine(path.parent / os.path.expanduser(value.strip()), path.parent, str(path), allow_outside_root))
        caption = row.get(cap) if cap else ""
        if isinstance(caption, list):  # JSONL rows may list several captions: the first describes the image
            caption = caption[0] if caption else ""
        yield SourceItem(file, file, " ".join(str(caption or "").split()))


def shard_items(shards: Sequence[str]) -> Iterator[SourceItem]:
    """The images of uncompressed tar shards, as byte ranges (so search results can be served without unpacking)."""

    for shard in shards:
        shard_path = str(Path(shard).resolve())
        try:
            tar = tarfile.open(shard_path, mode="r:")
        except tarfile.ReadError as e:
            raise ValueError(
                f"{shard} is not an uncompressed tar file; index plain .tar shards (as img2dataset writes)"
            ) from e
        with tar:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            order: list[str] = []
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, ext = sample_key(member.name)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = member
            for key in order:
                members = samples[key]
                image = next((members[e] for e in SHARD_IMAGE_EXTS if e in members), None)
                if image is None:
                    continue
                caption_member = next((members[e] for e in SHARD_CAPTION_EXTS if e in members), None)
                caption = ""
                if caption_member is not None:
                    raw = tar.extractfile(caption_member)
                    caption = " ".join(raw.read().decode("utf-8", errors="replace").split()) if raw else ""
                yield SourceItem(f"{shard_path}#{key}", shard_path, caption, image.offset_data, image.size)


def source_roots(src: str) -> set[str]:
    """The folders a source's images may come from: its folder, the CSV's folder, the shards' folders."""
    if is_shard_spec(src):
        return {str(Path(s).resolve().parent) for s in expand_urls(src)}
    path = Path(os.path.expanduser(src)).resolve()
    return {str(path if path.is_dir() else path.parent)}


def recorded_roots(index: Index) -> list[str]:
    """The folders an index's images may be served from: those its builds recorded, or, for an index built before
    they were, the folders of its last build's source."""
    roots = index.get_state(ROOTS_STATE)
    if roots is None:
        src = (index.get_state("build") or {}).get("source")
        try:
            roots = sorted(source_roots(src)) if src else []
        except (OSError, ValueError):
            roots = []
    return roots


def open_source(
    src: str, img_key: str | None = None, caption_key: str | None = None, allow_outside_root: bool = False
) -> Iterator[SourceItem]:
    """The items of a source spec (see the module docstring)."""
    if is_shard_spec(src):
        shards = expand_urls(src)
        check_shards_exist(shards)
        return shard_items(shards)
    path = Path(os.path.expanduser(src))
    if path.is_dir():
        return folder_items(path, allow_outside_root)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".jsonl"):
        return table_items(path, img_key, caption_key, allow_outside_root)
    if path.is_file() and path.suffix.lower() in IMAGE_EXTS:
        key = str(path.resolve())
        return iter([SourceItem(key, key)])
    if not path.exists():
        raise FileNotFoundError(f"{src} does not exist; give a folder of images, a .csv/.tsv/.jsonl, or .tar shards")
    raise ValueError(f"don't know how to index {src}: give a folder of images, a .csv/.tsv/.jsonl, or .tar shards")


# ------------------------------------------------------------------------------------------------------- build


def load_embedder(model_dir: str | os.PathLike, device: str = "cpu"):
    """(model, eval preprocess) of a model directory: a torch model (int8 ones too), or an ONNX export (`vislang
    export --onnx`), which onnxruntime runs on the CPU. Which one is the directory's choice, as in `vislang embed`, so
    index building, search and the HTTP service take an export wherever they take a model."""
    import torch

    onnx = is_onnx_dir(model_dir)
    if onnx and torch.device(device).type != "cpu":
        raise ValueError(
            f"{model_dir} is an ONNX export, which onnxruntime runs on the CPU; pass --device cpu, or the torch model "
            f"directory to run on {device}"
        )
    model, preprocess = load_embedding_model(model_dir, "onnx" if onnx else "torch")
    return model.eval() if onnx else model.to(device).eval(), preprocess


def open_or_create(
    index_dir: str | os.PathLike, model_dir: str | os.PathLike | None, backend: str = "faiss", **options: Any
) -> tuple[Index, str]:
    """Open the index in ``index_dir`` (checking it was built with ``model_dir``) or create it.

    Returns:
        The index and the model directory to embed with.
    """
    d = Path(index_dir)
    if (d / HEADER).is_file():
        index = open_index(d)
        recorded = index.header.get("model")
        if model_dir is not None and recorded and Path(model_dir).resolve() != Path(recorded):
            index.close()
            raise ValueError(
                f"{d} was built with the model {recorded}, not {model_dir}: vectors of two models cannot be mixed; "
                "use a new --index directory"
            )
        model = str(model_dir or recorded)
        if not model or model == "None":
            raise ValueError(f"{d} records no model; pass --model DIR")
        return index, model
    if model_dir is None:
        raise ValueError(f"{d} holds no index yet; pass --model DIR to build one")

    dim = get_model_config(model_dir).embed_dim
    return create_index(d, dim, backend=backend, model=str(Path(model_dir).resolve()), **options), str(model_dir)


def build_index(
    src: str,
    index_dir: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    commit_every: int = 8,
    device: str = "cpu",
    progress: bool = True,
    img_key: str | None = None,
    caption_key: str | None = None,
    backend: str = "faiss",
    allow_outside_root: bool = False,
    fps: float = 2.0,
    precision: str = "auto",
    **options: Any,
) -> dict[str, Any]:
    """Embed a source's images into an index, creating it if needed, resuming or adding if it exists.

    Args:
        src: folder, .csv/.tsv/.jsonl, or tar shard spec.
        index_dir: the index directory.
        model_dir: the model; default the one the index was built with.
        batch_size: images per forward pass.
        commit_every: batches per transaction (a crash loses at most this many batches of work).
        device: where the model runs.
        progress: show a progress bar.
        img_key: CSV/JSONL image column (default: the first of filepath, path, image, file, filename, img).
        caption_key: CSV/JSONL caption column (default: caption, text or title when present).
        backend: ``faiss`` or ``pgvector`` for a new index.
        allow_outside_root: index (and so let a server send) images whose paths leave the source's folder.
        fps: frames sampled per second when ``src`` is video (each sampled frame becomes an item; index/video.py).
        precision: ``auto`` (bf16 autocast where this machine has native bf16, a trial says it pays and the
            embeddings agree with fp32's: ``evaluation.embed.inference_precision``), ``fp32`` or ``bf16``.
        **options: back-end options for a new index (e.g. ``kind``, ``exact_max``).

    Returns:
        Counts: ``added``, ``already`` (indexed before), ``duplicates`` (repeated in the source), ``unreadable``,
        ``size`` (of the index afterwards), and ``seconds`` (from reading the source to the last commit; model
        loading excluded, so ``added / seconds`` is the indexing throughput).
    """
    if batch_size < 1 or commit_every < 1:
        raise ValueError("batch_size and commit_every must be at least 1")
    if is_video_source(src):
        return build_video_index(src, index_dir, model_dir, fps, batch_size, device, progress, backend,
                                 allow_outside_root, precision, **options)  # fmt: skip
    items = open_source(src, img_key, caption_key, allow_outside_root)
    first = next(items, None)  # errors about the source come before anything is created
    if first is None:
        raise ValueError(f"{src} holds no images to index")
    items = itertools.chain([first], items)
    index, model_path = open_or_create(index_dir, model_dir, backend, **options)
    counts = {"added": 0, "already": 0, "duplicates": 0, "unreadable": 0}
    try:
        model, preprocess = load_embedder(model_path, device)
        if model.cfg.embed_dim != index.dim:
            raise ValueError(f"the model embeds into {model.cfg.embed_dim} dims but {index_dir} holds {index.dim}")
        index.set_state("build", {"source": src, "status": "running"})
        roots = set(index.add_to_state_list(ROOTS_STATE, source_roots(src)))  # before any item: a server may serve
        # each one committed
        items = track_roots(items, roots)  # adds the folders of allowed outside paths
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="indexing", unit="img")
        add_items(index, items, model, preprocess, device, batch_size, commit_every, counts, bar,
                  before_commit=lambda: index.add_to_state_list(ROOTS_STATE, roots), precision=precision)  # fmt: skip
        counts["seconds"] = round(time.perf_counter() - t0, 3)
        if bar is not None:
            bar.close()
        index.set_state("build", {"source": src, "status": "complete", **counts})
        counts["size"] = len(index)
    finally:
        index.close()
    if counts["unreadable"]:
        print(f"[vislang] skipped {counts['unreadable']} unreadable image(s)")
    return counts


def add_items(
    index: Index,
    items: Iterator[SourceItem],
    model: Any,
    preprocess: Any,
    device: str,
    batch_size: int,
    commit_every: int,
    counts: dict[str, Any],
    bar: Any = None,
    before_commit: Any = None,
    precision: str = "auto",
) -> None:
    """Embed the items and add them to the index, a transaction every ``commit_every`` batches; items repeated in
    the source or already in the index are counted (``duplicates``, ``already``), not embedded, and so are images
    that cannot be read (``unreadable``). ``precision`` is settled on the first batch and kept for the rest."""
    seen: set[str] = set()
    pending_vecs: list[np.ndarray] = []
    pending_meta: list[dict[str, Any]] = []
    batches = 0

    def commit() -> None:
        if pending_meta:
            if before_commit is not None:
                before_commit()
            counts["added"] += add_new(index, np.concatenate(pending_vecs), pending_meta, counts)
            index.save()  # publish this version's FAISS file: a server swaps it in instead of rebuilding
            pending_vecs.clear()
            pending_meta.clear()

    for batch in batched(items, batch_size):
        fresh = []
        for it in batch:
            if it.key in seen:
                counts["duplicates"] += 1
            else:
                seen.add(it.key)
                fresh.append(it)
        done = index.ids_for_keys([it.key for it in fresh])
        counts["already"] += len(done)
        todo = [it for it in fresh if it.key not in done]
        vecs, kept, precision = embed_items(model, preprocess, todo, device, precision)
        counts["unreadable"] += len(todo) - len(kept)
        if kept:
            pending_vecs.append(vecs)
            pending_meta.extend(it.metadata() for it in kept)
        batches += 1
        if batches % commit_every == 0:
            commit()
        if bar is not None:
            bar.update(len(batch))
    commit()


def add_new(index: Index, vecs: np.ndarray, meta: list[dict[str, Any]], counts: dict[str, Any]) -> int:
    """Add the items no other writer indexed meanwhile (those count as ``already``); returns how many were added.

    Why: two ``index add`` runs over one source both find an item missing, embed it, and the second commit then
    meets the first's key; that must skip the item, not abort the whole build.
    """
    for _ in range(8):
        try:
            index.add(vecs, meta)
            return len(meta)
        except ValueError:
            done = index.ids_for_keys([m["key"] for m in meta])
            if not done:
                raise  # not a duplicate: a real error
            keep = [i for i, m in enumerate(meta) if m["key"] not in done]
            counts["already"] += len(done)
            vecs, meta = vecs[keep], [meta[i] for i in keep]
            if not meta:
                return 0
    raise RuntimeError("other writers keep adding the same items; run `vislang index add` again")


def batched(items: Iterator[SourceItem], n: int) -> Iterator[list[SourceItem]]:
    batch: list[SourceItem] = []
    for it in items:
        batch.append(it)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def embed_items(
    model, preprocess, items: Sequence[SourceItem], device: str = "cpu", precision: str = "auto"
) -> tuple[np.ndarray, list, str]:
    """Normalised embeddings (N, E) of the readable items, those items (unreadable ones are left out), and the
    precision they were computed in: ``auto`` resolved on this batch, for the caller to pass to the next batches.

    Why resolve here: ``auto`` is settled per input shape, so a build's last, smaller batch would pay a timed trial
    of its own (ten forward passes of the image tower) and every batch a cache lookup."""
    import torch

    tensors, kept = [], []
    for it in items:
        try:
            tensors.append(preprocess(read_item_image(it.path, it.offset, it.size)))
            kept.append(it)
        except (ValueError, FileNotFoundError, OSError):
            continue
    if not tensors:
        return np.zeros((0, model.cfg.embed_dim), np.float32), [], precision
    x = torch.stack(tensors)  # (N, C, H, W), model input
    if precision == "auto":
        dev = torch.device(device)

        def trial() -> torch.Tensor:  # what embed_images runs on this batch
            return model.encode_image(x.to(dev), normalize=True)

        with torch.inference_mode():
            precision = inference_precision(model, dev, "auto", trial, tuple(x.shape)).precision
    emb = embed_images(model, x, batch_size=len(tensors), device=device, precision=precision)  # (N, E)
    return emb.numpy(), kept, precision


def remove_from_index(index_dir: str | os.PathLike, targets: Sequence[str]) -> int:
    """Remove items named by id, by image file, or by every image under a folder (or in a CSV/JSONL/shards)."""
    ids: list[int] = []
    keys: list[str] = []
    videos: list[str] = []
    for t in targets:
        if t.isdigit():
            ids.append(int(t))
        elif is_video_source(t):  # a video's frames share its path, not a key; a later build adds it again
            videos.extend(str(p.resolve()) for p in list_videos([t]))
        else:
            keys.extend(it.key for it in open_source(t, allow_outside_root=True))  # naming what to drop is harmless
    with open_index(index_dir) as index:
        ids.extend(index.ids_for_keys(keys).values())
        if videos:
            ids.extend(index.ids_for_paths(videos))
            forget_videos(index, videos)
        return index.remove(ids)
