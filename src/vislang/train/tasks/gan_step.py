"""GAN training (``vislang train`` with ``task: gan``): the step and its helpers (its losses are in ``losses.py``). The
run itself is the one loop's (``train.loop``) with ``train.tasks.gan.GANTask``, which steps G's and D's optimizers by
manual optimisation.

Run layout (``cfg.out_dir``)::

    config.yaml        the resolved run config          metrics.jsonl    one JSON line per log_every steps
    fid.png            with gan.judge: tracked FID-FM and class consistency against step
    samples/           step_NNNNNNN.png grids: fixed prompts (rows) × fixed noise (columns), from the EMA generator
    checkpoints/       last.pt (atomic): G, D, EMA G, both optimizers, step, RNG states
    model/             the final TextToImage directory (generator + the frozen dual encoder)

Each step: one discriminator update on real (image, its text) against fake (G(z, text), text) and, weighted by
``matching_aware``, (real image, another item's text), the mismatched pair GAN-INT-CLS and DF-GAN count as fake so
that D judges agreement with the text, not realism alone; with ``text_match`` > 0, also a softmax over the batch's
texts (``models.text_match_loss``): D must pick each real image's text out of the batch, and G is trained so that D
picks its image's text too. One random wrong text mostly differs in colour, which D sees at once, so on its own D
learns colour–text agreement and barely looks at shape; comparing every image with every text keeps pushing D (and
through it G) on whatever attribute still confuses it. Then one generator update through the updated D; then the EMA
update. With ``gan.d_steps`` = k > 1 only every k-th step (batch) updates G and the EMA copy, the others D alone.

With ``gan.model.minibatch_std`` D also sees how much each group of consecutive images varies, and with
``gan.group_by_label`` each batch is ordered by class first, so that a group's spread is the spread within one class:
a generator that draws every "sandal" alike is then caught, where random groups mostly measure how different the
classes are, which the generator gets right anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...data.fashion_mnist import format_caption
from ...losses import (
    coverage_loss,
    d_fake_loss,
    d_loss,
    d_real_loss,
    g_loss,
    mismatched,
    mode_seeking_loss,
    spread_match_loss,
    text_match_loss,
)
from ...models.gan.networks import diff_augment, ema_update, parse_augment
from ..config import GANConfig
from ..loop import optimizer_step


def instance_dim(model: dict, embed_dim: int) -> int:
    """The instance-feature size of an IC-GAN run: the dual encoder's embedding size for ``clip`` features, the
    configured number of principal components (default 64) for ``pixels``."""
    if model.get("instance_features", "clip") == "clip":
        return embed_dim
    return int(model.get("instance_dim") or 64)


def default_prompts(gan: GANConfig, classnames: list[str] | None, captions: list[str]) -> list[str]:
    """Rows of the sample grid: the configured prompts, one class prompt per class, or the first distinct captions."""
    if gan.sample_prompts:
        return list(gan.sample_prompts)
    if classnames:
        return [format_caption("a photo of a {}.", c) for c in classnames]
    return list(dict.fromkeys(captions))[:8]


def lr_factor(step: int, total_steps: int, decay_from: float) -> float:
    """The learning-rate multiplier at ``step``: 1 until ``decay_from`` of the run, then linearly down to 0 at the
    last step (pix2pix's schedule), for runs that should settle rather than keep circling an equilibrium. Measured on
    the Fashion-MNIST ``gan`` config it hurt (FID-FM 0.465 decaying over the second half vs 0.205 constant, 6,550
    steps), so configs keep 1. A pure function of the step, so resume needs no scheduler state."""
    start = decay_from * total_steps
    if step < start or total_steps <= start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / (total_steps - start))


def noise(n: int, dim: int, device: torch.device, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Noise (n, dim) for this rank's ``n`` rows of a global batch of ``world``·n rows.

    Under torchrun every rank draws from one shared stream (``GANTask`` seeds it alike on every rank), draws the
    whole global batch's noise and keeps its own rows: each row gets the noise one process would give it, and the
    ranks' noises differ. On one process this is ``torch.randn(n, dim)``."""
    z = torch.randn(world * n, dim, device=device)
    return z[rank * n : (rank + 1) * n] if world > 1 else z


def _d_loss(
    s_real: torch.Tensor, s_fake: torch.Tensor, s_mis: torch.Tensor, n_mis_all: int, gan: GANConfig, world: int
) -> torch.Tensor:
    """``d_loss`` whose mismatched-pair term is this rank's part of the mean over the global batch's ``n_mis_all``
    pairs (a rank's count varies, so DDP's average of per-rank means would weigh the pairs unevenly)."""
    if world == 1 or gan.matching_aware <= 0 or n_mis_all == 0:
        return d_loss(s_real, s_fake, s_mis if world == 1 else None, gan.matching_aware, gan.loss)
    n = len(s_mis)
    mis = d_fake_loss(s_mis, gan.loss) * (n * world / n_mis_all) if n else s_mis.sum()
    fake = d_fake_loss(s_fake, gan.loss)
    return d_real_loss(s_real, gan.loss) + (fake + gan.matching_aware * mis) / (1 + gan.matching_aware)


def gan_step(
    G: torch.nn.Module,
    D: torch.nn.Module,
    G_ema: torch.nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    c: torch.Tensor,
    gan: GANConfig,
    mis_gen: torch.Generator,
    c_flip: torch.Tensor | None = None,
    update_g: bool = True,
    regularize: bool = True,
    stepper: Callable[[torch.optim.Optimizer, torch.Tensor], None] | None = None,
    *,
    G_train: torch.nn.Module | None = None,
    D_call: Callable[..., Any] | None = None,
    rank: int = 0,
    world: int = 1,
    c_all: torch.Tensor | None = None,
    c_flip_all: torch.Tensor | None = None,
) -> dict[str, float]:
    """One discriminator update, one generator update through the updated D, one EMA update; returns the stats.
    ``regularize`` False skips R1 on this step (``gan.r1_every``).
    With ``update_g`` False only the discriminator learns (``gan.d_steps`` > 1: D gets several batches per G update);
    the fakes are then drawn without a graph and the stats have no ``loss_g``.

    ``real`` are images in [-1, 1] (B, C, H, W), ``c`` their text embeddings (B, E). Noise comes from torch's global
    generator (saved in checkpoints), the choice of wrong texts from ``mis_gen``. ``c_flip`` (F, E), with
    ``gan.relation_negatives``: the embeddings of the first F items' captions with their spatial relation flipped
    (the caller puts the items whose captions state one first); each is a wrong text for its real image (matching-
    aware term) and one more text to tell apart in the text-matching softmax, for real images and fakes, so the
    layout, not only the colours and shapes, has to agree with the text.

    ``stepper(optimizer, loss)`` makes each update (zero_grad, backward, step): inside the loop ``Run.step``, which
    also scales and clips; by default ``train.loop.optimizer_step``.

    Under torchrun (``world`` > 1) this rank holds rows ``[rank·B, (rank+1)·B)`` of one process's global batch, whose
    conditions are ``c_all`` (world·B, E) and flipped texts ``c_flip_all``; G's training forward goes through
    ``G_train`` and D's update pass through ``D_call(fn)`` (``fn(D)`` inside D's DDP wrapper), so DDP averages
    their gradients. Noise, the wrong-text pairs and the text-matching softmax are then those of the global batch,
    and the step equals one process's on it; DiffAugment, mode seeking and coverage draw per rank (from a stream
    the ranks share), so with those on it is only close. The generator's update reads D directly: D's weights get
    no gradient from it.
    """
    if world > 1 and c_all is None:
        raise ValueError("gan_step on several ranks needs c_all, the conditions of the whole global batch")
    step = stepper or optimizer_step
    G_fwd = G_train if G_train is not None else G
    d_call = D_call if D_call is not None else (lambda fn: fn(D))
    b = real.shape[0]
    dev = real.device
    cond_dim = G.cfg.cond_dim
    c_text = c[:, :cond_dim]  # IC-GAN: c is [text, instance]; whether a text is wrong is the text's business
    c_glob = c if c_all is None else c_all  # (world·B, E): the global batch's conditions, this rank's at lo
    lo = rank * b
    n_flip = 0 if c_flip is None else len(c_flip)
    flips_all = c_flip if c_flip_all is None else c_flip_all
    n_flip_all = 0 if flips_all is None else len(flips_all)
    z = noise(b, G.cfg.z_dim, dev, rank, world)
    # Extra fakes ride in the same G pass (and BatchNorm batch) as the batch's own: a second noise for the first
    # half of the batch (mode seeking), several candidates for each of a few real images' texts (coverage).
    extra_z, extra_c = [], []
    if gan.mode_seeking > 0:
        extra_z.append(noise(b // 2, G.cfg.z_dim, dev, rank, world)), extra_c.append(c[: b // 2])
    n_cov = min(gan.coverage_images, b) if gan.coverage > 0 and update_g else 0
    if n_cov:
        pick = torch.randperm(b, device=dev)[:n_cov]
        extra_z.append(noise(n_cov * gan.coverage_candidates, G.cfg.z_dim, dev, rank, world))
        extra_c.append(c[pick].repeat_interleave(gan.coverage_candidates, dim=0))
    with torch.set_grad_enabled(update_g):  # a D-only step needs no graph through G
        fake_all = G_fwd(torch.cat([z, *extra_z]), torch.cat([c, *extra_c])) if extra_z else G_fwd(z, c)
    fake = fake_all[:b]  # (B, C, H, W)
    if gan.mode_seeking > 0:
        fake2, z = fake_all[b : b + b // 2], torch.cat([z, extra_z[0]])
    aug = parse_augment(gan.augment)  # DiffAugment: D sees real and fake through the same random transformations
    use_r1 = gan.r1 > 0 and regularize
    real_in = real.detach().requires_grad_(True) if use_r1 else real  # R1 needs D's gradient at the real images
    conds_mis: list[torch.Tensor] = []
    keep = None
    n_mis = n_mis_all = 0
    if gan.matching_aware > 0:
        # The real image under a wrong text reuses the real image's features: D's body never sees the text, and
        # skipping a third pass makes the step ~20% cheaper on a CPU, with the same scores. The pairs are drawn over
        # the global batch (the same draw on every rank), so each rank scores its rows' pairs of one process's.
        wrong, keep = mismatched(c_glob[:, :cond_dim].cpu(), gan.mismatch_max_cos, mis_gen)
        n_mis_all = int(keep.sum()) + n_flip_all
        wrong, keep = wrong[lo : lo + b].to(dev), keep[lo : lo + b].to(dev)
        conds_mis.append(c_glob[wrong][keep])
        n_mis = int(keep.sum())
        if n_flip:
            conds_mis.append(c_flip)
            n_mis += n_flip
    texts = torch.cat([c_glob, flips_all]) if n_flip_all else c_glob  # flipped captions are never right for anyone
    if gan.text_match > 0:
        positives = (c_text @ c_glob[:, :cond_dim].T) >= gan.mismatch_max_cos  # (B, world·B): own and same-meaning
        if n_flip_all:
            positives = torch.cat([positives, positives.new_zeros(b, n_flip_all)], dim=1)  # (B, world·B + F)

    def d_pass(D: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """D's part of its update, in one call (under torchrun inside D's DDP wrapper): features, scores, matching."""
        h = D.features(diff_augment(torch.cat([real_in, fake.detach()]), aug))  # (2B, W): each image through D once
        hs = [h]
        if keep is not None:
            hs.append(h[:b][keep])
            if n_flip:
                hs.append(h[:n_flip])
        scores = D.score(torch.cat(hs), torch.cat([c, c, *conds_mis]))  # (2B + M,): real, fake, real-with-wrong-text
        match = D.match(h[:b], texts) if gan.text_match > 0 else None  # real images pick their texts out of the batch
        return h, scores, match

    h, scores, match = d_call(d_pass)
    s_real, s_fake, s_mis = scores[:b], scores[b : 2 * b], scores[2 * b :]
    loss_d = _d_loss(s_real, s_fake, s_mis, n_mis_all, gan, world)
    stats: dict[str, float] = {}
    if use_r1:  # R1: a flat discriminator around the real data, instead of (or beside) spectral norm
        (grad,) = torch.autograd.grad(s_real.sum(), real_in, create_graph=True)
        r1 = grad.float().pow(2).sum(dim=(1, 2, 3)).mean()
        loss_d = loss_d + gan.r1 * gan.r1_every / 2 * r1  # lazy: k× the weight on every k-th step
        stats["r1"] = r1.item()
    if gan.text_match > 0:
        match_d = text_match_loss(match, positives)
        loss_d = loss_d + gan.text_match * match_d
        stats["match_d"] = match_d.item()
    step(opt_d, loss_d)
    stats.update(loss_d=loss_d.item(), d_real=s_real.mean().item(), d_fake=s_fake.mean().item())
    if n_mis:
        stats["d_mismatch"] = s_mis.mean().item()
    if not update_g:
        return stats
    D.requires_grad_(False)  # the generator's update needs gradients through D, not for D's weights
    if gan.spread_match > 0:  # the real images' spread under the updated D too, from the same pass
        h_both = D.features(diff_augment(torch.cat([real, fake]), aug))  # (2B, W)
        h_real_now, h_fake = h_both[:b].detach(), h_both[b:]
    else:
        h_fake = D.features(diff_augment(fake, aug))  # (B, W)
    loss_g = g_loss(D.score(h_fake, c), gan.loss)
    if gan.text_match > 0:
        match_g = text_match_loss(D.match(h_fake, texts), positives)  # fakes must pick out their own texts too
        loss_g = loss_g + gan.text_match * match_g
        stats["match_g"] = match_g.item()
    if gan.mode_seeking > 0:
        ms = mode_seeking_loss(fake[: b // 2], fake2, z[: b // 2], z[b:])
        loss_g = loss_g + gan.mode_seeking * ms
        stats["mode_seeking"] = ms.item()
    if n_cov:
        cov = coverage_loss(fake_all[len(fake_all) - n_cov * gan.coverage_candidates :], real[pick])
        loss_g = loss_g + gan.coverage * cov
        stats["coverage"] = cov.item()
    if gan.spread_match > 0:
        sm = spread_match_loss(h_fake, h_real_now, max(getattr(D, "mbstd", 0), 2))  # D's groups, else pairs
        loss_g = loss_g + gan.spread_match * sm
        stats["spread_match"] = sm.item()
    step(opt_g, loss_g)
    D.requires_grad_(True)
    if G_ema is not G:
        ema_update(G_ema, G, gan.ema_decay)
    stats["loss_g"] = loss_g.item()
    return stats
