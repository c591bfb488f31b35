"""ImageClassifier: shapes, preprocessing, freezing, save/load through vislang.from_pretrained."""

import json

import pytest
import torch

import vislang
from vislang.models.classifier import ClassifierConfig, ImageClassifier
from vislang.models.towers import VisionConfig

NAMES = ("a", "b", "c")


def _cfg(hidden=0, **vision):
    v = VisionConfig(arch="cnn", image_size=12, channels=1, width=4, depth=2, mean=(0.3,), std=(0.4,), **vision)
    return ClassifierConfig(vision=v, class_names=NAMES, hidden=hidden)


@pytest.mark.parametrize("hidden", [0, 6])
def test_forward_features_and_backward(hidden):
    torch.manual_seed(0)
    model = ImageClassifier(_cfg(hidden))
    x = torch.randn(5, 1, 12, 12)
    logits = model(x)
    assert logits.shape == (5, 3)
    feats = model.features(x)
    assert feats.shape == (5, model.num_features) and model.num_features == (hidden or 8)
    model.eval()
    assert torch.allclose(model.forward_head(model.features(x)), model(x), atol=1e-6)
    model.train()
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.class_names == list(NAMES)


def test_preprocess_uses_config_mean_std():
    model = ImageClassifier(_cfg())
    u8 = torch.full((2, 1, 12, 12), 255, dtype=torch.uint8)
    x = model.preprocess(u8)
    assert x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (1.0 - 0.3) / 0.4))
    probs = model.classify(u8)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert model.training  # classify restores the mode


def test_lock_tower_freezes_batchnorm_statistics():
    model = ImageClassifier(_cfg())
    model.lock_tower()
    model.train()
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    model(torch.randn(4, 1, 12, 12) * 3 + 1)
    after = model.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]


def test_save_and_load_via_vislang_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(_cfg(hidden=6)).eval()
    model.save_pretrained(tmp_path / "clf", extra={"metrics": {"top1": 0.5}})
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert meta["model_type"] == "vislang-classifier" and meta["class_names"] == list(NAMES)
    loaded = vislang.from_pretrained(tmp_path / "clf")
    assert isinstance(loaded, ImageClassifier) and not loaded.training
    x = torch.randn(3, 1, 12, 12)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert loaded.class_names == list(NAMES)
    model.save_pretrained(tmp_path / "clf")  # overwriting swaps atomically and leaves no temp folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]


def test_clip_directories_still_load(tmp_path, tiny_model_cfg):
    clip = vislang.create_model(tiny_model_cfg)
    clip.save_pretrained(tmp_path / "clip")
    assert type(vislang.from_pretrained(tmp_path / "clip")) is vislang.CLIP
    with pytest.raises(ValueError, match="not an image classifier"):
        ImageClassifier.from_pretrained(tmp_path / "clip")


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least two class names"):
        ImageClassifier(ClassifierConfig(class_names=("only",)))
    with pytest.raises(FileNotFoundError, match="not a classifier directory"):
        ImageClassifier.from_pretrained("/nonexistent/dir")
