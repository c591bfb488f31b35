"""Caption metrics against hand-computed values and torchmetrics' BLEU; reading metrics; shapes references."""

import math

import pytest

from vislang.evaluation.caption_metrics import (
    bleu,
    caption_scores,
    cider_d,
    edit_distance,
    reading_scores,
    rouge_l,
    shapes_references,
    tokenize,
)


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
    assert set(s) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert s["BLEU-1"] == pytest.approx(1.0) and s["METEOR"] is None
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
