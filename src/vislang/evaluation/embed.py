"""Batched, gradient-free embedding of prepared datasets, image tensors and texts.

Every evaluation starts here, so the batching, device moves, uint8 → float normalisation and eval-mode switching live
in one place. Images come either as a prepared dataset (anything with ``__len__`` and ``get_batch(indices)`` returning
``{"image": uint8 (B, C, H, W), ...}``) or as a plain tensor: uint8 tensors are normalised with the model's mean/std,
floating-point tensors are taken to be model input already (the output of ``preprocess``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import precision as prec
from ..data.transforms import normalize

ImageSource = Any  # a prepared dataset (``get_batch``) or a (N, C, H, W) tensor


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` if given (the model is moved there), else wherever the model already lives."""
    if device is None:
        return model_device(model)
    device = torch.device(device)
    if model_device(model) != device:
        model.to(device)
    return device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with the model in eval mode and no autograd, then restore its previous train/eval mode.

    Restoring matters because periodic evaluation happens in the middle of training.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def float_model(model: nn.Module) -> bool:
    """Whether ``model`` computes in float32 throughout: int8 models (``torch.ao`` quantised layers, the static int8
    CNN) have their own kernels, which bf16 autocast must not feed."""
    return not any("quantized" in type(m).__module__ or "torch.ao" in type(m).__module__ for m in model.modules())


AGREEMENT = 0.999  # auto keeps bf16 for inference only if every output row has at least this cosine with fp32's


def inference_precision(
    model: nn.Module, device: torch.device, precision: str, trial: Callable[[], Any], what: Any
) -> prec.Choice:
    """The precision an inference pass runs in: ``auto`` is bf16 autocast where this machine has native bf16, a
    timed trial of ``trial`` (the first batch's forward) says it pays, and its outputs agree with fp32's (every row's
    cosine at least ``AGREEMENT``; a pretrained EfficientNet-Lite0 on noise images gave 0.998, so this is checked
    per model rather than assumed); fp32 elsewhere and always for int8 models. Results are cached per machine, model
    and input shape (``vislang.precision``); outputs are float32 either way."""
    if precision != "auto":
        return prec.choose(precision, device)  # asked for: no key to hash, no cache to read (a server's every batch)
    if not float_model(model):
        return prec.Choice("fp32", "auto: an int8 model")
    key = prec.model_key([model], ("inference", what))
    choice = prec.choose(precision, device, key, trial)
    if choice.precision != "bf16":
        return choice
    entry = f"agreement | {prec.machine_key(device)} | {key}"
    agree = prec.read_cache().get(entry)
    if agree is None:
        outs = []
        for p in ("fp32", "bf16"):
            with prec.autocast(p, device):
                out = trial()
            outs.append((out[0] if isinstance(out, tuple) else out).float().flatten(1))
        agree = float(F.cosine_similarity(*outs).min())
        prec.write_cache(entry, agree)
    if agree < AGREEMENT:
        return prec.Choice("fp32", f"auto: bf16 outputs differ from fp32's (min cosine {agree:.4f} < {AGREEMENT})")
    return choice


def num_images(images: ImageSource) -> int:
    """Number of images in a dataset or tensor."""
    return int(images.shape[0]) if isinstance(images, torch.Tensor) else len(images)


def image_batch(images: ImageSource, indices: np.ndarray) -> torch.Tensor:
    """The raw images at ``indices`` (uint8 or already-normalised float), (B, C, H, W)."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(indices, dtype=torch.long)]
    return images.get_batch(indices)["image"]


def to_model_input(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images → float normalised with the model's own mean/std on ``device``; float images pass through."""
    images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images.float()

    v = model.cfg.vision
    return normalize(images, v.mean, v.std)


def map_images(
    fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    model: nn.Module,
    images: ImageSource,
    batch_size: int,
    device: torch.device,
    indices: Sequence[int] | np.ndarray | None = None,
    progress: bool = False,
    precision: str = "auto",
) -> tuple[torch.Tensor, ...]:
    """Apply ``fn`` to model-ready batches and concatenate each of its outputs on the CPU.

    Args:
        fn: batch (B, C, H, W) float → one tensor or a tuple of tensors, each (B, ...).
        model: supplies mean/std for uint8 input.
        images: dataset or tensor.
        batch_size: images per forward pass.
        device: where ``fn`` runs.
        indices: a subset of items (default all, in order).
        progress: show a tqdm bar.
        precision: ``auto`` (bf16 autocast where it pays on this machine, see ``inference_precision``), ``fp32`` or
            ``bf16``; outputs are float32 either way.
    """
    idx = np.arange(num_images(images)) if indices is None else np.asarray(indices, dtype=np.int64)
    starts = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="embedding images", unit="batch")
    outputs: list[tuple[torch.Tensor, ...]] = []
    amp = None
    for s in starts:
        x = to_model_input(model, image_batch(images, idx[s : s + batch_size]), device)
        if amp is None:  # settled on the first batch, which the trial times
            amp = prec.autocast(
                inference_precision(model, device, precision, lambda x=x: fn(x), tuple(x.shape)).precision, device
            )
        with amp:
            out = fn(x)
        out = out if isinstance(out, tuple) else (out,)
        outputs.append(tuple(o.float().cpu() for o in out))
    if not outputs:
        raise ValueError("no images to embed: the dataset (or the selected subset) is empty")
    return tuple(torch.cat(parts) for parts in zip(*outputs))


