"""Synthetic scenes of coloured shapes with captions and question–answer pairs.

A small, fully controlled world for testing what a vision-language model learns: colours, shapes, sizes, counts and
spatial relations are known exactly, so every caption is true and every question has one answer. A few colour–shape
combinations are never shown in the train/val/test splits; the "holdout" split is made of them, to measure whether a
model composes "red" and "triangle" it has only seen apart.

Scenes are generated lazily from ``(cfg.seed, seed, split, index)``: item ``i`` is the same whatever order items are
read in and however many workers read them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from torch.utils.data import Dataset

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (40, 160, 60),
    "blue": (40, 85, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 55, 185),
    "orange": (245, 125, 20),
    "cyan": (20, 185, 200),
    "gray": (120, 120, 120),
    "brown": (130, 80, 40),
    "pink": (240, 120, 180),
}
SHAPE_NAMES = ("circle", "square", "triangle", "star", "diamond")
SIZE_FRACTION = {"small": 0.11, "large": 0.18}  # half-extent of an object's box, as a fraction of the image side
DEFAULT_HOLDOUT = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("green", "square"),
    ("yellow", "star"),
    ("purple", "circle"),
)
SPLITS = ("train", "val", "test", "holdout")
DEFAULT_SIZES = {"train": 20_000, "val": 1_000, "test": 1_000, "holdout": 1_000}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATIONS = ("to the left of", "to the right of", "above", "below")
OPPOSITE = dict(zip(RELATIONS, ("to the right of", "to the left of", "below", "above")))
_RELATION_RE = re.compile(r"\b(" + "|".join(map(re.escape, RELATIONS)) + r")\b")


def flip_relation(caption: str) -> str | None:
    """The caption with its first spatial relation turned round ("a red circle to the left of a blue square" →
    "... to the right of ..."): the same words and objects, the opposite layout. A bag-of-words text tower gives both
    the same embedding; as a hard negative it teaches the tower word order (NegCLIP's swapped captions). None when
    the caption has no relation."""
    m = _RELATION_RE.search(caption)
    if m is None:
        return None
    return caption[: m.start()] + OPPOSITE[m.group(1)] + caption[m.end() :]


def relation_flips(captions: Sequence[str], option: str, off: str = "0") -> list[str | None]:
    """``flip_relation`` of every caption, for a training option that needs some (the error names ``option`` and the
    value ``off`` that turns it off);
    refuses data whose captions never state a relation, where the option would silently do nothing."""
    flipped = [flip_relation(c) for c in captions]
    if all(f is None for f in flipped):
        raise ValueError(
            f"{option} needs captions that state a spatial relation ('to the left of', 'to the right of', 'above', "
            f"'below'); none of the training captions does: turn it off (--{option}={off})"
        )
    return flipped


QUESTION_TYPES = ("colour", "shape", "size", "count", "yes/no", "relation")
_SUPERSAMPLE = 2  # draw at 2× and downsample: smooth edges at ~0.1 ms per scene
_PLACEMENT_TRIES = 30
_NOISE_AMPLITUDE = 7


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """The world the scenes are drawn from.

    Attributes:
        image_size: side of the square images in pixels.
        min_objects: fewest objects per scene.
        max_objects: most objects per scene (fewer when they cannot be placed without overlap).
        colors: colour names (keys of ``COLOR_RGB``).
        shapes: shape names (from ``SHAPE_NAMES``).
        sizes: size names (keys of ``SIZE_FRACTION``).
        holdout: (colour, shape) pairs never shown in train/val/test; the "holdout" split is made of them.
        holdout_single_fraction: share of holdout-split scenes holding a single held-out object (the rest are mixed
            scenes with at least one).
        seed: base seed of the world; combined with each dataset's own seed.
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star")
    sizes: tuple[str, ...] = ("small", "large")
    holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT
    holdout_single_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.colors if c not in COLOR_RGB] + [s for s in self.shapes if s not in SHAPE_NAMES]
        unknown += [s for s in self.sizes if s not in SIZE_FRACTION]
        if unknown:
            raise ValueError(
                f"unknown shapes-world names {unknown}; colours: {list(COLOR_RGB)}, shapes: {list(SHAPE_NAMES)}, "
                f"sizes: {list(SIZE_FRACTION)}"
            )
        bad = [tuple(p) for p in self.holdout if p[0] not in self.colors or p[1] not in self.shapes]
        if bad:
            raise ValueError(f"holdout pairs {bad} use colours or shapes not in the config")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if len(self.allowed_combos) < self.max_objects:
            raise ValueError("too few non-held-out colour–shape pairs for max_objects distinct objects")

    @property
    def combos(self) -> list[tuple[str, str]]:
        """Every (colour, shape) pair of the world."""
        return [(c, s) for c in self.colors for s in self.shapes]

    @property
    def holdout_set(self) -> frozenset[tuple[str, str]]:
        """The held-out pairs as a set of tuples."""
        return frozenset(tuple(p) for p in self.holdout)  # type: ignore[misc]

    @property
    def allowed_combos(self) -> list[tuple[str, str]]:
        """Pairs that may appear in the train/val/test splits."""
        held = self.holdout_set
        return [p for p in self.combos if p not in held]


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape: names plus its centre (x, y) and half-extent ``r`` in pixels."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    r: float

    @property
    def name(self) -> str:
        """ "red circle" — unique within a scene, since a scene never repeats a colour–shape pair."""
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything needed to render an image and derive its captions and questions."""

    objects: tuple[SceneObject, ...]
    image_size: int
    background: tuple[int, int, int]
    noise_seed: int

    def has(self, color: str, shape: str) -> bool:
        """Whether the scene holds a ``color`` ``shape``."""
        return any(o.color == color and o.shape == shape for o in self.objects)


# ----------------------------------------------------------------------------------------------------- generation


def find_spot(
    candidates: Sequence[Sequence[float]], r: float, placed: Sequence[SceneObject], gap: float
) -> tuple[float, float] | None:
    """The first candidate centre whose box keeps ``gap`` pixels from every placed object's box."""
    for x, y in candidates:
        if all(abs(x - o.x) >= r + o.r + gap or abs(y - o.y) >= r + o.r + gap for o in placed):
            return x, y
    return None


