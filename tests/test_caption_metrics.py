"""Caption metrics against hand-computed values, torchmetrics' BLEU and pycocoevalcap itself (BLEU, CIDEr, ROUGE-L,
METEOR through its Java jar, PTB tokenisation); reading metrics; shapes references; the nearest-neighbour baseline."""

import importlib.util
import math
import shutil

import pytest
import torch

import vislang.evaluation.caption_metrics as cm
from vislang.evaluation.caption_metrics import (
    bleu,
    caption_scores,
    cider_d,
    edit_distance,
    markdown_table,
    meteor,
    meteor_unavailable,
    nearest_neighbour_captions,
    reading_scores,
    rouge_l,
    shapes_references,
    tokenize,
)

HAVE_COCO = importlib.util.find_spec("pycocoevalcap") is not None
HAVE_JAVA = shutil.which("java") is not None
needs_coco = pytest.mark.skipif(not HAVE_COCO, reason="pycocoevalcap not installed (pip install pycocoevalcap)")
needs_java = pytest.mark.skipif(not (HAVE_COCO and HAVE_JAVA), reason="pycocoevalcap's jars need pycocoevalcap + java")

CANDS = ["a red circle and a blue square", "two objects: a small green star", "a yellow triangle above a circle",
         "a big purple square", "a green star"]  # fmt: skip
REFS = [
    ["a red circle and a blue square", "a small red circle and a large blue square"],
    ["two objects: a small green star and a red circle", "a green star"],
    ["a yellow triangle above a red circle", "a triangle"],
    ["a large purple square", "one object: a purple square", "a purple square on a light background"],
    ["a small blue circle", "a blue circle"],
]


def test_bleu_matches_a_hand_computed_example():
    # candidate "the cat sat on the mat" (6 words) vs reference "the cat is on the mat" (6 words)
    # 1-grams: the, cat, sat, on, the, mat -> matches the x2, cat, on, mat = 5/6
    # 2-grams: the cat, cat sat, sat on, on the, the mat -> matches the cat, on the, the mat = 3/5
    # 3-grams: the cat sat, cat sat on, sat on the, on the mat -> on the mat = 1/4
    # 4-grams: 3 of them, none match -> 0/3 (BLEU-4 ~ 0), brevity 1 (same length)
    b = bleu(["The cat sat on the mat."], [["the cat is on the mat"]])
    assert b[0] == pytest.approx(5 / 6, abs=1e-6)
    assert b[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert b[2] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)
    assert b[3] < 1e-3


def test_bleu_brevity_and_clipping_by_hand():
    # "the the the" vs "the cat": clipped unigram precision 1/3; closest ref length 2 > ... candidate 3 >= 2: no penalty
    assert bleu(["the the the"], [["the cat"]], max_n=1)[0] == pytest.approx(1 / 3, abs=1e-6)
    # "the cat" vs "the cat sat down": precision 1, brevity exp(1 - 4/2) = e^-1
    assert bleu(["the cat"], [["the cat sat down"]], max_n=1)[0] == pytest.approx(math.exp(-1), abs=1e-6)
    # the closest reference length is used: refs of 2 and 5 words, candidate of 2 -> no penalty
    assert bleu(["the cat"], [["a cat sat on it", "the cat"]], max_n=2)[1] == pytest.approx(1.0, abs=1e-6)


