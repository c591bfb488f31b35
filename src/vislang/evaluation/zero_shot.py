"""Zero-shot classification: class names become text prompts, the closest prompt embedding is the prediction.

Each class is represented by the mean of its prompt embeddings over several templates ("a photo of a {}.",
"a blurry photo of a {}."), renormalised — the prompt ensembling of the CLIP paper and OpenCLIP's
``build_zero_shot_classifier``, which smooths over any single phrasing the model happens to dislike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.fashion_mnist import format_caption
from .embed import ImageSource, embed_images, embed_texts, eval_mode, resolve_device

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}")

Template = str | Callable[[str], str]


def fill_template(template: Template, classname: str) -> str:
    """A prompt from a template: ``"a photo of a {}."`` style format strings or callables (OpenCLIP accepts both)."""
    if callable(template):
        return template(classname)

    return format_caption(template, classname)  # "a {}" + "ankle boot" → "an ankle boot"


def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Class weights (E, K): per class, the renormalised mean of its normalised template embeddings.

    Args:
        model: anything with ``encode_text``.
        tokenizer: ``tokenizer(list_of_str) -> LongTensor``.
        classnames: K class names as they read in a sentence.
        templates: T prompt templates.
        device: where to run; None = the model's device.
        batch_size: prompts per forward pass.
    """
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template, e.g. 'a photo of a {}.'")
    prompts = [fill_template(t, c) for c in classnames for t in templates]  # class-major: K*T prompts
    emb = embed_texts(model, tokenizer, prompts, batch_size, device)  # (K*T, E), normalised
    emb = emb.reshape(len(classnames), len(templates), -1).mean(dim=1)  # (K, E)
    return F.normalize(emb, dim=-1).T.contiguous()  # (E, K)


def logit_scale_of(model: nn.Module) -> float:
    """The model's learned temperature (CLIP's ``logit_scale.exp()``), 100 when it has none."""
    get = getattr(model, "get_logit_scale", None)
    return float(get()) if get is not None else 100.0


def classification_metrics(
    scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, num_classes: int, top_k: int = 5
) -> dict[str, Any]:
    """Top-1/top-k accuracy, per-class precision/recall/F1, confusion matrix and predictions from class scores.

    Top-k accuracy is the micro average (the fraction of images whose class is among the k best scores), computed
    with ``topk`` and tested against torchmetrics' ``MulticlassAccuracy``: importing torchmetrics at run time pulls
    in torchvision and costs about ten seconds per command on a laptop. Per-class numbers and the confusion matrix
    come from scikit-learn, with every class listed even when absent from ``labels``.

    Args:
        scores: (N, K) logits or probabilities.
        labels: (N,) true class indices in [0, K).
        num_classes: K.
        top_k: the k of the second accuracy (clipped to K).

    Returns:
        ``top1``, ``top{k}`` (named ``top5`` for the default), ``macro_f1`` and ``balanced_accuracy`` (mean F1 and
        recall over the classes present in ``labels``),
        ``n``, ``precision``/``recall``/``f1``/``support`` (arrays of length K), ``confusion`` (K, K; rows = true
        class) and ``predictions`` (N,).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    scores = torch.as_tensor(scores, dtype=torch.float32)
    target = torch.as_tensor(labels, dtype=torch.long)
    if scores.ndim != 2 or scores.shape[0] != target.shape[0] or scores.shape[1] != num_classes:
        raise ValueError(f"scores must be (N, {num_classes}) with N = len(labels), got {tuple(scores.shape)}")
    if target.numel() == 0:
        raise ValueError("no labelled items to score")
    k = min(top_k, num_classes)
    top = scores.topk(k, dim=1).indices  # (N, k), best first
    correct = top == target.unsqueeze(1)  # (N, k)
    preds = top[:, 0]
    y_true, y_pred = target.numpy(), preds.numpy()
    classes = np.arange(num_classes)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    present = support > 0
    return {
        "top1": float(correct[:, 0].float().mean()),
        f"top{top_k}": float(correct.any(dim=1).float().mean()),
        "macro_f1": float(f1[present].mean()),
        "balanced_accuracy": float(recall[present].mean()),
        "n": int(target.numel()),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "confusion": confusion_matrix(y_true, y_pred, labels=classes),
        "predictions": y_pred,
    }


def zero_shot_eval(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    dataset: ImageSource,
    classnames: Sequence[str] | None = None,
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    device: str | torch.device | None = None,
    batch_size: int = 512,
    labels: np.ndarray | None = None,
    image_emb: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Zero-shot classification of a labelled dataset.

    Items with an unknown label (-1) are left out. The scores are image–class cosine similarities; the temperature
    does not change rankings, so it is not applied.

    Args:
        model: a dual encoder.
        tokenizer: the model's tokenizer.
        dataset: a prepared dataset (with ``labels`` and ``classnames``) or an image tensor (then pass ``labels``).
        classnames: K names; default ``dataset.classnames``.
        templates: prompt templates for class-name ensembling.
        device: where to run; None = the model's device.
        batch_size: images per forward pass.
        labels: (N,) class indices; default ``dataset.labels``.
        image_emb: precomputed normalised image embeddings (N, E), to share one pass with other evaluations.

    Returns:
        The :func:`classification_metrics` dict plus ``classnames`` and ``templates``.
    """
    classnames = list(classnames if classnames is not None else (getattr(dataset, "classnames", None) or []))
    if not classnames:
        raise ValueError("zero-shot evaluation needs class names: pass classnames=[...] or use a labelled dataset")
    labels = np.asarray(labels if labels is not None else getattr(dataset, "labels", []), dtype=np.int64)
    known = np.flatnonzero(labels >= 0)
    if known.size == 0:
        raise ValueError("the dataset has no labelled items (all labels are -1), so zero-shot accuracy is undefined")
    if labels[known].max() >= len(classnames):
        raise ValueError(f"labels go up to {labels[known].max()} but only {len(classnames)} class names were given")
    if image_emb is not None and image_emb.shape[0] != len(labels):
        raise ValueError(
            f"image_emb has {image_emb.shape[0]} rows but there are {len(labels)} labels; pass matching ones"
        )
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device)  # (E, K)
    if image_emb is None:
        image_emb = embed_images(model, dataset, batch_size, device, indices=known)
    else:
        image_emb = image_emb[torch.as_tensor(known)]
    scores = image_emb.float() @ classifier  # (N, K)
    out = classification_metrics(scores, labels[known], len(classnames))
    out["classnames"] = classnames
    out["templates"] = [t if isinstance(t, str) else getattr(t, "__name__", "template") for t in templates]
    return out


def zero_shot_predict(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    images: torch.Tensor,
    labels: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Probabilities (B, K) over free-form ``labels`` for preprocessed images (B, C, H, W) or (C, H, W).

    Uses the model's learned temperature, so the probabilities mean what they meant in training (CLIP's recipe).
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)  # (1, C, H, W)
    dev = resolve_device(model, device)
    classifier = zero_shot_classifier(model, tokenizer, list(labels), templates, dev)  # (E, K)
    with eval_mode(model):
        image_emb = model.encode_image(images.to(dev).float(), normalize=True).float().cpu()  # (B, E)
        scale = logit_scale_of(model)
    return (scale * image_emb @ classifier).softmax(dim=-1)
