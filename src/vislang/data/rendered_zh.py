"""Reading Chinese: HSK words rendered with Debian's CJK fonts, horizontal or vertical; the caption is the text itself.

The companion of :mod:`.rendered_text` (English). Words come from the HSK 2.0 lists that ship with CC-CEDICT
(:func:`vislang.data.cedict.hsk_words`), kept when they are 1-``max_chars`` Chinese characters. Each item varies font,
size, colour, direction (a fifth are vertical, read top to bottom as on shop signs), rotation, background (plain,
noise, or a texture cut from an OpenClipart drawing when those are installed), blur and JPEG artefacts, all drawn
from the item's own seed, so item ``i`` of a split is the same in every run.

Splits, each isolating one kind of novelty:

``train`` / ``val``
    Training words, random strings of training characters (``random_fraction``: a reader trained on words alone
    recalls its word list instead of reading) and a few blank images captioned ``NO_TEXT`` (so the model can say
    "nothing here" instead of inventing words), in the training fonts.
``test``
    Held-out **words** in the training fonts: 2-4-character words of the higher HSK levels (3-6) written only in
    characters of the training words (a reader cannot spell a character it never saw), never a training word, and
    never inside a training string (random strings that contain one are drawn again).
``test-font``
    Training words in the held-out **font family** (``heldout_font``, WenQuanYi Micro Hei by default): a face no
    training image uses.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch.utils.data import Dataset

from .cedict import hsk_words, load_dictionary
from .rendered_text import NO_TEXT, SeededRendering

SPLITS = ("train", "val", "test", "test-font")
FONT_DIRS = ("/usr/share/fonts/opentype/noto", "/usr/share/fonts/truetype/wqy", "/usr/share/fonts/truetype")
INSTALL_FONTS = "apt-get install fonts-noto-cjk fonts-wqy-zenhei fonts-wqy-microhei"
CLIPART_DIR = "/usr/share/openclipart/png"


def is_hanzi(ch: str) -> bool:
    """A CJK unified ideograph (the characters Chinese is written in)."""
    return unicodedata.name(ch, "").startswith("CJK UNIFIED IDEOGRAPH")


@dataclasses.dataclass(frozen=True)
class Face:
    """One font face: a file, the face's index inside a .ttc collection, and the family it belongs to."""

    path: str
    index: int
    family: str  # weight and width variants share it ("Noto Sans CJK" covers Regular, Bold and Mono)


def _family(name: str) -> str:
    for suffix in (" Mono", " Sharp", " SC"):
        name = name.replace(suffix, "")
    return name


@functools.lru_cache(maxsize=1)
def cjk_faces() -> tuple[Face, ...]:
    """Simplified-Chinese faces installed: Noto Sans/Serif CJK SC and WenQuanYi, sorted for a stable order."""
    files = sorted({str(p) for d in FONT_DIRS if Path(d).is_dir() for p in Path(d).rglob("*.tt[cf]")})
    faces = []
    for path in files:
        for index in range(16):
            try:
                name = ImageFont.truetype(path, 12, index=index).getname()[0]
            except OSError:
                break
            if (name.startswith("Noto") and "CJK SC" in name) or name.startswith("WenQuanYi"):
                faces.append(Face(path, index, _family(name)))
    if not faces:
        raise FileNotFoundError(f"no Chinese fonts found under /usr/share/fonts; install some: {INSTALL_FONTS}")
    return tuple(faces)


def split_faces(split: str, heldout_font: str) -> tuple[Face, ...]:
    """The held-out family for ``test-font``, every other family for the other splits."""
    faces = cjk_faces()
    if heldout_font not in {f.family for f in faces}:
        raise ValueError(
            f"held-out font family {heldout_font!r} is not installed; have {sorted({f.family for f in faces})}"
        )
    chosen = tuple(f for f in faces if (f.family == heldout_font) == (split == "test-font"))
    if not chosen:
        raise ValueError(f"no fonts left for split {split!r}: install a second family ({INSTALL_FONTS})")
    return chosen


@functools.lru_cache(maxsize=8)
def chinese_vocabulary(levels: tuple[int, ...], max_chars: int) -> tuple[str, ...]:
    """HSK words at ``levels`` written in 1..max_chars Chinese characters (no punctuation, no "…" patterns)."""
    return tuple(w for w in hsk_words(levels) if 1 <= len(w) <= max_chars and all(map(is_hanzi, w)))