def place_object(
    rng: np.random.Generator, cfg: ShapesConfig, color: str, shape: str, size: str, placed: Sequence[SceneObject]
) -> SceneObject | None:
    """Random non-overlapping position for one object (rejection sampling); ``None`` if none found quickly."""
    side = cfg.image_size
    r = SIZE_FRACTION[size] * side
    margin = r + 0.02 * side
    tries = _PLACEMENT_TRIES if placed else 1
    spot = find_spot(rng.uniform(margin, side - margin, size=(tries, 2)).tolist(), r, placed, 0.04 * side)
    return None if spot is None else SceneObject(shape, color, size, spot[0], spot[1], r)


def smallest_size(cfg: ShapesConfig) -> str:
    """The config's smallest size name (the fallback when a larger object will not fit)."""
    return min(cfg.sizes, key=SIZE_FRACTION.__getitem__)


def add_objects(
    rng: np.random.Generator, cfg: ShapesConfig, pairs: Sequence[tuple[str, str]], placed: list[SceneObject]
) -> list[SceneObject]:
    """Place each (colour, shape) pair with a random size, shrinking to small (or dropping it) when it won't fit."""
    sizes = rng.integers(len(cfg.sizes), size=len(pairs)).tolist()
    for (color, shape), k in zip(pairs, sizes):
        obj = place_object(rng, cfg, color, shape, cfg.sizes[k], placed)
        if obj is None and cfg.sizes[k] != smallest_size(cfg):
            obj = place_object(rng, cfg, color, shape, smallest_size(cfg), placed)
        if obj is not None:
            placed.append(obj)
    return placed


