"""Image-text losses: CLIP's softmax InfoNCE, SigLIP's pairwise sigmoid loss, image–text matching (ITM)
and the captioning (next-token) loss; below them the text-to-image GAN's terms (adversarial, text matching,
mismatched texts, mode seeking, spread, coverage).

Both take the L2-normalised features the model returns plus its (already exponentiated) ``logit_scale`` and
optional ``logit_bias``, and both work unchanged on one process or under DDP: with several ranks they gather the
other ranks' features so that the negatives come from the global batch, and they are written so that the loss
averaged over ranks and the DDP-averaged gradients equal those of a single process on the global batch (with the
default ``gather_with_grad=True``; ``tests/test_ddp.py`` checks this).

Shapes: ``B`` is the local batch size, ``W`` the world size, ``N = W * B`` the global batch, ``D`` the
embedding dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as vdist

__all__ = ["ClipLoss", "SigLipLoss", "caption_loss", "itm_loss", "sample_hard_negatives"]

Scalar = torch.Tensor | float


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Fail early with a readable message instead of a shape error deep inside a matmul or cross-entropy."""
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            "expected 2-D [batch, dim] features, got image "
            f"{tuple(image_features.shape)} and text {tuple(text_features.shape)}"
        )
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"image and text batch sizes differ: {image_features.shape[0]} images vs "
            f"{text_features.shape[0]} texts; contrastive losses need exactly one text per image"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image and text embedding sizes differ: {image_features.shape[1]} vs {text_features.shape[1]}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("empty batch: contrastive losses need at least one image-text pair")