@functools.lru_cache(maxsize=8)
def word_splits(
    levels: tuple[int, ...], heldout_levels: tuple[int, ...], max_chars: int
) -> tuple[tuple[str, ...], ...]:
    """(training words, held-out words, training characters).

    Training words are the HSK words at ``levels``; held-out words are the 2..max_chars-character words at
    ``heldout_levels`` written entirely in characters of the training words (and not training words themselves):
    new words, familiar characters. Single characters are never held out, since a training image shows each one,
    nor are words inside a training word (客气 inside 不客气 is a sequence training images show).
    """
    train = chinese_vocabulary(levels, max_chars)
    chars = {c for w in train for c in w}
    known = set(train)
    heldout = tuple(
        w
        for w in chinese_vocabulary(heldout_levels, max_chars)
        if len(w) > 1 and set(w) <= chars and w not in known and not any(w in t for t in train)  # 客气 in 不客气
    )
    if not heldout:
        raise ValueError(
            f"no held-out words: HSK levels {heldout_levels} share no words built of the training characters"
        )
    return train, heldout, tuple(sorted(chars))


def contains_any(text: str, words: frozenset[str], longest: int) -> bool:
    """Whether any of ``words`` occurs in ``text`` (substrings of 2..longest characters)."""
    return any(text[i : i + n] in words for n in range(2, longest + 1) for i in range(len(text) - n + 1))


@functools.lru_cache(maxsize=1)
def _small_clipart() -> tuple[Path, ...]:
    root = Path(CLIPART_DIR)
    return tuple(sorted(p for p in root.rglob("*.png") if p.stat().st_size < 60_000)) if root.is_dir() else ()


def clipart_files(offset: int, limit: int = 64) -> tuple[Path, ...]:
    """Every 7th small OpenClipart PNG from ``offset`` (spread over topics): offset 0 gives the background textures,
    1 the no-text drawings of training, 5 the drawings a no-text check may use (never seen in training)."""
    return _small_clipart()[offset::7][:limit]


@functools.lru_cache(maxsize=1)
def clipart_drawings(limit: int = 64, side: int = 96) -> tuple[Image.Image, ...]:
    """RGBA OpenClipart drawings (at most side x side) for the no-text pictures; empty when none are installed."""
    out = []
    for p in clipart_files(1, limit):
        try:
            with Image.open(p) as im:
                im.draft("RGBA", (side, side))
                d = im.convert("RGBA")
                d.thumbnail((side, side))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        out.append(d)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def clipart_textures(limit: int = 64, side: int = 128) -> tuple[np.ndarray, ...]:
    """Grey textures (side x side, in [-1, 1]) from small OpenClipart PNGs; empty when none are installed."""
    out = []
    for p in clipart_files(0, limit):
        try:
            with Image.open(p) as im:
                im.draft("L", (side, side))
                g = im.convert("RGBA")
                flat = Image.new("RGBA", g.size, (255, 255, 255, 255))
                flat.alpha_composite(g)
                a = np.asarray(flat.convert("L").resize((side, side)), dtype=np.float32)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        out.append(a / 127.5 - 1.0)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ZhRenderConfig:
    """How Chinese text images vary.

    Attributes:
        image_size: side of the square images in pixels.
        hsk_levels: HSK 2.0 levels the words come from (1, 2: 299 words, ~350 characters; add 3 for ~600).
        max_chars: longest word kept (characters); also the longest random string.
        length_weights: relative weights of random-string lengths 1..max_chars (empty: uniform). Held-out words are
            mostly 2 characters (256 of 271), and a string of several characters is what teaches reading order.
        size_range: glyph size as a fraction of the image side (before fitting long words).
        vertical_fraction: share of items written top to bottom.
        max_rotation: rotation in degrees, uniform in ±max_rotation.
        noise: standard deviation of the Gaussian background noise, in grey levels.
        min_contrast: smallest luminance difference between text and background colours.
        clipart_fraction: share of backgrounds carrying an OpenClipart texture (when installed).
        blur_fraction: share of items blurred (Gaussian, radius up to 1 px at the output size).
        jpeg_fraction: share of items saved through JPEG at quality 25-90.
        heldout_levels: HSK levels the held-out ``test`` words come from (those built of training characters).
        heldout_font: the font family only ``test-font`` uses.
        random_fraction: share of ``train``/``val`` items that are random strings of training characters (0.4 read
            14% of held-out words: the decoder completed training words; 0.9 leaves it no word list to recall).
        blank_fraction: share of ``train``/``val`` items with no text at all (captioned ``NO_TEXT``).
        picture_fraction: share of those no-text items that show a picture (an OpenClipart drawing or a few filled
            shapes) instead of a bare background: trained on bare backgrounds alone, a reader invents characters
            for any drawing.
        caption: ``text`` (the characters: a reader) or ``gloss`` (CC-CEDICT's first sense of the word, what
            ``vislang translate`` shows for it: the end-to-end image-to-English variant; words only, so
            ``random_fraction`` must be 0).
        seed: base seed of the world.
    """

    image_size: int = 64
    hsk_levels: tuple[int, ...] = (1, 2)
    max_chars: int = 4
    length_weights: tuple[float, ...] = ()
    size_range: tuple[float, float] = (0.3, 0.6)
    vertical_fraction: float = 0.2
    max_rotation: float = 6.0
    noise: float = 8.0
    min_contrast: float = 90.0
    clipart_fraction: float = 0.15
    blur_fraction: float = 0.2
    jpeg_fraction: float = 0.2
    heldout_levels: tuple[int, ...] = (3, 4, 5, 6)
    heldout_font: str = "WenQuanYi Micro Hei"
    random_fraction: float = 0.9
    blank_fraction: float = 0.05
    picture_fraction: float = 0.6
    caption: str = "text"
    seed: int = 0