def sample_pairs(rng: np.random.Generator, pool: Sequence[tuple[str, str]], k: int) -> list[tuple[str, str]]:
    """``k`` distinct (colour, shape) pairs from ``pool``."""
    return [tuple(pool[i]) for i in rng.permutation(len(pool))[:k].tolist()]  # type: ignore[misc]


def make_scene(rng: np.random.Generator, cfg: ShapesConfig, objects: list[SceneObject]) -> Scene:
    """Wrap placed objects with a light random background tint and a noise seed."""
    base = int(rng.integers(222, 248))
    tint = rng.integers(-6, 7, size=3).tolist()
    background = (base + tint[0], base + tint[1], base + tint[2])
    return Scene(tuple(objects), cfg.image_size, background, int(rng.integers(2**31)))


def generate_scene(rng: np.random.Generator, cfg: ShapesConfig, holdout: bool = False) -> Scene:
    """A random scene of ``cfg.min_objects``–``cfg.max_objects`` non-overlapping objects.

    Args:
        rng: the random source (seed it per item for order-independent datasets).
        cfg: the world.
        holdout: False → only non-held-out pairs; True → at least one held-out pair (alone in a share
            ``cfg.holdout_single_fraction`` of scenes, otherwise mixed with any other pairs).
    """
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    if not holdout:
        return make_scene(rng, cfg, add_objects(rng, cfg, sample_pairs(rng, cfg.allowed_combos, n), []))
    first = tuple(cfg.holdout[int(rng.integers(len(cfg.holdout)))])
    placed = add_objects(rng, cfg, [first], [])  # type: ignore[list-item]
    if rng.random() >= cfg.holdout_single_fraction:
        others = [p for p in cfg.combos if p != first]
        add_objects(rng, cfg, sample_pairs(rng, others, max(min(n, cfg.max_objects), 2) - 1), placed)
    return make_scene(rng, cfg, placed)


def single_object_scene(
    rng: np.random.Generator, cfg: ShapesConfig, color: str, shape: str, size: str | None = None
) -> Scene:
    """A scene holding exactly one given object (for zero-shot probes of any colour–shape pair)."""
    size = size or cfg.sizes[int(rng.integers(len(cfg.sizes)))]
    obj = place_object(rng, cfg, color, shape, size, [])
    if obj is None:  # cannot happen on an empty canvas, but keep the function total
        half = cfg.image_size / 2
        obj = SceneObject(shape, color, size, half, half, SIZE_FRACTION[size] * cfg.image_size)
    return make_scene(rng, cfg, [obj])


# -------------------------------------------------------------------------------------------------------- drawing


def star_points(x: float, y: float, r: float, points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    """Vertices of an upright star, nudged down so it sits in the middle of its box."""
    cy = y + 0.1 * r
    out = []
    for k in range(2 * points):
        rad = r if k % 2 == 0 else r * inner
        a = -math.pi / 2 + k * math.pi / points
        out.append((x + rad * math.cos(a), cy + rad * math.sin(a)))
    return out


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: float, rgb: tuple[int, int, int]) -> None:
    """Draw one object (coordinates scaled by ``scale``) filling most of its box."""
    x, y, r = obj.x * scale, obj.y * scale, obj.r * scale
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif obj.shape == "square":
        h = 0.85 * r
        draw.rectangle((x - h, y - h, x + h, y + h), fill=rgb)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=rgb)
    elif obj.shape == "diamond":
        draw.polygon([(x, y - r), (x + 0.8 * r, y), (x, y + r), (x - 0.8 * r, y)], fill=rgb)
    elif obj.shape == "star":
        draw.polygon(star_points(x, y, 1.1 * r), fill=rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


@functools.lru_cache(maxsize=8)
def noise_texture(side: int) -> Image.Image:
    """A fixed grayscale-noise RGB texture, 4× the image side, from which each scene crops its own window.

    Pixel values are ``_NOISE_AMPLITUDE + 1 + noise`` (always positive), so ``ImageChops.add`` with a negative offset
    adds signed noise. Drawing fresh noise per image was the slowest step of rendering; a shifted window of one
    texture looks just as random to a model and costs a crop.
    """
    rng = np.random.default_rng(side)
    noise = rng.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, size=(4 * side, 4 * side, 1))
    return Image.fromarray(np.repeat(noise + _NOISE_AMPLITUDE + 1, 3, axis=2).astype(np.uint8), "RGB")


