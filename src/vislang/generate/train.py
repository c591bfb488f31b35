"""The GAN training loop (``vislang train`` with ``task: gan``): two optimizers, so its own loop, built from the
library's pieces: prepared data, atomic checkpoints with RNG state, the metrics JSONL writer and a tqdm bar.

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

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ..config import from_dict, to_dict
from ..evaluation.plots import plot_tracked_fid
from ..train.checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state
from ..train.config import GANConfig, TrainConfig
from ..train.data import epoch_batches, load_prepared
from ..train.loop import MetricsLog, pick_device
from .models import (
    GANModelConfig,
    build_gan,
    d_loss,
    diff_augment,
    ema_update,
    from_uint8,
    g_loss,
    group_size,
    parse_augment,
    standing_stats,
    text_match_loss,
    to_uint8,
)
from .sample import TextToImage, save_grid


@torch.no_grad()
def embed_texts(encoder: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    """Normalised text embeddings (N, E) with the frozen tower, in batches."""
    encoder.eval()
    dev = next(encoder.parameters()).device
    parts = [
        encoder.encode_text(tokenizer(texts[s : s + batch_size]).to(dev), normalize=True).float()
        for s in range(0, len(texts), batch_size)
    ]
    return torch.cat(parts)


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
        from ..data.fashion_mnist import format_caption

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


def mismatched(cond: torch.Tensor, max_cos: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of wrong texts, keep mask): each item takes the text of the item ``shift`` places on; pairs whose
    texts mean the same (cosine >= ``max_cos``, e.g. two templates of one class) are dropped, not counted as fake."""
    b = cond.shape[0]
    shift = int(torch.randint(1, b, (1,), generator=gen))
    idx = (torch.arange(b) + shift) % b
    keep = (cond * cond[idx]).sum(1) < max_cos  # (B,)
    return idx, keep


