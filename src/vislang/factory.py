"""Build models by name (``model_configs/*.json``), from a config file, or from a saved model directory.

A model directory (written by ``save_pretrained``) holds ``config.json``, ``model.safetensors`` and the tokenizer
files, so it is all one needs to embed, evaluate or serve, with no reference to the run that trained it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, from_dict, to_dict
from .model_dir import atomic_dir, write_weights
from .models.clip import CLIP, ModelConfig
from .pretrained import OfflineError, _looks_like_hub_id
from .tokenizers import HFTokenizer, Tokenizer, load_tokenizer

CONFIG_DIR = Path(__file__).parent / "model_configs"
MODEL_TYPE = "vislang-clip"
ITM_MODEL_TYPE = "vislang-itm"  # a dual encoder with an image–text matching head (models/itm.py), loaded like one
__version__ = "0.1.0"


def list_models() -> list[str]:
    """Names of the built-in model configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def get_model_config(name_or_path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A ``ModelConfig`` from a built-in name, a JSON file, or a model directory; ``overrides`` are dotted keys."""
    from .config import apply_overrides

    spec = str(name_or_path)
    p = Path(spec)
    if spec in list_models():
        data = json.loads((CONFIG_DIR / f"{spec}.json").read_text())
    elif p.is_dir() and (p / "config.json").is_file():
        data = json.loads((p / "config.json").read_text())["model"]
    elif p.is_file():
        data = json.loads(p.read_text())
        data = data.get("model", data)
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


def build_tokenizer(cfg: ModelConfig, texts: list[str] | None = None) -> Tokenizer | HFTokenizer:
    """The tokenizer a config asks for: the HF encoder's own, or one trained on ``texts``."""
    tc = cfg.text
    if tc.arch == "hf" or tc.tokenizer == "hf":
        from .pretrained import resolve_local_path

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
    from .data.transforms import ImageTransform

    v = cfg.vision
    return (
        ImageTransform(v.image_size, v.channels, v.mean, v.std, train=True),
        ImageTransform(v.image_size, v.channels, v.mean, v.std, train=False),
    )


def build_model(cfg: ModelConfig) -> CLIP:
    """The model family a config describes: the dual encoder, CoCa with a caption decoder, ITM with a match head."""
    if cfg.itm is not None:
        if cfg.decoder is not None:
            raise ValueError("a model has a caption decoder (model.decoder) or an ITM head (model.itm), not both")
        from .models.itm import ITMModel

        return ITMModel(cfg)
    if cfg.decoder is not None:
        from .models.captioner import CoCa

        return CoCa(cfg)
    return CLIP(cfg)


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
            _load_weights(model, p / "model.safetensors")
        else:
            from .pretrained import read_state_dict, resolve_local_path

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


def _load_weights(model: CLIP, file: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{file} does not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def save_pretrained(model: CLIP, directory: str | os.PathLike, tokenizer=None, extra: dict | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and tokenizer files; atomic (temp dir, then rename)."""
    with atomic_dir(directory) as tmp:
        cfg = model.cfg
        if cfg.text.arch == "hf":
            text_dir = tmp / "text_encoder"
            model.text.model.config.save_pretrained(str(text_dir))
            cfg = dataclasses.replace(
                cfg, text=dataclasses.replace(cfg.text, hf_path="text_encoder", hf_load_weights=False)
            )
        if cfg.vision.pretrained:  # the weights now live in model.safetensors
            cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pretrained=None))
        model_type = ITM_MODEL_TYPE if cfg.itm is not None else MODEL_TYPE
        meta = {"model_type": model_type, "vislang_version": __version__, "model": to_dict(cfg), **(extra or {})}
        write_weights(tmp, meta, model)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(directory)


def _load_classifier(directory: Path, device: str | torch.device) -> torch.nn.Module:
    from .models.classifier import ImageClassifier

    return ImageClassifier.from_pretrained(directory, device)


def _load_vqa(directory: Path, device: str | torch.device) -> torch.nn.Module:
    """The VQA model alone (``models.vqa.load_vqa`` also returns its tokenizer and answers); int8 ones rebuilt."""
    from .compress.quantize import load_model

    return load_model(directory, device)


def _load_gan(directory: Path, device: str | torch.device) -> torch.nn.Module:
    """The text-to-image GAN: its generator with the frozen text encoder and tokenizer that condition it."""
    from .models.gan.pipeline import TextToImage

    return TextToImage.from_pretrained(directory, device)


# Model families saved with their own ``model_type`` (config.json) and loader; the dual encoder / CoCa
# ("vislang-clip") is loaded below. Loaders import lazily, so adding one costs nothing until it is used.
MODEL_LOADERS: dict[str, Callable[[Path, str | torch.device], torch.nn.Module]] = {
    "vislang-classifier": _load_classifier,
    "vislang-vqa": _load_vqa,
    "vislang-gan": _load_gan,
}


def from_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> CLIP:
    """Load a model directory written by ``save_pretrained`` (or by another family's, per ``MODEL_LOADERS``)."""
    d = Path(directory)
    if not is_model_dir(d):
        if _looks_like_hub_id(str(directory)):
            raise OfflineError(f"{directory!r} looks like a hub id; pass a local model directory (no network here)")
        raise FileNotFoundError(
            f"{d} is not a vislang model directory (needs config.json and model.safetensors); "
            "train one with `vislang train` or save one with model.save_pretrained(dir)"
        )
    meta = json.loads((d / "config.json").read_text())
    loader = MODEL_LOADERS.get(meta.get("model_type"))
    if loader is not None:
        return loader(d, device)
    if meta.get("model_type") not in (MODEL_TYPE, ITM_MODEL_TYPE):
        raise ValueError(
            f"{d}/config.json is not a vislang model config (model_type={meta.get('model_type')!r}; "
            f"known: {[MODEL_TYPE, ITM_MODEL_TYPE, *MODEL_LOADERS]})"
        )
    if (meta.get("compression") or {}).get("method", "").endswith("int8"):
        from .compress import load_quantized  # int8 weights need the quantised modules rebuilt first

        return load_quantized(d, device)
    cfg = from_dict(ModelConfig, meta["model"], "model")
    if cfg.text.arch == "hf" and cfg.text.hf_path and not Path(cfg.text.hf_path).is_absolute():
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hf_path=str(d / cfg.text.hf_path)))
    model = build_model(cfg)
    _load_weights(model, d / "model.safetensors")
    return model.to(device).eval()
