"""OpenClipart (Debian ``openclipart-png`` + ``openclipart-svg``) as an image–caption dataset.

Each PNG is paired with the SVG of the same relative path, whose RDF metadata holds a title, keywords and a
description. That text is noisy: thousands of files carry a collection name as their title ("Part of the Flat Icon
Collection (…)", "Lemon SVG theme", "gramastar"), keywords include packaging tags ("hash", "icons", "theme") and
author names. Captions are built as ``"<subject>, <keyword>, <keyword>"`` after removing that boilerplate; where the
title is a collection name the subject falls back to the description and then to the file name.

Metadata sits in the first ~6 KB of every SVG, so only the head of each file is read, and the parsed result is cached
as JSON (8,121 files parse in well under a second cold, milliseconds warm).

A few PNGs are decompression bombs: 16 of them hold over 89 million pixels (up to 20,990 x 29,700, 2.5 GB as RGBA),
and decoding one takes seconds and gigabytes. Their size is read from the PNG header (24 bytes) before anything is
decoded, and those over ``max_pixels`` are skipped at once; the rest are decoded and, when larger than ``max_side``,
reduced deliberately (premultiplied alpha, box filter) before they go anywhere else.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import os
import re
import struct
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .readers import DatasetMissingError, SkipCounter, load_pair

DEFAULT_ROOT = "/usr/share/openclipart"
DEFAULT_CACHE = Path("~/.cache/vislang/openclipart_meta.json")
INSTALL_COMMAND = "sudo apt-get install openclipart-png openclipart-svg"
CACHE_VERSION = 1
HEAD_BYTES = 16_384  # metadata ends before byte ~5,600 in every packaged file; read more only when it does not
SPLITS = ("train", "test", "all")
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS); 16 packaged PNGs exceed it
MAX_SIDE = 1024  # larger images are reduced to this side first: models read 32-224 px, decoding stays cheap after
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A title shared by this many files is a collection name, not a description of one picture.
COLLECTION_TITLE_MIN_FILES = 10

BOILERPLATE_PATTERNS = [
    r"part of the .* collection",
    r"^part of the ",
    r"clip ?art by ",
    r"open ?clip ?art",
    r"\bcollection\b",
    r"\btheme\b",
    r"\bicon ?set\b",
    r"\bsvg\b",
    r"hash\(0x[0-9a-f]+\)",
    r"https?://",
    r"www\.",
    r"\S+@\S+\.\w+",
    r"^(untitled|drawing|layer ?\d*|image ?\d*|new document.*|unnamed.*)$",
    r"converted from",
    r"\bsubmission\b",
    r"\bsibmission\b",
]
_BOILERPLATE = re.compile("|".join(BOILERPLATE_PATTERNS), re.IGNORECASE)
# Keywords that describe the packaging or the file, not the picture.
STOP_KEYWORDS = frozenset(
    {
        "",
        "hash",
        "icon",
        "icons",
        "theme",
        "magick",
        "lemon_theme_icon",
        "mapsym",
        "unsorted",
        "special",
        "stock",
        "appicon",
        "webpage",
        "clipart",
        "clip art",
        "openclipart",
        "svg",
        "image",
        "media",
        "remix",
        "public domain",
        "png",
        "mimetypes",
        "mime-types",
        "filesystem",
        "application",
        "action",
        "etiquette",
        "geometry",
        "united_nations_member",
        "simple",
        "bordered",
        "ornamental",
        "miscellany",
    }
)
# File-name fragments that carry no meaning ("aiga_heliport1", "gnome-fs-web", "puffin-md").
STOP_NAME_TOKENS = frozenset(
    {"aiga", "gnome", "fs", "md", "stock", "kde", "ooo", "mime", "svg", "png", "lemon", "by"}
    | {"clipart", "openclipart", "openclipar", "openclipa", "openclip"}
)

_TAG = {
    "title": re.compile(r"<dc:title[^>]*>(.*?)</dc:title>", re.S),
    "description": re.compile(r"<dc:description[^>]*>(.*?)</dc:description>", re.S),
    "creator": re.compile(r"<dc:creator>.*?<dc:title[^>]*>(.*?)</dc:title>", re.S),
}
_AGENT = re.compile(r"<cc:Agent\b.*?</cc:Agent>", re.S)
_KEYWORD = re.compile(r"<rdf:li[^>]*>(.*?)</rdf:li>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_METADATA = re.compile(r"<metadata\b.*?</metadata>", re.S)


# ------------------------------------------------------------------------------------------------------- parsing


def read_head(path: Path, limit: int = HEAD_BYTES) -> str:
    """The SVG text up to the end of its ``<metadata>`` block (reading more only when the head cuts it off)."""
    with open(path, "rb") as f:
        data = f.read(limit)
        if b"</metadata>" not in data and b"<metadata" in data:
            data += f.read()
    return data.decode("utf-8", errors="replace")


def unescape(text: str) -> str:
    """XML text → plain text (entities are double-escaped in some files: ``&amp;quot;``)."""
    return " ".join(html.unescape(html.unescape(text)).split())


def parse_svg_metadata(text: str) -> dict[str, Any]:
    """Title, description, keywords and creator from an SVG's RDF metadata (empty fields when absent).

    Agent blocks (publisher, creator, rights) also hold ``<dc:title>`` elements, so they are cut out before the
    picture's own title is looked up.
    """
    match = _METADATA.search(text)
    meta = match.group(0) if match else text
    creator = _TAG["creator"].search(meta)
    work = _AGENT.sub("", meta)
    subject = _SUBJECT.search(work)
    out: dict[str, Any] = {}
    for field in ("title", "description"):
        found = _TAG[field].search(work)
        out[field] = unescape(found.group(1)) if found else ""
    out["keywords"] = [unescape(k) for k in _KEYWORD.findall(subject.group(1))] if subject else []
    out["creator"] = unescape(creator.group(1)) if creator else ""
    return out


def walk_files(folder: str, ext: str) -> dict[str, str]:
    """{relative path without extension: absolute path} for files ending in ``ext`` under ``folder`` (recursive).

    Plain strings rather than ``Path`` objects: building 16k ``Path`` objects took longer than parsing the cache.
    """
    found: dict[str, str] = {}
    prefix = len(folder.rstrip("/")) + 1
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(ext):
                full = os.path.join(dirpath, name)
                found[full[prefix : -len(ext)]] = full
    return found


def tree_signature(paths: Iterable[str]) -> str:
    """Cheap fingerprint of a file tree (names, sizes, mtimes) to tell when the cache is stale."""
    h = hashlib.sha1()
    for p in sorted(paths):
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()


def list_pairs(root: Path) -> list[tuple[str, str, str | None]]:
    """(relative stem, png path, svg path or None) for every PNG, sorted by stem; the SVG has the same stem."""
    pngs = walk_files(str(root / "png"), ".png")
    svgs = walk_files(str(root / "svg"), ".svg")
    return [(stem, pngs[stem], svgs.get(stem)) for stem in sorted(pngs)]


def load_cache(path: Path, root: Path, signature: str) -> dict[str, dict] | None:
    """Cached metadata when the cache matches this tree and parser version, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = data.get("version") == CACHE_VERSION and data.get("root") == str(root) and data.get("signature") == signature
    return data["files"] if ok else None


