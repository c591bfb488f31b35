"""Image–text dataset readers: CSV/TSV, JSONL, folders of image + .txt, WebDataset tar shards, COCO captions.

Every reader yields ``(PIL.Image.Image, caption)`` pairs (plus a label where one exists). Real-world caption data
always holds a few broken files, so map-style readers never raise on a bad item: ``dataset[i]`` returns ``None``
instead, the reason is counted in ``dataset.skips``, and training or preparation goes on. ``drop_none`` removes the
``None`` items from a batch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .transforms import upright

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff")
_MAX_EXAMPLES = 5


class DatasetMissingError(FileNotFoundError):
    """A packaged dataset is not installed; the message carries the command that installs it."""


class SkipCounter:
    """Counts skipped items per reason and remembers a few example paths, so one summary line explains the losses.

    Counts live in the process that read the items; with DataLoader workers each worker has its own copy.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def count(self, reason: str, path: str | os.PathLike | None = None) -> None:
        """Record one skipped item."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if path is not None:
            examples = self.examples.setdefault(reason, [])
            if len(examples) < _MAX_EXAMPLES:
                examples.append(str(path))

    def merge(self, counts: dict[str, int]) -> None:
        """Add counts gathered elsewhere (e.g. in a DataLoader worker)."""
        for reason, n in counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + int(n)

    @property
    def total(self) -> int:
        """Number of skipped items over all reasons."""
        return sum(self.counts.values())

    def reset(self) -> None:
        """Forget all counts (e.g. at the start of an epoch)."""
        self.counts.clear()
        self.examples.clear()

    def summary(self) -> str:
        """One line such as ``skipped 3 items: 2 unreadable image (e.g. a.jpg), 1 empty caption (e.g. b.jpg)``."""
        if not self.counts:
            return "skipped 0 items"
        parts = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            examples = self.examples.get(reason)
            parts.append(f"{n} {reason}" + (f" (e.g. {', '.join(examples[:2])})" if examples else ""))
        return f"skipped {self.total} item{'s' if self.total != 1 else ''}: " + "; ".join(parts)

    def __repr__(self) -> str:
        return f"SkipCounter({self.counts})"


def drop_none(batch: list) -> list:
    """Remove the ``None`` items that readers return for unreadable entries (use inside a collate function)."""
    return [item for item in batch if item is not None]


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (``load()``), so truncated files fail here rather than later in a worker, and turn
    the photo upright by its EXIF orientation (``transforms.upright``). HEIC/HEIF decode where the optional
    ``pillow-heif`` plugin is installed (``register_optional_formats``)."""
    register_optional_formats()
    img = Image.open(io.BytesIO(data))
    img.load()
    return upright(img)


_OPTIONAL_FORMATS: list[str] = []


def register_optional_formats() -> list[str]:
    """Register the image formats of optional Pillow plugins once (HEIC/HEIF from ``pillow-heif``); returns the
    extensions they added. AVIF and WebP are built into Pillow 11+."""
    if not _OPTIONAL_FORMATS:
        _OPTIONAL_FORMATS.append("")  # marks the attempt: done once per process
        try:
            from pillow_heif import register_heif_opener  # optional: only where it is installed
        except ImportError:
            return []
        register_heif_opener()
        _OPTIONAL_FORMATS.extend([".heic", ".heif"])
    return _OPTIONAL_FORMATS[1:]


def load_pair(path: str | os.PathLike, caption: str | None, skips: SkipCounter) -> tuple[Image.Image, str] | None:
    """Read one image file and pair it with a caption; ``None`` (counted) when either is unusable."""
    caption = clean_caption(caption)
    if not caption:
        skips.count("empty caption", path)
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        skips.count("missing image", path)
        return None
    try:
        return decode_image(data), caption
    except Exception:  # any decoder failure means "skip this item", never a crash mid-epoch
        skips.count("unreadable image", path)
        return None


def clean_caption(caption: Any) -> str:
    """Caption as a single-line stripped string ('' for None)."""
    if caption is None:
        return ""
    return " ".join(str(caption).split())


def resolve_path(value: str, root: str | os.PathLike) -> str:
    """An image path from a table: absolute paths are kept, relative ones resolve against ``root``.

    Kept as a string: tables can hold millions of rows, and a ``Path`` per row costs several times the memory.
    """
    return os.path.join(root, os.path.expanduser(value.strip()))


class CaptionDataset(Dataset):
    """Map-style base: ``self.items`` holds (image path, caption) pairs; bad items become ``None``."""

    def __init__(self) -> None:
        self.items: list[tuple[str | Path, str | None]] = []
        self.skips = SkipCounter()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, str] | None:
        return load_pair(self.items[index][0], self.caption(index), self.skips)

    def caption(self, index: int) -> str:
        """The raw caption of item ``index`` without opening its image."""
        return self.items[index][1] or ""


