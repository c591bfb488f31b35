"""The explicit attention path (half precision on a CPU, where SDPA's fused kernel is slow) computes what
``F.scaled_dot_product_attention`` does, for every mask form the models pass, and the ViT tower switches timm's
attention to it only there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vislang.factory import build_model, get_model_config
from vislang.layers import transformer as tr

CPU = torch.device("cpu")


def test_explicit_attention_only_in_half_precision_on_a_cpu():
    assert tr.explicit_attention_pays(CPU, torch.bfloat16)
    assert tr.explicit_attention_pays(CPU, torch.float16)
    assert not tr.explicit_attention_pays(CPU, torch.float32)
    assert not tr.explicit_attention_pays(torch.device("cuda"), torch.bfloat16)
    assert not tr.explicit_attention_pays(CPU, torch.bfloat16, tr.EXPLICIT_MAX_SCORES + 1)  # too large: fused
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tr.explicit_attention_pays(CPU, torch.float32)  # autocast's dtype counts, not the input's


def masks(B: int, T: int, S: int) -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)
    allowed = (torch.rand(B, 1, T, S, generator=g) > 0.4) | torch.eye(T, S, dtype=torch.bool)  # no empty row
    additive = torch.zeros(B, 1, T, S).masked_fill(~allowed, float("-inf"))
    return {
        "none": {},
        "causal": {"is_causal": True},
        "bool": {"attn_mask": allowed},
        "additive": {"attn_mask": additive},
    }


@pytest.mark.parametrize("kind", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("T,S", [(6, 6), (3, 7)])
def test_explicit_attention_matches_sdpa(kind, T, S):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, T, 8, generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 3, S, 8, generator=g, dtype=torch.bfloat16) for _ in range(2))
    kw = masks(2, T, S)[kind]
    got = tr.attention(q, k, v, **kw)  # bf16 on a CPU: the explicit path
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)  # bf16 rounding, nothing more
    # and the fp32 route is SDPA itself, exactly
    torch.testing.assert_close(tr.attention(q.float(), k.float(), v.float(), **kw), F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), **kw))  # fmt: skip


def test_explicit_attention_gradients_match_sdpa():
    g = torch.Generator().manual_seed(2)
    qkv = [torch.randn(2, 2, 5, 4, generator=g, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    tr.attention(*qkv, is_causal=True).float().square().sum().backward()
    got = [t.grad.double() for t in qkv]
    ref = [t.detach().double().requires_grad_() for t in qkv]
    F.scaled_dot_product_attention(*ref, is_causal=True).square().sum().backward()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.grad, atol=5e-2, rtol=5e-2)


def test_vit_tower_uses_explicit_attention_under_bf16_autocast_only():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model(get_model_config("vit-tiny-p4", {"text": {"vocab_size": 100}})).eval()
    images = torch.randn(2, 1, 28, 28)
    attns = model.visual.attns
    assert attns, "the timm ViT's attention modules were not found"
    fp32 = model.encode_image(images)
    assert all(m.fused_attn for m in attns)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.encode_image(images)
    assert not any(m.fused_attn for m in attns)
    assert F.cosine_similarity(fp32, bf16.float()).min() > 0.99