def embed_images(
    model: nn.Module,
    images: ImageSource,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: bool = False,
    normalize: bool = True,
    indices: Sequence[int] | np.ndarray | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Image embeddings (N, E) in the shared space, on the CPU, L2-normalised unless ``normalize=False``.

    Args:
        model: anything with ``encode_image(x, normalize=)`` (and ``cfg.vision.mean/std`` for uint8 input).
        images: a prepared dataset or a (N, C, H, W) tensor (uint8, or float already normalised).
        batch_size: images per forward pass.
        device: where to run; None = where the model is. The model is moved there if needed.
        progress: show a progress bar.
        normalize: L2-normalise the embeddings.
        indices: embed only these items.
        precision: ``auto`` (bf16 where it pays on this machine: ``inference_precision``), ``fp32`` or ``bf16``.
    """
    dev = resolve_device(model, device)
    with eval_mode(model):
        (emb,) = map_images(
            lambda x: model.encode_image(x, normalize=normalize), model, images, batch_size, dev, indices, progress,
            precision,
        )  # fmt: skip
    return emb


def tower_features(
    model: nn.Module,
    images: ImageSource,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: bool = False,
    indices: Sequence[int] | np.ndarray | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Pooled image-tower features (N, D) before the projection: what linear probes are fitted on.

    The projection is trained only to align with text; the tower's own features keep information the contrastive
    objective does not need, which is what a probe measures (as in the CLIP paper's linear-probe evaluation).
    """
    dev = resolve_device(model, device)
    with eval_mode(model):
        (feats,) = map_images(model.visual, model, images, batch_size, dev, indices, progress, precision)
    return feats


def embed_images_and_features(
    model: nn.Module,
    images: ImageSource,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: bool = False,
    indices: Sequence[int] | np.ndarray | None = None,
    precision: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings (N, E) and tower features (N, D) from a single pass over the images.

    Equivalent to ``embed_images`` plus ``tower_features`` for a ``CLIP`` (``encode_image`` is ``image_proj`` of
    ``visual``), at half the cost; evaluation on CPU needs both.
    """
    dev = resolve_device(model, device)

    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = model.visual(x)  # (B, D)
        if hasattr(model, "project_image"):  # a CLIP maps features its own way (a caption memory adds a view)
            return model.project_image(feats), feats  # (B, E), (B, D)
        return F.normalize(model.image_proj(feats), dim=-1), feats  # (B, E), (B, D)

    with eval_mode(model):
        emb, feats = map_images(both, model, images, batch_size, dev, indices, progress, precision)
    return emb, feats


def embed_texts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    normalize: bool = True,
    precision: str = "auto",
) -> torch.Tensor:
    """Text embeddings (N, E) on the CPU, L2-normalised unless ``normalize=False``.

    Args:
        model: anything with ``encode_text(ids, normalize=)``.
        tokenizer: ``tokenizer(list_of_str) -> LongTensor (B, T)``.
        texts: the texts, embedded in order.
        batch_size: texts per forward pass.
        device: where to run; None = where the model is.
        normalize: L2-normalise the embeddings.
        precision: ``auto`` (bf16 where it pays on this machine: ``inference_precision``), ``fp32`` or ``bf16``.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to embed")
    dev = resolve_device(model, device)
    parts, amp = [], None
    with eval_mode(model):
        for s in range(0, len(texts), batch_size):
            ids = tokenizer(texts[s : s + batch_size]).to(dev)  # (B, T)
            if amp is None:  # settled on the first batch, which the trial times
                choice = inference_precision(
                    model, dev, precision, lambda ids=ids: model.encode_text(ids), tuple(ids.shape)
                )
                amp = prec.autocast(choice.precision, dev)
            with amp:
                parts.append(model.encode_text(ids, normalize=normalize).float().cpu())
    return torch.cat(parts)