def save_cache(path: Path, root: Path, signature: str, files: dict[str, dict]) -> None:
    """Write the cache atomically; a read-only home folder only costs the speed-up."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        payload = {"version": CACHE_VERSION, "root": str(root), "signature": signature, "files": files}
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def load_metadata(root: Path, pairs: list[tuple[str, str, str | None]], cache_path: Path | None) -> dict[str, dict]:
    """Parsed metadata per relative stem, from the cache when it is fresh."""
    svgs = {stem: svg for stem, _, svg in pairs if svg is not None}
    signature = tree_signature(svgs.values())
    if cache_path is not None:
        cached = load_cache(cache_path, root, signature)
        if cached is not None:
            return cached
    files = {stem: parse_svg_metadata(read_head(Path(svg))) for stem, svg in svgs.items()}
    if cache_path is not None:
        save_cache(cache_path, root, signature, files)
    return files


def png_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, reading 24 bytes and decoding nothing; None if not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != PNG_MAGIC or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def load_bounded(
    path: str, caption: str, skips: SkipCounter, max_pixels: int, max_side: int
) -> tuple[Image.Image, str] | None:
    """``load_pair``'s (image, caption), or None (counted in ``skips``) if missing, unreadable or over ``max_pixels``.

    The pixel count comes from the header, so a decompression bomb costs a 24-byte read. Images with a side over
    ``max_side`` are reduced to it with a box filter on premultiplied alpha (``Image.thumbnail``), so transparent
    edges do not bleed dark fringes into the white background they are later composited on.
    """
    try:
        size = png_size(path)
    except OSError:
        skips.count("missing image", path)
        return None
    if size is not None and size[0] * size[1] > max_pixels:
        skips.count(f"image over {max_pixels / 1e6:.0f} megapixels (decompression-bomb guard)", path)
        return None
    with warnings.catch_warnings():  # the size was checked above: decoding what remains is deliberate
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pair = load_pair(path, caption, skips)
    if pair is None:
        return None
    img = pair[0]
    if max(img.size) > max_side:
        if img.mode == "P":  # palette images resize with nearest neighbours only; convert to filter properly
            img = img.convert("RGBA")
        img.thumbnail((max_side, max_side), Image.Resampling.BOX)
    return img, pair[1]


# ------------------------------------------------------------------------------------------------------ cleaning


def is_boilerplate(text: str) -> bool:
    """Whether a title/description is packaging text rather than a description of the picture."""
    return bool(_BOILERPLATE.search(text))


_EXTENSION = re.compile(r"\.(svg|png|jpe?g)$")
_BLACK_AND_WHITE = re.compile(r"\s*\(\s*b\s*(and|&)\s*w\s*\)|\s+\bb&w\b")
_NUMBERED_PARENS = re.compile(r"\([^)]*\d[^)]*\)")  # "(wed aug 25 23:29:46 2004)", "(v2)"
_INTRO = re.compile(
    r"^(this is )?(an? |the )?((nice|simple|detailed|vectori[sz]ed|standard|normal|little|small|cute|basic) )*"
    r"((image|picture|drawing|illustration|clipart|clip art|icon|vector|graphic) of )?(an? |the )?"
)
_TRAILING_NUMBER = re.compile(r"(?<=[a-z])\d+$|\s+\d+$")
_WORD_SPLIT = re.compile(r"[\W_]+")
_STAR = re.compile(r"(?:^|/)star_(\d+)pt\d+step$")
_CARD = re.compile(r"(?:^|/)(simple|bordered|ornamental)_([cdhs])_(\w+)$")
CARD_SUITS = {"c": "clubs", "d": "diamonds", "h": "hearts", "s": "spades"}
CARD_RANKS = {"a": "ace", "j": "jack", "q": "queen", "k": "king", "1": "ace"}


@functools.lru_cache(maxsize=65536)
def tidy_phrase(text: str) -> str:
    """Lowercase, readable phrase: file-like titles lose extensions, separators, filler and trailing numbers.

    Memoised: keywords repeat thousands of times across the collection.
    """
    text = unescape(text).strip().lower()
    text = _EXTENSION.sub("", text)
    text = _BLACK_AND_WHITE.sub(", black and white", text)
    text = _NUMBERED_PARENS.sub("", text)
    text = re.sub(r"_+", " ", text) if " " in text else re.sub(r"_+|(?<=\w)-(?=\w)", " ", text)
    text = _INTRO.sub("", text.strip())
    text = _TRAILING_NUMBER.sub("", text.strip())
    return re.sub(r"\s+", " ", text).strip(" -,.;:")


def name_tokens(creator: str) -> set[str]:
    """Lowercase parts of an author name (to strip them from file names and keywords)."""
    return {t for t in _WORD_SPLIT.split(creator.lower()) if len(t) >= 3}


def special_subject(stem: str) -> str:
    """Subjects for the two big generated families whose metadata is identical across hundreds of files.

    1,375 "gramastar" stars and 226 playing cards would otherwise share a handful of captions, which contrastive
    training treats as contradicting negatives; their file names encode what differs.
    """
    star = _STAR.search(stem)
    if star:
        return f"{int(star.group(1))}-pointed star"
    card = _CARD.search(stem)
    if card and card.group(2) in CARD_SUITS:
        rank = CARD_RANKS.get(card.group(3), card.group(3))
        return f"{rank} of {CARD_SUITS[card.group(2)]} playing card"
    return ""


def subject_from_stem(stem: str, creator: str) -> str:
    """A phrase from a file name: "armadillo_architetto_fra_01" → "armadillo", "aiga_heliport1" → "heliport".

    Packaged names are often ``<title>_<author prefix>_<nn>``; author fragments, numbers, single letters and
    meaningless tokens are dropped.
    """
    base = stem.rsplit("/", 1)[-1].lower()
    authors = name_tokens(creator)
    tokens: list[str] = []
    for raw in _WORD_SPLIT.split(base):
        t = raw.rstrip("0123456789")
        if len(t) < 2 or any(c.isdigit() for c in t) or t in STOP_NAME_TOKENS:
            continue
        if any(a.startswith(t) for a in authors):
            if tokens:  # a (truncated) author name ends a packaged "<title>_<author>_<nn>" stem
                break
            continue  # "clipart_by_<author>_-_<title>": skip the leading credit
        tokens.append(t)
    return " ".join(tokens)


def collection_titles(metadata: dict[str, dict], min_files: int = COLLECTION_TITLE_MIN_FILES) -> set[str]:
    """Titles shared by at least ``min_files`` files: collection names, useless as captions."""
    counts = Counter(m.get("title", "").strip().lower() for m in metadata.values())
    return {t for t, n in counts.items() if n >= min_files}


def usable_text(text: str, common: set[str], creator: str, max_chars: int = 80) -> str:
    """``text`` tidied, or '' when it is boilerplate, a collection name, the author's name, or too long."""
    if not text or len(text) > max_chars or is_boilerplate(text) or text.strip().lower() in common:
        return ""
    phrase = tidy_phrase(text)
    if not phrase or phrase == creator.strip().lower() or not re.search(r"[a-z]{2}", phrase):
        return ""
    return phrase