def mode_seeking_loss(a: torch.Tensor, b: torch.Tensor, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """MSGAN's mode-seeking term (Mao et al. 2019): 1 / (mean |G(za,c) - G(zb,c)| / mean |za - zb|). Small when two
    noises give different images for one text, so the generator is pushed away from drawing one image per text."""
    ratio = (a - b).abs().mean(dim=(1, 2, 3)) / (za - zb).abs().mean(dim=1)  # (N,)
    return 1.0 / (ratio.mean() + 1e-5)


def spread_match_loss(h_fake: torch.Tensor, h_real: torch.Tensor, group: int) -> torch.Tensor:
    """How far the spread of generated images' discriminator features, in each group of ``group`` consecutive items,
    is from the spread of the real images' group at the same place: mean (std_fake - std_real)² / mean std_real², per
    feature. With ``gan.group_by_label`` a group is one class (the fakes carry the real items' texts), so this asks
    for as much variety within a class as the data has, where the minibatch-std channel only lets D notice too
    little. ``h_*`` (B, W); a ``group`` that does not divide B shrinks to one that does, as the minibatch-std
    channel's. The real side is a target: no gradient."""
    b, w = h_fake.shape
    group = group_size(group, b)
    if group < 2:  # no spread to compare
        return h_fake.new_zeros(())
    # (var + eps)^½ as the minibatch-std channel takes it: a group of identical features still has a gradient
    std_f = (h_fake.float().reshape(b // group, group, w).var(dim=1, unbiased=False) + 1e-8).sqrt()  # (B/G, W)
    std_r = (h_real.detach().float().reshape(b // group, group, w).var(dim=1, unbiased=False) + 1e-8).sqrt()
    return ((std_f - std_r) ** 2).mean() / ((std_r**2).mean() + 1e-8)


def coverage_loss(candidates: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """IMLE's term (Li & Malik 2018): the mean squared pixel distance from each real image (N, C, H, W) to the
    nearest of its K generated candidates (N * K, C, H, W; candidates of one real image consecutive, drawn for its
    text). Only the nearest candidate gets a gradient, so every real image pulls some fake towards itself: a data
    mode that no noise reaches costs the generator, which the adversarial loss alone does not make it pay (a
    generator that draws a class's typical items well satisfies the discriminator while its spread stays narrow)."""
    n = real.shape[0]
    d = (candidates.float().view(n, -1, *real.shape[1:]) - real.float().unsqueeze(1)).pow(2).mean(dim=(2, 3, 4))
    return d.min(dim=1).values.mean()  # (N, K) → nearest per real image → mean


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
    """
    b = real.shape[0]
    c_text = c[:, : G.cfg.cond_dim]  # IC-GAN: c is [text, instance]; whether a text is wrong is the text's business
    n_flip = 0 if c_flip is None else len(c_flip)
    z = torch.randn(b, G.cfg.z_dim, device=real.device)
    # Extra fakes ride in the same G pass (and BatchNorm batch) as the batch's own: a second noise for the first
    # half of the batch (mode seeking), several candidates for each of a few real images' texts (coverage).
    extra_z, extra_c = [], []
    if gan.mode_seeking > 0:
        extra_z.append(torch.randn(b // 2, G.cfg.z_dim, device=real.device)), extra_c.append(c[: b // 2])
    n_cov = min(gan.coverage_images, b) if gan.coverage > 0 and update_g else 0
    if n_cov:
        pick = torch.randperm(b, device=real.device)[:n_cov]
        extra_z.append(torch.randn(n_cov * gan.coverage_candidates, G.cfg.z_dim, device=real.device))
        extra_c.append(c[pick].repeat_interleave(gan.coverage_candidates, dim=0))
    with torch.set_grad_enabled(update_g):  # a D-only step needs no graph through G
        fake_all = G(torch.cat([z, *extra_z]), torch.cat([c, *extra_c])) if extra_z else G(z, c)
    fake = fake_all[:b]  # (B, C, H, W)
    if gan.mode_seeking > 0:
        fake2, z = fake_all[b : b + b // 2], torch.cat([z, extra_z[0]])
    aug = parse_augment(gan.augment)  # DiffAugment: D sees real and fake through the same random transformations
    use_r1 = gan.r1 > 0 and regularize
    real_in = real.detach().requires_grad_(True) if use_r1 else real  # R1 needs D's gradient at the real images
    h = D.features(diff_augment(torch.cat([real_in, fake.detach()]), aug))  # (2B, W): each image through D's body once
    hs, conds = [h], [c, c]
    n_mis = 0
    if gan.matching_aware > 0:
        # The real image under a wrong text reuses the real image's features: D's body never sees the text, and
        # skipping a third pass makes the step ~20% cheaper on a CPU, with the same scores.
        wrong, keep = mismatched(c_text.cpu(), gan.mismatch_max_cos, mis_gen)
        keep = keep.to(real.device)
        hs.append(h[:b][keep]), conds.append(c[wrong.to(real.device)][keep])
        n_mis = int(keep.sum())
        if n_flip:
            hs.append(h[:n_flip]), conds.append(c_flip)
            n_mis += n_flip
    scores = D.score(torch.cat(hs), torch.cat(conds))  # (2B + M,): real, fake, real-with-wrong-text
    s_real, s_fake, s_mis = scores[:b], scores[b : 2 * b], scores[2 * b :]
    loss_d = d_loss(s_real, s_fake, s_mis, gan.matching_aware, gan.loss)
    stats: dict[str, float] = {}
    if use_r1:  # R1: a flat discriminator around the real data, instead of (or beside) spectral norm
        (grad,) = torch.autograd.grad(s_real.sum(), real_in, create_graph=True)
        r1 = grad.float().pow(2).sum(dim=(1, 2, 3)).mean()
        loss_d = loss_d + gan.r1 * gan.r1_every / 2 * r1  # lazy: k× the weight on every k-th step
        stats["r1"] = r1.item()
    texts = torch.cat([c, c_flip]) if n_flip else c  # (B + F, E): flipped captions are never right for anyone
    if gan.text_match > 0:
        positives = (c_text @ c_text.T) >= gan.mismatch_max_cos  # (B, B): own text and texts that mean the same
        if n_flip:
            positives = torch.cat([positives, positives.new_zeros(b, n_flip)], dim=1)  # (B, B + F)
        match_d = text_match_loss(D.match(h[:b], texts), positives)  # real images pick their texts out of the batch
        loss_d = loss_d + gan.text_match * match_d
        stats["match_d"] = match_d.item()
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
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
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    D.requires_grad_(True)
    if G_ema is not G:
        ema_update(G_ema, G, gan.ema_decay)
    stats["loss_g"] = loss_g.item()
    return stats


def train_gan(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train a text-conditioned GAN as ``cfg`` (``task: gan``) says; returns the saved model directory.
    cuDNN's benchmark mode, switched on for the run, is put back as it was afterwards."""
    before = torch.backends.cudnn.benchmark
    try:
        return _train_gan(cfg, resume)
    finally:
        torch.backends.cudnn.benchmark = before


def _train_gan(cfg: TrainConfig, resume: bool) -> Path:
    from ..factory import from_pretrained, get_tokenizer

    gan = cfg.gan or GANConfig()
    if gan.group_by_label and gan.relation_negatives:
        raise ValueError("gan.group_by_label and gan.relation_negatives each order the batch; choose one")
    parse_augment(gan.augment)  # an unknown augmentation fails before anything loads
    if (gan.fid_every or gan.keep_best) and not gan.judge:
        raise ValueError(
            "gan.fid_every and gan.keep_best track FID-FM with a fixed classifier: pass --gan.judge=DIR "
            "(train one with `vislang finetune --model fmnist-cnn --method scratch --out runs/finetune`)"
        )
    if gan.coverage > 0 and min(gan.coverage_candidates, gan.coverage_images) < 1:
        raise ValueError(
            f"gan.coverage_candidates={gan.coverage_candidates} and gan.coverage_images={gan.coverage_images} "
            "must be at least 1 (fakes drawn per real image, real images per batch) when gan.coverage is on"
        )
    if gan.r1 < 0 or gan.r1_every < 1:
        raise ValueError(
            f"gan.r1={gan.r1} must be >= 0 (0 = off) and gan.r1_every={gan.r1_every} >= 1 (R1 on every k-th step)"
        )
    if gan.d_steps < 1:
        raise ValueError(f"gan.d_steps={gan.d_steps} must be at least 1 (discriminator updates per generator update)")
    if not 0.0 <= gan.lr_decay_from <= 1.0:
        raise ValueError(
            f"gan.lr_decay_from={gan.lr_decay_from} must lie in [0, 1] (the fraction of the steps "
            "after which the learning rates fall linearly to 0; 1 keeps them constant)"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    if device.type == "cuda":  # the same shapes every step: let cuDNN time its convolution algorithms once
        torch.backends.cudnn.benchmark = True
    if not Path(gan.text_model).is_dir():  # checked before out_dir is made: a fresh clone has no text tower yet
        raise FileNotFoundError(
            f"gan.text_model {gan.text_model!r} is not a model directory; make one with `make demo` or "
            "`vislang train --config demo` (both write runs/demo/model), or pass --gan.text_model=DIR"
        )
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoints" / "last.pt"
    out.mkdir(parents=True, exist_ok=True)
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out_dir")
    encoder = from_pretrained(gan.text_model, device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    tokenizer = get_tokenizer(gan.text_model)
    v = encoder.cfg.vision
    mcfg = from_dict(
        GANModelConfig,
        {
            **gan.model,
            "cond_dim": encoder.cfg.embed_dim,
            "image_size": v.image_size,
            "channels": v.channels,
            **(
                {"instance_dim": instance_dim(gan.model, encoder.cfg.embed_dim)}
                if gan.model.get("instance_bank")
                else {}
            ),
        },
        "gan.model",
    )

    if mcfg.instance_bank > 0 and gan.relation_negatives:
        raise ValueError("gan.relation_negatives is not supported with instance conditioning (gan.model.instance_bank)")
    if mcfg.minibatch_std > 0 and cfg.batch_size % mcfg.minibatch_std:
        raise ValueError(
            f"gan.model.minibatch_std={mcfg.minibatch_std} must divide --batch_size={cfg.batch_size}, or a group of "
            "the minibatch-std channel would mix real and generated images; use a batch size that it divides"
        )
    d = cfg.data
    data = load_prepared(d.train, d.train_split, v.image_size, v.channels, d, cfg.progress)
    n = min(len(data), d.max_train) if d.max_train else len(data)
    captions = data.captions[:n]
    uniq, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    print(f"[vislang] embedding {len(uniq)} distinct captions of {n} images with the frozen text tower")
    cond_table = embed_texts(encoder, tokenizer, list(uniq)).to(device)  # (U, E)
    cap_index = torch.from_numpy(inverse.astype(np.int64))  # (N,)
    flip_table, has_flip = None, None
    if gan.relation_negatives:
        from ..data.shapes import relation_flips

        flipped = relation_flips(list(uniq), "gan.relation_negatives", off="false")
        has_flip = torch.tensor([f is not None for f in flipped])  # (U,)
        flip_table = torch.zeros_like(cond_table)  # (U, E): rows without a relation stay unused
        rows = has_flip.nonzero().squeeze(1)
        flip_table[rows.to(device)] = embed_texts(encoder, tokenizer, [flipped[i] for i in rows.tolist()]).to(device)
        print(f"[vislang] relation negatives: {int(has_flip.sum())} of {len(uniq)} distinct captions state a relation")
    bank = nn_table = None
    if mcfg.instance_bank > 0:
        if mcfg.instance_bank > n:
            raise ValueError(f"gan.model.instance_bank={mcfg.instance_bank} exceeds the {n} training images")
        from .instance import instance_features, neighbours

        print(
            f"[vislang] instance conditioning: {mcfg.instance_features} features of {n} training images, "
            f"a bank of {mcfg.instance_bank}, {mcfg.instance_k} neighbours each"
        )
        feats = instance_features(mcfg.instance_features, encoder, data, mcfg.instance_dim, n).to(device)  # (N, Ei)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[: mcfg.instance_bank]
        bank, bank_keys = feats[pick.to(device)], cond_table[cap_index[pick].to(device)]  # (M, Ei), (M, E)
        nn_table = neighbours(feats, cond_table[cap_index.to(device)], bank, bank_keys, mcfg.instance_k)  # (N, k)
        del feats
    sort_labels = None
    if gan.group_by_label:
        if not data.classnames:
            raise ValueError(f"gan.group_by_label needs a dataset with class labels; {d.train} has none")
        sort_labels = np.asarray(data.labels)
    prompts = default_prompts(gan, data.classnames, captions)
    tracker = None
    if gan.judge:
        from ..data.fashion_mnist import format_caption
        from .evaluate import FIDTracker

        if not data.classnames:
            raise ValueError(f"gan.judge tracks FID-FM per class, so it needs class names; {d.train} has none")
        class_cond = embed_texts(encoder, tokenizer, [format_caption("a photo of a {}.", c) for c in data.classnames])
        tracker = FIDTracker(
            gan.judge, class_cond.to(device), d.train, d.train_split, v.image_size, v.channels, gan.fid_images, cfg.seed
        )
    prompt_cond = embed_texts(encoder, tokenizer, prompts).to(device)  # (P, E)

    torch.manual_seed(cfg.seed)
    G, D = build_gan(mcfg)
    G, D = G.to(device), D.to(device)
    if bank is not None:
        G.set_bank(bank, bank_keys)
    # ~1.4x faster small convs on a CPU (measured); the projected D's frozen EfficientNet ~2x
    channels_last = device.type == "cpu" and mcfg.arch in ("dcgan", "projected")
    if channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G).eval() if gan.ema_decay > 0 else G
    for p in G_ema.parameters():
        p.requires_grad_(G_ema is G)
    opt_g = torch.optim.Adam(G.parameters(), lr=gan.lr_g, betas=gan.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=gan.lr_d, betas=gan.betas)

    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training set has {n} images, fewer than one batch of {cfg.batch_size}; lower --batch_size"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    fixed_z = torch.randn(gan.sample_per_prompt, mcfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    fixed_z = fixed_z.repeat(len(prompts), 1).to(device)  # (P*K, Z): the same K noises in every row
    fixed_c = prompt_cond.repeat_interleave(gan.sample_per_prompt, dim=0)  # (P*K, E)
    mis_gen = torch.Generator().manual_seed(cfg.seed + 2)
    # Captions drawn as in the data: the conditions of the standing BatchNorm statistics of every saved generator.
    stand_c = cond_table[cap_index[torch.randint(n, (4096,), generator=torch.Generator().manual_seed(cfg.seed))]]
    step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    best: dict = {}  # with a judge: {"step", "fid_fm", "G_ema"} of the lowest tracked FID-FM so far
    if resume:
        state = load_checkpoint(ckpt_path)
        G.load_state_dict(state["G"]), D.load_state_dict(state["D"])
        if G_ema is not G:
            G_ema.load_state_dict(state["G_ema"])
        opt_g.load_state_dict(state["opt_g"]), opt_d.load_state_dict(state["opt_d"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        total_steps = cfg.max_steps or state["total_steps"]  # --max_steps extends (or ends) a resumed run
        elapsed_before = state.get("elapsed_s", 0.0)
        set_rng_state(state["rng"])
        mis_gen.set_state(state["mis_rng"])
        best = state.get("best") or {}
        print(f"[vislang] resumed {ckpt_path} at step {step}/{total_steps}")

    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out / "gan_model_config.json").write_text(json.dumps(to_dict(mcfg), indent=2))
    log = MetricsLog(out / "metrics.jsonl", True)
    t_start = time.time()

    def elapsed() -> float:
        return elapsed_before + time.time() - t_start

    def save_checkpoint() -> None:
        atomic_torch_save(
            {
                "G": G.state_dict(),
                "D": D.state_dict(),
                "G_ema": G_ema.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "total_steps": total_steps,
                "elapsed_s": elapsed(),
                "rng": rng_state(),
                "mis_rng": mis_gen.get_state(),
                "best": best,
                "config": to_dict(cfg),
            },
            ckpt_path,
        )

    def write_samples() -> None:
        G_ema.eval()
        with torch.no_grad():
            imgs = to_uint8(G_ema(fixed_z, fixed_c)).cpu()
        save_grid(imgs, out / "samples" / f"step_{step:07d}.png", ncol=gan.sample_per_prompt, scale=2)
        if G_ema is G:
            G.train()

    def track() -> None:
        """Tracked FID-FM of the EMA generator as it would be saved now (standing statistics on a copy)."""
        nonlocal best
        snap = copy.deepcopy(G_ema)
        if gan.standing_stats and G_ema is not G:
            standing_stats(snap, stand_c, mcfg.z_dim, gan.standing_stats, cfg.batch_size, cfg.seed)
        r = tracker(snap, mcfg.z_dim)
        rec = {"step": step, "tracked_fid_fm": r["fid_fm"], "tracked_class_consistency": r["class_consistency"]}
        log.write(rec if tracker.floor is None else {**rec, "tracked_fid_fm_floor": tracker.floor})
        if not best or r["fid_fm"] < best["fid_fm"]:
            best = {"step": step, "fid_fm": r["fid_fm"], "G_ema": {k: t.clone() for k, t in snap.state_dict().items()}}
        bar.set_description(f"train gan (FID-FM {r['fid_fm']:.3f}, best {best['fid_fm']:.3f} at {best['step']})")
        plot_tracked_fid(out / "metrics.jsonl", out / "fid.png")

    bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress, desc="train gan", unit="step")
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    t_log, seen = time.time(), 0
    G.train(), D.train()
    while step < total_steps:
        batches = epoch_batches(n, cfg.batch_size, cfg.seed, epoch)[:steps_per_epoch]
        for idx in batches[batch_in_epoch:]:
            if sort_labels is not None:  # one class per minibatch-std group: D compares spread within a class
                idx = np.asarray(idx)
                idx = idx[np.argsort(sort_labels[idx], kind="stable")]
            cap = cap_index[torch.as_tensor(idx)]  # (B,) distinct-caption ids
            c_flip = None
            if flip_table is not None:  # items whose caption states a relation go first, with their flipped text
                order = torch.argsort((~has_flip[cap]).to(torch.int8), stable=True)
                idx, cap = np.asarray(idx)[order.numpy()], cap[order]
                c_flip = flip_table[cap[has_flip[cap]].to(device)]  # (F, E)
            real = from_uint8(data.get_batch(idx)["image"]).to(device)  # (B, C, H, W) in [-1, 1]
            if channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            c = cond_table[cap.to(device)]  # (B, E)
            if nn_table is not None:  # IC-GAN: each real image with one of its k nearest bank instances
                near = nn_table[torch.as_tensor(idx).to(device), torch.randint(mcfg.instance_k, (len(idx),)).to(device)]
                c = torch.cat([c, bank[near]], dim=1)  # (B, E + Ei)
            f = lr_factor(step, total_steps, gan.lr_decay_from)
            for opt, lr in ((opt_g, gan.lr_g), (opt_d, gan.lr_d)):
                for group in opt.param_groups:
                    group["lr"] = lr * f
            update_g = (step + 1) % gan.d_steps == 0  # the last of every d_steps batches also updates G
            regularize = step % gan.r1_every == 0
            stats = gan_step(G, D, G_ema, opt_g, opt_d, real, c, gan, mis_gen, c_flip, update_g, regularize)
            if not all(math.isfinite(v) for v in stats.values()):
                raise FloatingPointError(f"GAN losses became non-finite at step {step}; lower --gan.lr_d/--gan.lr_g")
            b = real.shape[0]
            step, batch_in_epoch, seen = step + 1, batch_in_epoch + 1, seen + b
            for k, val in stats.items():
                sums[k] = sums.get(k, 0.0) + val
                counts[k] = counts.get(k, 0) + 1
            bar.update(1)
            if budget_s and elapsed() >= budget_s and step < total_steps:
                # The time budget simply ends the run when it is spent (a decaying rate is cut where it stands).
                total_steps = step
                print(f"[vislang] time budget {cfg.time_budget_min} min spent: stopping at step {step}")
            if step % cfg.log_every == 0 or step == total_steps:
                rec = {"step": step, "epoch": round(epoch + batch_in_epoch / len(batches), 4)}
                # Each stat is the mean over the steps that had it (loss_g: G updates; d_mismatch: wrong texts found).
                rec.update({key: val / counts[key] for key, val in sums.items()}, lr_factor=round(f, 4))
                rec.update(images_per_s=seen / max(time.time() - t_log, 1e-9), elapsed_s=round(elapsed(), 2))
                log.write(rec)
                bar.set_postfix(
                    d=f"{rec['loss_d']:.3f}", g=f"{rec.get('loss_g', math.nan):.3f}", ips=f"{rec['images_per_s']:.0f}"
                )
                sums, counts, t_log, seen = {}, {}, time.time(), 0
            if tracker is not None and ((gan.fid_every and step % gan.fid_every == 0) or step == total_steps):
                track()
            if gan.sample_every and step % gan.sample_every == 0:
                write_samples()
            if step % cfg.save_every == 0:
                save_checkpoint()
            if step >= total_steps:
                break
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    save_checkpoint()
    chosen = step
    if best and (gan.keep_best or best["step"] == step):  # the snapshot already has its standing statistics
        G_ema.load_state_dict(best["G_ema"])
        chosen = best["step"]
        if chosen != step:
            print(f"[vislang] keeping the EMA generator of step {chosen} (tracked FID-FM {best['fid_fm']:.4f})")
    elif gan.standing_stats and G_ema is not G:  # after the checkpoint: a resumed run goes on from the trained state
        standing_stats(G_ema, stand_c, mcfg.z_dim, gan.standing_stats, cfg.batch_size, cfg.seed)
    write_samples()
    model = TextToImage(mcfg, G_ema, encoder, tokenizer, {"sample_prompts": prompts})
    extra = {
        "train": {"steps": step, "seconds": round(elapsed(), 1), "data": d.train, "text_model": gan.text_model},
        "data": {"train": d.train, "train_split": d.train_split, "val_split": d.val_split},
    }
    extra["train"]["generator_step"] = chosen  # the step whose EMA generator was saved (keep_best may go back)
    if best:
        extra["train"]["tracked_fid_fm"] = {"best": best["fid_fm"], "best_step": best["step"], "judge": gan.judge}
    model_dir = model.save_pretrained(out / "model", extra)
    print(f"[vislang] trained {step} GAN steps in {elapsed():.0f} s; model saved to {model_dir}")
    return model_dir
