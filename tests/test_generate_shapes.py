"""The shapes GAN's pieces: the discriminator scores one image under several texts from one pass, the text-matching
loss, the world options a run config passes to the shapes data set, and the packaged config using them."""

from __future__ import annotations

import pytest
import torch

from vislang.losses import mismatched
from vislang.models.gan.build import build_gan
from vislang.models.gan.networks import GANModelConfig


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "mlp"])
@pytest.mark.parametrize("projection", [True, False])
def test_discriminator_scores_features_under_any_text(arch, projection):
    torch.manual_seed(0)
    cfg = GANModelConfig(arch=arch, cond_dim=6, image_size=32, channels=3, d_width=4, projection=projection)
    _, d = build_gan(cfg)
    d.eval()  # spectral norm's power iteration runs once per training-mode call; eval keeps the weights fixed
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    c1, c2 = torch.randn(5, 6), torch.randn(5, 6)
    h = d.features(x)
    torch.testing.assert_close(d.score(h, c1), d(x, c1))  # what the training step uses for the real pair ...
    torch.testing.assert_close(d.score(h[[3, 1]], c2[[0, 4]]), d(x[[3, 1]], c2[[0, 4]]))  # ... and the wrong-text pair
    assert not torch.allclose(d.score(h, c1), d.score(h, c2))


def test_training_step_scores_wrong_texts_as_three_passes_would():
    """gan_step reuses the real images' features for the wrong-text pairs: the discriminator loss (and so its update)
    equals the one from scoring real, fake and mismatched pairs in one concatenated pass, as before."""
    from vislang.losses import d_loss
    from vislang.train.config import GANConfig
    from vislang.train.tasks.gan_step import gan_step

    torch.manual_seed(0)
    cfg = GANModelConfig(cond_dim=6, image_size=32, channels=3, z_dim=4, g_width=4, d_width=4)
    g, d = build_gan(cfg)
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    c = torch.eye(6)[[0, 0, 1, 1, 2, 2, 0, 1]]  # (8, 6): three texts, repeated, so some rolled pairs mean the same
    gan = GANConfig(ema_decay=0.0)
    ref_d = build_gan(cfg)[1]
    ref_d.load_state_dict(d.state_dict())
    torch.manual_seed(1)
    fake = g(torch.randn(8, 4), c).detach()
    wrong, keep = mismatched(c, gan.mismatch_max_cos, torch.Generator().manual_seed(5))
    assert 0 < int(keep.sum()) < 8  # some pairs dropped, some kept: both paths of the mask are exercised
    scores = ref_d(torch.cat([real, fake, real[keep]]), torch.cat([c, c, c[wrong][keep]]))
    expected = d_loss(scores[:8], scores[8:16], scores[16:], 1.0)
    opt = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.0, 0.9))  # noqa: E731
    torch.manual_seed(1)
    stats = gan_step(g, d, g, opt(g), opt(d), real, c, gan, torch.Generator().manual_seed(5))
    assert stats["loss_d"] == pytest.approx(expected.item(), rel=1e-5)


def test_text_match_loss_is_the_log_softmax_mass_on_the_right_texts():
    from vislang.losses import text_match_loss

    pos = torch.eye(4, dtype=torch.bool)
    assert text_match_loss(torch.zeros(4, 4), pos).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert text_match_loss(20 * torch.eye(4), pos).item() < 1e-6  # every image picks its own text
    assert text_match_loss(20 * torch.eye(4).flip(0), pos).item() > 10  # every image picks another text
    pos[0, 1] = True  # text 1 means the same as image 0's own text: picking it is right too
    logits = torch.zeros(4, 4)
    logits[0, 1] = 20
    assert text_match_loss(logits, pos).item() < text_match_loss(logits, torch.eye(4, dtype=torch.bool)).item()


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_match_ranks_texts_by_cosine_and_needs_the_projection(arch):
    torch.manual_seed(0)
    cfg = GANModelConfig(arch=arch, cond_dim=6, image_size=32, channels=3, d_width=4)
    _, d = build_gan(cfg)
    d.eval()
    h = d.features(torch.rand(3, 3, 32, 32))
    c = torch.randn(5, 6)
    logits = d.match(h, c)
    assert logits.shape == (3, 5) and logits.abs().max() <= 10.0 + 1e-5  # MATCH_SCALE times a cosine
    torch.testing.assert_close(d.match(2 * h, 3 * c), logits)  # scale-free in both features and texts
    _, plain = build_gan(GANModelConfig(arch=arch, cond_dim=6, image_size=32, channels=3, projection=False))
    with pytest.raises(ValueError, match="projection"):
        plain.match(plain.features(torch.rand(3, 3, 32, 32)), c)


