"""Reading Chinese: the renderer and its splits (no held-out word or font in training), CC-CEDICT parsing,
segmentation and lookup, the reader's answers (confidence, no text, truncation) and bad input to `vislang read`."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vislang.data.cedict import Dictionary, Entry, hsk_words, load_dictionary, numbered_to_marks, parse_line
from vislang.data.rendered_zh import (
    NO_TEXT,
    RenderedChinese,
    ZhRenderConfig,
    cjk_faces,
    contains_any,
    render_chinese,
    split_faces,
)
from vislang.models.reading import ImageInputError, Reader, Reading, open_checked, tidy, translate

CEDICT_LINES = """# a comment
傳統 传统 [chuan2 tong3] /tradition/traditional/convention/
出口 出口 [chu1 kou3] /an exit/to export/
出 出 [chu1] /to go out/
口 口 [kou3] /mouth/
長 长 [chang2] /long/
長 长 [zhang3] /chief/to grow/
長城 长城 [Chang2 cheng2] /the Great Wall/
水 水 [Shui3] /surname Shui/
水 水 [shui3] /water/river/
"""

needs_fonts = pytest.mark.skipif(not Path("/usr/share/fonts/truetype/wqy").is_dir(), reason="CJK fonts missing")


# ------------------------------------------------------------------------------------------------ dictionary
@pytest.fixture(scope="module")
def small_dict() -> Dictionary:
    return Dictionary([e for e in map(parse_line, CEDICT_LINES.splitlines()) if e is not None])


def test_parse_line_keeps_both_scripts_reading_and_every_sense():
    e = parse_line("傳統 传统 [chuan2 tong3] /tradition/traditional/convention/")
    assert e == Entry("傳統", "传统", "chuan2 tong3", ("tradition", "traditional", "convention"))
    assert e.pinyin_marks == "chuán tǒng"
    assert parse_line("# comment") is None and parse_line("") is None
    with pytest.raises(ValueError, match="not a CC-CEDICT line"):
        parse_line("no brackets here")


def test_pinyin_tone_marks_follow_the_placement_rules():
    assert numbered_to_marks("ni3 hao3") == "nǐ hǎo"
    assert numbered_to_marks("xiu1 gou3 lu:4 Bei3 jing1 de5") == "xiū gǒu lǜ Běi jīng de"
    assert numbered_to_marks("hui4 liu2") == "huì liú"  # the last vowel of "ui" / "iu"


def test_longest_match_segmentation_over_simplified_and_traditional(small_dict):
    assert small_dict.segment("出口") == ["出口"]  # the longest headword, not 出 + 口
    assert small_dict.segment("长城出口") == ["长城", "出口"]
    assert small_dict.segment("長城") == ["長城"]  # traditional headwords are indexed too
    assert small_dict.segment("出X口") == ["出", "X", "口"]  # an unknown character stands alone
    assert small_dict.segment("出 口") == ["出", "口"]  # spaces separate


def test_lookup_keeps_every_reading_and_sense_and_translate_shows_the_first(small_dict):
    entries = small_dict.lookup("长")
    assert [e.pinyin for e in entries] == ["chang2", "zhang3"]
    assert entries[1].senses == ("chief", "to grow")
    words = small_dict.translate("长城")
    assert words[0]["english"] == "the Great Wall" and words[0]["pinyin"] == "Cháng chéng"
    first = small_dict.translate("长")[0]
    assert first["english"] == "long" and [s for e in first["entries"] for s in e["senses"]] == [
        "long", "chief", "to grow"]  # fmt: skip
    assert small_dict.translate("X")[0]["english"] is None
    assert small_dict.gloss("长城出口X") == "the Great Wall; an exit"  # what `translate` shows: first senses
    water = small_dict.translate("水")[0]  # the common word before the surname the file lists first
    assert water["english"] == "water" and [e["pinyin"] for e in water["entries"]] == ["shuǐ", "Shuǐ"]
    assert small_dict.lookup("水")[0].senses == ("surname Shui",)  # lookup keeps file order


def test_the_packaged_cedict_and_hsk_lists():
    d = load_dictionary()
    assert len(d) > 100_000
    assert d.segment("我喜欢喝中國茶") == ["我", "喜欢", "喝", "中國", "茶"]
    exit_ = translate("出口")
    assert exit_["pinyin"] == "chū kǒu" and exit_["english"] == d.lookup("出口")[0].senses[0]
    assert "to export" in exit_["words"][0]["entries"][0]["senses"]
    assert len(hsk_words((1,))) == 150 and hsk_words((1,))[0] == "爱"


# ------------------------------------------------------------------------------------------------ renderer
@needs_fonts
def test_items_are_repeatable_and_vary():
    ds = RenderedChinese("train", n=12)
    a, b = ds[3], RenderedChinese("train", n=12)[3]
    assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert ds.caption(3) == a[1]
    assert a[0].size == (64, 64) and a[0].mode == "RGB"
    assert len({ds.caption(i) for i in range(12)}) > 6


@needs_fonts
def test_vertical_text_runs_down_and_horizontal_runs_across():
    ink = {}
    for vertical in (0.0, 1.0):
        cfg = ZhRenderConfig(vertical_fraction=vertical, max_rotation=0, noise=0, clipart_fraction=0, blur_fraction=0,
                             jpeg_fraction=0, min_contrast=200)  # fmt: skip
        img = np.asarray(render_chinese("中文字", np.random.default_rng(0), cjk_faces()[:1], cfg).convert("L"))
        mask = np.abs(img.astype(int) - int(np.median(img))) > 60  # text pixels differ from the background
        ys, xs = np.nonzero(mask)
        ink[vertical] = (xs.max() - xs.min(), ys.max() - ys.min())
    assert ink[0.0][0] > 1.5 * ink[0.0][1]  # wide
    assert ink[1.0][1] > 1.5 * ink[1.0][0]  # tall


@needs_fonts
def test_no_text_items_show_only_background():
    cfg = ZhRenderConfig(noise=0, clipart_fraction=0, jpeg_fraction=0)
    img = np.asarray(render_chinese(NO_TEXT, np.random.default_rng(1), cjk_faces(), cfg))
    assert img.reshape(-1, 3).std(0).max() < 1.0  # one flat colour
    captions = RenderedChinese("train", n=400).captions
    assert 0 < captions.count(NO_TEXT) < 40


@needs_fonts
def test_some_no_text_items_show_a_picture_and_training_is_mostly_random_strings():
    """A reader trained on bare backgrounds alone invents characters for any drawing: some ∅ items carry one."""
    cfg = ZhRenderConfig(noise=0, clipart_fraction=0, jpeg_fraction=0, blur_fraction=0)
    pic = np.asarray(render_chinese(NO_TEXT, np.random.default_rng(1), cjk_faces(), cfg, picture=True))
    assert pic.reshape(-1, 3).std(0).max() > 10  # something is drawn on the flat background
    ds = RenderedChinese("train", n=1500)
    blank = [i for i in range(len(ds)) if ds.caption(i) == NO_TEXT]
    spread = [np.asarray(ds[i][0].convert("L"), dtype=float).std() for i in blank]
    drawn = sum(s > 20 for s in spread)  # noise alone (8 grey levels) stays far below 20
    assert 0.3 * len(blank) < drawn < 0.9 * len(blank)  # picture_fraction 0.6 of the no-text items
    known = set(ds.words)
    words = sum(len(c) > 1 and c in known for c in ds.captions)  # 1-character strings are often words; longer, rarely
    assert 0 < words < 0.06 * len(ds)  # random_fraction 0.4 gave 28% here: the decoder learnt the word list
    none = ZhRenderConfig(picture_fraction=0.0, noise=0, clipart_fraction=0, jpeg_fraction=0, blur_fraction=0)
    bare = RenderedChinese("train", n=1500, cfg=none)
    assert all(np.asarray(bare[i][0]).reshape(-1, 3).std(0).max() < 1.0 for i in blank[:10])


@needs_fonts
def test_gloss_captions_are_the_english_translate_shows_on_the_same_images(tmp_path, capsys):
    from vislang.cli.main import main

    words = ZhRenderConfig(caption="text", random_fraction=0.0)
    gloss = RenderedChinese("train", n=40, cfg=dataclasses.replace(words, caption="gloss"))
    text = RenderedChinese("train", n=40, cfg=words)
    for i in range(40):
        (img_g, cap_g, _), (img_t, cap_t, _) = gloss[i], text[i]
        assert np.array_equal(np.asarray(img_g), np.asarray(img_t))  # same picture, another caption
        assert cap_g == (cap_t if cap_t == NO_TEXT else translate(cap_t)["english"]) == gloss.caption(i)
    assert any(c.isascii() and c != cap for c, cap in zip(gloss.captions, text.captions))
    with pytest.raises(ValueError, match="random_fraction=0"):
        RenderedChinese("train", n=4, cfg=ZhRenderConfig(caption="gloss"))
    assert main(["render-text", str(tmp_path / "x"), "--lang", "en", "--caption", "gloss", "--n", "2"]) == 2
    assert "--caption gloss is for --lang zh" in capsys.readouterr().err


@needs_fonts
def test_random_string_lengths_follow_the_weights():
    ds = RenderedChinese("train", n=300, cfg=ZhRenderConfig(length_weights=(0, 1, 0, 0), random_fraction=0.95))
    lengths = [len(c) for c in ds.captions if c != NO_TEXT and c not in set(ds.words)]
    assert len(lengths) > 200 and set(lengths) == {2}
    with pytest.raises(ValueError, match="length_weights needs 4"):
        RenderedChinese("train", n=4, cfg=ZhRenderConfig(length_weights=(1, 1)))


@needs_fonts
def test_no_held_out_word_reaches_training_and_every_character_does():
    train, test = RenderedChinese("train", n=3000), RenderedChinese("test", n=50)
    heldout = frozenset(test.words)
    assert len(heldout) > 100 and not heldout & set(train.words)
    assert all(len(w) > 1 and set(w) <= set(train.characters) for w in heldout)
    captions = train.captions + RenderedChinese("val", n=500).captions
    assert not any(contains_any(c, heldout, 4) for c in captions)
    assert set(test.captions) <= heldout
    assert contains_any("你大不了", frozenset({"不了"}), 4)  # the check itself can fail


@needs_fonts
def test_the_held_out_font_family_is_never_a_training_font():
    held = ZhRenderConfig().heldout_font
    train_families = {f.family for f in split_faces("train", held)} | {f.family for f in split_faces("val", held)}
    assert held not in train_families and len(train_families) >= 2
    assert {f.family for f in split_faces("test-font", held)} == {held}
    assert RenderedChinese("test-font", n=5).faces == split_faces("test-font", held)
    with pytest.raises(ValueError, match="not installed"):
        split_faces("train", "Comic Sans CJK")


# ------------------------------------------------------------------------------------------------ reader
def make_tiny_reader(root: Path, context_length: int = 6) -> Path:
    """An untrained tiny reader (grid tower, char tokenizer over a few Chinese words), saved as `train` saves one."""
    from vislang.factory import build_model, fit_config_to_tokenizer, save_pretrained
    from vislang.models import ModelConfig, TextConfig, VisionConfig
    from vislang.models.clip import DecoderConfig
    from vislang.tokenizers import Tokenizer

    torch.manual_seed(0)
    tokenizer = Tokenizer.train(["出口", "你好", "中文", NO_TEXT], kind="char", context_length=context_length)
    cfg = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(arch="cnn-grid", image_size=16, channels=1, width=4, depth=3, context_layers=1),
        text=TextConfig(
            arch="transformer", context_length=context_length, width=16, layers=1, heads=2, tokenizer="char"
        ),  # fmt: skip
        decoder=DecoderConfig(width=16, layers=1, heads=2),
    )
    return save_pretrained(build_model(fit_config_to_tokenizer(cfg, tokenizer)).eval(), root / "reader", tokenizer)


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory) -> Path:
    return make_tiny_reader(tmp_path_factory.mktemp("reader"))


def test_confidence_is_the_probability_of_the_reading(reader_dir):
    reader = Reader(reader_dir, min_confidence=0.0)
    img = Image.new("RGB", (40, 20), "white")
    x = reader.tensors([img])
    ids = reader.model.generate(x, max_length=reader.max_length)
    prob = float(reader._sequence_probability(x, ids)[0])
    # the same number by hand: step through the decoder, multiply the chosen tokens' probabilities
    state, prefix, expect = (
        reader.model.start_decoding(x, use_cache=False),
        torch.tensor([[reader.tokenizer.bos_id]]),
        1.0,
    )
    for tok in ids[0].tolist():
        p = reader.model.next_logits(state, prefix).softmax(-1)[0, tok].item()
        expect *= p
        if tok == reader.tokenizer.eos_id:
            break
        prefix = torch.cat([prefix, torch.tensor([[tok]])], 1)
    assert prob == pytest.approx(expect, rel=1e-4)


def test_judging_a_reading(reader_dir):
    reader = Reader(reader_dir, min_confidence=0.3)
    assert reader._judge(NO_TEXT, 0.9, True) == Reading("", 0.9, False, note="no text found (confidence 0.90)")
    low = reader._judge("你好", 0.1, True)
    assert not low.has_text and low.text == "" and "no legible text" in low.note
    cut = reader._judge("你好中文", 0.8, False)
    assert cut.has_text and cut.truncated and "longer than the model's context" in cut.note
    assert reader._judge("你 好", 0.8, True) == Reading("你好", 0.8, True)
    assert tidy("hello  world") == "hello world"


def test_an_untrained_reader_does_not_invent_words(reader_dir):
    """A model that knows nothing gives its reading a tiny probability: the answer is "no text", not characters."""
    out = Reader(reader_dir).read([Image.new("RGB", (64, 64), (200, 180, 40))])[0]
    assert not out.has_text and out.text == "" and 0 <= out.confidence <= 1 and out.note


def test_bad_images_are_refused_before_decoding(tmp_path):
    from test_serve import png_header_only

    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageInputError, match="not a readable image"):
        open_checked(tmp_path / "notes.png")
    with pytest.raises(ImageInputError, match="over the 16.8 Mpx limit"):
        open_checked(png_header_only(5_000, 5_000))
    with pytest.raises(ImageInputError, match="over the 16.8 Mpx limit"):
        open_checked(png_header_only(100_000, 100_000))  # so large that PIL itself refuses it
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_checked(tmp_path / "missing.png")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    assert open_checked(buf.getvalue()).size == (8, 8)


def test_read_and_translate_commands(reader_dir, tmp_path, capsys):
    from test_serve import png_header_only
    from vislang.cli.main import main

    good = tmp_path / "sign.png"
    Image.new("RGB", (64, 32), "white").save(good)
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "huge.png").write_bytes(png_header_only(5_000, 5_000))
    assert main(["read", str(good), "--model", str(reader_dir)]) == 0
    assert capsys.readouterr().out.strip().startswith("[no ")  # untrained: says so, invents nothing
    rc = main(["translate", str(good), str(tmp_path / "bad.png"), str(tmp_path / "huge.png"),
               "--model", str(reader_dir), "--json", "--min-confidence", "0"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 1 and "bad.png is not a readable image" in out.err and "huge.png is 5000x5000" in out.err
    rows = json.loads(out.out)
    assert [Path(row["image"]).name for row in rows] == ["sign.png"]
    assert {"text", "confidence", "has_text", "truncated", "note"} <= set(rows[0])
    with pytest.raises(SystemExit):
        main(["read", "--help"])
    assert "Examples:" in capsys.readouterr().out


@needs_fonts
def test_the_tesseract_benchmark_runs(reader_dir, tmp_path):
    pytest.importorskip("pytesseract")
    import shutil

    if shutil.which("tesseract") is None:
        pytest.skip("tesseract is not installed (apt-get install tesseract-ocr tesseract-ocr-chi-sim)")
    from test_benchmarks import load_benchmark

    res = load_benchmark("read_vs_tesseract").main(["--model", str(reader_dir), "--smoke", "--json",
                                                    str(tmp_path / "r.json")])  # fmt: skip
    for split in ("test", "test-font"):
        row = res["splits"][split]
        assert set(row) == {"vislang", "tesseract", "samples"}
        assert all(0 <= row[w]["exact_match"] <= 1 and row[w]["images_per_s"] > 0 for w in ("vislang", "tesseract"))
    assert json.loads((tmp_path / "r.json").read_text())["lang"] == "zh"


def test_translation_is_right_only_with_one_of_the_words_senses():
    from vislang.evaluation.reading import translation_correct

    assert translation_correct("出口", "出口")  # first sense "an exit" is one of 出口's senses
    assert not translation_correct("出", "出口") and not translation_correct("", "出口")


def test_an_end_to_end_gloss_is_scored_up_to_case_and_bracket_spacing():
    from vislang.evaluation.reading import gloss_correct

    # what a lower-casing word tokenizer writes for 公司's first sense "(business) company", and 北京's "Peking"
    assert gloss_correct("( business ) company", "公司") and gloss_correct("peking", "北京")
    assert not gloss_correct("business company", "公司") and not gloss_correct("( business )", "公司")


@needs_fonts
def test_read_eval_scores_every_split(reader_dir, capsys):
    from vislang.cli.main import main
    from vislang.evaluation.reading import evaluate_reader

    assert main(["read-eval", "--model", str(reader_dir), "--lang", "zh", "--n", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["splits"]) == {"test", "test-font"}
    test = res["splits"]["test"]
    assert test["n"] == 3 and test["exact_match"] == 0.0 and test["cer"] > 0  # untrained: reads nothing
    assert 0.5 <= test["translation_if_read_right"] <= 1.0 and test["translation"] == 0.0
    gloss = evaluate_reader(str(reader_dir), "zh", n=3, splits=["test-font"], gloss=True)["splits"]["test-font"]
    assert gloss["translation"] == 0.0 and gloss["samples"][0]["truth"].isascii()  # scored against English
    no_text = res["no_text"]  # pictures without text: an untrained reader's readings fall under the 0.3 confidence
    assert no_text["n"] == 3 and no_text["answered_no_text"] == 1.0 and no_text["invented"] == []


@needs_fonts
def test_rendered_zh_is_a_named_source():
    from vislang.data.sources import open_dataset

    ds = open_dataset("rendered-zh", split="test-font", n=4)
    assert isinstance(ds, RenderedChinese) and ds.split == "test-font" and len(ds) == 4
    img, text, i = ds[2]
    assert img.size == (64, 64) and text == ds.caption(2) and i == 2
