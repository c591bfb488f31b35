"""Rendered-text data: the test split reads words never seen in training."""

from __future__ import annotations

import numpy as np

from vislang.data.rendered_text import RenderConfig, RenderedText, english_words, is_heldout_word, split_vocabulary


def test_word_list_is_packaged_and_clean():
    words = english_words()
    assert len(words) == 8000
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 10 for w in words)


def test_test_split_words_are_never_in_training():
    cfg = RenderConfig()
    train = set(split_vocabulary(tuple(cfg.vocabulary), "train", cfg.heldout_fraction))
    val = set(split_vocabulary(tuple(cfg.vocabulary), "val", cfg.heldout_fraction))
    test = set(split_vocabulary(tuple(cfg.vocabulary), "test", cfg.heldout_fraction))
    assert train == val and not train & test
    assert 0.07 < len(test) / len(cfg.vocabulary) < 0.13  # about a tenth
    seen = {RenderedText("train", n=300).caption(i) for i in range(300)}
    held = [RenderedText("test", n=100).caption(i) for i in range(100)]
    assert all(is_heldout_word(w) for w in held) and not seen & set(held)


def test_items_are_deterministic_and_caption_matches_image_text():
    ds = RenderedText("test", n=5)
    img, text, _ = ds[3]
    img2, text2, _ = RenderedText("test", n=5)[3]
    assert text == text2 == ds.caption(3)
    assert np.array_equal(np.asarray(img), np.asarray(img2)) and img.size == (64, 64)


def test_heldout_fraction_zero_shares_every_word():
    cfg = RenderConfig(heldout_fraction=0.0, vocabulary=("alpha", "beta"))
    assert split_vocabulary(cfg.vocabulary, "test", 0.0) == ("alpha", "beta")
