"""Building a GAN from its config: the generator (plain, mixture, instance-conditioned or an ensemble of saved
generators) and the discriminator that ``cfg.arch`` names.

Why a module of its own: the builders dispatch to every architecture, and the architectures in ``projected``,
``ensemble`` and ``instance`` build on the base classes in ``networks``; with the dispatch here, above them all, the
imports inside ``models/gan/`` run one way (build → projected / ensemble / instance → networks).
"""

from __future__ import annotations

from torch import nn

from .ensemble import GeneratorEnsemble, member_configs
from .instance import InstanceGenerator
from .networks import ARCHS, DCGenerator, GANModelConfig, GeneratorMixture, inner_config
from .projected import ProjectedDiscriminator


def _classes(cfg: GANModelConfig) -> tuple[type[nn.Module], type[nn.Module]]:
    if cfg.arch == "projected":  # timm and the pretrained weights load only when the discriminator is built
        return DCGenerator, ProjectedDiscriminator
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown GAN arch {cfg.arch!r}; choose one of {sorted([*ARCHS, 'projected'])}")
    return ARCHS[cfg.arch]


def build_generator(cfg: GANModelConfig) -> nn.Module:
    """The generator alone (sampling a saved model needs no discriminator, nor a projected D's pretrained weights)."""
    if cfg.members:
        return GeneratorEnsemble([build_generator(m) for m in member_configs(cfg)])
    if cfg.instance_bank > 0:
        return InstanceGenerator(cfg, build_generator(inner_config(cfg)))
    if cfg.mixture < 1:
        raise ValueError(f"gan.model.mixture={cfg.mixture} must be at least 1 (generators in the model)")
    g_cls = _classes(cfg)[0]
    return GeneratorMixture(cfg, g_cls) if cfg.mixture > 1 else g_cls(cfg)


def build_gan(cfg: GANModelConfig) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for ``cfg.arch``."""
    return build_generator(cfg), _classes(cfg)[1](inner_config(cfg))
