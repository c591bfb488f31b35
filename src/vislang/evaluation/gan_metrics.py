"""How good are generated images? Distribution distances (FID, KID), an Inception-Score-style score, class
consistency and text–image agreement, computed with torchmetrics' implementations.

The standard Inception-v3 weights cannot be downloaded here, so the distances are taken in the feature space of a
fixed, saved image classifier (``ImageClassifier`` trained by ``vislang finetune``): on Fashion-MNIST this is
"FID-FM". Any FID depends on its feature space and sample size, so it is only read next to its floor, the same
distance between two real sets of the same size (train split against test split). With ``inception_weights`` (a local
``pt_inception-2015-12-05`` file and the torch-fidelity package) the standard Inception FID is computed too.

A judge is any module with ``features(x) -> (B, D)``, ``forward(x) -> logits (B, K)`` and ``class_names``, taking
the normalised floats its ``preprocess(uint8)`` makes (a ``preprocess`` that is missing means x / 255).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..data.shapes import single_object_caption
from ..data.transforms import normalize
from .embed import model_device


def _prep(judge: nn.Module, images: torch.Tensor) -> torch.Tensor:
    pre = getattr(judge, "preprocess", None)
    return pre(images) if pre is not None else images.float() / 255.0


class JudgeFeatures(nn.Module):
    """uint8 images → the judge's penultimate features: the feature extractor torchmetrics' FID/KID call."""

    def __init__(self, judge: nn.Module) -> None:
        super().__init__()
        self.judge = judge.eval()
        self.num_features = int(getattr(judge, "num_features", 0)) or None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(_prep(self.judge, images)).float()  # (B, D)


class JudgeLogits(nn.Module):
    """uint8 images → the judge's class logits: what torchmetrics' InceptionScore softmaxes."""

    def __init__(self, judge: nn.Module) -> None:
        super().__init__()
        self.judge = judge.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge(_prep(self.judge, images)).float()  # (B, K)


def _batches(images: torch.Tensor, size: int):
    for s in range(0, len(images), size):
        yield images[s : s + size]


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½) of two feature sets (N, D): the FID formula, written out
    (scipy's sqrtm) as the reference torchmetrics is checked against."""
    from scipy import linalg

    a, b = (np.asarray(torch.as_tensor(f).double()) for f in (feats_a, feats_b))
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)  # no disp=: removed in newer scipy
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


class _Given(nn.Module):
    """Hands torchmetrics features (or logits) already computed, so each image set goes through the judge once
    however many metrics read it."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def judge_outputs(judge: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), logits (N, K)) of uint8 images under the judge, in one pass."""
    judge.eval()
    feats, logits = [], []
    for chunk in _batches(images, batch_size):
        f = judge.features(_prep(judge, chunk))
        head = getattr(judge, "forward_head", None)
        feats.append(f.float().cpu())
        logits.append((head(f) if head is not None else judge(_prep(judge, chunk))).float().cpu())
    return torch.cat(feats), torch.cat(logits)


def fid_kid_from_features(
    real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 50, seed: int = 0
) -> dict[str, float]:
    """FID and KID (mean, std over subsets) of two feature sets (N, D), by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    given = _Given(real.shape[1])
    fid = FrechetInceptionDistance(feature=given)
    kid = KernelInceptionDistance(feature=given, subsets=kid_subsets, subset_size=min(1000, len(real), len(fake)))
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    torch.manual_seed(seed)  # KID draws random subsets
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def fid_kid(
    judge: nn.Module, real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 50, seed: int = 0
) -> dict[str, float]:
    """FID and KID of uint8 image sets (N, C, H, W) in the judge's feature space."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    return fid_kid_from_features(judge_outputs(judge, real)[0], judge_outputs(judge, fake)[0], kid_subsets, seed)


def inception_style_score_from_logits(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> dict[str, float]:
    """exp(E KL(p(y|x) || p(y))) with the judge's classes in place of ImageNet's (torchmetrics' InceptionScore):
    high when each image is confidently one class and the classes are covered evenly; at most the class count."""
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature=_Given(logits.shape[1]), splits=splits)
    metric.update(logits)
    torch.manual_seed(seed)  # the splits are a random permutation
    mean, std = metric.compute()
    return {"is": float(mean), "is_std": float(std)}


def inception_style_score(judge: nn.Module, images: torch.Tensor, splits: int = 10, seed: int = 0) -> dict[str, float]:
    """The Inception-Score-style score of uint8 images under the judge."""
    return inception_style_score_from_logits(judge_outputs(judge, images)[1], splits, seed)


def class_consistency_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | list[float]]:
    """Share of images whose argmax class is the one they were generated for, overall and per class."""
    labels = torch.as_tensor(labels)
    hit = (logits.argmax(1) == labels).float()
    classes = range(int(labels.max()) + 1)
    per_class = [float(hit[labels == k].mean()) if (labels == k).any() else float("nan") for k in classes]
    return {"class_consistency": float(hit.mean()), "per_class": per_class}


def class_consistency(judge: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float | list[float]]:
    """Share of uint8 images the judge assigns to the class they were generated for, overall and per class."""
    return class_consistency_from_logits(judge_outputs(judge, images)[1], labels)


@torch.no_grad()
def clip_score(encoder: nn.Module, images: torch.Tensor, text_emb: torch.Tensor, batch_size: int = 500) -> float:
    """Mean cosine similarity between each uint8 image and its text embedding (N, E) under the dual encoder."""

    v = encoder.cfg.vision
    dev = model_device(encoder)  # an ONNX export has no parameters
    sims = []
    for s in range(0, len(images), batch_size):
        x = normalize(images[s : s + batch_size].to(dev), v.mean, v.std)
        img = encoder.encode_image(x, normalize=True).float()  # (B, E)
        sims.append((img * text_emb[s : s + batch_size].to(dev)).sum(1).cpu())
    return float(torch.cat(sims).mean())


