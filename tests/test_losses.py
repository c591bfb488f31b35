"""ClipLoss / SigLipLoss against naive per-element references (python loops, scalar math), on one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vislang.losses import ClipLoss, SigLipLoss


def _features(batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    return img.requires_grad_(True), txt.requires_grad_(True)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    total = a.new_zeros(())
    for k in range(a.shape[0]):
        total = total + a[k] * b[k]
    return total


def naive_clip_loss(img, txt, scale, bias=None) -> torch.Tensor:
    """-log softmax written out per row, for images->texts and texts->images, averaged."""
    n = img.shape[0]
    logit = [[scale * _dot(img[i], txt[j]) + (0.0 if bias is None else bias) for j in range(n)] for i in range(n)]
    img_to_txt = img.new_zeros(())
    txt_to_img = img.new_zeros(())
    for i in range(n):
        row_norm = torch.log(sum(torch.exp(logit[i][j]) for j in range(n)))
        img_to_txt = img_to_txt + (row_norm - logit[i][i])
        col_norm = torch.log(sum(torch.exp(logit[j][i]) for j in range(n)))
        txt_to_img = txt_to_img + (col_norm - logit[i][i])
    return (img_to_txt / n + txt_to_img / n) / 2


def naive_siglip_loss(img, txt, scale, bias) -> torch.Tensor:
    """Double loop over pairs: -log sigmoid(y_ij * z_ij) = log(1 + exp(-y_ij * z_ij))."""
    n = img.shape[0]
    total = img.new_zeros(())
    for i in range(n):
        for j in range(n):
            y = 1.0 if i == j else -1.0
            z = scale * _dot(img[i], txt[j]) + bias
            total = total + torch.log(1 + torch.exp(-y * z))
    return total / n


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("batch,dim,seed", [(1, 3, 0), (5, 4, 1), (8, 6, 2)])
def test_clip_loss_matches_naive_reference(batch: int, dim: int, seed: int) -> None:
    img, txt = _features(batch, dim, seed)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)

    loss = ClipLoss()(img, txt, log_scale.exp())
    ref = naive_clip_loss(img, txt, log_scale.exp())
    assert loss.shape == ()
    assert torch.allclose(loss, ref, atol=1e-10, rtol=1e-10)

    inputs = [img, txt, log_scale]
    for got, want in zip(_grads(loss, inputs), _grads(ref, inputs)):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-8)


def test_clip_loss_with_bias_matches_naive_reference() -> None:
    img, txt = _features(6, 5, 3)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    loss = ClipLoss()(img, txt, scale, bias)
    ref = naive_clip_loss(img, txt, scale, bias)
    assert torch.allclose(loss, ref, atol=1e-10)
    for got, want in zip(_grads(loss, [img, txt, scale]), _grads(ref, [img, txt, scale])):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-8)


def test_clip_loss_float32_matches_reference() -> None:
    img, txt = _features(7, 8, 4)
    img32, txt32 = img.detach().float(), txt.detach().float()
    loss = ClipLoss()(img32, txt32, torch.tensor(20.0))
    ref = naive_clip_loss(img.detach(), txt.detach(), 20.0)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss.double(), ref, atol=1e-5)


@pytest.mark.parametrize("batch,dim,seed", [(1, 3, 0), (5, 4, 1), (8, 6, 2)])
def test_siglip_loss_matches_naive_reference(batch: int, dim: int, seed: int) -> None:
    img, txt = _features(batch, dim, seed)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)

    loss = SigLipLoss()(img, txt, log_scale.exp(), bias)
    ref = naive_siglip_loss(img, txt, log_scale.exp(), bias)
    assert loss.shape == ()
    assert torch.allclose(loss, ref, atol=1e-10, rtol=1e-10)

    inputs = [img, txt, log_scale, bias]
    for got, want in zip(_grads(loss, inputs), _grads(ref, inputs)):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-8)


def test_siglip_loss_without_bias_equals_zero_bias() -> None:
    img, txt = _features(4, 3, 5)
    scale = torch.tensor(3.0, dtype=torch.float64)
    assert torch.allclose(SigLipLoss()(img, txt, scale), naive_siglip_loss(img, txt, scale, 0.0), atol=1e-12)


def test_siglip_loss_is_stable_for_large_logits() -> None:
    # Naive log(1 + exp(x)) overflows here; the module must stay finite (it uses logsigmoid).
    img = torch.eye(4)
    txt = -torch.eye(4)
    loss = SigLipLoss()(img, txt, torch.tensor(1e4), torch.tensor(0.0))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(1e4, rel=1e-3)  # 4 positives * 1e4 / batch 4


@pytest.mark.parametrize("loss_fn", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_loss_decreases_as_features_align(loss_fn) -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(16, 32, generator=g), dim=-1)
    noise = F.normalize(torch.randn(16, 32, generator=g), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    losses = []
    for alpha in [0.0, 0.5, 0.9, 1.0]:  # text = mix of its image and random noise
        txt = F.normalize(alpha * img + (1 - alpha) * noise, dim=-1)
        losses.append(loss_fn(img, txt, scale, bias).item())
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


def test_clip_loss_training_step_reduces_loss() -> None:
    torch.manual_seed(0)
    x_img, x_txt = torch.randn(8, 5), torch.randn(8, 7)
    proj_img, proj_txt = torch.nn.Linear(5, 4), torch.nn.Linear(7, 4)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*proj_img.parameters(), *proj_txt.parameters(), log_scale]
    loss_fn = ClipLoss()

    def step() -> float:  # plain SGD by hand: torch.optim's first step imports torch._dynamo (seconds on CPU)
        for p in params:
            p.grad = None
        loss = loss_fn(F.normalize(proj_img(x_img), dim=-1), F.normalize(proj_txt(x_txt), dim=-1), log_scale.exp())
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
        return loss.item()

    first = step()
    for _ in range(30):
        last = step()
    assert last < first


@pytest.mark.parametrize("loss_fn", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_batch_size_mismatch_raises(loss_fn) -> None:
    with pytest.raises(ValueError, match="batch sizes differ"):
        loss_fn(torch.randn(4, 8), torch.randn(3, 8), torch.tensor(1.0))


@pytest.mark.parametrize("loss_fn", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_bad_shapes_raise(loss_fn) -> None:
    with pytest.raises(ValueError, match="embedding sizes differ"):
        loss_fn(torch.randn(4, 8), torch.randn(4, 6), torch.tensor(1.0))
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(torch.randn(4, 8, 1), torch.randn(4, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty batch"):
        loss_fn(torch.randn(0, 8), torch.randn(0, 8), torch.tensor(1.0))


@pytest.mark.parametrize("loss_fn", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_output_dict(loss_fn) -> None:
    img, txt = _features(3, 4, 0)
    scale = torch.tensor(5.0, dtype=torch.float64)
    plain = loss_fn(img, txt, scale, None)
    out = loss_fn(img, txt, scale, None, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert torch.equal(out["contrastive_loss"], plain)


def test_clip_label_cache_follows_batch_size() -> None:
    loss_fn = ClipLoss(cache_labels=True)
    for batch in [4, 4, 6, 2]:
        img, txt = _features(batch, 3, batch)
        scale = torch.tensor(2.0, dtype=torch.float64)
        assert torch.allclose(loss_fn(img, txt, scale), naive_clip_loss(img, txt, scale), atol=1e-10)
    uncached = ClipLoss(cache_labels=False)
    img, txt = _features(5, 3, 9)
    assert torch.allclose(uncached(img, txt, 2.0), naive_clip_loss(img, txt, 2.0), atol=1e-10)
    assert uncached._labels == {}


def test_float_logit_scale_accepted() -> None:
    img, txt = _features(4, 3, 1)
    assert torch.allclose(ClipLoss()(img, txt, 3.0), ClipLoss()(img, txt, torch.tensor(3.0, dtype=torch.float64)))
    assert torch.allclose(SigLipLoss()(img, txt, 3.0, -1.0), naive_siglip_loss(img, txt, 3.0, -1.0), atol=1e-10)


@pytest.mark.parametrize("loss_fn", [ClipLoss(), SigLipLoss()])
def test_positives_of_the_diagonal_alone_change_nothing(loss_fn) -> None:
    img, txt = _features(6, 8, 0)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    plain = loss_fn(img, txt, scale, bias)
    torch.testing.assert_close(loss_fn(img, txt, scale, bias, positives=torch.eye(6, dtype=torch.bool)), plain)


def test_pairs_of_one_caption_share_the_target() -> None:
    """Rows 0 and 1 hold the same caption: with them marked positive CLIP's loss is the naive soft-target CE, and
    SigLIP no longer penalises an image for scoring its twin's copy of its caption high."""
    img = _features(4, 8, 0)[0].detach()
    txt = img.clone()
    txt[1] = txt[0]  # the same caption twice
    img[1] = img[0]
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    scale = torch.tensor(20.0, dtype=torch.float64)
    logits = scale * img @ txt.T
    target = same.double() / same.double().sum(1, keepdim=True)
    ref = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    got = ClipLoss()(img, txt, scale, positives=same)
    torch.testing.assert_close(got, ref.to(got.dtype))
    sig = SigLipLoss()(img, txt, scale, torch.tensor(-5.0, dtype=torch.float64), positives=same)
    assert sig < SigLipLoss()(img, txt, scale, torch.tensor(-5.0, dtype=torch.float64))
