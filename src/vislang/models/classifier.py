"""An image classifier: any image tower (``towers.py``) plus a linear or small MLP head.

It is what ``vislang finetune`` trains (a linear probe or full fine-tune of a pretrained tower, or a supervised
baseline from scratch), and it doubles as a fixed judge for generated images: ``features`` gives the penultimate
features a Fréchet distance is computed on, ``forward`` the logits a classification score uses.

``forward`` and ``features`` take float images already normalised with the config's mean/std (the output of
``preprocess``); ``preprocess`` turns uint8 pixels (or floats in [0, 1]) into that input, and ``classify`` does both.
A saved classifier is a model directory like the dual encoder's (``config.json`` with ``model_type`` =
``vislang-classifier`` + ``model.safetensors``), so ``vislang.from_pretrained(dir)`` loads either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import from_dict, to_dict
from ..data.transforms import normalize
from ..model_dir import __version__, atomic_dir, write_weights
from .towers import VisionConfig, build_vision_tower

MODEL_TYPE = "vislang-classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)  # the image tower (any VisionConfig tower)
    class_names: tuple[str, ...] = ()  # one name per output logit, in label order
    hidden: int = 0  # 0 = linear head on the tower's pooled features; > 0 = one hidden layer of this size
    dropout: float = 0.0  # dropout before the (last) linear layer of the head

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ImageClassifier(nn.Module):
    """``visual`` (an image tower, named as in ``CLIP`` so tower weights move between the two) + ``head``."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        if cfg.num_classes < 2:
            raise ValueError(f"a classifier needs at least two class names, got {list(cfg.class_names)}")
        self.cfg = cfg
        self.visual = build_vision_tower(cfg.vision)
        width = self.visual.width
        if cfg.hidden:
            self.head = nn.Sequential(
                nn.Linear(width, cfg.hidden),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden, cfg.num_classes),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(width, cfg.num_classes))

    @property
    def class_names(self) -> list[str]:
        return list(self.cfg.class_names)

    @property
    def num_features(self) -> int:
        """Size of ``features``: the tower's pooled width, or the hidden layer's for an MLP head."""
        return self.cfg.hidden or self.visual.width

    # --- freezing (linear probe) ----------------------------------------------------------------------------------
    def lock_tower(self, lock: bool = True) -> None:
        """Freeze the image tower, BatchNorm statistics included, so only the head trains (``lock=False`` undoes it)."""
        for p in self.visual.parameters():
            p.requires_grad_(not lock)
        self.visual.train(self.training and not lock)
        self._locked = lock

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if getattr(self, "_locked", False):
            self.visual.eval()
        return self

    # --- forward ------------------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, D): the pooled tower output, or the hidden activations of an MLP head."""
        x = self.visual(images)  # (B, C, H, W) -> (B, width)
        if self.cfg.hidden:
            x = self.head[1](self.head[0](x))  # (B, hidden)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) from ``features``."""
        return self.head[2:](features) if self.cfg.hidden else self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) for normalised float images (B, C, H, W); see ``preprocess`` for raw pixels."""
        return self.forward_head(self.features(images))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) pixels, or floats in [0, 1], → the normalised float input ``forward`` expects."""

        v = self.cfg.vision
        return normalize(images.to(next(self.parameters()).device), v.mean, v.std)

    @torch.inference_mode()
    def classify(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Class probabilities (B, K) for raw pixels (uint8 or [0, 1] floats), in eval mode and batches."""
        was_training = self.training
        self.eval()
        try:
            parts = [
                self(self.preprocess(images[s : s + batch_size])).softmax(-1).float().cpu()
                for s in range(0, images.shape[0], batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(parts)

    # --- conventions shared with the other model families ---------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Penultimate features, L2-normalised as ``CLIP.encode_image`` (the name embedding and retrieval code call)."""
        x = self.features(images)
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Norms and biases stay out of weight decay."""
        return {n for n, p in self.named_parameters() if p.ndim < 2}

    # --- model directories ----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write ``config.json`` (model_type, config, class names) and ``model.safetensors``; atomic, like
        ``factory.save_pretrained``: a temporary folder renamed into place, so a crash never leaves half a model."""

        cfg = self.cfg
        if cfg.vision.pretrained:  # the weights now live in model.safetensors
            from dataclasses import replace

            cfg = replace(cfg, vision=replace(cfg.vision, pretrained=None))
        meta = {
            "model_type": MODEL_TYPE,
            "vislang_version": __version__,
            "model": to_dict(cfg),
            "class_names": self.class_names,
            **(extra or {}),
        }
        with atomic_dir(directory) as tmp:
            write_weights(tmp, meta, self)
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> ImageClassifier:
        """Load a directory written by ``save_pretrained`` (in eval mode)."""
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_file, weights = d / "config.json", d / "model.safetensors"
        if not (cfg_file.is_file() and weights.is_file()):
            raise FileNotFoundError(
                f"{d} is not a classifier directory (needs config.json and model.safetensors); "
                "train one with `vislang finetune`"
            )
        meta = json.loads(cfg_file.read_text())
        if meta.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"{d} holds a {meta.get('model_type')!r} model, not an image classifier; load it with "
                "vislang.from_pretrained, or train a classifier from it with `vislang finetune --model DIR`"
            )
        model = cls(from_dict(ClassifierConfig, meta["model"], "model"))
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model.to(device).eval()
