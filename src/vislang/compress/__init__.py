"""Smaller, faster models from a trained one: int8 quantisation, magnitude pruning and distillation.

Each method writes a model directory; ``vislang compare`` measures what it cost (size, speed, accuracy).
"""

from .api import METHODS, compress_model_dir
from .prune import prune_model, sparsity_of
from .quantize import load_model, load_quantized, quantize_dynamic, save_quantized

__all__ = [
    "METHODS",
    "compress_model_dir",
    "load_model",
    "load_quantized",
    "prune_model",
    "quantize_dynamic",
    "save_quantized",
    "sparsity_of",
]
