"""LiT with the image tower's last blocks unlocked (``--unlock-last N``), on tiny random towers (seconds).

The cache then holds the input of the first unlocked block; a step runs the unlocked blocks and the projections.
Asserted: the unlocked blocks change and every locked weight does not, the saved model computes what the cached path
computes (cached == uncached forward at the cut), the cache entry is keyed by the cut, and the cut reproduces the
tower for each kind of tower that supports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vislang.cli.main import main

CAPTIONS = ["a red circle left of a blue square", "a green star above a yellow circle", "a blue square"] * 4


def tiny_model(root: Path) -> Path:
    """A random compact-CNN (3 stages) + 1-layer Transformer dual encoder with its own tokenizer, saved."""
    from vislang.factory import fit_config_to_tokenizer, save_pretrained
    from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
    from vislang.tokenizers import Tokenizer

    d = root / "tiny"
    tok = Tokenizer.train(CAPTIONS, vocab_size=80, context_length=96)
    mcfg = ModelConfig(embed_dim=8, vision=VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=3),
                       text=TextConfig(arch="transformer", vocab_size=80, context_length=96, width=16, layers=1,
                                       heads=2))  # fmt: skip
    torch.manual_seed(0)
    save_pretrained(CLIP(fit_config_to_tokenizer(mcfg, tok)).eval(), d, tok)
    return d


def lit_args(model: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "--config", "lit", f"--model_name={model}", f"--pretrained={model}", "--model.embed_dim=8",
            "--model.lock_image=true", "--model.lock_text=true", "--data.train=shapes", "--data.val_split=val",
            "--data.options={n: 48}", "--data.max_val=16", "--batch_size=8", "--epochs=2", "--optim.warmup_steps=1",
            "--lit.unlock_lr_scale=1", f"--out_dir={out}", f"--lit.cache_dir={cache}", "--lit.workers=0",
            "--model.memory=null", "--progress=false", "--threads=1", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def unlocked(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlock")
    model = tiny_model(root)
    cache = root / "cache"
    assert main(lit_args(model, root / "run", cache, "--unlock-last", "1")) == 0
    return {"root": root, "model": model, "cache": cache, "run": root / "run"}


def test_only_the_unlocked_blocks_and_heads_change(unlocked):
    before = load_file(str(unlocked["model"] / "model.safetensors"))
    after = load_file(str(unlocked["run"] / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    tail = {k for k in before if k.startswith("visual.stages.2.") and "running_" not in k and "num_batches" not in k}
    assert tail and tail <= changed  # every weight of the last stage trained (BatchNorm statistics stay pretrained)
    assert {"image_proj.weight", "text_proj.weight"} <= changed
    assert all(k in tail or k in ("image_proj.weight", "text_proj.weight", "logit_scale") for k in changed), changed


def test_cache_holds_the_cut_and_the_saved_model_computes_the_cached_path(unlocked):
    """Rows of the cache are the input of the last stage; the saved model's ``encode_image`` of the images equals the
    trained last stage + projection applied to those cached rows."""
    import vislang
    from vislang.data.features import load_features
    from vislang.data.sources import open_dataset

    entry = next(p for p in unlocked["cache"].iterdir() if p.is_dir() and p.name.startswith("shapes-train"))
    feats = load_features(entry)
    assert np.asarray(feats.image).shape == (48, 8, 4, 4)  # stage 2 of 3 pooled twice: 8 channels at 4x4
    model, _, preprocess = vislang.create_model_and_transforms(unlocked["run"] / "model")
    ds = open_dataset("shapes", split="train", n=48)
    rows = [0, 7, 30]
    images = torch.stack([preprocess(ds[int(feats.index[r])][0]) for r in rows])  # (3, 3, 16, 16)
    trunk, tail = model.visual.split_last(1)
    with torch.inference_mode():
        cut = trunk(images)
        torch.testing.assert_close(cut, torch.from_numpy(np.asarray(feats.image[rows])), atol=1e-5, rtol=1e-4)
        whole = model.encode_image(images)
        cached = F.normalize(model.image_proj(tail(torch.from_numpy(np.asarray(feats.image[rows])))), dim=-1)
    torch.testing.assert_close(whole, cached, atol=1e-5, rtol=1e-4)


def test_the_cut_point_is_part_of_the_cache_key(unlocked, tmp_path):
    cache = unlocked["cache"]
    names = lambda: {p.name for p in cache.iterdir() if p.is_dir()}  # noqa: E731
    first = names()
    assert main(lit_args(unlocked["model"], tmp_path / "again", cache, "--unlock-last", "1")) == 0
    assert names() == first  # same cut: read back
    assert main(lit_args(unlocked["model"], tmp_path / "two", cache, "--lit.unlock_last_image=2", "--epochs=1")) == 0
    assert len(names()) == len(first) + 2  # train and test entries of another cut


def test_too_many_blocks_is_a_clear_error(unlocked, tmp_path, capsys):
    assert main(lit_args(unlocked["model"], tmp_path / "bad", unlocked["cache"], "--unlock-last", "4")) != 0
    assert "cannot unlock the last 4 blocks of the compact CNN: it has 3" in capsys.readouterr().err


@pytest.mark.parametrize("arch,size,kw", [("cnn", 24, {}), ("tf_efficientnet_lite0", 32, {}),
                                          ("vit_tiny_patch16_224", 16, {"patch_size": 8})])  # fmt: skip
@pytest.mark.parametrize("n", [1, 2])
def test_trunk_then_tail_is_the_tower(arch, size, kw, n):
    from vislang.models.towers import VisionConfig, build_vision_tower, check_split

    torch.manual_seed(0)
    cfg = VisionConfig(arch=arch, image_size=size, channels=3, width=4, depth=3, timm_kwargs=kw)
    tower = build_vision_tower(cfg).eval()
    trunk, tail = tower.split_last(n)
    check_split(tower, trunk, tail, size, 3)  # raises when tail(trunk(x)) != tower(x)
    tail_params = {id(p) for p in tail.parameters()}
    assert tail_params and tail_params < {id(p) for p in tower.parameters()}  # shared, and not the whole tower