def clean_keywords(keywords: Iterable[str], creator: str, subject: str, limit: int) -> list[str]:
    """Up to ``limit`` keywords: packaging tags, author names, numbers and words already in the subject removed."""
    authors = creator.strip().lower()
    seen = set(subject.replace(",", " ").split())
    out: list[str] = []
    for k in keywords:
        if k.strip().lower() in STOP_KEYWORDS:
            continue
        phrase = tidy_phrase(k)
        if phrase in STOP_KEYWORDS or len(phrase) < 2 or any(c.isdigit() for c in phrase) or is_boilerplate(phrase):
            continue
        if authors and (phrase in authors or authors in phrase):
            continue
        if phrase in seen or phrase.rstrip("s") in seen or phrase + "s" in seen:
            continue
        seen.add(phrase)
        out.append(phrase)
        if len(out) == limit:
            break
    return out


def build_caption(stem: str, meta: dict[str, Any], common: set[str], max_keywords: int = 3) -> str:
    """``"<subject>, <keyword>, …"`` or '' when nothing usable remains."""
    creator = meta.get("creator", "")
    subject = (
        special_subject(stem)
        or usable_text(meta.get("title", ""), common, creator)
        or usable_text(meta.get("description", ""), common, creator, max_chars=60)
        or subject_from_stem(stem, creator)
    )
    subject = "" if is_boilerplate(subject) else subject
    keywords = clean_keywords(meta.get("keywords", []), creator, subject, max_keywords)
    return ", ".join(([subject] if subject else []) + keywords)


