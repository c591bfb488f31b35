"""The synthetic shapes world: determinism, held-out combinations, captions and question answers."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vislang.data.shapes import (
    QUESTION_TYPES,
    ShapesConfig,
    ShapesDataset,
    generate_scene,
    relation,
    render,
    scene_captions,
    single_object_caption,
)

CFG = ShapesConfig()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def test_items_are_deterministic_by_seed_and_index():
    a, b = ShapesDataset("train", n=50, seed=3), ShapesDataset("train", n=50, seed=3)
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    for (img1, cap1, idx1), (img2, cap2, idx2) in zip(forward, backward):
        assert cap1 == cap2 and idx1 == idx2
        assert np.array_equal(pixels(img1), pixels(img2))
    c = ShapesDataset("train", n=50, seed=4)
    assert any(c.scene(i) != a.scene(i) for i in range(20))
    assert ShapesDataset("val", n=50, seed=3).scene(0) != a.scene(0)
    assert a.questions(7) == b.questions(7)


def test_images_are_rgb_of_configured_size():
    img, caption, index = ShapesDataset("test", n=3)[2]
    assert img.mode == "RGB" and img.size == (64, 64) and index == 2 and caption
    small = ShapesDataset("train", n=2, cfg=ShapesConfig(image_size=32))[0][0]
    assert small.size == (32, 32)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_holdout_pairs_never_appear_outside_holdout_split(split):
    ds = ShapesDataset(split, n=1500 if split == "train" else 300)
    held = CFG.holdout_set
    for i in range(len(ds)):
        assert not any((o.color, o.shape) in held for o in ds.scene(i).objects), (split, i)


def test_every_holdout_scene_contains_a_held_out_pair():
    ds = ShapesDataset("holdout", n=400)
    held = CFG.holdout_set
    sizes = Counter()
    seen_pairs = set()
    for i in range(len(ds)):
        objects = ds.scene(i).objects
        pairs = {(o.color, o.shape) for o in objects}
        assert pairs & held, i
        seen_pairs |= pairs & held
        sizes[len(objects) == 1] += 1
    assert sizes[True] > 50 and sizes[False] > 50  # both single-object and mixed scenes
    assert seen_pairs == held


def test_objects_stay_inside_and_do_not_overlap():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = generate_scene(rng, CFG)
        assert CFG.min_objects <= len(scene.objects) <= CFG.max_objects
        assert len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            assert o.r <= o.x <= CFG.image_size - o.r and o.r <= o.y <= CFG.image_size - o.r
        for a in scene.objects:
            for b in scene.objects:
                if a is not b:
                    assert abs(a.x - b.x) >= a.r + b.r or abs(a.y - b.y) >= a.r + b.r


def test_render_draws_each_object_in_its_colour():
    from vislang.data.shapes import COLOR_RGB

    ds = ShapesDataset("train", n=30)
    for i in range(30):
        scene = ds.scene(i)
        img = pixels(render(scene)).astype(int)
        for o in scene.objects:
            centre = img[int(o.y) - 1 : int(o.y) + 2, int(o.x) - 1 : int(o.x) + 2].reshape(-1, 3).mean(0)
            assert np.abs(centre - np.array(COLOR_RGB[o.color])).max() < 40, (i, o)


def test_captions_mention_every_object():
    ds = ShapesDataset("train", n=200)
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
        scene = ds.scene(i)
        for caption in scene_captions(scene, rng) + [ds.caption(i)]:
            for o in scene.objects:
                assert f"{o.color} {o.shape}" in caption or f"{o.color} {o.size} {o.shape}" in caption, caption


def test_single_object_caption():
    assert single_object_caption("red", "circle") == "a red circle"
    assert single_object_caption("orange", "star") == "an orange star"
    assert single_object_caption("blue", "square", "large") == "a large blue square"


def check_answer(scene, q: dict[str, str]) -> None:
    """Recompute the answer of one question from the scene itself."""
    objs = scene.objects
    text, answer, kind = q["question"], q["answer"], q["type"]
    assert kind in QUESTION_TYPES and answer and " " not in answer, q
    if text == "how many objects are there?":
        assert answer == str(len(objs))
    elif text.startswith("how many") and text.endswith("objects are there?"):
        color = text.split()[2]
        assert answer == str(sum(o.color == color for o in objs))
    elif text.startswith("how many"):
        shape = text.split()[2][:-1]
        assert answer == str(sum(o.shape == shape for o in objs))
    elif text.startswith("what colour is the"):
        shape = text.split()[-1][:-1]
        matches = [o for o in objs if o.shape == shape]
        assert len(matches) == 1 and matches[0].color == answer
    elif text.startswith("what shape is the") and text.endswith("object?"):
        color = text.split()[-2]
        matches = [o for o in objs if o.color == color]
        assert len(matches) == 1 and matches[0].shape == answer
    elif text.startswith("what size is the"):
        color, shape = text[:-1].split()[-2:]
        assert [o.size for o in objs if (o.color, o.shape) == (color, shape)] == [answer]
    elif text.startswith("is there"):
        color, shape = text[:-1].split()[-2:]
        assert answer == ("yes" if scene.has(color, shape) else "no")
    elif kind == "relation":
        rel_text, ref_text = text[len("what shape is ") : -1].rsplit(" the ", 1)
        color, shape = ref_text.split()
        ref = next(o for o in objs if (o.color, o.shape) == (color, shape))
        matches = [o for o in objs if o is not ref and rel_text in relation(o, ref)]
        assert len(matches) == 1 and matches[0].shape == answer
    else:
        raise AssertionError(f"unrecognised question {q}")


@pytest.mark.parametrize("split", ["train", "holdout"])
def test_questions_are_answerable_and_consistent(split):
    ds = ShapesDataset(split, n=300)
    kinds = Counter()
    answers = Counter()
    for i in range(len(ds)):
        scene = ds.scene(i)
        for q in ds.questions(i):
            check_answer(scene, q)
            kinds[q["type"]] += 1
            if q["type"] == "yes/no":
                answers[q["answer"]] += 1
    assert set(kinds) == set(QUESTION_TYPES)
    assert answers["yes"] > 0 and answers["no"] > 0


def test_training_questions_never_name_a_held_out_pair():
    ds = ShapesDataset("train", n=300)
    names = [f"{c} {s}" for c, s in CFG.holdout]
    for i in range(len(ds)):
        for q in ds.questions(i):
            assert not any(name in q["question"] for name in names), q


def test_config_validation():
    with pytest.raises(ValueError, match="unknown"):
        ShapesConfig(colors=("red", "mauve"))
    with pytest.raises(ValueError, match="holdout"):
        ShapesConfig(holdout=(("red", "hexagon"),))
    with pytest.raises(ValueError):
        ShapesDataset("validation")
    cfg = ShapesConfig(shapes=("circle", "square", "triangle", "diamond"), holdout=(("red", "diamond"),))
    assert ShapesDataset("holdout", n=5, cfg=cfg).scene(0).has("red", "diamond")


def test_generation_is_fast():
    ds = ShapesDataset("train", n=1000)
    start = time.perf_counter()
    for i in range(1000):
        ds[i]
    rate = 1000 / (time.perf_counter() - start)
    assert rate > 500, f"{rate:.0f} scenes/s"  # ~2,500-4,000/s on one core; loose bound for busy CI machines
