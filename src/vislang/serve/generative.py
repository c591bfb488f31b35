"""The models behind ``/v1/caption``, ``/v1/vqa`` and ``/v1/generate``, loaded once when the server starts.

``vislang caption``, ``vislang vqa`` and ``vislang generate`` load their model per command; a server answers many
requests, so here the model, tokenizer and preprocessing are kept, and each request only runs the forward passes. The
work itself is the library's: ``vislang.decoding.caption`` (what ``vislang caption`` calls), the VQA model's answer
head (what ``vislang vqa`` reads), and ``TextToImage.generate`` with its prompt checks and ``save_grid`` (what
``vislang generate`` calls). Bad questions and prompts raise ValueError with a message fit for a 400 answer.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..decoding import caption
from ..factory import from_pretrained, get_tokenizer, image_transforms
from ..models.gan.pipeline import TextToImage, save_grid
from ..models.vqa_generative import load_answerer


class Captioner:
    """A captioning (CoCa) model directory, ready to caption one image at a time.

    Args:
        model_dir: a model trained with ``vislang train --config caption``.
        device: where the model runs.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu") -> None:

        self.model = from_pretrained(model_dir, device).eval()
        if getattr(self.model.cfg, "decoder", None) is None:
            raise ValueError(
                f"{model_dir} holds a dual encoder without a caption decoder, so it cannot caption; pass a model "
                "trained with `vislang train --config caption` as --caption-model"
            )
        self.tokenizer = get_tokenizer(model_dir)
        _, self.preprocess = image_transforms(self.model.cfg)
        self.device = device
        self.max_tokens = self.model.cfg.text.context_length - 1  # the begin token takes one place of the context

    def __call__(self, image: Image.Image, max_length: int = 20, beam: int = 1) -> str:

        x = self.preprocess(image).unsqueeze(0).to(self.device)  # (1, C, H, W) normalised
        return caption(self.model, self.tokenizer, x, max_length=max_length, beam=beam)[0]


class QuestionAnswerer:
    """A VQA model directory, ready to answer one question at a time: an answer classifier (``vislang ablate-fusion``,
    ``vislang train --config vqa``) or a generative answerer (``vislang train --config vqa-gen``), with the same checks
    and scoring as ``vislang vqa`` (``models.vqa_generative.load_answerer``).

    Args:
        model_dir: a directory written by ``vislang.models.vqa.save_vqa`` or ``train_vqa_generative``.
        device: where the model runs.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu") -> None:
        self.answerer = load_answerer(model_dir, device)

    def __call__(self, image: Image.Image, question: str, top_k: int = 1) -> list[dict[str, Any]]:
        """The ``top_k`` most probable answers, ``[{"answer", "probability"}, ...]``, best first."""
        return [{"answer": a, "probability": p} for a, p in self.answerer.answer(image, question, top_k)]


class ImageGenerator:
    """A text-to-image GAN (run or model directory, as ``vislang generate --model`` takes), ready to draw one prompt.

    Requests are served one at a time (a lock): generation is compute-bound, so running two at once only makes both
    slower, and the warnings of the prompt check (words the text tower never saw) are caught per request.

    Args:
        model_dir: a GAN model directory or the run directory holding it (``vislang train --config gan``).
        device: where the model runs.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu") -> None:

        self.model = TextToImage.from_pretrained(model_dir, device)
        self._lock = threading.Lock()

    def __call__(self, prompt: str, n: int, seed: int | None) -> tuple[torch.Tensor, list[str]]:
        """uint8 images (n, C, H, W) of ``prompt`` and the prompt check's warnings; ValueError for a bad prompt."""
        with self._lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images = self.model.generate([prompt], n=n, seed=seed)
        return images, [str(w.message) for w in caught]

    @staticmethod
    def grid_png(images: torch.Tensor, scale: int = 2) -> bytes:
        """One PNG grid, laid out and scaled as ``vislang generate -o grid.png`` writes it (so the bytes match)."""

        with tempfile.TemporaryDirectory(prefix="vislang-grid-") as d:  # save_grid writes files; read it back
            return save_grid(images, Path(d) / "grid.png", ncol=min(len(images), 16), scale=scale).read_bytes()

    @staticmethod
    def png(image: torch.Tensor) -> bytes:
        """One uint8 (C, H, W) image as PNG bytes at its own size."""
        arr = image.permute(1, 2, 0).numpy()  # (H, W, C)
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
        return buf.getvalue()
