"""Model families. Each answers to encode_image / encode_text / forward(dict) / set_grad_checkpointing."""

from .clip import CLIP, ModelConfig
from .towers import TextConfig, TextTower, VisionConfig, VisionTower, build_text_tower, build_vision_tower

__all__ = [
    "CLIP",
    "ModelConfig",
    "TextConfig",
    "TextTower",
    "VisionConfig",
    "VisionTower",
    "build_text_tower",
    "build_vision_tower",
]
