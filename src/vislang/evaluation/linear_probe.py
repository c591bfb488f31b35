"""Linear probe: logistic regression on frozen image-tower features, the CLIP paper's measure of representation quality.

Zero-shot accuracy says how well images and class names line up; the probe says how much class information the image
tower carries at all, whether or not the text side learned to name it. Features are standardised and the inverse
regularisation strength C is picked on a held-out split of (a subsample of) the training features, which keeps a
60,000 × 128 probe within seconds on two CPU cores.

The fits run with BLAS/OpenMP limited to one thread: at 128 features the matrix products are too small to gain from
threads, and on a busy laptop OpenBLAS threads spinning against torch's OpenMP pool made an 8,000-item fit 40× slower
(28 s instead of 0.7 s).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .embed import ImageSource, tower_features

DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)


def as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """CPU NumPy view of a tensor or array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def make_probe(C: float, max_iter: int = 1000):
    """Standardise, then multinomial logistic regression (lbfgs); standardising lets lbfgs converge in few steps."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def fit_probe(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = 1000) -> tuple[Any, bool]:
    """A fitted probe and whether lbfgs converged (a non-converged probe is still usable, but say so)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe = make_probe(C, max_iter).fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return probe, converged


def select_C(
    x: np.ndarray,
    y: np.ndarray,
    Cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    sweep_max: int = 10000,
    max_iter: int = 1000,
    seed: int = 0,
) -> tuple[float, dict[str, float]]:
    """The C with the best held-out accuracy on a subsample of at most ``sweep_max`` items (smallest C on ties).

    Returns:
        The chosen C and the validation accuracy per C (keys are the C values as strings, for JSON).
    """
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    if len(y) > sweep_max:
        keep = rng.choice(len(y), sweep_max, replace=False)
        x, y = x[keep], y[keep]
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=stratify)
    scores = {}
    for C in sorted(Cs):
        probe, _ = fit_probe(x_tr, y_tr, C, max_iter)
        scores[str(C)] = float(probe.score(x_val, y_val))
    best = max(sorted(Cs), key=lambda c: scores[str(c)])
    return best, scores


def linear_probe(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    C: float | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    max_iter: int = 1000,
    sweep_max: int = 10000,
    seed: int = 0,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Fit a logistic-regression probe on training features and report test accuracy.

    Items labelled -1 (unknown) are dropped from both sides.

    Args:
        train_feats: (N, D) features.
        train_labels: (N,) class indices.
        test_feats: (M, D) features.
        test_labels: (M,) class indices.
        C: inverse regularisation strength; None = pick from ``Cs`` on a validation split.
        Cs: candidates for the sweep.
        max_iter: lbfgs iterations.
        sweep_max: training items used by the sweep (the final fit uses all).
        seed: subsampling and split seed.
        threads: BLAS/OpenMP threads for the fits (None = the libraries' default); one is fastest for small features.

    Returns:
        ``accuracy``, ``C``, ``n_train``, ``n_test``, ``converged``, ``fit_s`` and, after a sweep, ``val_accuracy``.
    """
    x_tr, y_tr = as_numpy(train_feats).astype(np.float32), as_numpy(train_labels).astype(np.int64)
    x_te, y_te = as_numpy(test_feats).astype(np.float32), as_numpy(test_labels).astype(np.int64)
    x_tr, y_tr = x_tr[y_tr >= 0], y_tr[y_tr >= 0]
    x_te, y_te = x_te[y_te >= 0], y_te[y_te >= 0]
    if len(np.unique(y_tr)) < 2:
        raise ValueError("a linear probe needs labelled training items from at least two classes")
    if len(y_te) == 0:
        raise ValueError("a linear probe needs labelled test items (all test labels are -1)")
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    with threadpool_limits(limits=threads):
        if C is None:
            C, out["val_accuracy"] = select_C(x_tr, y_tr, Cs, sweep_max=sweep_max, max_iter=max_iter, seed=seed)
        probe, converged = fit_probe(x_tr, y_tr, C, max_iter)
    out.update(
        accuracy=float(probe.score(x_te, y_te)),
        C=float(C),
        n_train=int(len(y_tr)),
        n_test=int(len(y_te)),
        converged=converged,
        fit_s=time.perf_counter() - t0,
    )
    return out


def probe_eval(
    model: nn.Module,
    train_dataset: ImageSource,
    test_dataset: ImageSource,
    device: str | torch.device | None = None,
    batch_size: int = 512,
    max_train: int | None = 20000,
    test_feats: torch.Tensor | None = None,
    train_labels: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = False,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Linear probe on the model's image-tower features for a train/test pair of labelled datasets.

    Args:
        model: a dual encoder with ``visual``.
        train_dataset: labelled training images.
        test_dataset: labelled test images.
        device: where features are computed.
        batch_size: images per forward pass.
        max_train: labelled training items used (a random subsample; None = all).
        test_feats: precomputed test tower features (M, D).
        train_labels: default ``train_dataset.labels``.
        test_labels: default ``test_dataset.labels``.
        seed: subsample seed.
        progress: show progress bars while computing features.
        **probe_kwargs: passed to :func:`linear_probe` (``C``, ``Cs``, ``max_iter``, ``sweep_max``, ``threads``).
    """
    y_tr = np.asarray(train_labels if train_labels is not None else train_dataset.labels, dtype=np.int64)
    y_te = np.asarray(test_labels if test_labels is not None else test_dataset.labels, dtype=np.int64)
    idx = np.flatnonzero(y_tr >= 0)
    if max_train is not None and len(idx) > max_train:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_train, replace=False))
    x_tr = tower_features(model, train_dataset, batch_size, device, progress, indices=idx)
    if test_feats is None:
        test_feats = tower_features(model, test_dataset, batch_size, device, progress)
    return linear_probe(x_tr, y_tr[idx], test_feats, y_te, seed=seed, **probe_kwargs)
