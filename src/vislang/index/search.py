"""Queries against an index: a text, an image or an embedding in, ranked items with scores out.

``Searcher`` holds the index and the model that built it, so ``vislang search`` and the HTTP service share one code
path from query to results. Queries run in the precision ``vislang embed`` and ``index build`` use (``auto``: bf16
autocast where this machine has native bf16, a trial says it pays and the outputs agree with fp32's; see
``evaluation.embed.inference_precision``), text and image queries alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import precision as prec
from ..evaluation.embed import embed_images, inference_precision
from ..factory import get_tokenizer
from ..inference import open_image
from .base import Index, open_index
from .build import load_embedder

TEXT_TRIAL_BATCH = 16  # the batch the text precision is settled on: what a busy server's batcher embeds at once
TRIAL_TEXT = "a photo of a small red circle"


class Searcher:
    """An index opened with its model (loaded on first use: embedding-only queries never need it).

    Args:
        index_dir: the index directory.
        model_dir: the model; default the one recorded in the index.
        device: where the model runs.
        precision: ``auto`` (bf16 where it pays and agrees with fp32 on this machine), ``fp32`` or ``bf16``.
        read_only: open the index read-only (a server; see ``open_index``).
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        model_dir: str | os.PathLike | None = None,
        device: str = "cpu",
        precision: str = "auto",
        read_only: bool = False,
    ) -> None:
        self.precision = prec.check(precision)
        self.index: Index = open_index(index_dir, read_only=read_only)
        self.model_dir = str(model_dir or self.index.header.get("model") or "")
        self.device = device
        self._model = self._preprocess = self._tokenizer = None
        self._text_precision: str | None = None

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

    @property
    def text_precision(self) -> str:
        """The precision text queries run in (``fp32`` or ``bf16``), settled once on a batch of
        ``TEXT_TRIAL_BATCH`` texts.

        Why once: ``auto`` is otherwise settled per input shape, and a server's batches come in every size from 1
        to 64, so each new size would pay a timed trial (ten forward passes) inside some request, and every batch a
        cache lookup. The tower's bf16 gain grows with the batch (at 1 text it is within 0.1 ms either way), so the
        batch a loaded server sees decides."""
        if self._text_precision is None:
            self._load()
            dev = torch.device(self.device)
            ids = self._tokenizer([TRIAL_TEXT] * TEXT_TRIAL_BATCH).to(dev)  # (B, T)
            with torch.inference_mode():
                choice = inference_precision(
                    self._model, dev, self.precision, lambda: self._model.encode_text(ids), tuple(ids.shape)
                )
            self._text_precision = choice.precision
        return self._text_precision

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, E) normalised text embeddings, in one forward pass (a server's batch: at most a few hundred texts).

        Why not ``inference.embed_texts``: it puts the model in eval mode and back around every call, a walk over
        every module that cost a tenth of a server batch's embedding time; this model stays in eval mode."""
        texts = list(texts)
        if not texts or any(not t.strip() for t in texts):
            raise ValueError("empty text given; every text to embed needs at least one word")
        amp = prec.autocast(self.text_precision, torch.device(self.device))
        ids = self._tokenizer(texts).to(self.device)  # (N, T)
        with torch.inference_mode(), amp:
            return self._model.encode_text(ids, normalize=True).float().cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, E) normalised image embeddings of decoded images, in the index's precision setting (as `index build`
        embeds them)."""
        self._load()
        batch = torch.stack([self._preprocess(img) for img in images])  # (N, C, H, W)
        return embed_images(self._model, batch, len(images), self.device, precision=self.precision).numpy()

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