def csv_separator(path: Path, sep: str | None) -> str:
    """The field separator: explicit, else tab for .tsv files and comma otherwise."""
    if sep is not None:
        return "\t" if sep in ("\\t", "tab") else sep
    return "\t" if path.suffix.lower() == ".tsv" else ","


def missing_columns_error(path: Path, header: Sequence[str], missing: list[str]) -> ValueError:
    """The error for a table that lacks the configured image/caption columns; names what was found instead."""
    return ValueError(
        f"{path}: column(s) {missing} not found; the file has columns {list(header)}. Set the image and caption "
        "columns with --csv-img-key / --csv-caption-key (img_key=... / caption_key=... in Python)."
    )


class CsvDataset(CaptionDataset):
    """Image paths and captions from a CSV/TSV file with a header row (OpenCLIP's ``--csv-img-key`` convention).

    Args:
        path: the .csv or .tsv file.
        img_key: column holding image paths.
        caption_key: column holding captions.
        sep: field separator; default tab for .tsv, comma otherwise.
        root: folder relative image paths resolve against; default the CSV's own folder, so a dataset folder can
            be moved as a whole.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        img_key: str = "filepath",
        caption_key: str = "caption",
        sep: str | None = None,
        root: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        with open(self.path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
            reader = csv.DictReader(f, delimiter=csv_separator(self.path, sep))
            header = reader.fieldnames or []
            missing = [k for k in (img_key, caption_key) if k not in header]
            if missing:
                raise missing_columns_error(self.path, header, missing)
            for line_no, row in enumerate(reader, start=2):
                image = row.get(img_key)
                if not image:
                    self.skips.count("row without image path", f"{self.path}:{line_no}")
                    continue
                self.items.append((resolve_path(image, self.root), row.get(caption_key) or ""))


def jsonl_rows(path: Path, skips: SkipCounter) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each JSON object line; blank lines are ignored, bad lines counted."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skips.count("invalid JSON line", f"{path}:{line_no}")
                continue
            if not isinstance(row, dict):
                skips.count("invalid JSON line", f"{path}:{line_no}")
                continue
            yield line_no, row


class JsonlDataset(CaptionDataset):
    """One JSON object per line with an image path and a caption.

    A caption field holding a list of strings gives one item per caption. Lines that are not JSON objects or lack a
    field are skipped when the file is read and counted in ``skips``.

    Args:
        path: the .jsonl file.
        img_key: field holding the image path.
        caption_key: field holding the caption (string or list of strings).
        root: folder relative paths resolve against; default the file's folder.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        img_key: str = "image",
        caption_key: str = "caption",
        root: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        for line_no, row in jsonl_rows(self.path, self.skips):
            if img_key not in row or caption_key not in row or not isinstance(row[img_key], str):
                self.skips.count(f"line missing '{img_key}' or '{caption_key}'", f"{self.path}:{line_no}")
                continue
            image = resolve_path(row[img_key], self.root)
            captions = row[caption_key]
            for caption in captions if isinstance(captions, list) else [captions]:
                self.items.append((image, "" if caption is None else str(caption)))


def find_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursive, hidden folders excluded), sorted for a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / n for n in filenames if n.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


class FolderDataset(CaptionDataset):
    """A folder tree of images, each captioned by a same-named ``.txt`` file (``cat.jpg`` + ``cat.txt``).

    Images without a caption file are left out when the folder is scanned and counted in ``skips``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__()
        self.root = Path(root)
        for image in find_images(self.root):
            text = image.with_suffix(".txt")
            if not text.is_file():
                self.skips.count("image without .txt caption", image)
                continue
            self.items.append((image, None))  # caption read lazily: folders can be huge

    def caption(self, index: int) -> str:
        """The caption text of item ``index`` (read from its .txt file)."""
        image, caption = self.items[index]
        if caption is not None:
            return caption
        try:
            return image.with_suffix(".txt").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


class CocoCaptions(CaptionDataset):
    """COCO-style captions: one item per (image, caption) annotation of ``captions_*.json``.

    Args:
        annotations_json: the annotations file (``images`` with ``id``/``file_name``, ``annotations`` with
            ``image_id``/``caption``).
        image_dir: folder holding the images named by ``file_name``.
    """

    def __init__(self, annotations_json: str | os.PathLike, image_dir: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(annotations_json)
        self.image_dir = Path(image_dir)
        data = json.loads(self.path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise ValueError(f"{self.path} is not a COCO captions file: it needs 'images' and 'annotations' lists")
        files = {img["id"]: img["file_name"] for img in data["images"]}
        for ann in data["annotations"]:
            name = files.get(ann.get("image_id"))
            if name is None:
                self.skips.count("annotation for unknown image id", f"{self.path}: image_id={ann.get('image_id')}")
                continue
            self.items.append((self.image_dir / name, ann.get("caption") or ""))


# --------------------------------------------------------------------------------------------- WebDataset shards


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..099}`` numeric ranges (zero padding kept) and ``{a,b}`` alternatives, left to right.

    >>> expand_braces("s-{00..02}.tar")
    ['s-00.tar', 's-01.tar', 's-02.tar']
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        lo, hi = range_match.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard list from a brace pattern, a ``::``-separated string, or a list of either."""
    if isinstance(urls, (str, os.PathLike)):
        urls = str(urls).split("::")
    out: list[str] = []
    for url in urls:
        out.extend(expand_braces(str(url)))
    return out


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_id_count() -> tuple[int, int]:
    """(worker id, number of workers) inside a DataLoader worker, else (0, 1)."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def split_shards(shards: Sequence[str], rank: int, world: int, worker: int, workers: int) -> list[str]:
    """Every (rank, worker) pair gets a disjoint, interleaved subset of the shards, so no sample is read twice."""
    slot, slots = rank * workers + worker, world * workers
    return list(shards[slot::slots])


def sample_key(name: str) -> tuple[str, str]:
    """Tar member name → (sample key, extension): the basename up to its first dot, as img2dataset writes them."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def group_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive tar members sharing a key (streaming; one sample in memory)."""
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        k, ext = sample_key(member.name)
        if k != key and files:
            yield key, files
            files = {}
        key = k
        f = tar.extractfile(member)
        if f is not None:
            files[ext] = f.read()
    if files:
        yield key, files


