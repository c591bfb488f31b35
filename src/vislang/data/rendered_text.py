"""Reading text: words and short phrases rendered with the system's fonts; the caption is the text itself.

Fonts come from Debian packages (fonts-dejavu-core, fonts-liberation: ``/usr/share/fonts``); each item varies font,
size, colour, rotation and background noise, drawn from its own seed like the shapes world, so item ``i`` is the same
in every run. ``write_folder`` exports a split as PNG + ``.txt`` pairs, which ``vislang train`` reads as a folder
dataset (``data.train=DIR``).

Words come from ``words.txt`` (8,000 English words shipped with the package). A tenth of them, picked by a stable hash
of the word, are *held out*: only the ``test`` split draws from them, so test accuracy measures reading letters, not
recognising whole words seen in training; ``train`` and ``val`` draw from the other nine tenths.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

FONT_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts/opentype")
SPLITS = ("train", "val", "test")
WORDS = tuple(
    """time year people way day man thing woman life child world school state family student group country problem
    hand part place case week company system program question work government number night point home water room
    mother area money story fact month lot right study book eye job word business issue side kind head house service
    friend father power hour game line end member law car city name team minute idea kid body information back parent
    face others level office door health person art war history party result change morning reason research girl guy
    moment air teacher force education red green blue black white yellow orange purple small large open close stop
    exit push pull enter sale cafe bank hotel taxi bus train park street road north south east west left right up down
    hello world coffee tea milk bread apple river stone light dark fire snow rain wind cloud star moon sun tree flower
    garden window paper music piece table chair phone clock key map glass plate shop market price free new old hot
    cold fast slow""".split()
)


@functools.lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """The packaged word list (lower-case, 3-10 letters), in a fixed order."""
    lines = (Path(__file__).with_name("words.txt")).read_text(encoding="utf-8").splitlines()
    return tuple(w for w in (x.strip() for x in lines) if w and not w.startswith("#"))


def is_heldout_word(word: str, fraction: float = 0.1) -> bool:
    """Whether ``word`` is held out: decided by a hash of the word itself, so the split never depends on order."""
    return zlib.crc32(word.encode("utf-8")) % 1000 < int(fraction * 1000)


@functools.lru_cache(maxsize=8)
def split_vocabulary(vocabulary: tuple[str, ...], split: str, fraction: float) -> tuple[str, ...]:
    """Words a split draws from: held-out words for ``test``, the others for ``train`` and ``val``."""
    if fraction <= 0:
        return vocabulary
    words = tuple(w for w in vocabulary if is_heldout_word(w, fraction) == (split == "test"))
    if not words:
        raise ValueError(f"no words left for split {split!r}; use a larger vocabulary or heldout_fraction=0")
    return words


@functools.lru_cache(maxsize=1)
def system_fonts() -> tuple[str, ...]:
    """TrueType/OpenType files installed on this machine (sorted for a stable order)."""
    found = sorted(
        str(p) for d in FONT_DIRS if Path(d).is_dir() for p in Path(d).rglob("*") if p.suffix in (".ttf", ".otf")
    )
    if not found:
        raise FileNotFoundError(
            "no system fonts found under /usr/share/fonts; "
            "install some: apt-get install fonts-dejavu-core fonts-liberation"
        )
    return tuple(f for f in found if "Math" not in f) or tuple(found)  # math fonts draw letters oddly


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """How text images vary.

    Attributes:
        image_size: side of the square images in pixels.
        max_words: items have 1..max_words words (1: single words, the reading benchmark).
        size_range: font size as a fraction of the image side (before fitting the width).
        min_squeeze: a word wider than the image is first narrowed horizontally, down to this fraction of its
            width (a condensed face), and only then shrunk as a whole: long words keep legible letter heights.
        max_rotation: rotation in degrees, uniform in ±max_rotation.
        noise: standard deviation of the Gaussian background noise, in grey levels.
        min_contrast: smallest luminance difference between text and background colours.
        vocabulary: words items are drawn from (default: the packaged English list; ``WORDS`` is a small
            everyday list).
        heldout_fraction: share of the vocabulary only the ``test`` split uses (0: every split shares all words).
        random_fraction: share of ``train``/``val`` items whose text is a random string of 3-10 letters instead of a
            word. Attention readers lean on the lexicon they were trained on and misread words outside it (Wan et
            al. 2020, "On Vocabulary Reliance in Scene Text Recognition"); letters in no particular order make them
            read each one. The ``test`` split stays held-out real words.
        blank_fraction: share of ``train``/``val`` items without text (captioned ``NO_TEXT``, "∅"): a bare
            background, or a picture (``picture_fraction`` of them: an OpenClipart drawing or filled shapes, drawn as
            the Chinese renderer draws them). A reader never shown one writes a word for every picture (the English
            reader trained without them answered "no text" for 39% of 1,000 pictures).
        picture_fraction: share of the no-text items that show a picture rather than a bare background.
        seed: base seed of the world.
    """

    image_size: int = 64
    max_words: int = 1
    size_range: tuple[float, float] = (0.3, 0.5)
    min_squeeze: float = 0.5
    max_rotation: float = 10.0
    noise: float = 12.0
    min_contrast: float = 90.0
    vocabulary: tuple[str, ...] = dataclasses.field(default_factory=english_words)
    heldout_fraction: float = 0.1
    random_fraction: float = 0.0
    blank_fraction: float = 0.0
    picture_fraction: float = 0.6
    seed: int = 0


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def render_text(text: str, rng: np.random.Generator, cfg: RenderConfig) -> Image.Image:
    """One image of ``text``: random font, size, colours, rotation and noise, narrowed then scaled to fit."""
    fonts = system_fonts()
    font_path = fonts[int(rng.integers(len(fonts)))]
    side = cfg.image_size
    size = int(side * rng.uniform(*cfg.size_range) * 2)  # drawn at 2x, then reduced: smoother glyphs
    while True:
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        fg = tuple(int(v) for v in rng.integers(0, 256, 3))
        if abs(_luma(bg) - _luma(fg)) >= cfg.min_contrast:
            break
    font = ImageFont.truetype(font_path, max(8, size))
    left, top, right, bottom = font.getbbox(text)
    tile = Image.new("RGBA", (right - left + 8, bottom - top + 8), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((4 - left, 4 - top), text, font=font, fill=(*fg, 255))
    big = side * 2
    squeeze = max(cfg.min_squeeze, min(1.0, 0.92 * big / tile.width))  # narrow a long word before shrinking it
    if squeeze < 1.0:
        tile = tile.resize((max(1, round(tile.width * squeeze)), tile.height), Image.LANCZOS)
    tile = tile.rotate(float(rng.uniform(-cfg.max_rotation, cfg.max_rotation)), expand=True, resample=Image.BICUBIC)
    scale = min(1.0, 0.92 * big / max(tile.size))  # long phrases shrink to fit
    if scale < 1.0:
        tile = tile.resize((max(1, int(tile.width * scale)), max(1, int(tile.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGB", (big, big), bg)
    x = int(rng.integers(0, big - tile.width + 1))
    y = int(rng.integers(0, big - tile.height + 1))
    canvas.paste(tile, (x, y), tile)
    img = np.asarray(canvas.reduce(2), dtype=np.float32)
    img += rng.normal(0.0, cfg.noise, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


NO_TEXT = "\u2205"  # ∅: the caption of an image without text; readers report it as "no text", never as a word


class SeededRendering(Dataset):
    """A rendered-text dataset whose item ``i`` depends only on its seed: ``(PIL RGB image, text, index)``.

    Why a base: the English and Chinese renderers share how an item is drawn (its generator from the config seed,
    the dataset seed, the split and the index; the text from the generator's first draws, so ``caption(i)`` and
    ``self[i]`` agree); each says only its splits, its salt, how it picks a text and how it draws it.
    """

    splits: tuple[str, ...] = SPLITS
    salt = 7  # keeps the renderers' random streams apart

    def setup(self, name: str, split: str, n: int | None, cfg: Any, seed: int) -> None:
        """What every renderer's ``__init__`` starts with: the split checked, the seeds, the item count (20,000 for
        ``train``, else 1,000, unless ``n``) and the image shape from ``cfg``."""
        if split not in self.splits:
            raise ValueError(f"{name} split must be one of {list(self.splits)}, got {split!r}")
        self.split, self.seed, self.cfg = split, seed, cfg
        self.n = (20_000 if split == "train" else 1_000) if n is None else int(n)
        self.image_size, self.channels = cfg.image_size, 3

    def __len__(self) -> int:
        return self.n

    def rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        return np.random.default_rng([self.cfg.seed, self.seed, self.splits.index(self.split), index, self.salt])

    def caption(self, index: int) -> str:
        return self._text(self.rng(index))

    @property
    def captions(self) -> list[str]:
        return [self.caption(i) for i in range(self.n)]

    def __getitem__(self, index: int) -> tuple[Image.Image, str, int]:
        rng = self.rng(index)
        text = self._text(rng)
        return self.render(text, rng), text, index

    def _text(self, rng: np.random.Generator) -> str:
        raise NotImplementedError

    def render(self, text: str, rng: np.random.Generator) -> Image.Image:
        raise NotImplementedError


class RenderedText(SeededRendering):
    """Rendered words and phrases as ``(PIL RGB image, text, index)``; item ``i`` depends only on its seed."""

    def __init__(self, split: str = "train", n: int | None = None, cfg: RenderConfig | None = None, seed: int = 0):
        self.setup("rendered-text", split, n, cfg or RenderConfig(), seed)
        self.words = split_vocabulary(tuple(self.cfg.vocabulary), split, self.cfg.heldout_fraction)

    def render(self, text: str, rng: np.random.Generator) -> Image.Image:
        if text == NO_TEXT:
            from .rendered_zh import ZhRenderConfig, render_chinese  # lazy: rendered_zh builds on this module

            c = self.cfg
            picture = bool(rng.random() < c.picture_fraction)
            zcfg = ZhRenderConfig(image_size=c.image_size, noise=c.noise, min_contrast=c.min_contrast)
            return render_chinese(NO_TEXT, rng, (), zcfg, picture=picture)
        return render_text(text, rng, self.cfg)

    def _text(self, rng: np.random.Generator) -> str:
        """Draw the item's words from ``rng`` (first draws of the item, so caption() and __getitem__ agree)."""
        if self.cfg.blank_fraction > 0 and self.split != "test" and rng.random() < self.cfg.blank_fraction:
            return NO_TEXT
        words = self.words
        k = int(rng.integers(1, self.cfg.max_words + 1))
        if self.split != "test" and self.cfg.random_fraction > 0 and rng.random() < self.cfg.random_fraction:
            return " ".join(_random_letters(rng) for _ in range(k))
        return " ".join(words[int(i)] for i in rng.integers(len(words), size=k))


def _random_letters(rng: np.random.Generator) -> str:
    """A pronounceable-or-not string of 3-10 lower-case letters: the length range of the packaged words."""
    return "".join(chr(ord("a") + int(c)) for c in rng.integers(26, size=int(rng.integers(3, 11))))


def write_folder(dataset: RenderedText, out_dir: str | Path, progress: bool = False) -> Path:
    """Export as ``000000.png`` + ``000000.txt`` pairs: a folder dataset any vislang command reads."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(dataset)), desc="render", unit="img", disable=not progress):
        img, text, _ = dataset[i]
        img.save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(text, encoding="utf-8")
    return out
