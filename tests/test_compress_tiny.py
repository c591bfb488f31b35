"""Tiny untrained models saved as model directories (shared by the compress and export tests): a dual encoder, a
captioner (CoCa) and a VQA model, all small enough to build, compress and export in seconds."""

from pathlib import Path

from vislang.data import ShapesDataset
from vislang.factory import fit_config_to_tokenizer, save_pretrained
from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
from vislang.tokenizers import Tokenizer

SHAPES = {"data": "shapes", "data_options": {"n": 64}}
TINY_VISION = VisionConfig(arch="cnn", image_size=24, channels=3, width=8, depth=2, mean=(0.5,) * 3, std=(0.5,) * 3)


def _shapes_tokenizer() -> Tokenizer:
    ds = ShapesDataset("train", n=64)
    return Tokenizer.train([ds[i][1] for i in range(len(ds))], vocab_size=200, context_length=32)


def tiny_model_dir(root: Path, seed: int = 0) -> Path:
    import torch

    tok = _shapes_tokenizer()
    cfg = ModelConfig(
        embed_dim=16,
        vision=TINY_VISION,
        text=TextConfig(arch="transformer", context_length=32, width=32, layers=1, heads=4),
    )
    torch.manual_seed(seed)
    model = CLIP(fit_config_to_tokenizer(cfg, tok)).eval()
    return save_pretrained(model, root / "model", tok)


def tiny_captioner_dir(root: Path, seed: int = 0) -> Path:
    """A CoCa: the tiny dual encoder plus a one-block caption decoder."""
    import torch

    from vislang.factory import build_model
    from vislang.models.clip import DecoderConfig

    tok = _shapes_tokenizer()
    cfg = ModelConfig(
        embed_dim=16,
        vision=TINY_VISION,
        text=TextConfig(arch="transformer", context_length=32, width=32, layers=1, heads=4),
        decoder=DecoderConfig(width=32, layers=1, heads=4, bos_id=tok.bos_id, eos_id=tok.eos_id),
    )
    torch.manual_seed(seed)
    model = build_model(fit_config_to_tokenizer(cfg, tok)).eval()
    return save_pretrained(model, root / "captioner", tok)


def tiny_vqa_dir(root: Path, seed: int = 0) -> Path:
    """A VQA answer classifier (CNN + Transformer + cross-attention fusion) on shapes questions."""
    import dataclasses

    import torch

    from vislang.data.vqa import answer_vocab, shapes_vqa
    from vislang.models.fusion import FusionConfig
    from vislang.models.vqa import VQAConfig, VQAModel, save_vqa

    train = shapes_vqa("train", 16, TINY_VISION.image_size)
    answers = answer_vocab(train.answers)
    tok = Tokenizer.train(train.questions, vocab_size=200, kind="wordpiece", context_length=20)
    text = TextConfig(arch="transformer", context_length=20, width=32, layers=1, heads=4, tokenizer="wordpiece")
    cfg = VQAConfig(
        vision=TINY_VISION,
        text=dataclasses.replace(text, vocab_size=tok.vocab_size, pad_id=tok.pad_id),
        fusion=FusionConfig(kind="cross_attention", dim=32, depth=1, heads=4),
        num_answers=len(answers),
        head_hidden=32,
    )
    torch.manual_seed(seed)
    return save_vqa(VQAModel(cfg).eval(), root / "vqa", tok, answers)


def test_tiny_model_dir_is_a_model_directory(tmp_path):
    from vislang.factory import from_pretrained, is_model_dir

    d = tiny_model_dir(tmp_path)
    assert is_model_dir(d) and from_pretrained(d).cfg.text.vocab_size <= 200


def test_tiny_captioner_and_vqa_dirs_load(tmp_path):
    from vislang.factory import from_pretrained
    from vislang.models.captioner import CoCa
    from vislang.models.vqa import load_vqa

    assert isinstance(from_pretrained(tiny_captioner_dir(tmp_path)), CoCa)
    model, _, answers = load_vqa(tiny_vqa_dir(tmp_path))
    assert model.cfg.num_answers == len(answers) > 1
