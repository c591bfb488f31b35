"""Saving int8 models, and reading any model directory compression handles.

The int8 mechanics (dynamic and static quantisation, the on-disk encoding, loading stored integers back) live below
the registry in :mod:`vislang.models.int8_io`, because loading an int8 directory is every loader's business; this
module writes them and names the families compression handles.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..models.dual_encoder import build_model, save_pretrained
from ..models.gan.pipeline import MODEL_TYPE as GAN_TYPE
from ..models.int8_io import QUANTISED_METHODS, quantized_state_dict
from ..models.quantized import quantize_dynamic
from ..models.vqa import MODEL_TYPE as VQA_TYPE
from ..models.vqa import VQAModel, save_vqa
from ..registry import FAMILIES, load, read_meta

__all__ = ["QUANTISED_METHODS", "load_model", "load_quantized", "model_family", "quantize_dynamic",
           "read_meta", "save_quantized"]  # fmt: skip


def model_family(meta: dict[str, Any]) -> str:
    """``dual-encoder``, ``captioner`` (a CoCa: the config has a decoder), ``vqa`` or ``generator`` (a text-to-image
    GAN), from a directory's config; the registry's ``compressible`` says which families compression handles."""
    kind = meta.get("model_type")
    if kind not in FAMILIES or not FAMILIES[kind].compressible:
        names = ", ".join(repr(k) for k, f in FAMILIES.items() if f.compressible)
        raise ValueError(
            f"compression handles dual encoders, captioners, VQA models and GAN generators ({names}), "
            f"not model_type {kind!r}"
        )
    if kind == VQA_TYPE:
        return "vqa"
    if kind == GAN_TYPE:
        return "generator"
    return "captioner" if (meta.get("model") or {}).get("decoder") else "dual-encoder"


def fp32_twin(model: nn.Module) -> nn.Module:
    """A freshly initialised fp32 model of the same family and config (what the saved config describes)."""
    return VQAModel(model.cfg) if isinstance(model, VQAModel) else build_model(model.cfg)


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    extra: dict | None = None,
    answers: list[str] | None = None,
) -> Path:
    """``save_pretrained`` (``save_vqa`` for a VQA model, with its ``answers``) for a model from
    :func:`quantize_dynamic` or :func:`vislang.models.quantized_static.quantize_static`: the fp32 config, int8
    weights."""
    comp = getattr(model, "_compression", None)
    if comp is None:
        raise ValueError("not a quantised model: make one with vislang.compress.quantize_dynamic(model)")
    # Write the config and tokenizer with the ordinary writer (from an fp32 twin), then replace the weights file.
    meta = {**(extra or {}), "compression": comp}
    if isinstance(model, VQAModel):
        if answers is None:
            raise ValueError("a VQA model directory needs its answer vocabulary: pass answers=[...]")
        d = save_vqa(fp32_twin(model), directory, tokenizer, answers, extra=meta)
    else:
        d = save_pretrained(fp32_twin(model), directory, tokenizer, extra=meta)
    save_file(quantized_state_dict(model), str(d / "model.safetensors"))
    return d


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a directory written by :func:`save_quantized` as the quantised model (int8 runs on the CPU only)."""
    d = Path(directory)
    comp = read_meta(d).get("compression") or {}
    if comp.get("method") not in QUANTISED_METHODS:
        raise ValueError(f"{d} is not an int8 model directory (compression: {comp or None})")
    return load(d, device)


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Any model directory compression handles, fp32 or int8 (``vislang.load``; kept as the compressor's name)."""
    read_meta(directory)  # a clear error for a folder that is not a model directory
    return load(directory, device)
