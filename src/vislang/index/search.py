"""Queries against an index: a text, an image or an embedding in, ranked items with scores out.

``Searcher`` holds the index and the model that built it, so ``vislang search`` and the HTTP service share one code
path from query to results.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..factory import get_tokenizer
from ..inference import embed_texts, open_image
from .base import Index, open_index
from .build import load_embedder


class Searcher:
    """An index opened with its model (loaded on first use: embedding-only queries never need it).

    Args:
        index_dir: the index directory.
        model_dir: the model; default the one recorded in the index.
        device: where the model runs.
    """

    def __init__(
        self, index_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None, device: str = "cpu"
    ) -> None:
        self.index: Index = open_index(index_dir)
        self.model_dir = str(model_dir or self.index.header.get("model") or "")
        self.device = device
        self._model = self._preprocess = self._tokenizer = None

    def _load(self) -> None:
        if self._model is not None:
            return
        if not self.model_dir:
            raise ValueError(f"{self.index.directory} records no model; pass --model DIR")

        model, preprocess = load_embedder(self.model_dir, self.device)  # a torch model or an ONNX export
        if model.cfg.embed_dim != self.index.dim:
            raise ValueError(
                f"{self.model_dir} embeds into {model.cfg.embed_dim} dims but the index holds {self.index.dim}; "
                "search with the model that built the index"
            )
        self._tokenizer = get_tokenizer(self.model_dir)
        self._preprocess = preprocess
        self._model = model.eval()

    @property
    def model(self):
        self._load()
        return self._model

    @property
    def tokenizer(self):
        self._load()
        return self._tokenizer

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, E) normalised text embeddings."""

        return embed_texts(self.model, self.tokenizer, list(texts), device=self.device)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, E) normalised image embeddings of decoded images."""
        self._load()
        batch = torch.stack([self._preprocess(img) for img in images]).to(self.device)  # (N, C, H, W)
        return self._model.encode_image(batch, normalize=True).float().cpu().numpy()

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        return self.index.query(np.atleast_2d(np.asarray(vectors, dtype=np.float32)), k)

    def search_text(self, text: str, k: int = 10) -> list[dict[str, Any]]:
        return self.search_vectors(self.embed_texts([text]), k)[0]

    def search_image(self, image: Image.Image | str | os.PathLike, k: int = 10) -> list[dict[str, Any]]:
        if not isinstance(image, Image.Image):
            image = open_image(Path(image))
        return self.search_vectors(self.embed_images([image]), k)[0]

    def close(self) -> None:
        self.index.close()
