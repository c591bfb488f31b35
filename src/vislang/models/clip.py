"""The dual encoder: an image tower and a text tower projected into one normalised space (CLIP / SigLIP).

``forward`` returns a dict so that tasks (contrastive, sigmoid, later ITM and captioning) pick what they need without
the model knowing which loss trains it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import to_dict
from ..model_dir import __version__, atomic_dir, write_weights
from .fusion import FusionConfig
from .towers import TextConfig, VisionConfig, build_text_tower, build_vision_tower

MODEL_TYPE = "vislang-clip"  # dual encoders and captioners
ITM_MODEL_TYPE = "vislang-itm"  # a dual encoder with an image-text matching head, loaded like one


@dataclass(frozen=True)
class DecoderConfig:
    """The caption decoder of a CoCa model (``models/captioner.py``): multimodal layers over the text tower's output."""

    width: int = 128  # hidden size of the multimodal layers (text tokens are projected to it when it differs)
    layers: int = 2  # multimodal blocks: causal self-attention, cross-attention to image tokens, MLP
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden = width * mlp_ratio
    dropout: float = 0.0
    caption_weight: float = 2.0  # task "coca": loss = contrastive + caption_weight * caption (CoCa's 1:2)
    bos_id: int = 2  # begin token that starts generation ([BOS] of vislang tokenizers)
    eos_id: int = 3  # end token that stops generation ([EOS] of vislang tokenizers)


@dataclass(frozen=True)
class ITMConfig:
    """The image–text matching head of an ALBEF-style model (``models/itm.py``): fusion + binary match classifier."""

    fusion: FusionConfig = field(default_factory=FusionConfig)  # how image and text tokens meet (ALBEF: cross-attn)
    itm_weight: float = 1.0  # task "itm": loss = contrastive + itm_weight * ITM cross-entropy


@dataclass(frozen=True)
class MemoryConfig:
    """A caption memory (LiT, ``task: lit``): an image is also described by the captions of its nearest training images.

    The memory holds ``size`` training pairs' tower outputs (pooled image features and text-tower features, both
    L2-normalised). An image's second view is the softmax-weighted mean (cosine of pooled image features over
    ``temperature``) of the stored pairs' text features: a point in the text tower's own space; a caption's second
    view is its text feature. Why: trained projections fit the captions they saw, while an unseen caption (most of a
    held-out split's) still lands near the captions of similar drawings in the pretrained text space, and this view
    needs no training to say so. The views join the trained embedding as its last ``text.width`` dimensions, scaled
    so that a dot product is ``(1 - weight)`` x the trained cosine + ``weight`` x the memory cosine: an index, a
    search and ``serve`` use it with no code of their own. ``size`` is set when ``task: lit`` fills the memory from
    its training pairs: the kept ones while training (the held-back ones stay out, so they still measure unseen
    captions), then, with ``lit.memory_all``, every pair once the best epoch is chosen (what the model saves).
    """

    weight: float = 0.3  # share of a score from the memory view
    temperature: float = 0.02  # softmax temperature over the stored pairs' image cosines (sharp: a few neighbours)
    size: int = 0  # stored training pairs; filled by task lit (CLIP.fill_memory), 0 until then
    class_weight: float = 0.0  # share of a score from an ImageNet-class view (0: none): the image tower's own
    # classifier's probabilities averaged over text-tower vectors of the class names, against the caption's vector;
    # it takes another text.width dims of embed_dim
    classes: int = 0  # classes stored for that view; filled by task lit (CLIP.fill_classes), 0 until then


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 128  # size of the shared image–text space
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
    max_logit_scale: float = 100.0  # the scale is clamped to this, as CLIP does, so training stays stable
    init_logit_bias: float | None = None  # SigLIP: -10; None = no bias
    lock_image: bool = False  # freeze the image tower (LiT-style locked-image tuning)
    lock_text: bool = False  # freeze the text tower
    decoder: DecoderConfig | None = None  # a caption decoder makes the model a CoCa (models/captioner.py)
    itm: ITMConfig | None = None  # an image–text matching head makes the model an ITM model (models/itm.py)
    memory: MemoryConfig | None = None  # a caption memory (task lit): its view takes the last text.width dims of
    # embed_dim, the trained projections the rest


