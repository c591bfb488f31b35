"""Reading text in images and translating it: what ``vislang read``, ``vislang translate`` and the server call.

A reader is a captioner trained to write the text it sees (``train --config read-zh``, ``read-en``, ``read-mixed``).
Around its greedy decoding this module adds what a user needs from a reading rather than a caption:

* a **confidence**: the probability the model gives its own reading (the product of its token probabilities,
  end token included), from one teacher-forced pass;
* **"no text"**: readers are trained on blank images captioned ``NO_TEXT``; when the model reads that, or its
  confidence is under ``min_confidence``, the answer is "no text" with the confidence, never invented words;
* **text longer than the context**: a reading that fills the context without an end token is flagged truncated;
* **input checks** before any decoding: files that are not images, images over ``MAX_PIXELS`` (checked from the
  header, before the pixels are decoded);
* the image is letterboxed (padded to a square), not centre-cropped: a wide sign keeps both ends.

``translate`` segments a reading with CC-CEDICT (:mod:`vislang.data.cedict`) and returns each word's pinyin and senses.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..data.cedict import load_dictionary
from ..data.rendered_zh import NO_TEXT, is_hanzi
from ..data.transforms import normalize, pil_to_array
from ..decoding import decode
from ..factory import from_pretrained, get_tokenizer

MAX_PIXELS = 4096 * 4096  # larger images are refused before decoding: a reader sees 64 px, and bombs cost gigabytes
MAX_BYTES = 20 * 1024 * 1024
MIN_CONFIDENCE = 0.3  # below this a reading is reported as "no legible text"


class ImageInputError(ValueError):
    """An input that is not a usable image (not an image, or too large); the message says what to do."""


@dataclasses.dataclass
class Reading:
    """What a reader saw in one image."""

    text: str  # "" when no text was found
    confidence: float  # the model's probability of its reading (of "no text" when it read none)
    has_text: bool
    truncated: bool = False  # the text ran past the model's context: the reading is cut
    note: str = ""  # one sentence for a person when something is off (no text, low confidence, truncated)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def open_checked(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image from a path or bytes, refusing non-images and images over ``max_pixels`` before decoding."""
    name = "upload" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        if len(source) > MAX_BYTES:
            raise ImageInputError(f"{name} is {len(source) / 2**20:.1f} MiB, over the {MAX_BYTES >> 20} MiB limit; "
                                  "send a smaller image")  # fmt: skip
        fp: Any = io.BytesIO(source)
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"{name} does not exist; pass an image file")
        fp = source
    try:
        img = Image.open(fp)
        w, h = img.size  # from the header: nothing decoded yet
        if w * h > max_pixels:
            raise ImageInputError(
                f"{name} is {w}x{h} ({w * h / 1e6:.1f} Mpx), over the {max_pixels / 1e6:.1f} Mpx limit; "
                "downscale or crop it to the text first"
            )
        img.load()
        return img
    except Image.DecompressionBombError:
        raise ImageInputError(f"{name} is over the {max_pixels / 1e6:.1f} Mpx limit (far over: a decompression "
                              "bomb); downscale or crop it to the text first") from None  # fmt: skip
    except (UnidentifiedImageError, OSError) as e:
        raise ImageInputError(
            f"{name} is not a readable image ({e.__class__.__name__}); pass a PNG/JPEG/WebP file"
        ) from e


class Reader:
    """A reading model with its tokenizer, ready to read PIL images in batches."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", min_confidence: float = MIN_CONFIDENCE):
        self.model = from_pretrained(model_dir, device).eval()
        if getattr(self.model.cfg, "decoder", None) is None:
            raise ValueError(
                f"{model_dir} is not a reading model (no caption decoder); train one with --config read-zh"
            )
        self.tokenizer = get_tokenizer(model_dir)
        self.device, self.min_confidence = device, min_confidence
        self.max_length = self.model.cfg.text.context_length - 1  # after the begin token, end token included
        v = self.model.cfg.vision
        self.size, self.channels, self.mean, self.std = v.image_size, v.channels, v.mean, v.std

    def tensors(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Letterboxed, resized, normalised (B, C, H, W): the whole image, as the reader was trained on."""
        arrays = np.stack([pil_to_array(im, self.size, self.channels, fit="pad") for im in images])
        return normalize(torch.from_numpy(arrays).permute(0, 3, 1, 2), self.mean, self.std).to(self.device)

    @torch.inference_mode()
    def read(self, images: Sequence[Image.Image], batch_size: int = 64) -> list[Reading]:
        """Read each image: greedy text, its probability, and whether any text is there."""
        out: list[Reading] = []
        for i in range(0, len(images), batch_size):
            x = self.tensors(images[i : i + batch_size])
            ids = self.model.generate(x, max_length=self.max_length)  # (B, L): text, end token, padding
            probs = self._sequence_probability(x, ids)
            texts = decode(self.tokenizer, ids)
            ended = (ids == self.tokenizer.eos_id).any(dim=1).tolist()
            out.extend(self._judge(t, float(p), e) for t, p, e in zip(texts, probs, ended))
        return out

    @torch.inference_mode()
    def _sequence_probability(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """P(reading | image): product of the token probabilities up to and including the end token."""
        bos = torch.full((ids.shape[0], 1), self.tokenizer.bos_id, dtype=ids.dtype, device=ids.device)
        text = torch.cat([bos, ids], dim=1)  # (B, 1 + L)
        pad = self.model.cfg.text.context_length - text.shape[1]
        if pad > 0:
            text = F.pad(text, (0, pad), value=self.tokenizer.pad_id)
        logp = self.model.caption_logits(x, text).log_softmax(-1)  # (B, T-1, V)
        target = text[:, 1:]  # (B, T-1)
        token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        ended_before = (target == self.tokenizer.eos_id).long().cumsum(1) - (target == self.tokenizer.eos_id).long()
        keep = (ended_before == 0) & (target != self.tokenizer.pad_id)  # tokens up to the first end token
        return (token_logp * keep).sum(1).exp()

    def _judge(self, text: str, prob: float, ended: bool) -> Reading:
        text = tidy(text)
        if text == NO_TEXT or not text:
            return Reading("", prob, False, note=f"no text found (confidence {prob:.2f})")
        if prob < self.min_confidence:
            return Reading("", 1.0 - prob, False, note=f"no legible text: the best reading has confidence {prob:.2f}, "
                           f"under {self.min_confidence:.2f}")  # fmt: skip
        if not ended:
            return Reading(text, prob, True, truncated=True, note=f"the text is longer than the model's context "
                           f"({self.max_length - 1} characters); this reading is cut")  # fmt: skip
        return Reading(text, prob, True)


def tidy(text: str) -> str:
    """Join Chinese characters a decoder spaced apart; keep single spaces between Latin words."""
    parts = text.split()
    out = ""
    for p in parts:
        joined = out and (is_hanzi(out[-1]) or is_hanzi(p[0]))
        out = out + p if (not out or joined) else f"{out} {p}"
    return out


def translate(text: str) -> dict[str, Any]:
    """A reading's translation through CC-CEDICT: pinyin and first sense per word, every sense kept in ``words``."""
    dictionary = load_dictionary()
    words = dictionary.translate(text)
    return {
        "text": text,
        "pinyin": " ".join(w["pinyin"] for w in words if w["pinyin"]),
        "english": dictionary.gloss(text),
        "words": words,
    }
