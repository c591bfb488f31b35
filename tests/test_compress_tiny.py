"""A tiny untrained dual encoder saved as a model directory (shared by the compress and export tests)."""

from pathlib import Path

from vislang.data import ShapesDataset
from vislang.factory import fit_config_to_tokenizer, save_pretrained
from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
from vislang.tokenizers import Tokenizer

SHAPES = {"data": "shapes", "data_options": {"n": 64}}


def tiny_model_dir(root: Path, seed: int = 0) -> Path:
    import torch

    ds = ShapesDataset("train", n=64)
    tok = Tokenizer.train([ds[i][1] for i in range(len(ds))], vocab_size=200, context_length=32)
    cfg = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(arch="cnn", image_size=24, channels=3, width=8, depth=2, mean=(0.5,) * 3, std=(0.5,) * 3),
        text=TextConfig(arch="transformer", context_length=32, width=32, layers=1, heads=4),
    )
    torch.manual_seed(seed)
    model = CLIP(fit_config_to_tokenizer(cfg, tok)).eval()
    return save_pretrained(model, root / "model", tok)


def test_tiny_model_dir_is_a_model_directory(tmp_path):
    from vislang.factory import from_pretrained, is_model_dir

    d = tiny_model_dir(tmp_path)
    assert is_model_dir(d) and from_pretrained(d).cfg.text.vocab_size <= 200
