"""Smaller, faster models from a trained one: int8 quantisation (dynamic, or static with calibration), magnitude
pruning and distillation, for dual encoders, captioners, VQA models and text-to-image generators (``api.SUPPORTED``
says which method fits which; generators: :mod:`vislang.compress.generator`).

Each method writes a model directory; ``vislang compare`` measures what it cost (size, speed, accuracy).
"""

from ..models.quantized_static import StaticInt8CNN, quantize_static
from .api import METHODS, compress_model_dir
from .prune import prune_model, sparsity_of
from .quantize import load_model, load_quantized, quantize_dynamic, save_quantized

__all__ = [
    "METHODS",
    "StaticInt8CNN",
    "compress_model_dir",
    "load_model",
    "load_quantized",
    "prune_model",
    "quantize_dynamic",
    "quantize_static",
    "save_quantized",
    "sparsity_of",
]
