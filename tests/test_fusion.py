"""Fusion modules: shapes, gradients to both towers, masking, and parity of the per-image key/value path."""

import pytest
import torch

from vislang.models.fusion import FUSIONS, FusionConfig, GatedFusion, build_fusion, pool_text

B, N, T, DI, DT = 3, 16, 5, 12, 10


def _inputs():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(B, N, DI, generator=g, requires_grad=True)
    txt = torch.randn(B, T, DT, generator=g, requires_grad=True)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return img, txt, valid


def _fusion(kind):
    torch.manual_seed(0)
    return build_fusion(FusionConfig(kind=kind, dim=8, depth=2, heads=2), DI, DT).eval()


@pytest.mark.parametrize("kind", FUSIONS)
def test_shape_and_gradients_reach_both_sides(kind):
    img, txt, valid = _inputs()
    out = _fusion(kind)(img, txt, valid)
    assert out.shape == (B, 8)
    out.square().sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert txt.grad is not None and txt.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", FUSIONS)
def test_image_index_equals_repeating_the_images(kind):
    img, txt, valid = _inputs()
    f = _fusion(kind)
    idx = torch.tensor([1, 1, 0])
    with torch.no_grad():
        a = f(img[:2], txt, valid, idx)
        b = f(img[idx], txt, valid)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", FUSIONS)
def test_padding_tokens_do_not_change_the_output(kind):
    img, txt, valid = _inputs()
    f = _fusion(kind)
    changed = txt.detach().clone()
    changed[1, 3:] = 100.0  # padding positions of row 1
    with torch.no_grad():
        torch.testing.assert_close(f(img, txt, valid)[1], f(img, changed, valid)[1])


def test_unknown_fusion_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown fusion 'bilinear'"):
        build_fusion(FusionConfig(kind="bilinear"), DI, DT)


def test_gated_matches_the_formula():
    img, txt, valid = _inputs()
    f = _fusion("gated")
    with torch.no_grad():
        e_i = torch.nn.functional.gelu(f.image_proj(img.mean(1)))
        e_t = torch.nn.functional.gelu(f.text_proj(pool_text(txt, valid, "eot")))
        a = torch.sigmoid(f.gate_image(torch.cat([e_i, e_t], -1)))
        b = torch.sigmoid(f.gate_text(torch.cat([e_i, e_t], -1)))
        torch.testing.assert_close(f(img, txt, valid), f.norm(a * e_i + b * e_t))
    assert isinstance(f, GatedFusion)


def test_cross_attention_matches_the_reference_block():
    """The per-image key/value path equals layers.transformer.Block run on repeated image tokens."""
    img, txt, valid = _inputs()
    f = _fusion("cross_attention")
    idx = torch.tensor([0, 2, 2])
    with torch.no_grad():
        x, ctx, mask = f.prepare(img, txt, valid)
        ref = x
        for blk in f.blocks:
            ref = blk(ref, attn_mask=mask, context=ctx[idx])
        torch.testing.assert_close(f.forward_tokens(img, txt, valid, idx), f.norm(ref))


def test_cross_attention_maps_are_distributions_over_image_tokens():
    img, txt, valid = _inputs()
    maps = _fusion("cross_attention").attention_maps(img, txt, valid)
    assert maps.shape == (B, 2, 2, T, N)
    torch.testing.assert_close(maps.sum(-1), torch.ones(B, 2, 2, T))


def test_ablate_fusion_defaults_to_the_readme_tables_15_minutes_per_fusion(monkeypatch, tmp_path):
    from vislang.cli import main
    from vislang.train import ablate

    calls = []

    def fake_ablate(out, **kw):  # record the settings instead of training four models
        calls.append(kw)
        (tmp_path / "ablation.md").write_text("table")
        return tmp_path / "ablation.md"

    monkeypatch.setattr(ablate, "ablate_fusion", fake_ablate)
    assert main(["ablate-fusion", "--out", str(tmp_path)]) == 0
    assert calls[-1]["time_budget_s"] == 900 and calls[-1]["epochs"] >= 20  # the budget, not epochs, ends training
    assert main(["ablate-fusion", "--out", str(tmp_path), "--time-budget", "0"]) == 0
    assert calls[-1]["time_budget_s"] is None and calls[-1]["epochs"] == 5
    assert main(["ablate-fusion", "--out", str(tmp_path), "--time-budget", "60", "--epochs", "2"]) == 0
    assert calls[-1]["time_budget_s"] == 60 and calls[-1]["epochs"] == 2
    assert main(["ablate-fusion", "--out", str(tmp_path), "--time-budget", "-1"]) == 2  # a clear error, no run
    assert len(calls) == 3