def dual_encoder_outputs(model, images: torch.Tensor | None, text: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What a dual encoder's forward returns (OpenCLIP's dict): features of what was given, the logit scale, and the
    logit bias when there is one. Shared by ``CLIP`` and its ONNX Runtime stand-in, which differ only in encoders."""
    out: dict[str, torch.Tensor] = {"logit_scale": model.get_logit_scale()}
    if images is not None:
        out["image_features"] = model.encode_image(images)
    if text is not None:
        out["text_features"] = model.encode_text(text)
    if model.logit_bias is not None:
        out["logit_bias"] = model.logit_bias
    return out


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = build_vision_tower(cfg.vision)
        self.text = build_text_tower(cfg.text)
        proj_dim = cfg.embed_dim
        if cfg.memory is not None:
            m = cfg.memory
            views = 2 if m.class_weight > 0 else 1  # the memory's, and the ImageNet-class view's
            proj_dim -= views * self.text.width
            if (proj_dim < 1 or not 0.0 <= m.weight <= 1.0 or m.class_weight < 0 or m.weight + m.class_weight > 1
                    or m.temperature <= 0):  # fmt: skip
                raise ValueError(
                    f"model.memory takes the last {views} x text.width={self.text.width} dims of embed_dim="
                    f"{cfg.embed_dim}, with weight + class_weight in [0, 1] (got {m.weight} + {m.class_weight}) and "
                    f"temperature > 0 (got {m.temperature}): set --model.embed_dim above {views * self.text.width} "
                    f"(e.g. {views * self.text.width + 512}) or drop model.memory"
                )
            self.register_buffer("memory_image", torch.zeros(m.size, self.visual.width))
            self.register_buffer("memory_text", torch.zeros(m.size, self.text.width))
            if m.class_weight > 0:  # "memory_" names: a run from a pretrained model fills its own (task lit)
                self.register_buffer("memory_class_weight", torch.zeros(m.classes, self.visual.width))
                self.register_buffer("memory_class_bias", torch.zeros(m.classes))
                self.register_buffer("memory_class_text", torch.zeros(m.classes, self.text.width))
        self.image_proj = nn.Linear(self.visual.width, proj_dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.init_logit_bias else None
        if cfg.lock_image:
            self.lock_image_tower()
        if cfg.lock_text:
            self.lock_text_tower()

    # --- freezing -----------------------------------------------------------------------------------------------
    def lock_image_tower(self) -> None:
        """Freeze the image tower, BatchNorm statistics included (they stay as pretrained)."""
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.visual.eval()
        self._locked_image = True

    def lock_text_tower(self) -> None:
        for p in self.text.parameters():
            p.requires_grad_(False)
        self.text.eval()
        self._locked_text = True

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        if getattr(self, "_locked_image", False):
            self.visual.eval()
        if getattr(self, "_locked_text", False):
            self.text.eval()
        return self

    # --- encoders -----------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.project_image(self.visual(images), normalize)  # (B, E)

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.project_text(self.text(ids), normalize)  # (B, E)

    def project_image(self, feats: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled image-tower features (B, D_image) → embeddings (B, E): the one place that maps them (LiT trains
        and evaluates on cached features through it, so its numbers are the saved model's)."""
        x = self.image_proj(feats)
        if self.cfg.memory is None:
            return F.normalize(x, dim=-1) if normalize else x
        keys, values = self.memory_keys()
        weights = torch.softmax(F.normalize(feats, dim=-1) @ keys.T / self.cfg.memory.temperature, dim=-1)  # (B, M)
        views = [weights @ values]
        if self.cfg.memory.class_weight > 0:
            views.append(self.class_view(feats))
        return self._join(x, views)

    def project_text(self, feats: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled text-tower features (B, D_text) → embeddings (B, E)."""
        x = self.text_proj(feats)
        if self.cfg.memory is None:
            return F.normalize(x, dim=-1) if normalize else x
        return self._join(x, [feats, feats] if self.cfg.memory.class_weight > 0 else [feats])

    def class_view(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled image features (B, D_image) → the image tower's own class probabilities averaged over the stored
        class names' text features (B, D_text): what the pretrained classifier says the image shows, in words."""
        if self.memory_class_weight.shape[0] == 0:
            raise ValueError(
                "this model's ImageNet-class view (model.memory.class_weight) is empty: task lit fills it from the "
                "image tower's classifier; set --model.memory.class_weight=0 to train it with another task"
            )
        probs = torch.softmax(feats.float() @ self.memory_class_weight.T + self.memory_class_bias, dim=-1)  # (B, C)
        return probs @ self.memory_class_text

    def _join(self, trained: torch.Tensor, recalled: list[torch.Tensor]) -> torch.Tensor:
        """The views, unit length each, scaled so a dot product mixes their cosines by ``memory.weight`` (and
        ``memory.class_weight``); the result is unit length whatever ``normalize`` asked (the memory views have no
        unnormalised form)."""
        m = self.cfg.memory
        shares = [m.weight, m.class_weight][: len(recalled)]
        parts = [math.sqrt(1.0 - sum(shares)) * F.normalize(trained, dim=-1)]
        parts += [math.sqrt(w) * F.normalize(r.to(trained.dtype), dim=-1) for w, r in zip(shares, recalled)]
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def fill_classes(self, weight: torch.Tensor, bias: torch.Tensor, names: torch.Tensor) -> None:
        """Store an image classifier over the pooled features (C, D_image), (C,) and its class names' text-tower
        features (C, D_text) for the ImageNet-class view; ``memory.classes`` follows, as ``fill_memory``'s size."""
        m = self.cfg.memory
        if m is None or m.class_weight <= 0:
            raise ValueError("the model has no class view: set model.memory.class_weight (e.g. 0.1)")
        if weight.shape != (len(names), self.visual.width) or bias.shape != (len(names),):
            raise ValueError(f"classifier {tuple(weight.shape)} + bias {tuple(bias.shape)} does not match "
                             f"{len(names)} class names over {self.visual.width} image features")  # fmt: skip
        dev = self.image_proj.weight.device
        self.memory_class_weight = weight.float().to(dev)
        self.memory_class_bias = bias.float().to(dev)
        self.memory_class_text = F.normalize(names.float(), dim=-1).to(dev)
        self.cfg = dataclasses.replace(self.cfg, memory=dataclasses.replace(m, classes=len(names)))

    def memory_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored image features (M, D_image), stored text features (M, D_text)), both unit length."""
        if self.memory_image.shape[0] == 0:
            raise ValueError(
                "this model's caption memory (model.memory) is empty: task lit fills it from its training pairs "
                "(vislang train --config lit); drop model.memory to train it with another task"
            )
        return self.memory_image, self.memory_text

    @torch.no_grad()
    def fill_memory(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> None:
        """Store training pairs' pooled tower outputs (N, D_image) and (N, D_text) as the caption memory (replacing
        what it held); the config's ``memory.size`` follows, so the saved model rebuilds the same buffers."""
        if self.cfg.memory is None:
            raise ValueError("the model has no caption memory: set model.memory (e.g. --model.memory.weight=0.3)")
        if len(image_feats) != len(text_feats) or len(image_feats) == 0:
            raise ValueError(f"the caption memory needs pairs: got {len(image_feats)} images, {len(text_feats)} texts")
        dev = self.image_proj.weight.device
        self.memory_image = F.normalize(image_feats.float(), dim=-1).to(dev)
        self.memory_text = F.normalize(text_feats.float(), dim=-1).to(dev)
        self.cfg = dataclasses.replace(self.cfg, memory=dataclasses.replace(self.cfg.memory, size=len(image_feats)))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Token-level image features (B, N, D) for fusion and decoders."""
        return self.visual.forward_tokens(images)

    def text_tokens(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-level text features (B, T, D) and the valid-token mask (B, T)."""
        return self.text.forward_tokens(ids)

    def get_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def forward(self, images: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return dual_encoder_outputs(self, images, text)

    # --- conventions shared with timm / OpenCLIP ----------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay: temperature, bias, embeddings, norms and biases."""
        names = {"logit_scale", "logit_bias"}
        for n, p in self.named_parameters():
            if p.ndim < 2 or "embedding" in n:
                names.add(n)
        return names

    # --- model directories (Hugging Face convention) -------------------------------------------------------------
    def save_pretrained(self, directory, tokenizer=None) -> None:
        save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, device: str | torch.device = "cpu") -> CLIP:
        # lazy: dual_encoder imports this module at its top (its build_model picks CoCa or ITMModel, CLIP subclasses)
        from .dual_encoder import load_pretrained

        return load_pretrained(directory, device)


def model_type_of(cfg: ModelConfig) -> str:
    return ITM_MODEL_TYPE if cfg.itm is not None else MODEL_TYPE


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
        meta = {"model_type": model_type_of(cfg), "vislang_version": __version__, "model": to_dict(cfg)}
        meta.update(extra or {})
        write_weights(tmp, meta, model)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(directory)