def test_bleu_agrees_with_torchmetrics():
    torchmetrics = pytest.importorskip("torchmetrics.text")
    cands = ["a red circle and a blue square", "two objects: a small green star", "a yellow triangle above a circle"]
    refs = [
        ["a red circle and a blue square", "a small red circle and a large blue square"],
        ["two objects: a small green star and a red circle", "a green star"],
        ["a yellow triangle above a red circle", "a triangle"],
    ]
    ours = bleu(cands, refs)
    for n in (1, 2, 3, 4):
        theirs = torchmetrics.BLEUScore(n_gram=n)([" ".join(tokenize(c)) for c in cands],
                                                  [[" ".join(tokenize(r)) for r in rs] for rs in refs])  # fmt: skip
        assert ours[n - 1] == pytest.approx(float(theirs), abs=1e-5), n


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5 -> P = R = 5/6 -> F = 5/6
    assert rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(5 / 6)
    # candidate 2 words, reference 4: LCS 2 -> P 1, R 0.5; F = (1 + 1.44) * 0.5 / (0.5 + 1.44) = 0.6289...
    assert rouge_l(["a cat"], [["a big fat cat"]]) == pytest.approx(2.44 * 0.5 / 1.94)
    assert rouge_l(["dog"], [["a cat"]]) == 0.0


def test_cider_rewards_the_right_caption_and_scales_by_ten():
    refs = [["a red circle", "one red circle"], ["a blue square", "one blue square"], ["a green star", "a star"]]
    perfect = cider_d(["a red circle", "a blue square", "a green star"], refs)
    wrong = cider_d(["a blue square", "a green star", "a red circle"], refs)
    assert perfect > 1.5 and wrong < 0.5 * perfect
    # one image: every n-gram has document frequency 1 = the number of images, so idf is 0 and CIDEr is 0 (as COCO)
    assert cider_d(["a red circle"], [["a red circle"]]) == 0.0


def test_cider_hand_computed_two_images():
    # two images, one reference each; candidate = reference for image 0 and disjoint words for image 1.
    # Image 0: ngrams of "red circle" appear only in image 0's refs -> idf log(2) each; the cosine is 1 for n = 1, 2
    # and 0 for n = 3, 4 (no such n-grams): mean over n = 0.5, x10 = 5.0; image 1 scores 0; corpus mean 2.5.
    score = cider_d(["red circle", "green star"], [["red circle"], ["blue square"]])
    assert score == pytest.approx(2.5)


def test_caption_scores_keys_and_bad_input():
    s = caption_scores(["a red circle"], [["a red circle"]], with_meteor=False)
    assert set(s) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}  # METEOR left out, not None or 0
    assert s["BLEU-1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reference lists"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="list of strings"):
        bleu(["a"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        bleu([], [])


def test_reading_scores():
    assert edit_distance("kitten", "sitting") == 3
    s = reading_scores(["Hello", "wrld", "ok "], ["hello", "world", "ok"])
    assert s["exact_match"] == pytest.approx(2 / 3)
    assert s["cer"] == pytest.approx(1 / 12)
    with pytest.raises(ValueError, match="as many"):
        reading_scores(["a"], [])


def test_shapes_references_include_the_training_caption():
    from vislang.data.shapes import ShapesDataset

    ds = ShapesDataset("val", n=20)
    refs = shapes_references(ds)
    assert all(ds.caption(i) in refs[i] and len(refs[i]) >= 3 for i in range(20))


def _coco(cands, refs):
    """pycocoevalcap's input: {id: [tokenised caption]} for results, {id: [tokenised refs]} for ground truth."""
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(tokenize(c))] for i, c in enumerate(cands)}
    return gts, res


@needs_coco
def test_bleu_cider_rouge_agree_with_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco(CANDS, REFS)
    theirs, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert bleu(CANDS, REFS) == pytest.approx(theirs, abs=1e-9)
    assert cider_d(CANDS, REFS) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    assert rouge_l(CANDS, REFS) == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert cider_d(CANDS, REFS) > 0.5  # a non-trivial value, not two zeros agreeing


