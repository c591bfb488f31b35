"""Ensembles of separately trained text-to-image generators (``vislang generate-ensemble``).

Why: on Fashion-MNIST one generator's images spread too little within a class (the judge's features of generated
t-shirts spread half as much as the real ones), and generators trained apart, from other seeds or configs, cover
different parts of each class: pooling their samples lowers FID-FM where two snapshots of one run do not
(docs/gan-fashion-mnist.md). Trained together against one discriminator (``gan.model.mixture``) the components learn
slower and do not split the data, so the pooling happens after training: an ensemble is one model directory that
``generate``, ``generate-eval`` and ``serve`` read like any other (Wang et al. 2016, "Ensembles of generative
adversarial networks").

Which member draws an image is a function of its noise alone, so an image stays reproducible from its seed: the
first noise entry z₀ picks member j = ⌊K·Φ(z₀)⌋ and is then mapped back to a standard normal, Φ⁻¹(K·Φ(z₀) − j).
Every member therefore draws 1/K of the images and sees noise distributed exactly as in its training (picking by the
argmax of K entries, as the trained-together mixture does, would hand each member noise it never saw: the picked
entry biased upwards, the others downwards).

Pooling saved generators into such a directory is :func:`vislang.models.gan.pipeline.build_ensemble`, next to the
``TextToImage`` it loads and writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...config import from_dict, to_dict
from .networks import INTERFACE_FIELDS, GANModelConfig, normal_to_uniform, route


class GeneratorEnsemble(nn.Module):
    """K complete generators (any architecture, instance-conditioned or mixtures included) behind one (z, c) → image
    interface; see the module docstring for how the noise picks a member."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 generators, got {len(members)}")
        self.members = nn.ModuleList(members)

    def split_noise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((B,) the member that draws each noise vector, (B, Z) the noise it receives: z₀ re-normalised)."""
        k = len(self.members)
        u = normal_to_uniform(z[:, 0].double()) * k  # uniform on [0, K)
        j = u.floor().clamp(0, k - 1)
        eps = 1e-7
        z0 = torch.special.ndtri((u - j).clamp(eps, 1 - eps)).to(z.dtype)
        return j.long(), torch.cat([z0[:, None], z[:, 1:]], dim=1)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        pick, z = self.split_noise(z)
        return route(self.members, pick, z, c)


def ensemble_config(members: Sequence[GANModelConfig]) -> GANModelConfig:
    """The ensemble's own config: the fields every member shares, and each member's full config in ``members``."""
    first = members[0]
    for k, m in enumerate(members[1:], start=2):
        for f in INTERFACE_FIELDS:
            if getattr(m, f) != getattr(first, f):
                raise ValueError(
                    f"member {k} has {f}={getattr(m, f)}, member 1 {f}={getattr(first, f)}: an ensemble's generators "
                    "must share noise size, text-embedding size, image size and channels"
                )
    shared = {f: getattr(first, f) for f in INTERFACE_FIELDS}
    return GANModelConfig(arch=first.arch, **shared, members=tuple(to_dict(m) for m in members))


def member_configs(cfg: GANModelConfig) -> list[GANModelConfig]:
    """The members' own configs, as saved in an ensemble's ``members``."""
    return [from_dict(GANModelConfig, dict(m), f"model.members[{k}]") for k, m in enumerate(cfg.members)]