def in_test_split(stem: str, test_fraction: float, seed: int) -> bool:
    """Stable split by a hash of the file name, so duplicates filed in two folders land in the same split."""
    name = stem.rsplit("/", 1)[-1]
    digest = hashlib.md5(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def check_installed(root: Path) -> None:
    """DatasetMissingError (with the install command) unless both the PNG and SVG trees exist."""
    missing = [d for d in ("png", "svg") if not (root / d).is_dir()]
    if missing:
        raise DatasetMissingError(
            f"OpenClipart not found in {root} (missing {', '.join(d + '/' for d in missing)}). Install it with: "
            f"{INSTALL_COMMAND} (as root: apt-get install openclipart-png openclipart-svg; or run "
            "`make openclipart`), or pass root=<folder with png/ and svg/>."
        )


class OpenClipart(Dataset):
    """OpenClipart PNGs with captions from their SVG metadata, as ``(PIL image, caption, category)``.

    ``category`` indexes ``categories``, the top-level folder (animals, food, …). Images are RGBA/P/LA with
    transparency; ``pil_to_array`` composites them on white.

    Args:
        root: folder with ``png/`` and ``svg/`` (the Debian packages' layout).
        split: "train", "test" or "all".
        test_fraction: share of files in the test split.
        seed: seed of the split hash.
        cache_path: where parsed metadata is cached; None disables the cache.
        max_keywords: keywords appended after the subject.
        max_pixels: PNGs with more pixels (read from the header) are skipped without decoding.
        max_side: larger images are reduced to this side right after decoding.
    """

    def __init__(
        self,
        root: str | os.PathLike = DEFAULT_ROOT,
        split: str = "train",
        test_fraction: float = 0.1,
        seed: int = 0,
        cache_path: str | os.PathLike | None = DEFAULT_CACHE,
        max_keywords: int = 3,
        max_pixels: int = MAX_PIXELS,
        max_side: int = MAX_SIDE,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"OpenClipart split must be one of {list(SPLITS)}, got {split!r}")
        self.root = Path(root)
        check_installed(self.root)
        self.split = split
        self.max_pixels, self.max_side = int(max_pixels), int(max_side)
        self.skips = SkipCounter()
        pairs = list_pairs(self.root)
        cache = Path(os.path.expanduser(cache_path)) if cache_path is not None else None
        metadata = load_metadata(self.root, pairs, cache)
        common = collection_titles(metadata)
        self.categories = sorted({stem.split("/", 1)[0] for stem, _, _ in pairs if "/" in stem})
        self.items: list[tuple[str, str, int]] = []
        for stem, png, _svg in pairs:
            if split != "all" and in_test_split(stem, test_fraction, seed) != (split == "test"):
                continue
            meta = metadata.get(stem)
            caption = build_caption(stem, meta, common, max_keywords) if meta is not None else ""
            if not caption:
                self.skips.count("PNG without SVG metadata" if meta is None else "no usable caption text", png)
                continue
            self.items.append((png, caption, self.category_index(stem)))

    def category_index(self, stem: str) -> int:
        """Index in ``categories`` of a file's top-level folder (-1 for files at the root)."""
        category = stem.split("/", 1)[0] if "/" in stem else ""
        return self.categories.index(category) if category in self.categories else -1

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, index: int) -> str:
        """The caption of item ``index``."""
        return self.items[index][1]

    def __getitem__(self, index: int) -> tuple[Image.Image, str, int] | None:
        png, caption, category = self.items[index]
        pair = load_bounded(png, caption, self.skips, self.max_pixels, self.max_side)
        return None if pair is None else (pair[0], pair[1], category)

    def __repr__(self) -> str:
        return f"OpenClipart(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