def noise_window(noise_seed: int, side: int) -> Image.Image:
    """The scene's side×side window of the shared noise texture, chosen by its noise seed."""
    texture = noise_texture(side)
    span = texture.size[0] - side
    ox, oy = noise_seed % span, (noise_seed // span) % span
    return texture.crop((ox, oy, ox + side, oy + side))


def render(scene: Scene) -> Image.Image:
    """The scene as a PIL RGB image of ``scene.image_size`` pixels (deterministic).

    Shapes are drawn at 2× on a flat background and box-filtered down (anti-aliasing), then light noise is added over
    the whole image, so models cannot rely on perfectly flat colours.
    """
    side = scene.image_size
    img = Image.new("RGB", (side * _SUPERSAMPLE, side * _SUPERSAMPLE), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_object(draw, obj, _SUPERSAMPLE, COLOR_RGB[obj.color])
    window = noise_window(scene.noise_seed, side)
    return ImageChops.add(img.reduce(_SUPERSAMPLE), window, scale=1.0, offset=-(_NOISE_AMPLITUDE + 1))


# ------------------------------------------------------------------------------------------------------- language


def article(phrase: str) -> str:
    """ "a" or "an" for a noun phrase."""
    return "an" if phrase[:1] in "aeiou" else "a"


def single_object_caption(color: str, shape: str, size: str | None = None) -> str:
    """ "a red circle" / "a small red circle" — the phrase zero-shot probes and captions share."""
    phrase = f"{size} {color} {shape}" if size else f"{color} {shape}"
    return f"{article(phrase)} {phrase}"


def join_words(items: Sequence[str]) -> str:
    """English list: "a", "a and b", "a, b and c"."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def plural(shape: str) -> str:
    """Plural of a shape name."""
    return shape + "s"


def number_word(n: int) -> str:
    """Small numbers as words for captions ("two objects")."""
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def relation(a: SceneObject, b: SceneObject) -> list[str]:
    """Relations that clearly hold from ``a`` to ``b`` (their boxes do not overlap along that axis)."""
    out = []
    if a.x + a.r <= b.x - b.r:
        out.append("to the left of")
    if a.x - a.r >= b.x + b.r:
        out.append("to the right of")
    if a.y + a.r <= b.y - b.r:
        out.append("above")
    if a.y - a.r >= b.y + b.r:
        out.append("below")
    return out


def left_to_right(scene: Scene) -> list[SceneObject]:
    """Objects in reading order, so list captions also carry a hint of layout."""
    return sorted(scene.objects, key=lambda o: (o.x, o.y))


def object_phrases(scene: Scene, sized: bool) -> list[str]:
    """ "a small red circle" for every object, left to right."""
    return [single_object_caption(o.color, o.shape, o.size if sized else None) for o in left_to_right(scene)]


def relation_caption(rng: np.random.Generator, scene: Scene) -> str | None:
    """ "a small red circle to the left of a large blue square" (+ the other objects), or None if no pair relates."""
    pairs = [(a, b, rel) for a in scene.objects for b in scene.objects if a is not b for rel in relation(a, b)]
    if not pairs:
        return None
    a, b, rel = pairs[int(rng.integers(len(pairs)))]
    sized = bool(rng.random() < 0.5)
    text = (
        f"{single_object_caption(a.color, a.shape, a.size if sized else None)} {rel} "
        f"{single_object_caption(b.color, b.shape, b.size if sized else None)}"
    )
    rest = [single_object_caption(o.color, o.shape) for o in left_to_right(scene) if o is not a and o is not b]
    return text + (f", plus {join_words(rest)}" if rest else "")


def scene_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Every phrasing of the scene; each names every object's colour and shape."""
    n = len(scene.objects)
    captions = [join_words(object_phrases(scene, sized=True)), join_words(object_phrases(scene, sized=False))]
    noun = "object" if n == 1 else "objects"
    captions.append(f"{number_word(n)} {noun}: {join_words(object_phrases(scene, sized=bool(rng.random() < 0.5)))}")
    if n == 1:
        captions.append(f"{object_phrases(scene, sized=True)[0]} on a light background")
    else:
        rel = relation_caption(rng, scene)
        if rel is not None:
            captions.append(rel)
    return captions


def scene_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One phrasing chosen at random (relation phrasings when possible, a third of the time)."""
    captions = scene_captions(scene, rng)
    return captions[int(rng.integers(len(captions)))]


def qa(question: str, answer: str | int, kind: str) -> dict[str, str]:
    """One question record; answers are always single words."""
    return {"question": question, "answer": str(answer), "type": kind}


def attribute_questions(scene: Scene) -> list[dict[str, str]]:
    """Colour questions for shapes seen once, shape questions for colours seen once, and size questions."""
    shapes = Counter(o.shape for o in scene.objects)
    colors = Counter(o.color for o in scene.objects)
    out = []
    for o in scene.objects:
        if shapes[o.shape] == 1:
            out.append(qa(f"what colour is the {o.shape}?", o.color, "colour"))
        if colors[o.color] == 1:
            out.append(qa(f"what shape is the {o.color} object?", o.shape, "shape"))
        out.append(qa(f"what size is the {o.name}?", o.size, "size"))
    return out


def count_questions(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig) -> list[dict[str, str]]:
    """How many objects, how many of one present and one random shape, how many of one present colour."""
    shapes = Counter(o.shape for o in scene.objects)
    colors = Counter(o.color for o in scene.objects)
    out = [qa("how many objects are there?", len(scene.objects), "count")]
    present = sorted(shapes)
    asked = {present[int(rng.integers(len(present)))], cfg.shapes[int(rng.integers(len(cfg.shapes)))]}
    for shape in sorted(asked):
        out.append(qa(f"how many {plural(shape)} are there?", shapes.get(shape, 0), "count"))
    color = sorted(colors)[int(rng.integers(len(colors)))]
    out.append(qa(f"how many {color} objects are there?", colors[color], "count"))
    return out


def yes_no_questions(
    scene: Scene, rng: np.random.Generator, cfg: ShapesConfig, avoid: frozenset[tuple[str, str]]
) -> list[dict[str, str]]:
    """One "yes" (a present object) and one "no" (an absent pair), never naming a pair in ``avoid``."""
    present = scene.objects[int(rng.integers(len(scene.objects)))]
    out = [qa(f"is there {single_object_caption(present.color, present.shape)}?", "yes", "yes/no")]
    absent = [p for p in cfg.combos if p not in avoid and not scene.has(*p)]
    if absent:
        color, shape = absent[int(rng.integers(len(absent)))]
        out.append(qa(f"is there {single_object_caption(color, shape)}?", "no", "yes/no"))
    return out


def relation_questions(scene: Scene, rng: np.random.Generator, limit: int = 2) -> list[dict[str, str]]:
    """ "what shape is to the left of the blue square?" — only where exactly one object stands in that relation."""
    candidates = []
    for ref in scene.objects:
        for rel in RELATIONS:
            matches = [o for o in scene.objects if o is not ref and rel in relation(o, ref)]
            if len(matches) == 1:
                candidates.append(qa(f"what shape is {rel} the {ref.name}?", matches[0].shape, "relation"))
    if len(candidates) > limit:
        keep = sorted(rng.choice(len(candidates), size=limit, replace=False).tolist())
        candidates = [candidates[i] for i in keep]
    return candidates


def scene_questions(
    scene: Scene, rng: np.random.Generator, cfg: ShapesConfig, avoid: frozenset[tuple[str, str]] = frozenset()
) -> list[dict[str, str]]:
    """All question–answer pairs of a scene (``{question, answer, type}``), each with a unique one-word answer."""
    return (
        attribute_questions(scene)
        + count_questions(scene, rng, cfg)
        + yes_no_questions(scene, rng, cfg, avoid)
        + relation_questions(scene, rng)
    )


# -------------------------------------------------------------------------------------------------------- dataset


def with_world(cfg: ShapesConfig, world: dict[str, Any]) -> ShapesConfig:
    """``cfg`` with the given fields replaced; lists (as YAML writes them) become the tuples the config holds."""
    fields = {f.name for f in dataclasses.fields(ShapesConfig)} - {"seed"}  # ``seed`` is the data set's own
    unknown = sorted(set(world) - fields)
    if unknown:
        raise ValueError(f"unknown shapes option(s) {unknown}; use n, seed or a world field: {sorted(fields)}")
    tup = {k: tuple(tuple(p) if isinstance(p, list) else p for p in v) if isinstance(v, list) else v
           for k, v in world.items()}  # fmt: skip
    return dataclasses.replace(cfg, **tup) if tup else cfg


class ShapesDataset(Dataset):
    """Synthetic shape scenes as ``(PIL RGB image, caption, scene_index)``.

    Args:
        split: "train", "val", "test" (no held-out pair ever appears) or "holdout" (every scene has one).
        n: number of scenes; default 20,000 for train and 1,000 otherwise.
        cfg: the world.
        seed: which scenes; item ``i`` depends only on ``(cfg.seed, seed, split, i)``.
        **world: ``ShapesConfig`` fields that replace those of ``cfg``, so a run config can pick its world through
            ``data.options`` (``{max_objects: 1}``: single-object scenes, as the shapes GAN trains on).
    """

    def __init__(
        self, split: str = "train", n: int | None = None, cfg: ShapesConfig | None = None, seed: int = 0, **world: Any
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"shapes split must be one of {list(SPLITS)}, got {split!r}")
        self.split = split
        self.n = DEFAULT_SIZES[split] if n is None else int(n)
        self.cfg = with_world(cfg or ShapesConfig(), world)
        self.seed = seed
        self.image_size = self.cfg.image_size
        self.channels = 3

    def __len__(self) -> int:
        return self.n

    def rng(self, index: int, stream: int = 0) -> np.random.Generator:
        """The random source of item ``index`` (stream 0: scene and caption, 1: questions)."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} scenes")
        return np.random.default_rng([self.cfg.seed, self.seed, SPLITS.index(self.split), index, stream])

    def scene(self, index: int) -> Scene:
        """The scene of item ``index``."""
        return generate_scene(self.rng(index), self.cfg, holdout=self.split == "holdout")

    def scene_and_caption(self, index: int) -> tuple[Scene, str]:
        """Scene and caption of item ``index`` from one random stream (so both are fixed by the index)."""
        rng = self.rng(index)
        scene = generate_scene(rng, self.cfg, holdout=self.split == "holdout")
        return scene, scene_caption(scene, rng)

    def caption(self, index: int) -> str:
        """The caption of item ``index``."""
        return self.scene_and_caption(index)[1]

    def questions(self, index: int) -> list[dict[str, str]]:
        """Question–answer pairs of item ``index``; outside the holdout split they never name a held-out pair."""
        avoid = frozenset() if self.split == "holdout" else self.cfg.holdout_set
        return scene_questions(self.scene(index), self.rng(index, stream=1), self.cfg, avoid)

    def __getitem__(self, index: int) -> tuple[Image.Image, str, int]:
        scene, caption = self.scene_and_caption(index)
        return render(scene), caption, index

    def __repr__(self) -> str:
        return f"ShapesDataset(split={self.split!r}, n={self.n}, seed={self.seed}, cfg={self.cfg})"
