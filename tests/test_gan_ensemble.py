"""Ensembles of separately trained GANs (`vislang generate-ensemble`): the noise picks a member uniformly and hands it
standard normal noise, every pooled image is exactly its member's image, the directory reloads and samples
reproducibly through the usual commands, and members that cannot be pooled are refused clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_generate import fm_text_model_dir
from vislang.models.gan.build import build_generator
from vislang.models.gan.ensemble import GeneratorEnsemble, ensemble_config
from vislang.models.gan.instance import InstanceGenerator
from vislang.models.gan.networks import GANModelConfig
from vislang.models.gan.pipeline import TextToImage, build_ensemble

PROMPT = "a photo of a bag."


def _save_member(d, text_dir, seed: int, **changes) -> TextToImage:
    from vislang.factory import from_pretrained, get_tokenizer

    base = {"z_dim": 8, "cond_dim": 16, "image_size": 28, "channels": 1, "g_width": 4, "d_width": 4}
    cfg = GANModelConfig(**{**base, **changes})
    torch.manual_seed(seed)
    g = build_generator(cfg)
    if isinstance(g, InstanceGenerator):  # a bank of random unit vectors under random caption keys
        g.set_bank(torch.nn.functional.normalize(torch.randn(*g.bank.shape), dim=1),
                   torch.nn.functional.normalize(torch.randn(*g.keys.shape), dim=1))  # fmt: skip
    meta = {"sample_prompts": [PROMPT], "data": {"train": "fashion-mnist"}, "train": {"steps": seed}}
    t2i = TextToImage(cfg, g, from_pretrained(text_dir), get_tokenizer(text_dir), meta)
    t2i.save_pretrained(d)
    return t2i


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    text = fm_text_model_dir(root / "text")
    a = _save_member(root / "a", text, 1)
    b = _save_member(root / "b", text, 2, instance_bank=12, instance_dim=5, instance_k=3)  # an IC-GAN member
    return root, text, [root / "a", root / "b"], [a, b]


def test_the_noise_picks_each_member_equally_and_hands_it_standard_normal_noise():
    ens = GeneratorEnsemble([torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()])
    z = torch.randn(60_000, 4, generator=torch.Generator().manual_seed(0))
    pick, z2 = ens.split_noise(z)
    counts = torch.bincount(pick, minlength=3).float() / len(z)
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.01)
    for j in range(3):  # what each member sees is distributed as in its training: N(0, 1), not a third of it
        z0 = z2[pick == j, 0]
        assert abs(z0.mean().item()) < 0.03 and abs(z0.std().item() - 1) < 0.03
        assert (z0 < 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(z2[:, 1:], z[:, 1:])  # only the entry that picked is re-mapped
    p2, _ = ens.split_noise(z[:10])
    assert torch.equal(p2, pick[:10])  # a function of each noise vector alone
    with pytest.raises(ValueError, match="at least 2"):
        GeneratorEnsemble([torch.nn.Identity()])


def test_every_pooled_image_is_its_members_image_and_reloads_reproducibly(members, tmp_path):
    _, _, dirs, (a, b) = members
    ens = build_ensemble(dirs, tmp_path / "ens")
    loaded = TextToImage.from_pretrained(tmp_path / "ens")
    assert isinstance(loaded.generator, GeneratorEnsemble) and len(loaded.cfg.members) == 2
    assert isinstance(loaded.generator.members[1], InstanceGenerator)
    assert [m["train"]["steps"] for m in loaded.meta["ensemble"]] == [1, 2]
    x = loaded.generate(PROMPT, n=64, seed=5)
    assert torch.equal(x, ens.generate(PROMPT, n=64, seed=5)) and torch.equal(x, loaded.generate(PROMPT, n=64, seed=5))
    pick, z = loaded.generator.split_noise(loaded.noise(64, 5))
    cond = loaded.embed([PROMPT]).repeat(64, 1)
    for j, member in enumerate((a, b)):
        idx = (pick == j).nonzero().squeeze(1)
        assert 10 < len(idx) < 54  # both draw
        assert torch.equal(x[idx], member.decode(cond[idx], z[idx]))
    assert not torch.equal(x[pick == 0][:1], b.decode(cond[:1], z[pick == 0][:1]))  # the members differ


def test_members_that_cannot_be_pooled_are_refused(members, tmp_path):
    root, text, dirs, _ = members
    _save_member(root / "z16", text, 3, z_dim=16)
    with pytest.raises(ValueError, match="z_dim=16"):
        build_ensemble([dirs[0], root / "z16"], tmp_path / "x")
    other = root / "text2"
    fm_text_model_dir(other)
    from vislang.factory import from_pretrained, get_tokenizer, save_pretrained

    enc = from_pretrained(other)
    with torch.no_grad():
        next(enc.parameters()).add_(0.01)
    save_pretrained(enc, other, get_tokenizer(other))
    _save_member(root / "other", other, 4)
    with pytest.raises(ValueError, match="another text tower"):
        build_ensemble([dirs[0], root / "other"], tmp_path / "x")
    with pytest.raises(ValueError, match="at least two"):
        build_ensemble(dirs[:1], tmp_path / "x")
    with pytest.raises(ValueError, match="one of the members"):
        build_ensemble(dirs, dirs[0])
    with pytest.raises(ValueError, match="must share"):
        ensemble_config([GANModelConfig(image_size=28), GANModelConfig(image_size=32)])
    assert not (tmp_path / "x").exists()


def test_export_and_compression_refuse_an_ensemble_naming_the_members_way(members, tmp_path):
    _, _, dirs, _ = members
    build_ensemble([dirs[0], dirs[0]], tmp_path / "ens")  # a member may repeat: it then draws twice as often
    from vislang.compress.api import compress_model_dir
    from vislang.export.onnx import export_generator

    with pytest.raises(ValueError, match="ensemble of 2 generators.*each member"):
        export_generator(tmp_path / "ens", tmp_path / "onnx")
    with pytest.raises(ValueError, match="ensemble of 2 generators"):
        compress_model_dir(tmp_path / "ens", "dynamic-int8", tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_cli_pools_members_and_generate_reads_the_result(members, tmp_path, capsys):
    from vislang.cli.main import main

    _, _, dirs, _ = members
    out = tmp_path / "ens"
    assert main(["generate-ensemble", *map(str, dirs), "-o", str(out)]) == 0
    assert "2 generators" in capsys.readouterr().out
    grid = tmp_path / "g.png"
    assert main(["generate", PROMPT, "--model", str(out), "-n", "4", "-o", str(grid), "--seed", "0"]) == 0
    assert grid.is_file()
    assert main(["generate-ensemble", str(dirs[0]), "-o", str(tmp_path / "one")]) == 2  # a clear error, no traceback
    assert "at least two" in capsys.readouterr().err
    cfg = TextToImage.from_pretrained(out).cfg
    assert dataclasses.asdict(cfg)["members"][0]["z_dim"] == 8
