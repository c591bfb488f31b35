"""Magnitude pruning of a model's Conv2d/ConvTranspose2d/Linear weights to a target sparsity, made permanent afterwards.

Two kinds:

* ``unstructured``: the globally smallest-magnitude weights across all prunable layers (``prune.global_unstructured``
  with L1), so layers with many small weights lose more. Needs sparse kernels to run faster; it saves nothing as is.
* ``structured``: whole units, per layer: attention heads (the head's query/key/value rows and its output-projection
  columns, ranked by L2 norm) and, elsewhere, output channels of convolutions and rows of Linear layers (L2 norm,
  ``prune.ln_structured``). Zeroed units could be sliced away to make the model smaller and faster.

Masks stay attached during the fine-tune (pruned weights stay zero), then ``prune.remove`` bakes them in, so the result
is a plain model directory. Sparsity is counted over the weights of the prunable layers (biases, norms, embeddings and
the temperature are not pruned).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from ..layers.transformer import Attention

PRUNE_KINDS = ("unstructured", "structured")


def check_sparsity(sparsity: float) -> float:
    if not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a fraction in (0, 1), e.g. 0.5 for 50% zeros; got {sparsity}")
    return float(sparsity)


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv2d, ConvTranspose2d (a generator's) and Linear layer: what pruning acts on."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)]


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zero weights over the prunable layers (masks applied)."""
    zeros = total = 0
    for _, m in prunable(model):
        w = m.weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def _prune_heads(attn: Attention, amount: float) -> None:
    """Mask the ``amount`` fraction of heads with the smallest L2 norm over their q/k/v rows and output columns."""
    h = attn.heads
    dim = attn.q.weight.shape[0]
    hd = dim // h
    n_drop = round(amount * h)
    if n_drop == 0:
        return
    q = attn.q.weight.reshape(h, hd, -1)  # (h, hd, D)
    k, v = attn.kv.weight.reshape(2, h, hd, -1)  # (h, hd, Dc) each
    o = attn.out.weight.reshape(dim, h, hd)  # (D, h, hd)
    norms = q.pow(2).sum((1, 2)) + k.pow(2).sum((1, 2)) + v.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))  # (h,)
    keep = torch.ones(h, dtype=torch.bool)
    keep[norms.argsort()[:n_drop]] = False
    rows = keep.repeat_interleave(hd)  # (D,) True = kept
    prune.custom_from_mask(attn.q, "weight", rows[:, None].expand_as(attn.q.weight).float())
    prune.custom_from_mask(attn.kv, "weight", rows.repeat(2)[:, None].expand_as(attn.kv.weight).float())
    prune.custom_from_mask(attn.out, "weight", rows[None, :].expand_as(attn.out.weight).float())
    for lin, mask in ((attn.q, rows), (attn.kv, rows.repeat(2))):
        if lin.bias is not None:
            prune.custom_from_mask(lin, "bias", mask.float())


def prune_model(model: nn.Module, sparsity: float, kind: str = "unstructured", per_layer: bool = False) -> nn.Module:
    """Attach magnitude-pruning masks to ``model`` in place so that ``sparsity`` of its prunable weights are zero.

    ``per_layer`` (unstructured): every layer loses the same fraction instead of the globally smallest weights. For
    layers followed by BatchNorm, whose weights can have any scale without changing the function, one global
    threshold compares magnitudes that mean nothing across layers: on the Fashion-MNIST generator it took 78% of one
    transposed convolution's weights and 48% of the input layer's."""
    sparsity = check_sparsity(sparsity)
    if kind not in PRUNE_KINDS:
        raise ValueError(f"unknown pruning kind {kind!r}; choose one of {', '.join(PRUNE_KINDS)}")
    layers = prunable(model)
    if not layers:
        raise ValueError("the model has no Conv2d, ConvTranspose2d or Linear layers to prune")
    if kind == "unstructured" and per_layer:
        for _, m in layers:
            prune.l1_unstructured(m, "weight", amount=sparsity)
        return model
    if kind == "unstructured":
        prune.global_unstructured([(m, "weight") for _, m in layers], prune.L1Unstructured, amount=sparsity)
        return model
    in_heads: set[int] = set()
    for _, m in model.named_modules():
        if isinstance(m, Attention):
            _prune_heads(m, sparsity)
            in_heads.update(id(x) for x in (m.q, m.kv, m.out))
    for _, m in layers:
        if id(m) not in in_heads:
            out_dim = 1 if isinstance(m, nn.ConvTranspose2d) else 0  # a transposed conv's weight is (in, out, k, k)
            prune.ln_structured(m, "weight", amount=sparsity, n=2, dim=out_dim)  # whole output channels / rows
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Bake every pruning mask into its weight (``prune.remove``): a plain model with zeros, savable as usual."""
    for _, m in model.named_modules():
        for name in ("weight", "bias"):
            if prune.is_pruned(m) and hasattr(m, f"{name}_orig"):
                prune.remove(m, name)
    return model
