"""The caption memory (``model.memory``, LiT) and the caption-disjoint held-back split (``lit.val_by: caption``).

Asserted on tiny random towers (seconds): the held-back captions never occur among the kept pairs; a model with a
memory embeds into ``embed_dim`` unit vectors whose dot product is ``(1 - weight)`` x the trained cosine + ``weight``
x the memory cosine, computed here from the stored pairs by hand; a LiT run fills the memory with its kept pairs
only, and the saved model (``vislang.load``) embeds as the run evaluated; bad settings fail with the fix named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
from vislang.models.clip import MemoryConfig
from vislang.train.tasks.lit import pair_retrieval, split_rows


def test_caption_split_holds_back_whole_captions() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, 500)  # 40 captions, 500 pairs
    fit, val = split_rows(500, 0.1, seed=3, groups=groups)
    assert len(fit) + len(val) == 500 and not set(fit) & set(val)
    assert not set(groups[val]) & set(groups[fit])  # no held-back caption among the kept pairs
    assert 50 <= len(val) <= 50 + np.bincount(groups).max()  # whole groups until 10% of the pairs are held
    again = split_rows(500, 0.1, seed=3, groups=groups)
    assert np.array_equal(again[1], val)  # seeded
    assert not np.array_equal(split_rows(500, 0.1, seed=4, groups=groups)[1], val)
    plain_fit, plain_val = split_rows(500, 0.1, seed=3)
    assert len(plain_val) == 50 and set(groups[plain_val]) & set(groups[plain_fit])  # random pairs share captions
    one = split_rows(500, 0.1, seed=3, groups=np.zeros(500, np.int64))  # a single caption: nothing to hold back
    assert len(one[1]) == 0 and len(one[0]) == 500


def small_config(memory: MemoryConfig | None, embed_dim: int = 24) -> ModelConfig:
    return ModelConfig(embed_dim=embed_dim, vision=VisionConfig(arch="cnn", image_size=16, channels=3, width=4,
                       depth=2), text=TextConfig(arch="transformer", vocab_size=50, context_length=8, width=16,
                       layers=1, heads=2), memory=memory)  # fmt: skip


def test_memory_embedding_mixes_the_two_cosines() -> None:
    torch.manual_seed(0)
    w, temp = 0.4, 0.05
    model = CLIP(small_config(MemoryConfig(weight=w, temperature=temp))).eval()
    assert model.image_proj.out_features == 24 - 16  # the memory takes text.width of embed_dim
    keys, values = torch.randn(10, model.visual.width), torch.randn(10, 16)
    model.fill_memory(keys, values)
    assert model.cfg.memory.size == 10
    images, ids = torch.rand(3, 3, 16, 16), torch.randint(1, 50, (5, 8))
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(ids)
        feats_i, feats_t = model.visual(images), model.text(ids)
        trained = F.normalize(model.image_proj(feats_i), dim=-1) @ F.normalize(model.text_proj(feats_t), dim=-1).T
    assert img.shape == (3, 24) and txt.shape == (5, 24)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    # by hand: softmax over the stored pairs by image cosine, the mean of their captions, against the caption itself
    near = torch.softmax(F.normalize(feats_i, dim=-1) @ F.normalize(keys, dim=-1).T / temp, dim=-1)
    recalled = F.normalize(near @ F.normalize(values, dim=-1), dim=-1)
    memory = recalled @ F.normalize(feats_t, dim=-1).T
    torch.testing.assert_close(img @ txt.T, (1 - w) * trained + w * memory, atol=1e-5, rtol=1e-4)
    plain = CLIP(small_config(None)).eval()
    with torch.no_grad():
        assert plain.encode_image(images).shape == (3, 24)  # without a memory embed_dim is all trained


def test_memory_settings_fail_with_the_fix() -> None:
    with pytest.raises(ValueError, match="embed_dim"):
        CLIP(small_config(MemoryConfig(), embed_dim=16))  # nothing left for the trained projections
    model = CLIP(small_config(MemoryConfig())).eval()
    with pytest.raises(ValueError, match="empty: task lit fills it"):
        model.encode_image(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="pairs"):
        model.fill_memory(torch.randn(3, model.visual.width), torch.randn(2, 16))


CAPTIONS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow", "black", "white") for s in ("circle", "square")]


@pytest.mark.parametrize("memory_all", [False, True])
def test_lit_run_fills_the_memory_and_the_saved_model_matches(tmp_path: Path, memory_all: bool) -> None:
    """A LiT run on random towers. While training, the memory holds the kept pairs only: the saved model's embeddings
    of the cached features, with the memory it would have had then, score what the run kept on the held-back pairs.
    With ``lit.memory_all`` (lit.yaml's default) the saved memory is every usable training pair, held-back ones too;
    without it, the kept pairs only."""
    import vislang
    from vislang.cli.main import main
    from vislang.data.features import load_features
    from vislang.factory import fit_config_to_tokenizer, save_pretrained
    from vislang.tokenizers import Tokenizer

    tok = Tokenizer.train(CAPTIONS, vocab_size=60, context_length=8)
    torch.manual_seed(0)
    base = tmp_path / "tiny"
    save_pretrained(CLIP(fit_config_to_tokenizer(small_config(MemoryConfig()), tok)).eval(), base, tok)  # empty
    folder = tmp_path / "photos"
    folder.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
        (folder / f"p{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = ["train", "--config", "lit", f"--model_name={base}", f"--pretrained={base}", "--model.embed_dim=24",
            "--model.lock_image=true", "--model.lock_text=true", "--model.memory.weight=0.5",
            "--model.memory.class_weight=0", f"--data.train={folder}",
            "--lit.val_fraction=0.25", "--batch_size=8", "--epochs=2", "--optim.warmup_steps=1", f"--out_dir={run}",
            f"--lit.cache_dir={cache}", "--lit.workers=0", "--progress=false", "--threads=1",
            f"--lit.memory_all={str(memory_all).lower()}"]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["model"]["memory"]["weight"] == 0.5
    feats = load_features(next(p for p in cache.iterdir() if p.is_dir()))
    groups = np.unique(feats.captions, return_inverse=True)[1]
    fit, val = split_rows(len(feats), 0.25, 0, groups)  # lit.yaml holds back whole captions; seed 0
    assert 0 < len(val) < len(feats)  # something was held back, so the two settings differ
    model = vislang.load(run / "model")
    stored = np.arange(len(feats)) if memory_all else fit
    assert model.cfg.memory.size == len(stored) == model.memory_image.shape[0]
    assert json.loads((run / "eval" / "retrieval.json").read_text())["memory_size"] == len(stored)
    torch.testing.assert_close(model.memory_text, F.normalize(torch.from_numpy(feats.text[stored]), dim=-1))
    torch.testing.assert_close(model.memory_image, F.normalize(torch.from_numpy(feats.image[stored]), dim=-1))
    model.fill_memory(torch.from_numpy(feats.image[fit]), torch.from_numpy(feats.text[fit]))  # as while training
    with torch.no_grad():
        img = model.project_image(torch.from_numpy(np.asarray(feats.image[val])))
        txt = model.project_text(torch.from_numpy(np.asarray(feats.text[val])))
    r = pair_retrieval(img, txt, [feats.captions[i] for i in val], (10,))
    kept = json.loads((run / "eval" / "retrieval.json").read_text())["val_text_to_image_R@10"]
    assert r["text_to_image_R@10"] == pytest.approx(kept, abs=1e-6)  # the saved model scores what the run kept
    assert math.isfinite(kept)


def test_saliency_explains_a_model_with_a_memory() -> None:
    """``vislang explain`` scores image against text with the model's own embedding (the memory's dimensions too)."""
    from PIL import Image

    from vislang.evaluation.explain import clip_saliency
    from vislang.tokenizers import Tokenizer

    tok = Tokenizer.train(CAPTIONS, vocab_size=50, context_length=8)
    torch.manual_seed(0)
    model = CLIP(small_config(MemoryConfig())).eval()
    model.fill_memory(torch.randn(6, model.visual.width), torch.randn(6, 16))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8))
    cam = clip_saliency(model, tok, image, "a red circle")
    assert cam.shape == (16, 16) and np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1


def test_class_view_adds_the_classifier_s_words_to_the_score(tmp_path: Path) -> None:
    """``memory.class_weight``: another unit block whose image side is the stored classifier's probabilities over the
    class names' text vectors, so a dot product is (1 - w - cw) x trained + w x memory + cw x class cosine; the
    config's ``classes`` follows the fill, so a saved model reloads it; empty or mismatched views fail with the fix."""
    from vislang.factory import save_pretrained
    from vislang.pretrained import read_classifier
    from vislang.tokenizers import Tokenizer

    torch.manual_seed(0)
    w, cw = 0.3, 0.2
    cfg = small_config(MemoryConfig(weight=w, class_weight=cw), embed_dim=40)
    model = CLIP(cfg).eval()
    assert model.image_proj.out_features == 40 - 2 * 16  # two views of text.width each
    model.fill_memory(torch.randn(4, model.visual.width), torch.randn(4, 16))
    with pytest.raises(ValueError, match="ImageNet-class view .* is empty"):
        model.encode_image(torch.rand(1, 3, 16, 16))
    cls_w, cls_b, names = torch.randn(5, model.visual.width), torch.randn(5), torch.randn(5, 16)
    with pytest.raises(ValueError, match="does not match"):
        model.fill_classes(cls_w, cls_b[:4], names)
    model.fill_classes(cls_w, cls_b, names)
    assert model.cfg.memory.classes == 5
    images, ids = torch.rand(3, 3, 16, 16), torch.randint(1, 50, (4, 8))
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(ids)
        fi, ft = model.visual(images), model.text(ids)
        trained = F.normalize(model.image_proj(fi), dim=-1) @ F.normalize(model.text_proj(ft), dim=-1).T
        keys, values = model.memory_image, model.memory_text
        near = torch.softmax(F.normalize(fi, dim=-1) @ keys.T / 0.02, dim=-1)
        memory = F.normalize(near @ values, dim=-1) @ F.normalize(ft, dim=-1).T
        said = torch.softmax(fi @ cls_w.T + cls_b, dim=-1) @ F.normalize(names, dim=-1)
        classes = F.normalize(said, dim=-1) @ F.normalize(ft, dim=-1).T
    assert img.shape == (3, 40) and txt.shape == (4, 40)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(img @ txt.T, (1 - w - cw) * trained + w * memory + cw * classes, atol=1e-5, rtol=1e-4)
    tok = Tokenizer.train(CAPTIONS, vocab_size=50, context_length=8)
    save_pretrained(model, tmp_path / "m", tok)
    import vislang

    again = vislang.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), img)
    with pytest.raises(ValueError, match="weight \\+ class_weight"):
        CLIP(small_config(MemoryConfig(weight=0.6, class_weight=0.5), embed_dim=40))
    torch.save({"features.0.weight": torch.randn(2, 2)}, tmp_path / "no_head.pt")
    with pytest.raises(ValueError, match="holds no classifier"):
        read_classifier(str(tmp_path / "no_head.pt"))
    torch.save({"_fc.weight": cls_w, "_fc.bias": cls_b}, tmp_path / "head.pt")
    got_w, got_b = read_classifier(str(tmp_path / "head.pt"))
    assert torch.equal(got_w, cls_w) and torch.equal(got_b, cls_b)