class WebDatasetShards(IterableDataset):
    """Streams (image, caption) pairs from WebDataset-style tar shards (what img2dataset writes).

    Shards are split across DDP ranks and DataLoader workers, so each sample is read once per epoch by exactly one
    worker when there are at least as many shards as ranks × workers (otherwise some workers get none). Corrupt
    images, samples missing an image or caption, and unreadable shards are skipped and counted in ``skips`` (in the
    worker process that read them).

    Args:
        urls: local shard paths: a brace pattern like ``data/{000000..000099}.tar``, ``::``-joined paths, or a list.
        image_keys: member extensions tried, in order, for the image.
        caption_keys: member extensions tried, in order, for the caption.
        shuffle: shuffle the shard order each epoch (seeded by ``seed`` and ``set_epoch``).
        seed: seed of the shard shuffle.
    """

    def __init__(
        self,
        urls: str | list[str],
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        caption_keys: Sequence[str] = ("txt", "caption"),
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.shards = expand_urls(urls)
        if not self.shards:
            raise ValueError(f"no shards in {urls!r}")
        self.image_keys = tuple(k.lower() for k in image_keys)
        self.caption_keys = tuple(k.lower() for k in caption_keys)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skips = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Change the shard shuffle for a new epoch (same epoch → same order on every rank)."""
        self.epoch = epoch

    def shard_order(self) -> list[str]:
        """All shards in this epoch's order (before splitting across ranks and workers)."""
        if not self.shuffle:
            return list(self.shards)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()]

    def my_shards(self) -> list[str]:
        """The shards this process/worker reads."""
        return split_shards(self.shard_order(), *dist_rank_world(), *worker_id_count())

    def sample_from_files(self, key: str, files: dict[str, bytes], shard: str) -> tuple[Image.Image, str] | None:
        """Build one (image, caption) pair from a sample's members; ``None`` (counted) when unusable."""
        where = f"{shard}:{key}"
        image = next((files[k] for k in self.image_keys if k in files), None)
        caption = next((files[k] for k in self.caption_keys if k in files), None)
        if image is None:
            self.skips.count("sample without image", where)
            return None
        text = clean_caption(caption.decode("utf-8", errors="replace") if caption is not None else "")
        if not text:
            self.skips.count("empty caption", where)
            return None
        try:
            return decode_image(image), text
        except Exception:  # a corrupt member is skipped, never fatal
            self.skips.count("unreadable image", where)
            return None

    def iter_shard(self, shard: str) -> Iterator[tuple[Image.Image, str]]:
        """Samples of one shard; a shard that cannot be read (or is truncated) is counted and abandoned."""
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for key, files in group_members(tar):
                    sample = self.sample_from_files(key, files, shard)
                    if sample is not None:
                        yield sample
        except (OSError, tarfile.TarError, EOFError):
            self.skips.count("unreadable shard", shard)

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        for shard in self.my_shards():
            yield from self.iter_shard(shard)


def looks_like_shards(spec: str) -> bool:
    """Whether a spec names tar shards (``.tar`` in it, or a ``{..}`` brace pattern)."""
    return ".tar" in spec or "{" in spec


def check_shards_exist(shards: Iterable[str]) -> None:
    """FileNotFoundError naming the first missing shards (the spec was probably mistyped)."""
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard file(s) not found, e.g. {missing[:3]}; check the path and brace range"
        )
