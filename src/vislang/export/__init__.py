"""ONNX export of dual encoders, captioners and GAN generators (running an export: ``vislang.models.onnx_runtime``)."""

from ..factory import load_embedding_model
from ..models.onnx_runtime import OnnxCLIP, is_onnx_dir
from .onnx import export_onnx

__all__ = ["OnnxCLIP", "export_onnx", "is_onnx_dir", "load_embedding_model"]
