"""Instance-conditioned GAN (IC-GAN): which bank items a prompt may draw, the pick from the noise, the neighbours an
instance is trained with, the generator's two ways of being called, and a training run that saves, reloads and
samples reproducibly; export and compression refuse it clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from test_generate import _cfg, fm_text_model_dir
from vislang.models.gan.build import build_gan
from vislang.models.gan.instance import (
    InstanceGenerator,
    candidates,
    instance_features,
    neighbours,
    pick_from_noise,
    pixel_pca,
)
from vislang.models.gan.networks import GANModelConfig, inner_config
from vislang.models.gan.pipeline import TextToImage


def test_candidates_are_the_matching_captions_or_else_the_nearest():
    keys = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.1, 1.0], [0.7, 0.7]]), dim=1)
    prompts = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]), dim=1)
    cand = candidates(prompts, keys, k=2)
    assert cand[0].tolist() == [True, True, False, False, False]  # two captions mean the same: those
    assert cand[1].tolist() == [False, False, True, True, False]
    assert cand[2].sum() == 2 and cand[2, 0]  # nothing matches [1, -1]: its two nearest captions
    assert candidates(prompts[:1], keys, k=3)[0].sum() == 3  # fewer than k match: the k nearest instead


def test_the_noise_picks_each_candidate_equally_and_reproducibly():
    cand = torch.tensor([[False, True, False, True, True]]).expand(300, -1)
    u = (torch.arange(300) + 0.5) / 300
    picks = pick_from_noise(cand, u)
    assert set(picks.tolist()) == {1, 3, 4}
    assert torch.bincount(picks, minlength=5)[[1, 3, 4]].tolist() == [100, 100, 100]
    assert torch.equal(pick_from_noise(cand, u), picks)
    assert pick_from_noise(cand[:1], torch.tensor([0.9999999])).item() == 4  # never past the last candidate


def test_neighbours_are_nearest_among_items_of_the_same_caption():
    torch.manual_seed(0)
    texts = F.normalize(torch.eye(2)[torch.tensor([0, 0, 1, 1, 0, 1])], dim=1)  # (6, 2): two "classes"
    feats = F.normalize(torch.randn(6, 4), dim=1)
    bank_idx = torch.tensor([0, 2, 4, 5])
    nn_ = neighbours(feats, texts, feats[bank_idx], texts[bank_idx], k=2)
    assert nn_.shape == (6, 2)
    same = {0: {0, 2}, 1: {1, 3}}  # bank rows of class 0 / 1
    for i in range(6):
        cls = int(texts[i, 1] > 0)
        assert set(nn_[i].tolist()) == same[cls]
    assert nn_[0, 0].item() == 0  # a bank item is its own nearest neighbour


def _instance_generator(bank_n: int = 6) -> InstanceGenerator:
    torch.manual_seed(0)
    cfg = GANModelConfig(cond_dim=4, z_dim=5, g_width=4, d_width=4, instance_bank=bank_n, instance_dim=3, instance_k=2)
    g, d = build_gan(cfg)
    assert isinstance(g, InstanceGenerator) and d.embed.in_features == 4 + 3  # D reads [text, instance] too
    keys = F.normalize(torch.eye(4)[torch.tensor([0, 0, 0, 1, 1, 1])], dim=1)
    g.set_bank(F.normalize(torch.randn(bank_n, 3), dim=1), keys)
    return g.eval()


def test_text_only_conditions_draw_an_instance_of_that_caption_from_the_bank():
    g = _instance_generator()
    z, c = torch.randn(40, 5), torch.eye(4)[torch.zeros(40, dtype=torch.long)]  # 40 draws of "caption 0"
    inst = g.instances(z, c)
    rows = [(inst[i] - g.bank).abs().sum(1).argmin().item() for i in range(40)]
    assert set(rows) == {0, 1, 2}  # only bank items whose caption is caption 0, each of them
    with torch.no_grad():
        torch.testing.assert_close(g(z, c), g.inner(z, torch.cat([c, inst], dim=1)))  # the same as given in full
        full = torch.cat([c, g.bank[torch.full((40,), 4)]], dim=1)
        assert not torch.allclose(g(z, full), g(z, c))  # a given instance is used as given
    with pytest.raises(ValueError, match="do not fit"):
        g.set_bank(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="instance_dim"):
        inner_config(GANModelConfig(instance_bank=4))


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("features,dim", [("clip", 16), ("pixels", 64)])
def test_instance_gan_trains_saves_and_samples_reproducibly(tmp_path, features, dim):
    from vislang.train.tasks.gan import train_gan

    text = fm_text_model_dir(tmp_path / "text")
    c = _cfg(text, tmp_path / "run", 3)
    model = {**c.gan.model, "instance_bank": 64, "instance_features": features}
    c = dataclasses.replace(c, gan=dataclasses.replace(c.gan, model=model))
    model_dir = train_gan(c)
    t2i = TextToImage.from_pretrained(model_dir)
    g = t2i.generator
    assert isinstance(g, InstanceGenerator) and g.bank.shape == (64, dim) and t2i.cfg.instance_dim == dim
    norms = g.bank.norm(dim=1)  # filled: normalised image embeddings, or principal components of mean norm ~1
    assert torch.allclose(norms, torch.ones(64), atol=1e-5) if features == "clip" else 0.5 < norms.mean() < 2
    a, b = t2i.generate("a photo of a bag.", n=6, seed=3), t2i.generate("a photo of a bag.", n=6, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, t2i.generate("a photo of a bag.", n=6, seed=4))
    with pytest.raises(ValueError, match="exceeds"):
        too_big = dataclasses.replace(c.gan, model={**c.gan.model, "instance_bank": 10**6})
        train_gan(dataclasses.replace(c, gan=too_big, out_dir=str(tmp_path / "big")))

    from vislang.export.onnx import export_generator

    with pytest.raises(ValueError, match="instance-conditioned"):
        export_generator(model_dir, tmp_path / "onnx")
    from vislang.compress.api import compress_model_dir

    with pytest.raises(ValueError, match="instance-conditioned"):
        compress_model_dir(model_dir, "dynamic-int8", tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_pixel_features_are_principal_components_that_tell_sizes_apart():
    torch.manual_seed(0)
    imgs = torch.zeros(40, 1, 8, 8, dtype=torch.uint8)
    for i in range(40):  # squares of four sizes, with a little noise
        side = 2 + i % 4
        imgs[i, 0, :side, :side] = 200
    imgs = (imgs.float() + torch.rand(40, 1, 8, 8) * 20).to(torch.uint8)
    f = pixel_pca(imgs, dim=3)
    assert f.shape == (40, 3) and f.norm(dim=1).mean().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(f, pixel_pca(imgs, dim=3))  # deterministic
    d_same = (f[0] - f[4]).norm()  # the same size
    d_other = (f[0] - f[3]).norm()  # smallest against largest square
    assert d_other > 5 * d_same
    assert torch.equal(instance_features("pixels", None, imgs, 3), f)
    with pytest.raises(ValueError, match="instance_features"):
        instance_features("sift", None, imgs, 3)


def test_a_text_counts_as_wrong_by_the_text_alone_not_by_the_instance():
    from vislang.train.config import GANConfig
    from vislang.train.tasks.gan_step import gan_step

    g = _instance_generator()
    g.train()
    _, d = build_gan(g.cfg)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), 1e-3) for m in (g, d))
    text = torch.eye(4)[torch.zeros(8, dtype=torch.long)]  # one caption for all: no text is wrong for any image
    inst = torch.cat([g.bank[:4], -g.bank[:4]])  # instances as unlike as can be
    real = torch.rand(8, 1, 28, 28) * 2 - 1
    stats = gan_step(g, d, g, opt_g, opt_d, real, torch.cat([text, inst], 1), GANConfig(), torch.Generator())
    assert "d_mismatch" not in stats  # no real image was scored under a "wrong" text
    other = torch.eye(4)[torch.tensor([0, 1] * 4)]
    stats = gan_step(g, d, g, opt_g, opt_d, real, torch.cat([other, inst], 1), GANConfig(), torch.Generator())
    assert "d_mismatch" in stats