def _wrap(loss: torch.Tensor, output_dict: bool) -> torch.Tensor | dict[str, torch.Tensor]:
    return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP): each image must pick its own text among all texts of the batch, and vice versa.

    ``loss = (CE(logits_per_image, labels) + CE(logits_per_text, labels)) / 2`` with
    ``logits_per_image = logit_scale * image @ text.T (+ logit_bias)`` and ``labels[i] = i``.

    Under DDP the features of all ranks are gathered (more negatives per positive, which is the point of large
    contrastive batches):

    * ``local_loss=False`` (default): every rank computes the full ``[N, N]`` global loss. Same value on every rank.
    * ``local_loss=True``: a rank only computes the rows of its own images/texts against all ``N`` candidates
      (``[B, N]`` logits, labels offset by ``rank * B``), i.e. ``O(B*N)`` instead of ``O(N^2)`` memory. The loss
      differs per rank, but its mean over ranks equals the global loss, and with ``gather_with_grad=True`` the
      DDP-averaged gradients equal the global ones too.

    ``gather_with_grad=False`` gathers without autograd (cheaper; gradients then only approximate the global ones,
    see :func:`vislang.distributed.gather_features`). ``cache_labels`` keeps the ``arange`` labels around between
    steps since the batch size rarely changes.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, cache_labels: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def get_ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        """Index of the matching column for each row: ``[num_logits]`` (offset by ``rank * B`` in local mode)."""
        offset = num_logits * vdist.rank() if (self.local_loss and vdist.world_size() > 1) else 0
        key = (device, num_logits, offset)
        labels = self._labels.get(key) if self.cache_labels else None
        if labels is None:
            labels = torch.arange(num_logits, device=device, dtype=torch.long) + offset
            if self.cache_labels:
                self._labels = {key: labels}  # keep one entry: batch size / device changes are rare
        return labels

    def get_logits(
        self,
        image_features: torch.Tensor,  # [B, D]
        text_features: torch.Tensor,  # [B, D]
        logit_scale: Scalar,
        logit_bias: Scalar | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image, logits_per_text)``: ``[B, B]`` on one process, ``[N, N]`` global or ``[B, N]``
        local under DDP."""
        if vdist.world_size() > 1:
            all_image, all_text = vdist.gather_features(
                image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad
            )  # [N, D] each
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text.T  # [B, N]
                logits_per_text = logit_scale * text_features @ all_image.T  # [B, N]
            else:
                logits_per_image = logit_scale * all_image @ all_text.T  # [N, N]
                logits_per_text = logits_per_image.T  # [N, N]
        else:
            logits_per_image = logit_scale * image_features @ text_features.T  # [B, B]
            logits_per_text = logits_per_image.T  # [B, B]
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def forward(
        self,
        image_features: torch.Tensor,  # [B, D], L2-normalised
        text_features: torch.Tensor,  # [B, D], L2-normalised
        logit_scale: Scalar,  # already exponentiated, scalar tensor
        logit_bias: Scalar | None = None,
        output_dict: bool = False,
        positives: torch.Tensor | None = None,  # [rows, cols] bool, symmetric: pairs that match (diagonal included)
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Scalar loss, or ``{"contrastive_loss": loss}`` when ``output_dict``.

        ``positives`` marks more than the diagonal as a match (pairs of one caption, e.g. "computer" under a dozen
        images): the target of each row is then spread evenly over its positives instead of being ``labels[i]``, so
        an image is not pushed away from its own caption held by another row. Shape of the logits; under DDP the
        caller builds it from gathered ids."""
        _check_features(image_features, text_features)
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        if positives is not None:
            target = positives.to(logits_per_image.dtype)
            target = target / target.sum(1, keepdim=True)  # [rows, cols], rows sum to 1
            loss = (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_text, target)) / 2
            return _wrap(loss, output_dict)
        labels = self.get_ground_truth(logits_per_image.device, logits_per_image.shape[0])  # [rows]
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return _wrap(loss, output_dict)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023): every image-text pair is an independent binary problem.

    ``logits = logit_scale * image @ text.T + logit_bias``, ``labels = 2 * eye - 1`` (+1 on matching pairs, -1
    elsewhere) and ``loss = -sum(logsigmoid(labels * logits)) / B``: the sum over all pairs, normalised by the
    number of images, as in the paper. Unlike softmax InfoNCE it needs no normalisation over the batch, which
    makes it cheap to shard.

    Under DDP (``W`` ranks, local batch ``B``, global ``N = W*B``) each rank gathers the *texts* of all ranks
    (with autograd when ``gather_with_grad``), scores its ``B`` local images against all ``N`` texts (positives
    only where the global indices match, i.e. column ``rank*B + i`` for local image ``i``) and divides by its local
    ``B``. Normalisation, exactly: ``loss_r = S_r / B`` where ``S_r`` sums the ``B*N`` pair terms of rank ``r``;
    the single-process loss on the global batch is ``(sum_r S_r) / N = mean_r(loss_r)``. Since DDP averages
    gradients over ranks (and the differentiable gather returns every rank's gradient for a text to its owner),
    the mean over ranks of the per-rank losses and the DDP-averaged gradients equal the global-batch loss and its
    gradients exactly. The per-rank loss value itself is *not* the global loss; average it over ranks for logging.

    Without ``gather_with_grad`` a rank's texts only receive the gradient of its own images' rows (approximate).
    """

    def __init__(self, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad

    @staticmethod
    def get_labels(
        num_images: int, num_texts: int, offset: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """``[num_images, num_texts]``: +1 at ``(i, offset + i)``, -1 elsewhere."""
        labels = -torch.ones(num_images, num_texts, device=device, dtype=dtype)
        idx = torch.arange(num_images, device=device)
        labels[idx, idx + offset] = 1
        return labels

    def forward(
        self,
        image_features: torch.Tensor,  # [B, D], L2-normalised
        text_features: torch.Tensor,  # [B, D], L2-normalised
        logit_scale: Scalar,  # already exponentiated
        logit_bias: Scalar | None = None,
        output_dict: bool = False,
        positives: torch.Tensor | None = None,  # [B, N] bool: more matches than the diagonal (see ClipLoss)
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Scalar loss for this rank's images (see the class docstring for the DDP normalisation); ``positives``
        labels every marked pair +1 instead of the diagonal alone."""
        _check_features(image_features, text_features)
        batch = image_features.shape[0]
        if vdist.world_size() > 1:
            all_text = vdist.gather_tensor(
                text_features, gather_with_grad=self.gather_with_grad, keep_local_grad=True
            )  # [N, D]
            offset = vdist.rank() * batch
        else:
            all_text = text_features  # [B, D]
            offset = 0
        logits = logit_scale * image_features @ all_text.T  # [B, N]
        if logit_bias is not None:
            logits = logits + logit_bias
        labels = self.get_labels(batch, all_text.shape[0], offset, logits.device, logits.dtype)  # [B, N]
        if positives is not None:
            labels = positives.to(logits.dtype) * 2 - 1  # [B, N]
        loss = -F.logsigmoid(labels * logits).sum() / batch
        return _wrap(loss, output_dict)


def sample_hard_negatives(
    sim: torch.Tensor, positive: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's in-batch hard negatives for ITM: for each image a text, for each text an image, drawn with probability
    ∝ softmax(similarity) over the candidates that are not positives.

    Sampling (rather than taking the most similar) keeps the negatives hard without always picking the same, possibly
    mislabelled, one. Positives are given as a mask, not as the diagonal, because a batch can hold the same caption
    for two images: the other image's identical caption describes this image just as well and must never be drawn as
    a negative.

    Args:
        sim: (B_img, B_txt) image–text similarities (logits, e.g. ``logit_scale * image @ text.T``); not
            differentiated through.
        positive: (B_img, B_txt) bool, True where the text matches the image (its own caption or an identical one).
        generator: random source (default: torch's global one).

    Returns:
        ``neg_text`` (B_img,) and ``neg_image`` (B_txt,) indices; -1 where every candidate is a positive (e.g. all
        captions of the batch are the same), so the caller leaves that row out.
    """
    if sim.ndim != 2 or sim.shape != positive.shape:
        raise ValueError(
            f"sim {tuple(sim.shape)} and positive {tuple(positive.shape)} must be the same (B_img, B_txt) shape"
        )
    if positive.dtype != torch.bool:
        raise ValueError(f"positive must be a bool mask, got {positive.dtype}")

    def draw(s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # (R, C) -> (R,)
        has_neg = ~pos.all(dim=1)  # (R,)
        logits = s.float().masked_fill(pos, float("-inf"))
        logits = torch.where(has_neg[:, None], logits, torch.zeros_like(logits))  # no NaN rows in the softmax
        idx = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)  # (R,)
        return torch.where(has_neg, idx, torch.full_like(idx, -1))

    with torch.no_grad():
        return draw(sim, positive), draw(sim.T, positive.T)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the match head over (positive, negative-text, negative-image) pairs; label 1 = match.

    Args:
        logits: (P, 2) no-match / match logits.
        labels: (P,) 0 or 1.
    """
    if logits.ndim != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected (P, 2) logits and (P,) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels.long())


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Next-token cross-entropy of teacher-forced logits (B, T-1, V) against ``tokens[:, 1:]``, padding ignored.

    Position t of the logits predicts token t+1, so the first token (the begin token) is never a target. The logits
    are upcast to float32: under bf16 autocast a 30k-way softmax loses the small probabilities that matter here.
    """
    if logits.ndim != 3 or logits.shape[:2] != (tokens.shape[0], tokens.shape[1] - 1):
        raise ValueError(
            f"caption logits {tuple(logits.shape)} do not fit tokens {tuple(tokens.shape)}: expected (B, T-1, V)"
        )
    target = tokens[:, 1:]  # (B, T-1)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=pad_id)


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """VQA answer classifier: soft-target cross-entropy; targets are VQA scores normalised per question (one-hot for
    one answer)."""
    t = targets / targets.sum(1, keepdim=True).clamp(min=1e-6)  # (B, A)
    return -(t * F.log_softmax(logits, dim=-1)).sum(1).mean()


def answer_mask(tokens: torch.Tensor, sep: int, pad: int) -> torch.Tensor:
    """(B, T-1): which next-token targets ``tokens[:, 1:]`` the generative VQA loss counts — the answer tokens and the
    end token, i.e. every non-padding token after the first separator."""
    is_sep = (tokens == sep).long()
    after = (is_sep.cumsum(1) - is_sep) > 0  # (B, T): strictly after the first separator
    return (after & (tokens != pad))[:, 1:]


def answer_loss(logits: torch.Tensor, tokens: torch.Tensor, sep: int, pad: int) -> torch.Tensor:
    """Generative VQA: ``caption_loss`` over the answer tokens only; question targets are set to padding, which it
    ignores."""
    targets = tokens.clone()
    targets[:, 1:] = tokens[:, 1:].masked_fill(~answer_mask(tokens, sep, pad), pad)
    return caption_loss(logits, targets, pad)


def group_size(group: int, n: int) -> int:
    """The largest group size up to ``group`` that divides a batch of ``n`` (1 if none larger does)."""
    return next(k for k in range(min(group, n), 0, -1) if n % k == 0)


# --- GAN terms (train.tasks.gan_step) --------------------------------------------------------------------------------
def d_real_loss(scores: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss for scores that should read "real" (hinge: max(0, 1 - s); bce: -log sigmoid(s))."""
    if kind == "hinge":
        return F.relu(1 - scores).mean()
    if kind == "bce":
        return F.softplus(-scores).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; choose hinge or bce")


def d_fake_loss(scores: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss for scores that should read "fake" (hinge: max(0, 1 + s); bce: -log(1 - sigmoid(s)))."""
    if kind == "hinge":
        return F.relu(1 + scores).mean()
    if kind == "bce":
        return F.softplus(scores).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; choose hinge or bce")


def d_loss(
    real: torch.Tensor, fake: torch.Tensor, mismatch: torch.Tensor | None = None, weight: float = 1.0,
    kind: str = "hinge",
) -> torch.Tensor:  # fmt: skip
    """real term + (fake term + weight · mismatch term) / (1 + weight): with ``mismatch`` the scores of real images
    under wrong texts, the matching-aware loss of GAN-INT-CLS / DF-GAN; without it the plain GAN loss."""
    if mismatch is None or mismatch.numel() == 0 or weight <= 0:
        return d_real_loss(real, kind) + d_fake_loss(fake, kind)
    return d_real_loss(real, kind) + (d_fake_loss(fake, kind) + weight * d_fake_loss(mismatch, kind)) / (1 + weight)


def g_loss(fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator loss: hinge's -D, or the non-saturating -log sigmoid(D) of the original GAN."""
    if kind == "hinge":
        return -fake.mean()
    if kind == "bce":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; choose hinge or bce")


def text_match_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """-log of the softmax mass on the right texts, per image, averaged: ``logits`` (B, T) from the discriminator's
    ``match``, ``positives`` (B, T) True where a text describes the image (its own, and texts that mean the same).
    The batch-wide form of the matching-aware term: every image is compared with every text, not with one wrong
    text."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.masked_fill(~positives, -float("inf")).logsumexp(dim=1)).mean()


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
