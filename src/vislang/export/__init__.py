"""Deployment formats for trained models: ONNX towers and an onnxruntime back end with the model's method names."""

from .onnx import OnnxCLIP, export_onnx, is_onnx_dir, load_embedding_model

__all__ = ["OnnxCLIP", "export_onnx", "is_onnx_dir", "load_embedding_model"]