def test_text_match_trains_both_nets_through_the_discriminator():
    from vislang.train.config import GANConfig
    from vislang.train.tasks.gan_step import gan_step

    torch.manual_seed(0)
    cfg = GANModelConfig(cond_dim=6, image_size=32, channels=3, z_dim=4, g_width=4, d_width=4)
    g, d = build_gan(cfg)
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    c = torch.eye(6)[[0, 0, 1, 1, 2, 2, 3, 4]]
    stats = {}
    for weight in (0.0, 1.0):
        g0, d0 = build_gan(cfg)
        g0.load_state_dict(g.state_dict()), d0.load_state_dict(d.state_dict())
        opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
        torch.manual_seed(1)
        s = gan_step(g0, d0, g0, opt(g0), opt(d0), real, c, GANConfig(text_match=weight, ema_decay=0.0),
                     torch.Generator().manual_seed(5))  # fmt: skip
        stats[weight] = (s, g0.out.weight.detach().clone(), d0.embed.parametrizations.weight.original.clone())
    s, g_w, d_w = stats[1.0]
    assert s["match_d"] > 0 and s["match_g"] > 0 and "match_d" not in stats[0.0][0]
    assert not torch.allclose(g_w, stats[0.0][1]) and not torch.allclose(d_w, stats[0.0][2])  # both updates moved


def test_shapes_world_options_reach_the_data_set():
    from vislang.data.shapes import ShapesConfig, ShapesDataset

    ds = ShapesDataset("train", n=40, max_objects=1, sizes=["large"])
    assert ds.cfg == ShapesConfig(max_objects=1, sizes=("large",))  # YAML lists become the config's tuples
    scenes = [ds.scene(i) for i in range(40)]
    assert all(len(s.objects) == 1 and s.objects[0].size == "large" for s in scenes)
    assert ShapesDataset("train", n=4).cfg == ShapesConfig()  # no options: the default world, unchanged
    assert ShapesDataset("train", n=4, holdout=[["red", "circle"]]).cfg.holdout_set == {("red", "circle")}
    with pytest.raises(ValueError, match="max_objects"):
        ShapesDataset("train", n=4, max_object=1)


def test_packaged_shapes_gan_config_trains_on_single_objects():
    from vislang.config import PACKAGED_CONFIGS
    from vislang.data.shapes import ShapesDataset
    from vislang.train.config import load_train_config

    cfg = load_train_config(PACKAGED_CONFIGS / "gan-shapes.yaml")
    ds = ShapesDataset("train", n=20, **cfg.data.options)
    assert all(len(ds.scene(i).objects) == 1 for i in range(20))
    assert cfg.gan.text_match > 0


def test_pixel_judge_reads_layout_and_refuses_what_is_not_there():
    from vislang.evaluation.gan_metrics import relation_holds, relation_match

    palette = {"red": (215, 38, 38), "blue": (40, 85, 215), "green": (40, 160, 60)}
    img = torch.full((1, 3, 32, 32), 230, dtype=torch.uint8)  # light background
    img[0, :, 4:10, 2:8] = torch.tensor([215, 38, 38])[:, None, None]  # red, top left
    img[0, :, 20:28, 22:30] = torch.tensor([40, 85, 215])[:, None, None]  # blue, bottom right
    assert relation_match(img, [("red", "to the left of", "blue")], palette)["relation_match"] == 1.0
    assert relation_match(img, [("red", "above", "blue")], palette)["relation_match"] == 1.0
    assert relation_match(img, [("blue", "to the left of", "red")], palette)["relation_match"] == 0.0
    missing = relation_match(img, [("red", "to the left of", "green")], palette)
    assert missing == {"colours_present": 0.0, "relation_match": 0.0}
    with pytest.raises(ValueError, match="unknown relation"):
        relation_holds((0, 0), "behind", (1, 1))


