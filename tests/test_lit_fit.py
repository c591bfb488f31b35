"""``--lit.fit=pad`` reaches the saved model: the cache is extracted from letterboxed images, and the saved model's
preprocess (what ``index build`` and ``serve`` run) letterboxes too, so it embeds a photo as the run saw it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vislang.data.transforms import ImageTransform, normalize, pil_to_array

CAPTIONS = ["a red bar", "a blue bar", "a green bar", "a black bar"]


def wide(seed: int) -> Image.Image:
    """A 60x20 image whose left and right thirds differ from its centre: a crop and a letterbox see other pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (20, 60, 3), dtype=np.uint8))


def test_image_transform_letterboxes_when_asked() -> None:
    img = wide(0)
    crop = ImageTransform(16, 3, (0.5,), (0.5,))(img)
    pad = ImageTransform(16, 3, (0.5,), (0.5,), fit="pad")(img)
    expected = normalize(torch.from_numpy(pil_to_array(img, 16, 3, "pad")).permute(2, 0, 1), (0.5,), (0.5,))
    torch.testing.assert_close(pad, expected)
    assert not torch.allclose(crop, pad)
    assert (pad[:, 0] == 1.0).all()  # the top row is the white letterbox
    assert ImageTransform(16, 3, (0.5,), (0.5,), train=True, fit="pad").to_array(img).shape == (16, 16, 3)


def test_lit_fit_pad_is_saved_with_the_model(tmp_path: Path) -> None:
    import vislang
    from vislang.cli.main import main
    from vislang.data.features import load_features
    from vislang.factory import fit_config_to_tokenizer, save_pretrained
    from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
    from vislang.tokenizers import Tokenizer

    tok = Tokenizer.train(CAPTIONS, vocab_size=40, context_length=8)
    torch.manual_seed(0)
    base = tmp_path / "tiny"
    mcfg = ModelConfig(embed_dim=8, vision=VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=2),
                       text=TextConfig(arch="transformer", vocab_size=40, context_length=8, width=16, layers=1,
                                       heads=2))  # fmt: skip
    save_pretrained(CLIP(fit_config_to_tokenizer(mcfg, tok)).eval(), base, tok)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        wide(i).save(folder / f"p{i:02d}.png")
        (folder / f"p{i:02d}.txt").write_text(CAPTIONS[i % 4])
    common = ["train", "--config", "lit", f"--model_name={base}", f"--pretrained={base}", "--model.embed_dim=8",
              "--model.memory=null", "--model.lock_image=true", "--model.lock_text=true", f"--data.train={folder}",
              "--lit.val_fraction=0", "--batch_size=4", "--epochs=1", "--optim.warmup_steps=1", "--lit.workers=0",
              "--progress=false", "--threads=1"]  # fmt: skip
    for fit in ("crop", "pad"):
        run, cache = tmp_path / f"run-{fit}", tmp_path / f"cache-{fit}"
        assert main([*common, f"--lit.fit={fit}", f"--out_dir={run}", f"--lit.cache_dir={cache}"]) == 0
        model, _, preprocess = vislang.create_model_and_transforms(run / "model")
        assert model.cfg.vision.fit == fit and preprocess.fit == fit
        feats = load_features(next(p for p in cache.iterdir() if p.is_dir()))
        rows = [0, 5]
        images = torch.stack([preprocess(wide(int(feats.index[r]))) for r in rows])
        with torch.inference_mode():
            served = model.encode_image(images)
            cached = model.project_image(torch.from_numpy(np.asarray(feats.image[rows])))
        torch.testing.assert_close(served, cached, atol=2e-4, rtol=1e-3)  # the served model sees what was cached
