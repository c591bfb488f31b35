"""Build models by name (``model_configs/*.json``), from a config file, or from a saved model directory.

A model directory (written by ``save_pretrained``) holds ``config.json``, ``model.safetensors`` and the tokenizer
files, so it is all one needs to embed, evaluate or serve, with no reference to the run that trained it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, apply_overrides, from_dict
from .data.transforms import ImageTransform
from .model_dir import __version__
from .models.clip import CLIP, ModelConfig
from .models.dual_encoder import ITM_MODEL_TYPE, MODEL_TYPE, build_model, load_weights, save_pretrained
from .models.fusion import FUSIONS
from .models.vqa import MODEL_TYPE as VQA_TYPE
from .models.vqa import VQAConfig
from .pretrained import OfflineError, _looks_like_hub_id, read_state_dict, resolve_local_path
from .registry import load, named_config, named_configs
from .tokenizers import HFTokenizer, Tokenizer, load_tokenizer

__all__ = ["ITM_MODEL_TYPE", "MODEL_TYPE", "__version__", "build_model", "from_pretrained", "load", "save_pretrained"]


def list_models(model_type: str | None = MODEL_TYPE) -> list[str]:
    """Names of the built-in model configs (``model_configs/``) of one family, the dual encoders by default (what
    ``create_model`` builds); ``model_type=None`` lists every family's."""
    return sorted(named_configs(model_type))


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def get_model_config(name_or_path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A ``ModelConfig`` from a built-in name, a JSON file, or a model directory; ``overrides`` are dotted keys."""
    spec = str(name_or_path)
    p = Path(spec)
    if spec in list_models():
        data = named_config(spec, MODEL_TYPE)
    elif p.is_dir() and (p / "config.json").is_file():
        data = json.loads((p / "config.json").read_text())["model"]
    elif p.is_file():
        data = json.loads(p.read_text())
        data = data.get("model", data)
        if data.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(f"{p} is not a dual-encoder config (its model_type is not {MODEL_TYPE!r})")
    elif _looks_like_hub_id(spec):
        raise OfflineError(
            f"{spec!r} looks like a hub id; vislang works offline: pass a built-in name ({', '.join(list_models())}), "
            "a config JSON, or a local model directory"
        )
    else:
        raise ConfigError(f"unknown model {spec!r}: use one of {list_models()}, a config .json, or a model directory")
    if overrides:
        data = apply_overrides(data, overrides)
    return from_dict(ModelConfig, data, "model")


def load_vqa_config(name_or_path: str, overrides: tuple[str, ...] | list[str] | dict[str, Any] = ()) -> VQAConfig:
    """A VQA classifier's ``VQAConfig`` from a built-in name (``model_configs/``, model_type vislang-vqa) or a JSON
    file, plus dotted overrides (a list of ``key=value`` or a nested dict).

    It lives here, beside ``get_model_config``, rather than in ``models.vqa``: the named configs are the registry's,
    and the registry imports ``models.vqa``."""
    p = Path(name_or_path)
    if name_or_path in named_configs():
        data = named_config(name_or_path, VQA_TYPE)  # a clear error for a built-in config of another family
    elif p.is_file():
        data = json.loads(p.read_text())
        if data.pop("model_type", VQA_TYPE) != VQA_TYPE:
            raise ValueError(f"{p} is not a VQA model config (its model_type is not {VQA_TYPE!r})")
    else:
        names = sorted(named_configs(VQA_TYPE))
        raise ValueError(f"unknown VQA model config {name_or_path!r}; use one of {names} or a JSON file")
    if overrides:
        data = apply_overrides(data, overrides if isinstance(overrides, dict) else list(overrides))
    cfg = from_dict(VQAConfig, data, "model")
    if cfg.fusion.kind not in FUSIONS:
        raise ValueError(f"unknown fusion {cfg.fusion.kind!r}; choose one of {list(FUSIONS)}")
    return cfg


def build_tokenizer(cfg: ModelConfig, texts: list[str] | None = None) -> Tokenizer | HFTokenizer:
    """The tokenizer a config asks for: the HF encoder's own, or one trained on ``texts``."""
    tc = cfg.text
    if tc.arch == "hf" or tc.tokenizer == "hf":
        return HFTokenizer(resolve_local_path(tc.hf_path, "text encoder (text.hf_path)"), tc.context_length)
    if texts is None:
        raise ValueError("this model trains its own tokenizer: pass the training captions (texts=...)")
    return Tokenizer.train(texts, vocab_size=tc.vocab_size, kind=tc.tokenizer, context_length=tc.context_length)


def fit_config_to_tokenizer(cfg: ModelConfig, tokenizer: Tokenizer | HFTokenizer) -> ModelConfig:
    """Make the text tower's vocabulary and padding id agree with the tokenizer that will feed it."""
    if cfg.text.arch == "hf":
        return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pad_id=tokenizer.pad_id))
    text = dataclasses.replace(cfg.text, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    return dataclasses.replace(cfg, text=text)


def image_transforms(cfg: ModelConfig):
    """(train, eval) callables PIL image → normalised float tensor (C, H, W)."""

    v = cfg.vision
    return (
        ImageTransform(v.image_size, v.channels, v.mean, v.std, train=True, fit=v.fit),
        ImageTransform(v.image_size, v.channels, v.mean, v.std, train=False, fit=v.fit),
    )


def create_model(
    name_or_path: str | os.PathLike | ModelConfig,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> CLIP:
    """A model by built-in name / config file / ``ModelConfig``; ``pretrained`` = a model directory or weights file.

    A model directory as ``name_or_path`` loads its weights too (same as ``from_pretrained``).
    """
    if isinstance(name_or_path, ModelConfig):
        cfg = name_or_path
    else:
        if is_model_dir(name_or_path) and pretrained is None:
            return from_pretrained(name_or_path, device=device)
        cfg = get_model_config(name_or_path, overrides)
    model = build_model(cfg)
    if pretrained is not None:
        p = Path(pretrained)
        if is_model_dir(p):
            load_weights(model, p / "model.safetensors")
        else:
            model.load_state_dict(read_state_dict(resolve_local_path(pretrained)))
    return model.to(device)


def create_model_and_transforms(
    name_or_path: str | os.PathLike | ModelConfig,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
):
    """OpenCLIP-style: returns ``(model, preprocess_train, preprocess_val)``."""
    model = create_model(name_or_path, pretrained, device, **overrides)
    train_tf, val_tf = image_transforms(model.cfg)
    return model, train_tf, val_tf


def get_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """The tokenizer saved in a model directory, a tokenizer directory, or the pretrained one a named config uses."""
    p = Path(str(name_or_path))
    if p.is_dir():
        return load_tokenizer(p)
    cfg = get_model_config(name_or_path)
    return build_tokenizer(cfg)


def from_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a saved model of any family (``vislang.load``: the registry reads config.json's ``model_type``)."""
    return load(directory, device)


def load_embedding_model(path: str | os.PathLike, backend: str = "auto"):
    """``(model, preprocess)`` for embedding: a torch model directory or an ONNX export run by onnxruntime.

    ``backend``: ``"torch"``, ``"onnx"``, or ``"auto"`` (ONNX when ``path`` is an export directory). This is what
    ``vislang embed --backend`` selects; the tokenizer of either kind of directory loads with ``get_tokenizer(path)``.
    """
    model = load(path, backend=backend)
    return model, image_transforms(model.cfg)[1]