@pytest.mark.slow  # the jar loads a 60 MB paraphrase table: ~11 s on an idle machine, ~50 s on a busy one
@needs_java
def test_meteor_runs_offline_through_the_jar():
    """The wheel ships meteor-1.5.jar and its paraphrase table: this runs without a network (value from the jar)."""
    assert meteor_unavailable() is None
    refs = [["a red circle and a blue square", "a small red circle"], ["a green star"]]
    score = meteor(["a red circle and a square", "a green star"], refs)
    assert score == pytest.approx(0.4901, abs=1e-3)
    s = caption_scores(CANDS, REFS)  # the same Java process again: no second start-up
    assert 0 < s["METEOR"] < 1 and meteor(CANDS[:1], REFS[:1]) > meteor(CANDS[1:2], REFS[:1])


def test_meteor_is_omitted_with_a_note_without_java(monkeypatch):
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    assert meteor(["a red circle"], [["a red circle"]]) is None
    assert "java" in meteor_unavailable() and "METEOR omitted" in meteor_unavailable()
    assert "METEOR" not in caption_scores(["a red circle"], [["a red circle"]])


def test_meteor_is_omitted_when_the_java_process_fails(monkeypatch):
    class Broken:  # what a crashed jar looks like: it answers an empty line, float('') fails
        def compute_score(self, gts, res):
            raise ValueError("could not convert string to float: ''")

    monkeypatch.setattr(cm.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(cm.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(cm._METEOR, "scorer", Broken())
    monkeypatch.setattr(cm._METEOR, "failure", None)
    assert meteor(["a"], [["a"]]) is None
    assert "Java process failed" in meteor_unavailable()
    assert meteor(["a"], [["a"]]) is None  # remembered: no retry per call


@needs_java
def test_our_tokenizer_matches_ptb_on_shapes_and_rendered_text():
    """COCO tokenises with Stanford's PTB tokenizer (Java); ours gives the same tokens on this project's captions."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from vislang.data.rendered_text import RenderedText
    from vislang.data.shapes import ShapesDataset

    texts = [r for rs in shapes_references(ShapesDataset("holdout", n=40)) for r in rs]
    texts += RenderedText("test", n=40).captions + CANDS
    ptb = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [ptb[i][0] for i in range(len(texts))] == [" ".join(tokenize(t)) for t in texts]


def test_markdown_table_has_a_row_per_subset_and_method():
    subsets = {
        "test": {"images": 10, "methods": {"greedy": {"BLEU-4": 0.5, "CIDEr": 1.25}, "nn_baseline": {"BLEU-4": 0.25}}},
        "holdout": {"images": 4, "methods": {"greedy": {"BLEU-4": 0.125, "CIDEr": 0.5}}},
    }
    md = markdown_table(subsets, ["METEOR omitted: no java"]).splitlines()
    assert md[0] == "| subset | images | method | BLEU-4 | CIDEr |"
    assert md[2] == "| test | 10 | greedy | 0.5000 | 1.2500 |" and md[3] == "| test | 10 | nn_baseline | 0.2500 |  |"
    assert md[4].startswith("| holdout | 4 | greedy |") and md[-1] == "METEOR omitted: no java"


class PixelEmbedder(torch.nn.Module):
    """encode_image = the flattened pixels: the nearest neighbour of an image is its exact copy."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.cfg = type("Cfg", (), {"vision": type("V", (), {"mean": (0.5,), "std": (0.5,)})()})()

    def encode_image(self, x, normalize=True):
        z = x.flatten(1) * self.w
        return torch.nn.functional.normalize(z, dim=-1) if normalize else z


def test_nearest_neighbour_baseline_takes_the_most_similar_training_caption():
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=g)
    caps = [f"caption {i}" for i in range(6)]
    order = [4, 0, 5]
    test = train[order].clone()
    test[0, 0, 0, 0] ^= 1  # near copies still find their original
    borrowed, idx = nearest_neighbour_captions(PixelEmbedder(), train, caps, test)
    assert idx.tolist() == order and borrowed == ["caption 4", "caption 0", "caption 5"]
    assert caption_scores(borrowed, [[c] for c in borrowed], with_meteor=False)["BLEU-1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="training images but"):
        nearest_neighbour_captions(PixelEmbedder(), train, caps[:2], test)