def test_relation_prompts_come_from_real_scenes_the_judge_gets_right():
    import numpy as np
    from PIL import Image

    from vislang.data.shapes import COLOR_RGB, OPPOSITE, ShapesConfig, render
    from vislang.evaluation.gan import relation_prompts
    from vislang.evaluation.gan_metrics import relation_match

    items = relation_prompts(40)
    assert len(items) == 40 and all(rel in prompt for prompt, (_, rel, _), _ in items)
    palette = {c: COLOR_RGB[c] for c in ShapesConfig().colors}
    real = np.stack([np.asarray(render(sc).resize((32, 32), Image.BILINEAR)) for _, _, sc in items])
    real_t = torch.from_numpy(real).permute(0, 3, 1, 2).contiguous()
    assert relation_match(real_t, [t for _, t, _ in items], palette)["relation_match"] == 1.0
    flipped = [(a, OPPOSITE[r], b) for _, (a, r, b), _ in items]
    assert relation_match(real_t, flipped, palette)["relation_match"] == 0.0


def test_flipped_relation_texts_count_as_wrong_in_both_discriminator_terms():
    """With c_flip the discriminator scores each of the first F real images under its flipped caption as a wrong
    pair and adds the flipped captions to the text-matching softmax: its loss is the reference computed by hand."""
    from vislang.losses import d_loss, text_match_loss
    from vislang.train.config import GANConfig
    from vislang.train.tasks.gan_step import gan_step

    torch.manual_seed(0)
    cfg = GANModelConfig(cond_dim=6, image_size=32, channels=3, z_dim=4, g_width=4, d_width=4)
    g, d = build_gan(cfg)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    c = torch.eye(6)[[0, 1, 2, 3]]
    c_flip = torch.eye(6)[[4, 5]]  # the first two items' captions, relation flipped
    gan = GANConfig(ema_decay=0.0, matching_aware=0.0, text_match=1.0)
    ref_d = build_gan(cfg)[1]
    ref_d.load_state_dict(d.state_dict())
    torch.manual_seed(1)
    fake = g(torch.randn(4, 4), c).detach()
    h = ref_d.features(torch.cat([real, fake]))
    s = ref_d.score(h, torch.cat([c, c]))
    positives = torch.cat([torch.eye(4, dtype=torch.bool), torch.zeros(4, 2, dtype=torch.bool)], dim=1)
    want = d_loss(s[:4], s[4:]) + text_match_loss(ref_d.match(h[:4], torch.cat([c, c_flip])), positives)
    opt = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.0, 0.9))  # noqa: E731
    torch.manual_seed(1)
    stats = gan_step(g, d, g, opt(g), opt(d), real, c, gan, torch.Generator().manual_seed(5), c_flip)
    assert stats["loss_d"] == pytest.approx(want.item(), rel=1e-5)


def test_gan_trains_with_relation_negatives_and_refuses_data_without_relations(tmp_path):
    from vislang.factory import fit_config_to_tokenizer, save_pretrained
    from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
    from vislang.tokenizers import Tokenizer
    from vislang.train.config import load_train_config
    from vislang.train.tasks.gan import train_gan

    words = ["a red circle to the left of a blue square", "two objects: a green star and a red square"] * 4
    tok = Tokenizer.train(words, vocab_size=80, context_length=24)
    mcfg = ModelConfig(
        embed_dim=8,
        vision=VisionConfig(arch="cnn", image_size=32, channels=3, width=4, depth=2),
        text=TextConfig(arch="transformer", vocab_size=80, context_length=24, width=16, layers=1, heads=2),
    )
    torch.manual_seed(0)
    text_dir = tmp_path / "text"
    save_pretrained(CLIP(fit_config_to_tokenizer(mcfg, tok)).eval(), text_dir, tok)
    common = [
        "task=gan", "data.train=shapes", "batch_size=16", "max_steps=2", "progress=false", "threads=1",
        f"gan.text_model={text_dir}", "gan.model={g_width: 4, d_width: 4, z_dim: 4}", "gan.relation_negatives=true",
        "gan.text_match=1.0", "gan.standing_stats=2", f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    cfg = load_train_config(None, [*common, "data.options={n: 64, min_objects: 2, max_objects: 2}",
                                   f"out_dir={tmp_path / 'run'}"])  # fmt: skip
    assert (train_gan(cfg) / "config.json").is_file()
    cfg = load_train_config(None, [*common, "data.options={n: 64, max_objects: 1}", f"out_dir={tmp_path / 'one'}"])
    with pytest.raises(ValueError, match="relation_negatives=false"):
        train_gan(cfg)


def test_mode_seeking_term_rewards_different_images_for_one_text():
    from vislang.losses import mode_seeking_loss
    from vislang.train.config import GANConfig
    from vislang.train.tasks.gan_step import gan_step

    za, zb = torch.zeros(4, 8), torch.ones(4, 8)  # |za - zb| = 1
    same = torch.zeros(4, 1, 6, 6)
    assert mode_seeking_loss(same, same + 0.5, za, zb) == pytest.approx(2.0, rel=1e-4)  # 1 / (0.5 / 1)
    assert mode_seeking_loss(same, same + 0.01, za, zb) > 50  # near-identical images: a large penalty
    torch.manual_seed(0)
    cfg = GANModelConfig(cond_dim=6, image_size=32, channels=3, z_dim=4, g_width=4, d_width=4)
    g, d = build_gan(cfg)
    opt = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.0, 0.9))  # noqa: E731
    real, c = torch.rand(8, 3, 32, 32) * 2 - 1, torch.eye(6)[[0, 1, 2, 3, 4, 5, 0, 1]]
    stats = gan_step(g, d, g, opt(g), opt(d), real, c, GANConfig(ema_decay=0.0, mode_seeking=1.0),
                     torch.Generator().manual_seed(5))  # fmt: skip
    assert stats["mode_seeking"] > 0 and "mode_seeking" not in gan_step(
        g, d, g, opt(g), opt(d), real, c, GANConfig(ema_decay=0.0), torch.Generator().manual_seed(5)
    )


