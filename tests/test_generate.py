"""Text → image GAN: model shapes, the projection discriminator's use of the text, the metrics (FID against a
reference and torchmetrics, KID, IS-style, class consistency), reproducible generation, bad input, and a CPU smoke
run of training (with exact resume), `vislang generate` and the evaluator."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vislang.evaluation.gan_metrics import (
    class_consistency,
    clip_score,
    fid_kid,
    frechet_distance,
    inception_style_score,
)
from vislang.losses import d_loss, mismatched
from vislang.models.gan.build import build_gan
from vislang.models.gan.networks import (
    GANModelConfig,
    diff_augment,
    from_uint8,
    minibatch_std,
    num_resamples,
    standing_stats,
    to_uint8,
)
from vislang.models.gan.pipeline import TextToImage, check_prompts, is_gan_dir, slerp
from vislang.train.tasks.gan_step import lr_factor

FM_CAPTIONS = [f"a photo of a {c}." for c in ("sneaker", "bag", "coat", "dress", "sandal", "shirt")] + [
    f"a small photo of a {c}." for c in ("sneaker", "bag", "coat", "dress", "sandal", "shirt")
]


def fm_text_model_dir(d: Path) -> Path:
    """An (untrained) tiny Fashion-MNIST-shaped dual encoder with a tokenizer trained on a few captions, saved to d."""
    from vislang.factory import fit_config_to_tokenizer, save_pretrained
    from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
    from vislang.tokenizers import Tokenizer

    tok = Tokenizer.train(FM_CAPTIONS * 3, vocab_size=120, context_length=24)
    cfg = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(arch="cnn", image_size=28, channels=1, width=4, depth=2, mean=(0.3,), std=(0.35,)),
        text=TextConfig(arch="transformer", vocab_size=120, context_length=24, width=16, layers=1, heads=2),
    )
    torch.manual_seed(0)
    model = CLIP(fit_config_to_tokenizer(cfg, tok))
    save_pretrained(model.eval(), d, tok)
    return d


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory) -> Path:
    return fm_text_model_dir(tmp_path_factory.mktemp("text") / "model")


@pytest.fixture(scope="module")
def t2i(text_model_dir) -> TextToImage:
    from vislang.factory import from_pretrained, get_tokenizer

    torch.manual_seed(0)
    cfg = GANModelConfig(arch="dcgan", z_dim=8, cond_dim=16, image_size=28, channels=1, g_width=4, d_width=4)
    g, _ = build_gan(cfg)
    return TextToImage(cfg, g, from_pretrained(text_model_dir), get_tokenizer(text_model_dir), {"sample_prompts": []})


# --- models ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["dcgan", "resnet", "mlp"])
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_generator_and_discriminator_shapes(arch, size, channels):
    cfg = GANModelConfig(arch=arch, z_dim=8, cond_dim=12, image_size=size, channels=channels, g_width=4, d_width=4)
    g, d = build_gan(cfg)
    z, c = torch.randn(5, 8), torch.randn(5, 12)
    x = g(z, c)
    assert x.shape == (5, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1  # tanh range, what to_uint8 expects
    assert d(x, c).shape == (5,)
    assert num_resamples(size)[1] >= 4


def test_unsupported_size_and_arch_are_clear_errors():
    with pytest.raises(ValueError, match="image_size 7"):
        num_resamples(7)
    with pytest.raises(ValueError, match="unknown GAN arch"):
        build_gan(GANModelConfig(arch="vae"))


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "mlp"])
def test_projection_discriminator_uses_the_text(arch):
    torch.manual_seed(0)
    cfg = GANModelConfig(arch=arch, z_dim=8, cond_dim=12, g_width=4, d_width=4, projection=True)
    _, d = build_gan(cfg)
    d.eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    c1, c2 = torch.randn(4, 12), torch.randn(4, 12)
    assert not torch.allclose(d(x, c1), d(x, c2))  # the score depends on the text
    # ... and only through the projection <embed(c), h>: without it, the text no longer matters
    d.embed = nn.Linear(12, d.head.in_features, bias=False)
    nn.init.zeros_(d.embed.weight)
    torch.testing.assert_close(d(x, c1), d(x, c2))


def test_resnet_blocks_add_their_convolutions_to_a_shortcut():
    from vislang.models.gan.networks import ResDownBlock, ResUpBlock

    torch.manual_seed(0)
    x, c = torch.randn(3, 4, 8, 8), torch.randn(3, 6)
    down, first, up = ResDownBlock(4, 5, sn=False), ResDownBlock(4, 5, sn=False, first=True), ResUpBlock(4, 5, 6)
    assert down(x).shape == (3, 5, 4, 4) and ResDownBlock(4, 5, sn=False, down=False)(x).shape == (3, 5, 8, 8)
    assert up(x, c).shape == (3, 5, 16, 16)
    with torch.no_grad():  # the residual branch silenced: what is left is the shortcut alone
        for m in (down, first, up):
            m.conv2.weight.zero_(), m.conv2.bias.zero_()
    torch.testing.assert_close(down(x), F.avg_pool2d(down.skip(x), 2))
    torch.testing.assert_close(first(x), first.skip(F.avg_pool2d(x, 2)))
    torch.testing.assert_close(up(x, c), up.skip(F.interpolate(x, scale_factor=2, mode="nearest")))
    assert not torch.allclose(ResDownBlock(4, 5, sn=False)(x), F.avg_pool2d(down.skip(x), 2))  # the branch counts


def test_minibatch_std_sees_spread_within_groups_and_never_mixes_real_with_fake():
    same = torch.randn(1, 3, 5, 5).expand(8, -1, -1, -1)  # a "generator" that draws one image for every noise
    varied = torch.randn(8, 3, 5, 5)
    out = minibatch_std(torch.cat([varied, same]), group=4)  # (16, 4, 5, 5): [real; fake] as a training step has it
    assert out.shape == (16, 4, 5, 5)
    assert torch.all(out[:8, 3] > 0.5) and torch.all(out[8:, 3] < 1e-3)  # spread of each half on its own
    torch.testing.assert_close(out[:8], minibatch_std(varied, group=4))  # the fake half does not leak into the real
    assert minibatch_std(torch.randn(6, 2, 3, 3), group=4).shape == (6, 3, 3, 3)  # 6 % 4: groups of 3 instead
    # ... and in the discriminator an image's features depend on its group: collapsed or varied neighbours
    torch.manual_seed(0)
    _, d = build_gan(GANModelConfig(cond_dim=6, d_width=4, minibatch_std=4))
    d.eval()  # spectral norm: no power iteration between the calls compared
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    h_collapsed = d.features(x[:1].expand(4, -1, -1, -1))[0]
    h_varied = d.features(x[:4])[0]
    assert not torch.allclose(h_collapsed, h_varied)
    torch.testing.assert_close(d.features(x)[:4], h := d.features(torch.cat([x[:4], -x[4:]]))[:4])  # other group
    assert h.shape == (4, d.head.in_features)
    assert GANModelConfig().minibatch_std == 0  # saved models without the field load as before


def test_minibatch_std_channels_measure_each_slice_of_the_features():
    x = torch.randn(8, 4, 3, 3)
    x[:, 2:] = x[:1, 2:]  # the second half of the channels is alike across the batch
    out = minibatch_std(x, group=4, channels=2)
    assert out.shape == (8, 6, 3, 3)
    assert torch.all(out[:, 4] > 0.3) and torch.all(out[:, 5] < 1e-3)  # one spread per slice
    with pytest.raises(ValueError, match="must divide"):
        minibatch_std(x, group=4, channels=3)
    _, d = build_gan(GANModelConfig(cond_dim=6, d_width=4, minibatch_std=4, minibatch_std_channels=4))
    assert d.std_conv.in_channels == 16 + 4 and d.features(torch.rand(8, 1, 28, 28)).shape == (8, 16)
    with pytest.raises(ValueError, match="minibatch_std_channels"):
        build_gan(GANModelConfig(cond_dim=6, d_width=4, minibatch_std=4, minibatch_std_channels=3))


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("z_in_norm", [False, True])
def test_noise_reaches_the_batchnorms_only_with_z_in_norm(arch, z_in_norm):
    torch.manual_seed(0)
    g, _ = build_gan(GANModelConfig(arch=arch, cond_dim=6, z_dim=5, g_width=4, z_in_norm=z_in_norm))
    with torch.no_grad():
        g.fc.weight[:, :5] = 0  # the first layer ignores the noise
        for m in g.modules():
            if hasattr(m, "gamma"):
                m.gamma.weight.normal_(), m.beta.weight.normal_()
    g.eval()
    c = torch.randn(1, 6).expand(2, -1)
    out = g(torch.randn(2, 5), c)
    assert out.shape == (2, 1, 28, 28)
    same = torch.allclose(out[0], out[1], atol=1e-5)
    assert same is (not z_in_norm)  # two noises, one text: they differ only through the norms


def test_diff_augment_transforms_each_image_and_lets_gradients_through():
    x = torch.rand(64, 1, 16, 16, requires_grad=True)
    assert diff_augment(x, "") is x and diff_augment(x, ()) is x  # no policy: untouched
    torch.manual_seed(0)
    y = diff_augment(x, "translation,cutout,brightness,contrast")
    assert y.shape == x.shape
    y.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable: G learns through it
    torch.manual_seed(0)
    torch.testing.assert_close(diff_augment(x, "translation,cutout,brightness,contrast"), y)  # seeded: reproducible
    # translation: each image is its own shifted copy, at most side/8 = 2 pixels, edges repeated
    img = torch.zeros(64, 1, 16, 16)
    img[:, :, 7, 7] = 1.0
    moved = diff_augment(img, "translation")
    where = moved[:, 0].flatten(1).argmax(1)
    rows, cols = where // 16, where % 16
    assert ((rows - 7).abs() <= 2).all() and ((cols - 7).abs() <= 2).all() and moved.sum(dim=(1, 2, 3)).eq(1).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # per-image draws, not one shift for the batch
    # cutout: exactly one square of half the side set to 0
    holes = diff_augment(-torch.ones(8, 1, 16, 16), "cutout") == 0
    assert holes.sum(dim=(1, 2, 3)).eq(64).all()
    with pytest.raises(ValueError, match="choose from"):
        diff_augment(x, "translation,flip")


def test_matching_aware_loss_counts_wrong_text_as_fake():
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)  # a perfect D on real vs fake: hinge loss 0
    assert float(d_loss(real, fake)) == 0.0
    assert float(d_loss(real, fake, mismatch=torch.full((4,), 2.0))) > 0  # wrong text scored "real" is penalised
    assert float(d_loss(real, fake, mismatch=torch.full((4,), -2.0))) == 0.0


def test_mismatched_texts_skip_pairs_that_mean_the_same():
    c = nn.functional.normalize(torch.tensor([[1.0, 0], [1.0, 0.01], [0, 1.0], [0, 1.0]]), dim=1)
    for seed in range(5):
        idx, keep = mismatched(c, 0.9, torch.Generator().manual_seed(seed))
        assert (idx != torch.arange(4)).all()
        assert torch.equal(keep, (c * c[idx]).sum(1) < 0.9)


def test_standing_stats_make_eval_mode_match_the_generators_own_batches():
    """After standing statistics, eval-mode BatchNorm normalises with the generator's own statistics: on the very
    batch they were taken from, eval output ≈ train output; with stale statistics (as an EMA copy has) it is not."""
    torch.manual_seed(0)
    G, _ = build_gan(GANModelConfig(image_size=28, cond_dim=8, g_width=8, z_dim=4))
    conds = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    for m in G.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0), m.running_var.fill_(0.1)  # stale statistics
    g = torch.Generator().manual_seed(5)
    pick, z = torch.randint(32, (64,), generator=g), torch.randn(64, 4, generator=g)
    with torch.no_grad():
        want = G.train()(z, conds[pick])  # normalised with the batch's own statistics
        stale = G.eval()(z, conds[pick])
    assert (stale - want).abs().max() > 0.1
    standing_stats(G, conds, z_dim=4, batches=1, batch_size=64, seed=5)  # the same draws as above
    assert not G.training
    with torch.no_grad():
        got = G(z, conds[pick])
    assert (got - want).abs().max() < 0.02  # running_var is unbiased, the batch's is not: tiny difference
    momenta = {m.momentum for m in G.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.1}  # the training momentum is restored


def test_uint8_round_trip():
    x = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(x)), x)


# --- metrics --------------------------------------------------------------------------------------------------------
class TinyJudge(nn.Module):
    """The judge interface: features(), forward() logits, class_names; a fixed random projection of the pixels."""

    class_names = ["dark", "bright"]

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(28 * 28, dim)
        self.num_features = dim + 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        edges = (x[..., 1:] - x[..., :-1]).abs().flatten(1).mean(1, keepdim=True)  # high-frequency energy (B, 1)
        return torch.cat([torch.tanh(self.proj(x.flatten(1))), 10 * edges], dim=1)  # (B, dim + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True)  # mean brightness in [0, 1]
        return torch.cat([(0.5 - m) * 20, (m - 0.5) * 20], dim=1)


def _images(n: int, seed: int, bright: bool | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g) * 0.5
    if bright is None:
        x[: n // 2] += 0.5
    elif bright:
        x += 0.5
    return (x * 255).round().to(torch.uint8)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`")
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise():
    judge = TinyJudge()
    real = _images(300, 0)
    assert abs(fid_kid(judge, real, real)["fid"]) < 1e-3
    fids, kids = [], []
    for sigma in (10, 40, 90):
        noisy = real.float() + sigma * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
        r = fid_kid(judge, real, noisy.clamp(0, 255).round().to(torch.uint8))
        fids.append(r["fid"]), kids.append(r["kid"])
    assert fids[0] > 1e-3 and fids == sorted(fids), fids
    assert kids == sorted(kids), kids


def test_nearest_distances_find_copies_and_measure_the_rest():
    from vislang.evaluation.gan_metrics import nearest_distances

    torch.manual_seed(0)
    ref = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8)
    far = torch.full((1, 1, 6, 6), 0, dtype=torch.uint8)
    d = nearest_distances(torch.cat([ref[7:9], far]), ref, chunk=2)  # two copies, one image of zeros
    assert d[:2].tolist() == pytest.approx([0.0, 0.0], abs=1e-3)
    want = ((ref.float() / 255).flatten(1).pow(2).mean(1).sqrt()).min()  # zeros: RMS distance = nearest image's RMS
    assert d[2].item() == pytest.approx(want.item(), rel=1e-4)


def test_torchmetrics_fid_matches_the_formula():
    judge = TinyJudge()
    a, b = _images(200, 0), _images(200, 3, bright=True)
    with torch.no_grad():
        fa, fb = (judge.features(x.float() / 255) for x in (a, b))
    ref = frechet_distance(fa, fb)
    assert ref > 0.01
    assert fid_kid(judge, a, b)["fid"] == pytest.approx(ref, rel=1e-3, abs=1e-4)


def test_inception_style_score_and_class_consistency():
    judge = TinyJudge()
    mixed, dark = _images(200, 0), _images(200, 1, bright=False)
    assert inception_style_score(judge, mixed, splits=2)["is"] == pytest.approx(2.0, abs=0.05)  # both classes, sure
    assert inception_style_score(judge, dark, splits=2)["is"] == pytest.approx(1.0, abs=0.05)  # one class only
    labels = torch.tensor([1] * 100 + [0] * 100)
    res = class_consistency(judge, mixed, labels)
    assert res["class_consistency"] == 1.0 and res["per_class"] == [1.0, 1.0]
    assert class_consistency(judge, mixed, 1 - labels)["class_consistency"] == 0.0


def test_fid_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_kid(TinyJudge(), _images(1, 0), _images(5, 0))


def test_clip_score_is_a_mean_cosine(t2i):
    imgs = _images(6, 0)
    text = t2i.embed(["a photo of a bag."]).repeat(6, 1)
    s = clip_score(t2i.encoder, imgs, text)
    assert -1 <= s <= 1
    assert s == pytest.approx(-clip_score(t2i.encoder, imgs, -text), abs=1e-5)


# --- generation -----------------------------------------------------------------------------------------------------
def test_generation_with_a_fixed_seed_is_reproducible(t2i):
    a = t2i.generate(["a photo of a sneaker", "a photo of a bag"], n=3, seed=7)
    b = t2i.generate(["a photo of a sneaker", "a photo of a bag"], n=3, seed=7)
    c = t2i.generate(["a photo of a sneaker", "a photo of a bag"], n=3, seed=8)
    assert a.shape == (6, 1, 28, 28) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    more = t2i.generate("a photo of a sneaker", n=5, seed=7)
    assert torch.equal(more[:3], a[:3])  # the first images of a seed do not depend on -n


def test_interpolation_strip_moves_between_prompts(t2i):
    strip = t2i.interpolate("a photo of a sneaker", "a photo of a bag", steps=5, seed=0)
    assert strip.shape == (5, 1, 28, 28)
    first, last = t2i.generate("a photo of a sneaker", n=1, seed=0), t2i.generate("a photo of a bag", n=1, seed=0)
    assert (strip[0].int() - first[0].int()).abs().max() <= 1  # same noise and (up to rounding) the same condition
    assert (strip[-1].int() - last[0].int()).abs().max() <= 1
    a, b = nn.functional.normalize(torch.randn(2, 8), dim=1)
    path = slerp(a, b, torch.linspace(0, 1, 4))
    torch.testing.assert_close(path.norm(dim=1), torch.ones(4))


def test_bad_prompts_and_counts_are_clear_errors(t2i):
    with pytest.raises(ValueError, match="empty"):
        t2i.generate(["   "], n=1)
    with pytest.raises(ValueError, match="none of the words"):
        t2i.generate(["zxqv blorptang"], n=1)
    with pytest.raises(ValueError, match="at least 1"):
        t2i.generate(["a photo of a bag"], n=0)
    with pytest.raises(ValueError, match="at most 4096"):
        t2i.generate(["a photo of a bag"], n=100_000)
    with pytest.warns(UserWarning, match="never seen"):
        check_prompts(["a photo of a zxqv"], t2i.tokenizer)
    with warnings.catch_warnings():  # "t-shirt" is "t", "-", "shirt" to the tokenizer: known words, no warning
        warnings.simplefilter("error")
        check_prompts(["a photo of a t-shirt."], t2i.tokenizer)


def test_save_and_load_round_trip(t2i, tmp_path):
    d = t2i.save_pretrained(tmp_path / "model", {"data": {"train": "fashion-mnist"}})
    assert is_gan_dir(d) and is_gan_dir(tmp_path) and not is_gan_dir(tmp_path / "nothing")
    back = TextToImage.from_pretrained(tmp_path)  # a run directory works too
    assert torch.equal(back.generate("a photo of a coat", n=2, seed=1), t2i.generate("a photo of a coat", n=2, seed=1))
    with pytest.raises(ValueError, match="not a text-to-image GAN"):
        TextToImage.from_pretrained(d / "text_encoder")


# --- training, CLI, evaluation (CPU smoke) ----------------------------------------------------------------------------
def _cfg(text_model_dir, out: Path, steps: int, arch: str = "dcgan"):
    from vislang.train.config import load_train_config

    return load_train_config(
        None,
        [
            "task=gan",
            "data.train=fashion-mnist",
            "data.max_train=256",
            "batch_size=32",
            f"max_steps={steps}",
            "log_every=2",
            "save_every=3",
            "progress=false",
            "threads=1",
            f"out_dir={out}",
            f"gan.text_model={text_model_dir}",
            f"gan.model.arch={arch}",
            "gan.model.z_dim=8",
            "gan.model.g_width=4",
            "gan.model.d_width=4",
            "gan.sample_every=3",
            "gan.sample_per_prompt=2",
            "gan.mismatch_max_cos=1.5",  # an untrained tower embeds every caption alike: keep all wrong pairs
        ],
    )


def _generator_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.fashion_mnist
def test_train_resumes_exactly_and_writes_the_run(text_model_dir, tmp_path):
    from vislang.train.tasks.gan import train_gan

    straight = train_gan(_cfg(text_model_dir, tmp_path / "a", 6))
    train_gan(_cfg(text_model_dir, tmp_path / "b", 3))
    resumed = train_gan(_cfg(text_model_dir, tmp_path / "b", 6), resume=True)
    for k, v in _generator_state(straight).items():
        torch.testing.assert_close(_generator_state(resumed)[k], v, msg=k)
    run = tmp_path / "a"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6] and all("loss_d" in r and "d_mismatch" in r for r in lines)
    assert (run / "samples" / "step_0000003.png").is_file() and (run / "checkpoints" / "last.pt").is_file()
    with pytest.raises(FileExistsError, match="--resume"):
        train_gan(_cfg(text_model_dir, run, 6))


@pytest.mark.fashion_mnist
def test_resnet_gan_trains_and_saves_a_loadable_generator(text_model_dir, tmp_path):
    from vislang.train.tasks.gan import train_gan

    model_dir = train_gan(_cfg(text_model_dir, tmp_path / "r", 3, arch="resnet"))
    t2i = TextToImage.from_pretrained(model_dir)
    assert t2i.cfg.arch == "resnet" and any(k.startswith("blocks.0.conv2") for k in _generator_state(model_dir))
    assert t2i.generate("a photo of a bag.", n=2, seed=0).shape == (2, 1, 28, 28)


@pytest.mark.fashion_mnist
def test_mixture_gan_trains_saves_and_samples_each_component(text_model_dir, tmp_path):
    import dataclasses

    from vislang.models.gan.networks import GeneratorMixture
    from vislang.train.tasks.gan import train_gan

    c = _cfg(text_model_dir, tmp_path / "m", 3)
    model_dir = train_gan(dataclasses.replace(c, gan=dataclasses.replace(c.gan, model={**c.gan.model, "mixture": 2})))
    t2i = TextToImage.from_pretrained(model_dir)
    assert t2i.cfg.mixture == 2 and isinstance(t2i.generator, GeneratorMixture)
    state = _generator_state(model_dir)
    assert any(k.startswith("parts.1.") for k in state)
    assert not torch.allclose(state["parts.0.fc.weight"], state["parts.1.fc.weight"])
    x = t2i.generate("a photo of a bag.", n=6, seed=0)
    assert x.shape == (6, 1, 28, 28) and torch.equal(t2i.generate("a photo of a bag.", n=2, seed=0), x[:2])


@pytest.mark.fashion_mnist
def test_projected_gan_trains_and_its_generator_loads_without_the_discriminator(text_model_dir, tmp_path, monkeypatch):
    from vislang.models.gan import projected
    from vislang.train.tasks.gan import train_gan

    model_dir = train_gan(_cfg(text_model_dir, tmp_path / "p", 3, arch="projected"))

    def no_feature_net(*a, **k):
        raise AssertionError("sampling built the projected discriminator")

    monkeypatch.setattr(projected, "frozen_feature_net", no_feature_net)
    t2i = TextToImage.from_pretrained(model_dir)
    assert t2i.cfg.arch == "projected" and t2i.generate("a photo of a bag.", n=2, seed=0).shape == (2, 1, 28, 28)


@pytest.mark.fashion_mnist
def test_lr_decay_falls_linearly_to_zero_and_resumes_exactly(text_model_dir, tmp_path):
    import dataclasses

    from vislang.train.tasks.gan import train_gan

    assert [lr_factor(s, 10, 0.6) for s in (0, 5, 6, 8, 10)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor(9, 10, 1.0) == 1.0 and lr_factor(0, 10, 0.0) == 1.0 and lr_factor(5, 10, 0.0) == 0.5

    def cfg(out, steps, decay_from=0.5):
        c = _cfg(text_model_dir, tmp_path / out, steps)
        return dataclasses.replace(c, max_steps=steps, gan=dataclasses.replace(c.gan, lr_decay_from=decay_from))

    straight = train_gan(cfg("a", 6))
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_factor"] for r in lines] == pytest.approx([1.0, 1.0, 1 / 3], abs=1e-4)  # steps 1, 3, 5
    # The rate is a function of the step and the run's length, so a resumed run follows the schedule exactly: the
    # first 3 steps at the full rate (a 3-step run that does not decay), then resumed as a 6-step run decaying at 3.
    train_gan(cfg("b", 3, decay_from=1.0))
    resumed = train_gan(cfg("b", 6), resume=True)
    for k, v in _generator_state(straight).items():
        torch.testing.assert_close(_generator_state(resumed)[k], v, msg=k)
    train_gan(cfg("c", 6, decay_from=1.0))  # without the decay the weights differ
    assert any(
        not torch.equal(v, _generator_state(tmp_path / "c" / "model")[k]) for k, v in _generator_state(straight).items()
    )
    with pytest.raises(ValueError, match="lr_decay_from"):
        train_gan(cfg("d", 2, decay_from=1.5))


@pytest.mark.fashion_mnist
def test_d_steps_trains_the_generator_on_every_kth_batch_and_logs_its_loss_over_those(text_model_dir, tmp_path):
    import dataclasses

    from vislang.train.tasks.gan import train_gan

    c = _cfg(text_model_dir, tmp_path / "a", 4)
    train_gan(dataclasses.replace(c, gan=dataclasses.replace(c.gan, d_steps=2)))
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4] and all("loss_g" in r and "loss_d" in r for r in lines)
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    adam_steps = lambda opt: {float(s["step"]) for s in state[opt]["state"].values()}  # noqa: E731
    assert adam_steps("opt_d") == {4.0} and adam_steps("opt_g") == {2.0}  # four D updates, two G updates
    with pytest.raises(ValueError, match="d_steps"):
        train_gan(dataclasses.replace(c, out_dir=str(tmp_path / "b"), gan=dataclasses.replace(c.gan, d_steps=0)))


def test_spread_match_is_zero_for_equal_spread_and_grows_as_the_fakes_collapse():
    from vislang.losses import spread_match_loss

    torch.manual_seed(0)
    real = torch.randn(8, 5) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    shuffled = real[[1, 0, 3, 2, 5, 4, 7, 6]]  # each group of 4 keeps its members: the same spread
    assert spread_match_loss(shuffled, real, 4).item() < 1e-10
    half = real.reshape(2, 4, 5).mean(1, keepdim=True) + 0.5 * (
        real.reshape(2, 4, 5) - real.reshape(2, 4, 5).mean(1, keepdim=True)
    )
    collapsed = real.reshape(2, 4, 5).mean(1, keepdim=True).expand(2, 4, 5)
    losses = [spread_match_loss(x.reshape(8, 5), real, 4).item() for x in (half, collapsed)]
    assert 0 < losses[0] < losses[1] and losses[1] == pytest.approx(1.0, abs=1e-4)  # all spread gone: 1
    # groups are where the spread is taken: one group of 8 sees the other groups' shift, two of 4 do not
    shifted = real + torch.tensor([0.0] * 4 + [10.0] * 4)[:, None]
    assert spread_match_loss(shifted, real, 4).item() < 1e-10 < spread_match_loss(shifted, real, 8).item()
    h = torch.randn(8, 5, requires_grad=True)
    spread_match_loss(h, real.requires_grad_(), 4).backward()
    assert h.grad is not None and real.grad is None  # the real side is a target


@pytest.mark.fashion_mnist
def test_spread_match_changes_the_generator_update_only_when_on(text_model_dir, tmp_path):
    import dataclasses

    from vislang.train.tasks.gan import train_gan

    c = _cfg(text_model_dir, tmp_path / "a", 3)
    with_mbstd = dataclasses.replace(c, gan=dataclasses.replace(c.gan, model={**c.gan.model, "minibatch_std": 4}))
    base = train_gan(with_mbstd)
    on = dataclasses.replace(
        with_mbstd, out_dir=str(tmp_path / "b"), gan=dataclasses.replace(with_mbstd.gan, spread_match=1.0)
    )
    spread = train_gan(on)
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["spread_match"] >= 0 for r in lines)
    a, b = _generator_state(base), _generator_state(spread)
    assert any(not torch.allclose(a[k], b[k]) for k in a)  # the term reached G's weights


@pytest.mark.fashion_mnist
def test_group_by_label_orders_each_batch_by_class(text_model_dir, tmp_path, monkeypatch):
    import dataclasses

    from vislang.data.prepare import PreparedDataset
    from vislang.train.tasks.gan import train_gan

    seen: list[np.ndarray] = []
    get_batch = PreparedDataset.get_batch

    def recording(self, idx):
        seen.append(np.asarray(self.labels)[np.asarray(idx)])
        return get_batch(self, idx)

    monkeypatch.setattr(PreparedDataset, "get_batch", recording)
    cfg = _cfg(text_model_dir, tmp_path / "grouped", 2)
    gan = dataclasses.replace(cfg.gan, group_by_label=True, model={**cfg.gan.model, "minibatch_std": 4})
    train_gan(dataclasses.replace(cfg, gan=gan))
    batches = [b for b in seen if len(b) == cfg.batch_size]
    assert len(batches) == 2 and all(np.all(np.diff(b) >= 0) for b in batches)  # one class after another
    assert len(set(batches[0].tolist())) > 1  # ... of a batch that still mixes classes
    seen.clear()
    train_gan(dataclasses.replace(cfg, out_dir=str(tmp_path / "plain")))
    assert not all(np.all(np.diff(b) >= 0) for b in seen if len(b) == cfg.batch_size)  # off: random order
    with pytest.raises(ValueError, match="choose one"):
        train_gan(
            dataclasses.replace(cfg, out_dir=str(tmp_path / "x"), gan=dataclasses.replace(gan, relation_negatives=True))
        )
    odd = dataclasses.replace(gan, model={**gan.model, "minibatch_std": 5})
    with pytest.raises(ValueError, match="must divide"):
        train_gan(dataclasses.replace(cfg, out_dir=str(tmp_path / "y"), gan=odd))


@pytest.mark.fashion_mnist
def test_cli_train_generate_and_eval(text_model_dir, tmp_path, monkeypatch):
    from PIL import Image

    from vislang.cli.main import main

    run = tmp_path / "run"
    args = [f"--{o}" for o in _cfg_overrides(text_model_dir, run)]
    assert main(["train", *args]) == 0
    grid = tmp_path / "grid.png"
    assert (
        main(["generate", "a photo of a sneaker", "-n", "4", "-o", str(grid), "--seed", "0", "--model", str(run)]) == 0
    )
    assert Image.open(grid).size == (2 * (4 * 30 + 2), 2 * 32)  # 4 images of 28 px, 2 px gaps, scale 2
    strip = tmp_path / "strip.png"
    argv = ["generate", "a photo of a bag", "--to", "a photo of a coat", "--steps", "3", "-o", str(strip)]
    assert main([*argv, "--model", str(run)]) == 0 and strip.is_file()
    assert main(["generate", "", "-o", str(grid), "--model", str(run)]) == 2
    assert main(["generate", "a photo of a bag", "-n", "0", "-o", str(grid), "--model", str(run)]) == 2

    calls = []
    fake = lambda m, **kw: calls.append((m, kw["judge"])) or {"fid_fm": 1.0}  # noqa: E731
    monkeypatch.setattr("vislang.evaluation.gan.evaluate_gan", fake)
    assert main(["eval", "--model", str(run)]) == 0 and calls == [(str(run), None)]  # `vislang eval` takes GAN runs
    assert main(["eval", "--model", str(run), "--judge", "j/model"]) == 0 and calls[-1] == (str(run), "j/model")
    monkeypatch.undo()

    judge = _tiny_fm_judge(tmp_path / "judge")
    from vislang.evaluation.gan import evaluate_gan

    res = evaluate_gan(run, judge=judge, n_per_class=420, n_real=100)  # 4200 images: past the 4096 cap per call
    assert res["n_generated"] == 4200 and 0 <= res["class_consistency"] <= 1
    assert res["fid_fm"] > 0 and res["fid_fm_floor"] >= 0 and "clip_score_real" in res
    assert res["fid_fm_floor_samples"] == 5 and res["fid_fm_floor_std"] > 0  # 5 disjoint train samples of 4200
    assert res["nn_train_rms_generated"] > 0 and res["nn_train_rms_real"] > 0  # test images are not train images
    assert 0 <= res["nn_train_closer_than_real_p1"] <= 1
    assert (run / "eval" / "results.json").is_file()

    # The real side measured once serves a second evaluation with the same numbers (vislang compare reuses it).
    from vislang.evaluation.gan import evaluate_classes, load_judge, real_reference
    from vislang.models.gan.pipeline import TextToImage

    model, j = TextToImage.from_pretrained(run), load_judge(judge)
    ref = real_reference(j, "fashion-mnist", 28, 1, n_per_class=30, n_real=200, seed=3)
    alone = evaluate_classes(model, j, n_per_class=30, n_real=200, seed=3)
    reused = evaluate_classes(model, j, n_per_class=30, n_real=200, seed=3, reference=ref)
    for k in ("fid_fm", "fid_fm_floor", "fid_fm_floor_std", "judge_accuracy_real", "nn_train_rms_real"):
        assert reused[k] == pytest.approx(alone[k]), k
    with pytest.raises(ValueError, match="made for 200 images, this evaluation draws 100"):
        evaluate_classes(model, j, n_per_class=10, n_real=200, seed=3, reference=ref)

    # Several noise seeds: each in its own folder, the summary the mean, with each seed's numbers beside it.
    from vislang.evaluation.gan import evaluate_gan_seeds

    summ = evaluate_gan_seeds(run, [0, 1], judge=judge, n_per_class=30, n_real=200, out_dir=tmp_path / "ms")
    each = [json.loads((tmp_path / "ms" / f"seed-{k}" / "results.json").read_text()) for k in (0, 1)]
    assert each[0]["fid_fm"] != each[1]["fid_fm"] and (tmp_path / "ms" / "seed-1" / "samples.png").is_file()
    assert summ["fid_fm"] == pytest.approx((each[0]["fid_fm"] + each[1]["fid_fm"]) / 2) and summ["fid_fm_sd"] > 0
    assert summ["fid_fm_over_floor"] == pytest.approx(summ["fid_fm"] / summ["fid_fm_floor"])
    assert summ["per_seed"]["1"]["fid_fm"] == each[1]["fid_fm"] and summ["seeds"] == [0, 1]
    assert json.loads((tmp_path / "ms" / "results.json").read_text())["fid_fm"] == summ["fid_fm"]
    for bad in ("0,0", "x", ","):
        assert main(["generate-eval", "--model", str(run), "--judge", str(judge), "--seed", bad]) == 2


def _cfg_overrides(text_model_dir, out):
    cfg_list = [
        "task=gan",
        "data.max_train=128",
        "batch_size=32",
        "max_steps=2",
        "progress=false",
        "threads=1",
        f"out_dir={out}",
        f"gan.text_model={text_model_dir}",
        "gan.model.arch=mlp",
        "gan.model.z_dim=8",
        "gan.model.g_width=4",
        "gan.model.d_width=4",
        "gan.sample_every=0",
    ]
    return cfg_list


def _tiny_fm_judge(d: Path) -> Path:
    from vislang.data.fashion_mnist import FASHION_MNIST_LABELS
    from vislang.models import VisionConfig
    from vislang.models.classifier import ClassifierConfig, ImageClassifier

    torch.manual_seed(0)
    v = VisionConfig(arch="cnn", image_size=28, channels=1, width=4, depth=2, mean=(0.3,), std=(0.35,))
    ImageClassifier(ClassifierConfig(vision=v, class_names=tuple(FASHION_MNIST_LABELS))).save_pretrained(d)
    return d


def test_missing_text_model_is_a_clear_error(tmp_path):
    from vislang.train.tasks.gan import train_gan

    cfg = _cfg(tmp_path / "nope", tmp_path / "run", 1)
    with pytest.raises(FileNotFoundError, match="gan.text_model") as err:
        train_gan(cfg)
    assert "make demo" in str(err.value) and "--gan.text_model=DIR" in str(err.value)  # says how to get one
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_gan_text_model_defaults_to_what_make_demo_writes():
    from vislang.config import PACKAGED_CONFIGS
    from vislang.train.config import GANConfig, load_train_config

    assert GANConfig().text_model == "runs/demo/model"
    for name in ("gan", "gan-mlp", "gan-gpu", "gan-projected"):  # the Fashion-MNIST GANs borrow the demo's tower
        assert load_train_config(PACKAGED_CONFIGS / f"{name}.yaml").gan.text_model == "runs/demo/model", name


def test_packaged_gan_configs_load():
    from vislang.cli.main import PACKAGED_CONFIGS
    from vislang.train.config import load_train_config

    for name in ("gan", "gan-mlp", "gan-shapes", "gan-shapes-relations", "gan-gpu", "gan-projected"):
        cfg = load_train_config(PACKAGED_CONFIGS / f"{name}.yaml")
        assert cfg.task == "gan" and cfg.gan is not None
        GANModelConfig(**cfg.gan.model)  # every model key is a real field
    assert load_train_config(None).gan is None  # other runs are unchanged


def test_judge_interface_without_preprocess_scales_pixels():
    judge = TinyJudge()
    x = _images(4, 0)
    from vislang.evaluation.gan_metrics import JudgeFeatures

    torch.testing.assert_close(JudgeFeatures(judge)(x), judge.features(x.float() / 255))
    assert np.isfinite(frechet_distance(torch.randn(50, 3), torch.randn(50, 3)))


def test_gan_throughput_benchmark_smoke(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gan_throughput", Path("benchmarks/gan_throughput.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert [r["arch"] for r in out["rows"]] == ["dcgan", "mlp"]
    assert all(r["train_images_per_s"] > 0 and r["generate_images_per_s"] > 0 for r in out["rows"])
    assert json.loads((tmp_path / "b.json").read_text())["ratio"]["train_dcgan_over_mlp"] > 0


@pytest.mark.fashion_mnist
def test_train_with_diff_augment_differs_and_checks_the_policy_first(text_model_dir, tmp_path):
    import dataclasses

    from vislang.train.tasks.gan import train_gan

    cfg = _cfg(text_model_dir, tmp_path / "plain", 2)
    plain = train_gan(cfg)
    aug = train_gan(
        dataclasses.replace(cfg, out_dir=str(tmp_path / "aug"), gan=dataclasses.replace(cfg.gan, augment="translation"))
    )
    assert any(not torch.equal(v, _generator_state(aug)[k]) for k, v in _generator_state(plain).items())
    bad = dataclasses.replace(cfg, out_dir=str(tmp_path / "bad"), gan=dataclasses.replace(cfg.gan, augment="rotate"))
    with pytest.raises(ValueError, match="unknown GAN augmentation 'rotate'"):
        train_gan(bad)
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.fashion_mnist
def test_fid_tracking_leaves_training_alone_and_keep_best_saves_the_best_step(text_model_dir, tmp_path, monkeypatch):
    import dataclasses

    from vislang.evaluation.gan import FIDTracker
    from vislang.train.checkpoint import load_checkpoint
    from vislang.train.tasks.gan import train_gan

    judge = _tiny_fm_judge(tmp_path / "judge")
    base = _cfg(text_model_dir, tmp_path / "plain", 6)

    def cfg(out, steps=6, **gan):
        return dataclasses.replace(
            base, out_dir=str(tmp_path / out), max_steps=steps, gan=dataclasses.replace(base.gan, **gan)
        )

    plain = train_gan(cfg("plain"))
    tracked = train_gan(cfg("tracked", judge=str(judge), fid_every=2, fid_images=40))
    lines = [json.loads(x) for x in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in lines if "tracked_fid_fm" in r]
    assert [r["step"] for r in fids] == [2, 4, 6] and all(r["tracked_fid_fm"] > 0 for r in fids)
    assert all(0 <= r["tracked_class_consistency"] <= 1 for r in fids)
    assert all(0 < r["tracked_fid_fm_floor"] < r["tracked_fid_fm"] for r in fids)  # two real samples: closer
    assert (tmp_path / "tracked" / "fid.png").is_file() and not (tmp_path / "plain" / "fid.png").exists()
    for k, v in _generator_state(plain).items():  # tracking draws from its own generators: same training
        torch.testing.assert_close(_generator_state(tracked)[k], v, msg=k)

    scripted = iter([0.5, 0.1, 0.3])  # the snapshot of step 4 is the best
    real_call = FIDTracker.__call__
    monkeypatch.setattr(FIDTracker, "__call__", lambda self, g, z: {**real_call(self, g, z), "fid_fm": next(scripted)})
    best = train_gan(cfg("best", judge=str(judge), fid_every=2, fid_images=40, keep_best=True))
    meta = json.loads((best / "config.json").read_text())["train"]
    assert meta["generator_step"] == 4 and meta["tracked_fid_fm"]["best_step"] == 4 and meta["steps"] == 6
    assert load_checkpoint(tmp_path / "best" / "checkpoints" / "last.pt")["best"]["step"] == 4
    four = train_gan(cfg("four", steps=4))  # the same run stopped at step 4 saves the same generator
    for k, v in _generator_state(four).items():
        torch.testing.assert_close(_generator_state(best)[k], v, msg=k)
    scripted = iter([0.5, 0.3, 0.1])  # the last step is the best: its snapshot is saved, the same as recomputing
    last = train_gan(cfg("last", judge=str(judge), fid_every=2, fid_images=40))
    assert json.loads((last / "config.json").read_text())["train"]["generator_step"] == 6
    for k, v in _generator_state(plain).items():
        torch.testing.assert_close(_generator_state(last)[k], v, msg=k)
    with pytest.raises(ValueError, match="--gan.judge"):
        train_gan(cfg("nojudge", keep_best=True))


def test_train_gan_puts_cudnn_benchmark_back_even_when_the_run_fails(monkeypatch, tmp_path):
    from vislang.train.config import GANConfig, TrainConfig
    from vislang.train.tasks import gan as gan_task

    def setup_that_fails(gan):
        torch.backends.cudnn.benchmark = not before  # what a CUDA run does
        raise RuntimeError("stopped")

    before = torch.backends.cudnn.benchmark
    monkeypatch.setattr(gan_task, "check_gan_config", setup_that_fails)
    monkeypatch.setattr(gan_task.GANTask, "check", lambda self, cfg: None)  # no text tower needed to get to setup
    with pytest.raises(RuntimeError, match="stopped"):
        gan_task.train_gan(TrainConfig(task="gan", out_dir=str(tmp_path), gan=GANConfig(), progress=False))
    assert torch.backends.cudnn.benchmark == before


def test_coverage_loss_pulls_only_the_nearest_candidate():
    from vislang.losses import coverage_loss

    real = torch.rand(2, 1, 4, 4) * 2 - 1
    cand = torch.stack([real[0] + 0.5, real[0] + 0.1, real[1] - 1.0, real[1]]).requires_grad_()  # K=2 per real
    loss = coverage_loss(cand, real)
    assert loss.item() == pytest.approx((0.1**2 + 0.0) / 2, abs=1e-6)  # nearest per real: 0.1 away, exact
    loss.backward()
    touched = cand.grad.flatten(1).abs().sum(1) > 0
    assert touched.tolist() == [False, True, False, False]  # the farther ones get nothing; the exact one has 0 grad
    far = coverage_loss(torch.stack([real[0] + 0.5, real[0] + 0.4, real[1] + 0.3, real[1] - 0.3]), real)
    assert far.item() == pytest.approx((0.4**2 + 0.3**2) / 2, abs=1e-5)


def test_coverage_term_reaches_the_generator(text_model_dir, tmp_path):
    import dataclasses

    from vislang.models.gan.build import build_gan
    from vislang.models.gan.networks import GANModelConfig
    from vislang.train.config import GANConfig
    from vislang.train.tasks.gan_step import gan_step

    def step(weight: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        g, d = build_gan(GANModelConfig(cond_dim=6, z_dim=5, g_width=4, d_width=4))
        opt_g, opt_d = (torch.optim.Adam(m.parameters(), 1e-2) for m in (g, d))
        gan = dataclasses.replace(GANConfig(), coverage=weight, coverage_images=3, coverage_candidates=4)
        real, c = torch.rand(8, 1, 28, 28) * 2 - 1, torch.nn.functional.normalize(torch.randn(8, 6), dim=1)
        stats = gan_step(g, d, g, opt_g, opt_d, real, c, gan, torch.Generator().manual_seed(0))
        assert stats["coverage"] > 0
        return {k: v.clone() for k, v in g.state_dict().items()}

    tiny, big = step(1e-9), step(10.0)  # the same noise, batches and BatchNorm statistics: only the weight differs
    assert any(not torch.allclose(tiny[k], big[k]) for k in tiny if tiny[k].is_floating_point())
    with pytest.raises(ValueError, match="coverage_candidates"):
        from vislang.train.tasks.gan import train_gan

        c = _cfg(text_model_dir, tmp_path / "a", 2)
        train_gan(dataclasses.replace(c, gan=dataclasses.replace(c.gan, coverage=1.0, coverage_candidates=0)))


def test_generator_mixture_picks_a_component_from_the_noise_alone():
    from vislang.models.gan.networks import GeneratorMixture

    g, _ = build_gan(GANModelConfig(cond_dim=6, z_dim=5, g_width=4, mixture=3))
    assert isinstance(g, GeneratorMixture) and len(g.parts) == 3
    torch.manual_seed(0)
    z, c = torch.randn(600, 5), torch.randn(600, 6)
    k = g.component(z)
    assert k.bincount(minlength=3).min() > 150  # each component draws about a third of the images
    g.eval()
    with torch.no_grad():
        x = g(z, c)
        for j in range(3):  # every image is its own component's output, wherever it sits in the batch
            sel = (k == j).nonzero().squeeze(1)
            assert torch.allclose(x[sel], g.parts[j](z[sel], c[sel]), atol=1e-6)
        assert torch.allclose(g(z[5:6], c[5:6]), x[5:6], atol=1e-6)  # one image alone: the same as in a batch
    g.train()
    g(z[:32], c[:32]).square().mean().backward()
    assert all(p.grad is not None for part in g.parts for p in part.parameters())  # all components learn
    with pytest.raises(ValueError, match="mixture"):
        build_gan(GANModelConfig(cond_dim=6, z_dim=5, mixture=0))
    with pytest.raises(ValueError, match="z_dim"):
        build_gan(GANModelConfig(cond_dim=6, z_dim=2, mixture=3))


def test_packed_discriminator_scores_each_image_with_its_pack_partner():
    torch.manual_seed(0)
    x, c = torch.rand(8, 1, 28, 28) * 2 - 1, F.normalize(torch.randn(8, 6), dim=1)
    for pack in (1, 2):
        _, d = build_gan(GANModelConfig(cond_dim=6, d_width=4, pack=pack))
        d.eval()  # spectral norm: no power iteration between the calls compared
        changed = torch.cat([x[:1], -x[1:2], x[2:]])  # only image 1 differs
        s, s2 = d(x, c), d(changed, c)
        assert s.shape == (8,)
        torch.testing.assert_close(s[2:], s2[2:])  # other packs untouched
        assert torch.isclose(s[0], s2[0]).item() == (pack == 1)  # image 0 is judged together with image 1 when packed
    with pytest.raises(ValueError, match="packs of gan.model.pack=2"):
        d.features(x[:3])
    with pytest.raises(ValueError, match="at least 1"):
        build_gan(GANModelConfig(cond_dim=6, d_width=4, pack=0))


def test_flatten_head_sees_where_things_are_and_sum_pooling_barely_does():
    torch.manual_seed(0)
    x = torch.zeros(2, 1, 28, 28)
    x[0, 0, 4:12, 4:12] = 1.0  # one square top left ...
    x[1, 0, 16:24, 16:24] = 1.0  # ... the same square bottom right
    gaps = {}
    for pool in ("sum", "flatten"):
        _, d = build_gan(GANModelConfig(cond_dim=6, d_width=4, d_pool=pool))
        d.eval()
        h = d.features(x)
        gaps[pool] = ((h[0] - h[1]).norm() / h.norm(dim=1).mean()).item()
    assert gaps["flatten"] > 5 * gaps["sum"]  # sum pooling: nearly the same features wherever the square is (borders)
    with pytest.raises(ValueError, match="d_pool"):
        build_gan(GANModelConfig(cond_dim=6, d_width=4, d_pool="max"))


def test_r1_penalises_the_discriminators_gradient_at_real_images():
    import dataclasses

    from vislang.train.config import GANConfig
    from vislang.train.tasks.gan_step import gan_step

    def step(r1: float, regularize: bool = True) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        g, d = build_gan(GANModelConfig(cond_dim=6, z_dim=5, g_width=4, d_width=4, spectral_norm=False))
        opt_g, opt_d = (torch.optim.Adam(m.parameters(), 1e-2) for m in (g, d))
        real, c = torch.rand(8, 1, 28, 28) * 2 - 1, F.normalize(torch.randn(8, 6), dim=1)
        gan = dataclasses.replace(GANConfig(), r1=r1, r1_every=4)
        stats = gan_step(g, d, g, opt_g, opt_d, real, c, gan, torch.Generator(), regularize=regularize)
        return stats, {k: v.clone() for k, v in d.state_dict().items()}

    (off, d_off), (on, d_on), (lazy, d_lazy) = step(0.0), step(10.0), step(10.0, regularize=False)
    assert "r1" not in off and on["r1"] > 0 and "r1" not in lazy
    torch.testing.assert_close(off["d_real"], on["d_real"])  # same step up to the penalty ...
    assert any(not torch.allclose(d_off[k], d_on[k]) for k in d_off)  # ... which changes D's update
    assert all(torch.equal(d_off[k], d_lazy[k]) for k in d_off)  # a step between lazy R1 steps: no penalty at all


@pytest.mark.parametrize("bad", [{"r1": -1.0}, {"r1": 1.0, "r1_every": 0}])
def test_bad_r1_settings_are_clear_errors(text_model_dir, tmp_path, bad):
    import dataclasses

    from vislang.train.tasks.gan import train_gan

    c = _cfg(text_model_dir, tmp_path / "a", 2)
    with pytest.raises(ValueError, match="gan.r1"):
        train_gan(dataclasses.replace(c, gan=dataclasses.replace(c.gan, **bad)))
    assert not (tmp_path / "a" / "checkpoints").exists()
