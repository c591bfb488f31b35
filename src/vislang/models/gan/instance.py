"""Instance conditioning (IC-GAN, Casanova et al. 2021): the generator and discriminator read, beside the text, the
image embedding of one real training item (an "instance"), and the real images D sees under that instance are its
nearest neighbours. Why: a text-conditioned generator on Fashion-MNIST draws each class's items too much alike
(its judge features spread 0.43-0.86 as much as the real ones), and separately trained generators cover different
parts of a class (docs/gan-fashion-mnist.md). With an instance to start from, every neighbourhood of the data has
to be drawn, not only the easiest part of each class.

At sampling time the instance comes from a bank saved with the generator: the image embeddings of a fixed random
subset of the training images (under the frozen dual encoder that conditions the GAN, never the judge) with the text
embedding of each one's caption. For a prompt, the candidates are the bank items whose caption means the same as the
prompt (text cosine >= ``match_cos``: the same class on Fashion-MNIST), else the ``k`` most similar captions; one of
them is picked from the noise alone (its last entry), so an image stays reproducible from its seed, and
:class:`InstanceGenerator` keeps the (z, text) → image interface of every other generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ...evaluation.embed import embed_images, image_batch, num_images
from .networks import normal_to_uniform

MATCH_COS = 0.9  # a bank caption "means the same" as a prompt at this text cosine (as gan.mismatch_max_cos)


def candidates(prompt: torch.Tensor, keys: torch.Tensor, k: int, match_cos: float = MATCH_COS) -> torch.Tensor:
    """(B, N) bool: the bank items each prompt (B, E) may take an instance from, by the cosine of the prompt with
    each item's caption ``keys`` (N, E): those at ``match_cos`` or above, or, for a prompt that no caption matches,
    its ``k`` nearest captions (ties included) when fewer than ``k`` match."""
    sims = prompt.float() @ keys.float().T  # (B, N)
    cand = sims >= match_cos
    kth = sims.topk(min(k, sims.shape[1]), dim=1).values[:, -1:]  # (B, 1)
    return torch.where(cand.sum(dim=1, keepdim=True) >= min(k, sims.shape[1]), cand, sims >= kth)


def pick_from_noise(cand: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) the index of the ⌊u·count⌋-th True of each row of ``cand`` (B, N), ``u`` (B,) in [0, 1): a uniform pick
    among a row's candidates that is a pure function of ``u``."""
    count = cand.sum(dim=1)  # (B,)
    r = torch.minimum((u * count).floor().long(), count - 1)  # (B,): u < 1, so this only guards rounding
    pos = cand.long().cumsum(dim=1) - 1  # (B, N): rank of each candidate within its row
    return ((pos == r[:, None]) & cand).long().argmax(dim=1)


class InstanceGenerator(nn.Module):
    """(z, c) → image where c is either a text embedding (B, E): an instance is then drawn from the bank for each
    row, or [text, instance] (B, E + Ei) as a training step gives it. ``inner`` is any generator built for
    conditions of size E + Ei."""

    def __init__(self, cfg, inner: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.inner = inner
        self.register_buffer("bank", torch.zeros(cfg.instance_bank, cfg.instance_dim))  # (N, Ei) image embeddings
        self.register_buffer("keys", torch.zeros(cfg.instance_bank, cfg.cond_dim))  # (N, E) their captions'

    def set_bank(self, bank: torch.Tensor, keys: torch.Tensor) -> None:
        if bank.shape != self.bank.shape or keys.shape != self.keys.shape:
            raise ValueError(f"instance bank {tuple(bank.shape)} / keys {tuple(keys.shape)} do not fit "
                             f"{tuple(self.bank.shape)} / {tuple(self.keys.shape)}")  # fmt: skip
        self.bank.copy_(bank), self.keys.copy_(keys)

    def instances(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, Ei) the bank instance that noise ``z`` (B, Z) picks for each text ``c`` (B, E)."""
        u = normal_to_uniform(z[:, -1].float())
        cand = candidates(c, self.keys, self.cfg.instance_k)
        return self.bank[pick_from_noise(cand, u.clamp(0, 1 - 1e-7))].to(c.dtype)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.shape[1] == self.cfg.cond_dim:
            c = torch.cat([c, self.instances(z, c)], dim=1)  # (B, E + Ei)
        return self.inner(z, c)


INSTANCE_FEATURES = ("clip", "pixels")


@torch.no_grad()
def pixel_pca(images: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, dim) the images' coordinates on their ``dim`` principal components, scaled so the mean row norm is 1:
    a description of each item's shape, size and brightness, what a caption-trained image tower mostly discards.
    Exact and deterministic (eigenvectors of the D × D covariance; D = 784 on Fashion-MNIST)."""
    x = images.flatten(1).double() / 255  # (N, D)
    x = x - x.mean(0, keepdim=True)
    _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    v = vecs[:, -dim:].flip(1)  # (D, dim): the top components first
    f = (x @ v).float()  # (N, dim)
    return f / f.norm(dim=1).mean().clamp(min=1e-12)


@torch.no_grad()
def instance_features(kind: str, encoder: nn.Module, images, dim: int, n: int | None = None) -> torch.Tensor:
    """(N, Ei) instance features of the first ``n`` (default all) uint8 training images of ``images`` (a prepared
    dataset or a tensor): ``clip``, the frozen dual encoder's normalised image embeddings (IC-GAN's choice of a
    pretrained embedding); ``pixels``, their ``dim`` principal components."""

    idx = np.arange(num_images(images) if n is None else n)
    if kind == "clip":
        return embed_images(encoder, images, indices=idx)
    if kind == "pixels":
        return pixel_pca(image_batch(images, idx), dim)
    raise ValueError(f"unknown gan.model.instance_features {kind!r}; choose one of {', '.join(INSTANCE_FEATURES)}")


@torch.no_grad()
def neighbours(
    feats: torch.Tensor, texts: torch.Tensor, bank: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 2048
) -> torch.Tensor:
    """(N, k) for each training item (image embedding ``feats`` (N, Ei), caption embedding ``texts`` (N, E)): its
    ``k`` nearest bank items by image embedding among those a prompt of its caption may pick (:func:`candidates`),
    so an instance is only ever paired with real images that its own captions' prompts would draw it for."""
    out = []
    bank_sq = (bank * bank).sum(1)  # (M,): nearest by Euclidean distance (= by cosine for normalised features)
    for s in range(0, len(feats), chunk):
        cand = candidates(texts[s : s + chunk], keys, k)  # (b, N)
        sims = (2 * feats[s : s + chunk] @ bank.T - bank_sq).masked_fill(~cand, -math.inf)  # (b, N): -|f-b|² + |f|²
        out.append(sims.topk(min(k, bank.shape[0]), dim=1).indices)
    return torch.cat(out)