def test_coordinate_planes_tell_the_discriminator_where_things_are():
    torch.manual_seed(0)
    cfg = GANModelConfig(cond_dim=6, image_size=32, channels=3, d_width=4, coord_channels=True)
    _, d = build_gan(cfg)
    d.eval()
    first = d.convs[0]
    assert first.in_channels == 3 + 2
    grid = d.grid[0]  # (2, H, W): x grows to the right, y downwards, both in [-1, 1]
    assert torch.all(grid[0, :, 1:] > grid[0, :, :-1]) and torch.all(grid[1, 1:, :] > grid[1, :-1, :])
    assert grid.abs().max() == 1.0
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    planes = torch.cat([x, grid.expand(2, -1, -1, -1)], dim=1)  # what the first conv sees
    torch.testing.assert_close(d.features(x), torch.nn.functional.leaky_relu(d.convs(planes), 0.2).sum(dim=(2, 3)))
    assert GANModelConfig().coord_channels is False  # saved models without the field load as before


def test_discriminator_only_steps_leave_the_generator_and_its_ema_alone():
    """gan.d_steps > 1: a step with update_g False updates D and nothing of G (weights, EMA copy), and its stats carry
    no generator loss; the next full step moves G again."""
    import copy

    from vislang.train.config import GANConfig
    from vislang.train.tasks.gan_step import gan_step

    torch.manual_seed(0)
    cfg = GANModelConfig(cond_dim=6, image_size=32, channels=3, z_dim=4, g_width=4, d_width=4)
    g, d = build_gan(cfg)
    g_ema = copy.deepcopy(g)
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.0, 0.9))
    real, c = torch.rand(8, 3, 32, 32) * 2 - 1, torch.eye(6)[[0, 1, 2, 3, 4, 5, 0, 1]]
    gan = GANConfig(ema_decay=0.9, d_steps=2)
    g0, ema0, d0 = (copy.deepcopy(m.state_dict()) for m in (g, g_ema, d))
    stats = gan_step(g, d, g_ema, opt_g, opt_d, real, c, gan, torch.Generator().manual_seed(5), update_g=False)
    assert "loss_g" not in stats and "loss_d" in stats
    params = lambda m: {k: v for k, v in m.state_dict().items() if v.is_floating_point()}  # noqa: E731
    for k, v in params(g).items():
        if "running" not in k:  # BatchNorm statistics follow the fakes D saw; the weights must not move
            torch.testing.assert_close(v, g0[k], rtol=0, atol=0)
    for k, v in params(g_ema).items():
        torch.testing.assert_close(v, ema0[k], rtol=0, atol=0)
    assert any(not torch.equal(v, d0[k]) for k, v in params(d).items())
    stats = gan_step(g, d, g_ema, opt_g, opt_d, real, c, gan, torch.Generator().manual_seed(5))
    assert "loss_g" in stats
    assert any(not torch.equal(v, g0[k]) for k, v in params(g).items() if "running" not in k)
    assert any(not torch.equal(v, ema0[k]) for k, v in params(g_ema).items())