@torch.no_grad()
def nearest_distances(query: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N,) root-mean-square pixel distance (pixels in [0, 1]) from each uint8 image of ``query`` (N, C, H, W) to
    its nearest image in ``reference`` (M, C, H, W): the memorisation check. A generator that copies its training
    images sits far closer to them than held-out real images do."""
    ref = reference.flatten(1).float() / 255  # (M, D)
    ref_sq = (ref * ref).sum(1)  # (M,)
    out = []
    for s in range(0, len(query), chunk):
        q = query[s : s + chunk].flatten(1).float() / 255  # (b, D)
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ ref.T + ref_sq  # (b, M) squared distances
        out.append(d2.min(dim=1).values.clamp(min=0).div(ref.shape[1]).sqrt())
    return torch.cat(out)


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights: str, batch_size: int = 100) -> float:
    """Standard FID (Inception-v3 pool features) with weights read from a local file (torch-fidelity's
    ``pt_inception-2015-12-05-6726825d.pth``); gray images are repeated to 3 channels, torchmetrics resizes."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)
    except ModuleNotFoundError as e:
        raise RuntimeError(f"the Inception FID needs torch-fidelity: pip install torch-fidelity ({e})") from e
    for is_real, images in ((True, real), (False, fake)):
        for chunk in _batches(images, batch_size):
            fid.update(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk, real=is_real)
    return float(fid.compute())


# --- shapes: do colour and shape follow the text? ---------------------------------------------------------------------
@torch.no_grad()
def attribute_match(
    encoder: nn.Module,
    tokenizer,
    images: torch.Tensor,
    colors: Sequence[str],
    shapes: Sequence[str],
    targets: Sequence[tuple[str, str]],
) -> dict[str, float]:
    """Judge single-object images zero-shot with the dual encoder over every "a {colour} {shape}" prompt; the
    share whose predicted colour, shape, and both, match the (colour, shape) each was made for."""

    pairs = [(c, s) for c in colors for s in shapes]
    ids = tokenizer([single_object_caption(c, s) for c, s in pairs]).to(next(encoder.parameters()).device)
    text = encoder.encode_text(ids, normalize=True).float()  # (P, E)
    v = encoder.cfg.vision
    preds = []
    for s in range(0, len(images), 500):
        x = normalize(images[s : s + 500].to(text.device), v.mean, v.std)
        preds.append((encoder.encode_image(x, normalize=True).float() @ text.T).argmax(1).cpu())
    pred = [pairs[i] for i in torch.cat(preds).tolist()]
    color_ok = np.mean([p[0] == t[0] for p, t in zip(pred, targets)])
    shape_ok = np.mean([p[1] == t[1] for p, t in zip(pred, targets)])
    both_ok = np.mean([p == tuple(t) for p, t in zip(pred, targets)])
    return {"color_match": float(color_ok), "shape_match": float(shape_ok), "both_match": float(both_ok)}


def colour_centroids(
    images: torch.Tensor, palette: dict[str, tuple[int, int, int]], max_dist: float = 60.0, min_pixels: int = 3
) -> list[dict[str, tuple[float, float]]]:
    """Where each palette colour sits in each uint8 RGB image (N, 3, H, W): the centroid (x, y) of the pixels whose
    nearest palette colour it is, within ``max_dist`` in RGB; colours with fewer than ``min_pixels`` are absent.
    A model-free judge of layout for flat-coloured scenes, so position is not judged by a network that may itself
    ignore word order."""
    names = list(palette)
    pal = torch.tensor([palette[c] for c in names], dtype=torch.float32)  # (K, 3)
    x = images.float().permute(0, 2, 3, 1)  # (N, H, W, 3)
    dist = torch.cdist(x.reshape(len(x), -1, 3), pal[None].expand(len(x), -1, -1))  # (N, HW, K)
    best, idx = dist.min(dim=2)  # (N, HW)
    h, w = images.shape[2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    out = []
    for n in range(len(x)):
        found = {}
        for k, name in enumerate(names):
            mask = (idx[n] == k) & (best[n] < max_dist)
            if int(mask.sum()) >= min_pixels:
                found[name] = (float(xs[mask].mean()), float(ys[mask].mean()))
        out.append(found)
    return out


def relation_holds(a: tuple[float, float], rel: str, b: tuple[float, float]) -> bool:
    """Does point ``a`` stand in relation ``rel`` ("to the left of", "to the right of", "above", "below") to ``b``?
    Image y grows downwards."""
    checks = {
        "to the left of": a[0] < b[0],
        "to the right of": a[0] > b[0],
        "above": a[1] < b[1],
        "below": a[1] > b[1],
    }
    if rel not in checks:
        raise ValueError(f"unknown relation {rel!r}; one of {list(checks)}")
    return checks[rel]


def relation_match(
    images: torch.Tensor, triples: Sequence[tuple[str, str, str]], palette: dict[str, tuple[int, int, int]]
) -> dict[str, float]:
    """Two-object layouts, judged by pixel colour: for each image made for (colour_a, relation, colour_b), whether
    both colours are present and whether colour a's centroid stands in the relation to colour b's."""
    cents = colour_centroids(images, palette)
    present = [a in c and b in c for c, (a, _, b) in zip(cents, triples)]
    ok = [p and relation_holds(c[a], rel, c[b]) for p, c, (a, rel, b) in zip(present, cents, triples)]
    return {"colours_present": float(np.mean(present)), "relation_match": float(np.mean(ok))}
