"""The dual-encoder family: CLIP, CoCa (a CLIP with a caption decoder) and ALBEF-style ITM (a CLIP with a match
head). One config class (``ModelConfig``) describes all three; this module builds and loads them. Saving
(``save_pretrained``, ``MODEL_TYPE``) lives in ``clip`` with ``CLIP.save_pretrained``, since it needs only the config,
not the subclasses, and is re-exported here.

Why a module of its own: the family has three classes in three files (``clip``, ``captioner``, ``itm``) and the one
function that picks among them must import all three; the registry (``vislang.registry``) points here for the
``vislang-clip`` and ``vislang-itm`` model types.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..config import from_dict
from .captioner import CoCa
from .clip import CLIP, ITM_MODEL_TYPE, MODEL_TYPE, ModelConfig, model_type_of, save_pretrained
from .int8_io import is_int8, load_int8_state
from .itm import ITMModel

__all__ = [
    "ITM_MODEL_TYPE",
    "MODEL_TYPE",
    "build_model",
    "config_from_meta",
    "load_pretrained",
    "load_weights",
    "model_type_of",
    "save_pretrained",
]


def build_model(cfg: ModelConfig) -> CLIP:
    """The model a config describes: the dual encoder, CoCa with a caption decoder, ITM with a match head."""
    if cfg.itm is not None:
        if cfg.decoder is not None:
            raise ValueError("a model has a caption decoder (model.decoder) or an ITM head (model.itm), not both")
        return ITMModel(cfg)
    if cfg.decoder is not None:
        return CoCa(cfg)
    return CLIP(cfg)


def config_from_meta(meta: dict, directory: Path) -> ModelConfig:
    """The saved ``ModelConfig``, with a saved Hugging Face text encoder's path made absolute."""
    cfg = from_dict(ModelConfig, meta["model"], "model")
    if cfg.text.arch == "hf" and cfg.text.hf_path and not Path(cfg.text.hf_path).is_absolute():
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hf_path=str(directory / cfg.text.hf_path)))
    return cfg


def load_weights(model: torch.nn.Module, file: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{file} does not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> CLIP:
    """A ``vislang-clip`` / ``vislang-itm`` directory as its model (fp32 or int8), in eval mode."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta = json.loads((d / "config.json").read_text())
    model = build_model(config_from_meta(meta, d))
    comp = meta.get("compression") or {}
    if is_int8(meta, device, str(d)):  # the quantised modules are rebuilt, then filled
        return load_int8_state(model, load_file(str(d / "model.safetensors")), comp, str(d))
    load_weights(model, d / "model.safetensors")
    return model.to(device).eval()
