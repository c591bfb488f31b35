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


def _ink_rows_cols(img) -> tuple[int, int]:
    """Height and width of the text's bounding box (pixels that differ from the corner's background colour)."""
    a = np.asarray(img.convert("L"), dtype=np.int16)
    ink = np.abs(a - a[0, 0]) > 30
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def test_long_words_are_narrowed_before_they_shrink():
    """A 10-letter word keeps taller letters by being condensed horizontally; short words are drawn as they were."""
    from vislang.data.rendered_text import render_text

    plain = dict(noise=0.0, max_rotation=0.0, size_range=(0.45, 0.45))
    squeezed, shrunk = RenderConfig(min_squeeze=0.5, **plain), RenderConfig(min_squeeze=1.0, **plain)
    for seed in range(4):
        h_sq, w_sq = _ink_rows_cols(render_text("curriculum", np.random.default_rng(seed), squeezed))
        h_sh, w_sh = _ink_rows_cols(render_text("curriculum", np.random.default_rng(seed), shrunk))
        assert h_sq >= 1.3 * h_sh and w_sq <= 64  # taller letters, still inside the image
        short = [np.asarray(render_text("cat", np.random.default_rng(seed), c)) for c in (squeezed, shrunk)]
        assert np.array_equal(*short)


def test_random_fraction_mixes_letter_strings_into_training_only():
    words = set(english_words())
    mixed = RenderedText("train", n=200, cfg=RenderConfig(random_fraction=0.3))
    texts = mixed.captions
    random_ones = [t for t in texts if t not in words]
    assert 0.15 < len(random_ones) / len(texts) < 0.45
    assert all(t.isalpha() and t.islower() and 3 <= len(t) <= 10 for t in random_ones)
    assert mixed[5][1] == texts[5]  # the image is drawn from the same text as caption()
    test = RenderedText("test", n=100, cfg=RenderConfig(random_fraction=0.3))
    assert all(t in words and is_heldout_word(t) for t in test.captions)  # the benchmark stays held-out real words
    plain = RenderedText("train", n=50)
    assert plain.captions == RenderedText("train", n=50, cfg=RenderConfig(random_fraction=0.0)).captions
    assert all(t in words for t in plain.captions)


def test_render_text_cli_refuses_a_bad_fraction(tmp_path, capsys):
    from vislang.cli.main import main

    assert main(["render-text", str(tmp_path / "x"), "--n", "2", "--random-fraction", "1.5"]) == 2
    assert "--random-fraction must be in [0, 1)" in capsys.readouterr().err
    assert main(["render-text", str(tmp_path / "y"), "--n", "3", "--random-fraction", "0.5", "--no-progress"]) == 0
    assert len(list((tmp_path / "y").glob("*.png"))) == 3


def test_blank_fraction_adds_pictures_without_text_to_training_only(tmp_path, capsys):
    from vislang.cli.main import main
    from vislang.data.rendered_text import NO_TEXT

    cfg = RenderConfig(random_fraction=0.3, blank_fraction=0.2)
    train = RenderedText("train", n=200, cfg=cfg)
    blanks = [i for i, t in enumerate(train.captions) if t == NO_TEXT]
    assert 0.1 < len(blanks) / 200 < 0.3
    pixels = [np.asarray(train[i][0]) for i in blanks[:12]]
    assert all(p.shape == (64, 64, 3) for p in pixels) and train[blanks[0]][1] == NO_TEXT
    assert len({p.std().round(1) for p in pixels}) > 3  # backgrounds and pictures, not one blank image
    assert NO_TEXT not in RenderedText("test", n=100, cfg=cfg).captions  # the benchmark stays real words
    off = RenderedText("train", n=50, cfg=RenderConfig(random_fraction=0.3))
    assert (
        off.captions == RenderedText("train", n=50, cfg=RenderConfig(random_fraction=0.3, blank_fraction=0.0)).captions
    )
    assert main(["render-text", str(tmp_path / "x"), "--n", "2", "--blank-fraction", "1"]) == 2
    assert "--blank-fraction must be in [0, 1)" in capsys.readouterr().err
