"""Sampling noise scale (`vislang generate-tune`): a generator with ``noise_scale`` s draws from noise × s exactly, the
scale reaches every member of an ensemble and leaves the IC-GAN's instance pick alone, the tuned copy samples with the
best scale, and bad input is refused clearly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from test_gan_ensemble import PROMPT, _save_member
from test_generate import _tiny_fm_judge, fm_text_model_dir
from vislang.evaluation.gan_tune import parse_scales, tune_noise_scale, with_noise_scale
from vislang.models.gan.build import build_generator
from vislang.models.gan.instance import InstanceGenerator
from vislang.models.gan.networks import GANModelConfig
from vislang.models.gan.pipeline import TextToImage

SMALL = {"z_dim": 8, "cond_dim": 16, "image_size": 28, "channels": 1, "g_width": 4, "d_width": 4}


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "mlp"])
def test_a_scaled_generator_draws_what_the_plain_one_draws_from_scaled_noise(arch):
    cfg = GANModelConfig(arch=arch, **SMALL)
    torch.manual_seed(0)
    plain = build_generator(cfg).eval()
    scaled = build_generator(with_noise_scale(cfg, 1.3)).eval()
    scaled.load_state_dict(plain.state_dict())
    z, c = torch.randn(5, 8), torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    assert torch.allclose(scaled(z, c), plain(1.3 * z, c), atol=1e-6)
    assert not torch.allclose(scaled(z, c), plain(z, c), atol=1e-3)


def test_the_scale_reaches_every_member_and_not_the_instance_pick():
    member = GANModelConfig(**SMALL, instance_bank=6, instance_dim=3, instance_k=2)
    plain_member = dataclasses.asdict(GANModelConfig(**SMALL))
    ens = GANModelConfig(**SMALL, members=(dataclasses.asdict(member), plain_member))
    g = build_generator(with_noise_scale(ens, 1.2))
    assert [m.cfg.noise_scale for m in g.members] == [1.2, 1.2]
    ic = g.members[0]
    assert isinstance(ic, InstanceGenerator) and ic.inner.cfg.noise_scale == 1.2
    ic.set_bank(torch.randn(6, 3), torch.nn.functional.normalize(torch.randn(6, 16), dim=1))
    z, c = torch.randn(64, 8), torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    plain_ic = build_generator(member)
    plain_ic.load_state_dict(ic.state_dict())
    assert torch.equal(ic.instances(z, c), plain_ic.instances(z, c))  # the bank item depends on the noise, not s
    with pytest.raises(ValueError, match="out of range"):
        with_noise_scale(ens, 0)


def test_parse_scales():
    assert parse_scales("1.1, 0.9,1,1") == [0.9, 1.0, 1.1]
    for bad, msg in (("", "empty"), ("1,x", "numbers separated by commas")):
        with pytest.raises(ValueError, match=msg):
            parse_scales(bad)


@pytest.mark.fashion_mnist
def test_tune_writes_a_copy_that_samples_with_the_best_scale(tmp_path):
    text = fm_text_model_dir(tmp_path / "text")
    src = _save_member(tmp_path / "g", text, 1)
    judge = _tiny_fm_judge(tmp_path / "judge")
    res = tune_noise_scale(tmp_path / "g", judge, [0.5, 1.0, 2.0], n=40, out=tmp_path / "tuned")
    assert [r["noise_scale"] for r in res["rows"]] == [0.5, 1.0, 2.0]
    assert len({round(r["fid_fm"], 6) for r in res["rows"]}) == 3  # the scale changes what is drawn
    assert res["best"]["fid_fm"] == min(r["fid_fm"] for r in res["rows"]) and res["split"] == "train"
    tuned = TextToImage.from_pretrained(tmp_path / "tuned")
    s = res["best"]["noise_scale"]
    assert tuned.cfg.noise_scale == s and tuned.meta["noise_tune"]["best"]["noise_scale"] == s
    z, cond = tuned.noise(4, 0), tuned.embed([PROMPT]).repeat(4, 1)
    assert torch.equal(tuned.decode(cond, z), src.decode(cond, s * z))
    assert json.loads((tmp_path / "tuned" / "noise_scale.json").read_text())["best"]["noise_scale"] == s
    assert (tmp_path / "tuned" / "noise_scale.png").is_file()
    with pytest.raises(ValueError, match="out of range"):
        tune_noise_scale(tmp_path / "g", judge, [1.0, -1.0], n=40)
    with pytest.raises(ValueError, match="is the model being tuned"):
        tune_noise_scale(tmp_path / "g", judge, [1.0], n=40, out=tmp_path / "g")


@pytest.mark.fashion_mnist
def test_cli_generate_tune(tmp_path, capsys):
    from vislang.cli.main import main

    text = fm_text_model_dir(tmp_path / "text")
    _save_member(tmp_path / "g", text, 2)
    judge = str(_tiny_fm_judge(tmp_path / "judge"))
    assert main(["generate-tune", str(tmp_path / "g"), "--judge", judge, "--scales", "0.8,1.2", "-n", "40"]) == 0
    out = capsys.readouterr().out
    assert "| 0.8 |" in out and "| 1.2 |" in out and "best noise scale" in out
    assert not (tmp_path / "tuned").exists()  # without -o it only measures
    assert main(["generate-tune", str(tmp_path / "g"), "--judge", judge, "--scales", "1,abc"]) == 2
    assert "numbers separated by commas" in capsys.readouterr().err
