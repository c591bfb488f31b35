"""The one table of model families: ``model_type`` (what a directory's ``config.json`` names) → config class, model
builder and directory loader. Every loader goes through it: ``vislang.load``, ``from_pretrained``, ``compress``,
``export``, ``serve``; fp32, int8 (each family rebuilds its quantised modules) and ONNX export directories alike.

Why one table: each family used to be recognised by string comparisons copied into five files; adding a family now
means one ``Family`` row here (Hugging Face's ``AutoModel`` mapping, read from ``config.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import from_dict
from .model_dir import run_or_model_dir
from .models import dual_encoder
from .models.classifier import MODEL_TYPE as CLASSIFIER_TYPE
from .models.classifier import ClassifierConfig, ImageClassifier
from .models.clip import ModelConfig
from .models.gan.build import build_generator
from .models.gan.networks import GANModelConfig
from .models.gan.pipeline import MODEL_TYPE as GAN_TYPE
from .models.gan.pipeline import TextToImage
from .models.onnx_runtime import OnnxCLIP, is_onnx_dir
from .models.vqa import MODEL_TYPE as VQA_TYPE
from .models.vqa import VQAConfig, VQAModel, load_vqa
from .pretrained import OfflineError, _looks_like_hub_id


@dataclass(frozen=True)
class Family:
    """One model family: how its config reads, how it builds untrained, how a saved directory loads."""

    model_type: str  # config.json's "model_type"
    name: str  # what people call it (messages, `vislang models`)
    config_class: type  # the dataclass config.json's "model" section holds
    build: Callable[[Any], nn.Module]  # config -> untrained model (the parametrized registry test builds each)
    load: Callable[[Path, str | torch.device], nn.Module]  # model directory -> model in eval mode (fp32 or int8)
    compressible: bool = True  # `vislang compress` handles it


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(dual_encoder.MODEL_TYPE, "dual encoder / captioner", ModelConfig, dual_encoder.build_model,
               dual_encoder.load_pretrained),
        Family(dual_encoder.ITM_MODEL_TYPE, "dual encoder with ITM head", ModelConfig, dual_encoder.build_model,
               dual_encoder.load_pretrained, compressible=False),
        Family(CLASSIFIER_TYPE, "image classifier", ClassifierConfig, ImageClassifier,
               ImageClassifier.from_pretrained, compressible=False),
        Family(VQA_TYPE, "VQA classifier", VQAConfig, VQAModel, lambda d, device: load_vqa(d, device)[0]),
        Family(GAN_TYPE, "text-to-image GAN", GANModelConfig, build_generator, TextToImage.from_pretrained),
    )
}  # fmt: skip


CONFIG_DIR = Path(__file__).parent / "model_configs"  # every named architecture of every family, one JSON each


def named_configs(model_type: str | None = None) -> dict[str, str]:
    """Built-in config names → their ``model_type`` (each JSON in ``model_configs/`` names it), optionally of one
    family only."""
    out = {}
    for f in sorted(CONFIG_DIR.glob("*.json")):
        kind = json.loads(f.read_text()).get("model_type")
        if kind not in FAMILIES:
            raise ValueError(f"{f} names model_type {kind!r}; every built-in config names one of {sorted(FAMILIES)}")
        if model_type is None or kind == model_type:
            out[f.stem] = kind
    return out


def named_config(name: str, model_type: str) -> dict[str, Any]:
    """The ``model`` section of built-in config ``name`` (without its ``model_type``), which must be of
    ``model_type``'s family."""
    if model_type not in FAMILIES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(FAMILIES)}")
    file = CONFIG_DIR / f"{name}.json"
    if not file.is_file():
        raise ValueError(f"no built-in config {name!r}; choose one of {sorted(named_configs(model_type))}")
    data = json.loads(file.read_text())
    kind = data.pop("model_type", None)
    if kind != model_type:
        raise ValueError(
            f"built-in config {name!r} is a {FAMILIES[kind].name if kind in FAMILIES else kind} config "
            f"({kind}), not a {FAMILIES[model_type].name} one; choose one of {sorted(named_configs(model_type))}"
        )
    return data


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory, or an error that says what a model directory is and how to make one."""
    d = Path(directory)
    if not ((d / "config.json").is_file() and (d / "model.safetensors").is_file()):
        if _looks_like_hub_id(str(directory)):
            raise OfflineError(f"{directory!r} looks like a hub id; pass a local model directory (no network here)")
        raise FileNotFoundError(
            f"{d} is not a vislang model directory (needs config.json and model.safetensors); "
            "train one with `vislang train` or save one with model.save_pretrained(dir)"
        )
    return json.loads((d / "config.json").read_text())


def family_of(meta: dict[str, Any], where: str = "this directory") -> Family:
    kind = meta.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(
            f"{where}/config.json is not a vislang model config (model_type={kind!r}; known: {sorted(FAMILIES)})"
        )
    return FAMILIES[kind]


def build_from_meta(meta: dict[str, Any], directory: Path) -> nn.Module:
    """The untrained fp32 model a saved config describes (compression rebuilds it before setting int8 weights)."""
    fam = family_of(meta, str(directory))
    if fam.config_class is ModelConfig:
        return dual_encoder.build_model(dual_encoder.config_from_meta(meta, directory))
    return fam.build(from_dict(fam.config_class, meta["model"], "model"))


def load(path: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "auto") -> nn.Module:
    """Any saved vislang model as its model, in eval mode: a model directory of any family (fp32 or int8), a training
    run (its ``model/``), or an ONNX export (run by onnxruntime; ``backend="torch"`` refuses it, ``"onnx"``
    requires it)."""
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"unknown back end {backend!r}; choose torch, onnx or auto")
    d = run_or_model_dir(path)
    if is_onnx_dir(d):
        if backend == "torch":
            raise ValueError(f"{d} is an ONNX export; load it with backend='onnx' (or 'auto')")
        return OnnxCLIP(d)
    if backend == "onnx":
        raise FileNotFoundError(f"{d} is not an ONNX export; make one with `vislang export {d} --onnx OUT_DIR`")
    meta = read_meta(d)
    return family_of(meta, str(d)).load(d, device)