def _colours(rng: np.random.Generator, min_contrast: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    while True:
        bg, fg = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        if abs(np.dot(bg, (0.299, 0.587, 0.114)) - np.dot(fg, (0.299, 0.587, 0.114))) >= min_contrast:
            return bg, fg


def _text_tile(text: str, font: ImageFont.FreeTypeFont, fg: tuple[int, ...], vertical: bool) -> Image.Image:
    """The text drawn on a transparent tile: one line, or one character per row when vertical."""
    if not vertical or len(text) == 1:
        left, top, right, bottom = font.getbbox(text)
        tile = Image.new("RGBA", (right - left + 8, bottom - top + 8), (0, 0, 0, 0))
        ImageDraw.Draw(tile).text((4 - left, 4 - top), text, font=font, fill=(*fg, 255))
        return tile
    step = int(font.size * 1.08)
    tile = Image.new("RGBA", (step + 8, step * len(text) + 8), (0, 0, 0, 0))
    draw = ImageDraw.Draw(tile)
    for i, ch in enumerate(text):
        left, top, right, bottom = font.getbbox(ch)
        x = 4 + (step - (right - left)) // 2 - left
        y = 4 + i * step + (step - (bottom - top)) // 2 - top
        draw.text((x, y), ch, font=font, fill=(*fg, 255))
    return tile


def _background(rng: np.random.Generator, bg: tuple[int, ...], big: int, cfg: ZhRenderConfig) -> Image.Image:
    canvas = np.empty((big, big, 3), dtype=np.float32)
    canvas[:] = bg
    textures = clipart_textures() if cfg.clipart_fraction > 0 else ()
    if textures and rng.random() < cfg.clipart_fraction:
        tex = textures[int(rng.integers(len(textures)))]
        tex = np.asarray(Image.fromarray(tex).resize((big, big)), dtype=np.float32)
        canvas += (tex * 0.35 * cfg.min_contrast)[..., None]  # faint: the text keeps most of its contrast
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def _paste_picture(canvas: Image.Image, rng: np.random.Generator, fg: tuple[int, ...]) -> None:
    """A picture without text on ``canvas``: an OpenClipart drawing (half the time, when installed) or 1-4 filled
    ellipses, rectangles and polygons. Filled, never outlined or thin: an outlined square is 口, a bar is 一."""
    big = canvas.width
    drawings = clipart_drawings()
    if drawings and rng.random() < 0.5:
        d = drawings[int(rng.integers(len(drawings)))]
        scale = big * rng.uniform(0.4, 1.0) / max(d.size)
        d = d.resize((max(1, int(d.width * scale)), max(1, int(d.height * scale))), Image.LANCZOS)
        canvas.paste(d, (int(rng.integers(0, big - d.width + 1)), int(rng.integers(0, big - d.height + 1))), d)
        return
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 5))):
        colour = fg if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, big * 3 // 4, 2))
        w, h = (int(v) for v in rng.integers(big // 6, big // 2, 2))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        else:
            points = [(int(a), int(b)) for a, b in rng.integers(0, big, (int(rng.integers(3, 7)), 2))]
            draw.polygon(points, fill=colour)


def render_chinese(
    text: str, rng: np.random.Generator, faces: tuple[Face, ...], cfg: ZhRenderConfig, picture: bool = False
) -> Image.Image:
    """One image of ``text`` (``NO_TEXT``: background only, or a picture without text when ``picture``): random
    face, size, colours, direction and artefacts. ``faces`` may be empty for ``NO_TEXT`` (the English renderer's
    no-text items)."""
    if not faces and text != NO_TEXT:
        raise ValueError(f"no font to draw {text!r} with: install some ({INSTALL_FONTS})")
    face = faces[int(rng.integers(len(faces)))] if faces else None
    side, big = cfg.image_size, cfg.image_size * 2  # drawn at 2x, then reduced: smoother strokes
    size = max(10, int(big * rng.uniform(*cfg.size_range)))
    bg, fg = _colours(rng, cfg.min_contrast)
    vertical = bool(rng.random() < cfg.vertical_fraction)
    canvas = _background(rng, bg, big, cfg)
    if picture:
        _paste_picture(canvas, rng, fg)
    elif text != NO_TEXT:
        tile = _text_tile(text, ImageFont.truetype(face.path, size, index=face.index), fg, vertical)
        tile = tile.rotate(float(rng.uniform(-cfg.max_rotation, cfg.max_rotation)), expand=True, resample=Image.BICUBIC)
        scale = min(1.0, 0.94 * big / max(tile.size))  # long words shrink to fit
        if scale < 1.0:
            tile = tile.resize((max(1, int(tile.width * scale)), max(1, int(tile.height * scale))), Image.LANCZOS)
        x = int(rng.integers(0, big - tile.width + 1))
        y = int(rng.integers(0, big - tile.height + 1))
        canvas.paste(tile, (x, y), tile)
    img = canvas.reduce(2)
    if rng.random() < cfg.blur_fraction:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, cfg.noise, (side, side, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < cfg.jpeg_fraction:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(25, 91)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


class RenderedChinese(SeededRendering):
    """Rendered Chinese words as ``(PIL RGB image, text, index)``; item ``i`` depends only on its seed."""

    splits = SPLITS
    salt = 11

    def __init__(self, split: str = "train", n: int | None = None, cfg: ZhRenderConfig | None = None, seed: int = 0):
        self.setup("rendered-zh", split, n, cfg or ZhRenderConfig(), seed)
        c = self.cfg
        train, self.heldout, self.characters = word_splits(tuple(c.hsk_levels), tuple(c.heldout_levels), c.max_chars)
        self.words = self.heldout if split == "test" else train
        self._heldout_set = frozenset(self.heldout)
        self.faces = split_faces(split, self.cfg.heldout_font)
        w = np.asarray(c.length_weights or [1.0] * c.max_chars, dtype=float)
        if len(w) != c.max_chars or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"length_weights needs {c.max_chars} non-negative weights (lengths 1..max_chars), "
                             f"got {c.length_weights}")  # fmt: skip
        self._length_p = w / w.sum()
        if c.caption not in ("text", "gloss"):
            raise ValueError(f"ZhRenderConfig.caption must be 'text' or 'gloss', got {c.caption!r}")
        if c.caption == "gloss" and c.random_fraction > 0:
            raise ValueError("caption='gloss' needs random_fraction=0: a random string of characters has no meaning")

    def caption(self, index: int) -> str:
        return self.label(super().caption(index))

    def __getitem__(self, index: int) -> tuple[Image.Image, str, int]:
        img, text, i = super().__getitem__(index)
        return img, self.label(text), i

    def label(self, text: str) -> str:
        """What an item is captioned: its text, or with ``caption="gloss"`` the English shown for it."""
        if self.cfg.caption == "text" or text == NO_TEXT:
            return text
        return load_dictionary().gloss(text) or text

    def render(self, text: str, rng: np.random.Generator) -> Image.Image:
        picture = text == NO_TEXT and rng.random() < self.cfg.picture_fraction
        return render_chinese(text, rng, self.faces, self.cfg, picture=picture)

    def _text(self, rng: np.random.Generator) -> str:
        """The item's text from the first draws of its generator (so caption() and __getitem__ agree)."""
        u = rng.random()
        if self.split in ("train", "val"):
            if u < self.cfg.blank_fraction:
                return NO_TEXT
            if u < self.cfg.blank_fraction + self.cfg.random_fraction:
                while True:  # a random string that happens to spell a held-out word is drawn again
                    k = 1 + int(rng.choice(self.cfg.max_chars, p=self._length_p))
                    text = "".join(self.characters[int(i)] for i in rng.integers(len(self.characters), size=k))
                    if not contains_any(text, self._heldout_set, self.cfg.max_chars):
                        return text
        return self.words[int(rng.integers(len(self.words)))]


class Interleaved(Dataset):
    """Items of several datasets in turn (``a0, b0, a1, b1, ...``): one folder that trains a mixed reader."""

    def __init__(self, *parts: Dataset) -> None:
        self.parts = parts
        self.n = len(parts) * min(len(p) for p in parts)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        img, text, _ = self.parts[index % len(self.parts)][index // len(self.parts)]
        return img, text, index
