"""Blocks shared by models: attention, MLP, Transformer blocks (self- and cross-attention)."""

from .transformer import Attention, Block, Mlp, Transformer

__all__ = ["Attention", "Block", "Mlp", "Transformer"]
