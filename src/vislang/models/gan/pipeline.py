"""Text → image with a trained generator: prompts are checked, embedded by the frozen dual encoder, and decoded.

A GAN model directory (written by ``save_pretrained``; ``model_type`` = ``vislang-gan``) holds::

    config.json         GANModelConfig, sample prompts, training summary
    model.safetensors   the generator's weights (the EMA copy when the run kept one)
    text_encoder/       the dual encoder whose text tower conditions the generator (a vislang model directory)

so generation needs nothing from the run that trained it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...config import from_dict, to_dict
from ...evaluation.embed import model_device
from ...model_dir import __version__, atomic_dir, run_or_model_dir, write_weights
from ...tokenizers import load_tokenizer
from ..dual_encoder import load_pretrained, save_pretrained
from ..int8_io import is_int8
from .build import build_generator
from .ensemble import GeneratorEnsemble, ensemble_config
from .networks import GANModelConfig, to_uint8
from .quantized import load_quantized_generator

MODEL_TYPE = "vislang-gan"
MAX_IMAGES = 4096  # per call: more is a batch job, not an interactive request (and a typo like -n 100000)
_CHUNK = 256  # images per generator forward


def known_words(tokenizer) -> set[str] | None:
    """Whole words the tokenizer learnt as single tokens (its training captions' words); None if it cannot tell."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return None
    vocab = backend.get_vocab()
    words = {t[: -len("</w>")] for t in vocab if t.endswith("</w>")}  # BPE: word-final pieces
    if not words:  # WordPiece: pieces without the continuation prefix
        words = {t for t in vocab if not t.startswith("##") and not t.startswith("[")}
    return {w for w in words if re.fullmatch(r"[a-z0-9-]+", w)}


def check_prompts(prompts: Sequence[str], tokenizer, examples: Sequence[str] = ()) -> list[str]:
    """Stripped prompts; ValueError for an empty one or one with no word the text tower was trained on.

    A BPE tokenizer spells any word in pieces, so an unknown word silently becomes a meaningless embedding:
    refusing prompts made only of such words (and warning about partly unknown ones) keeps users from reading
    meaning into noise.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError('no prompt given; pass at least one, e.g. "a photo of a sneaker"')
    out = [p.strip() for p in prompts]
    for p in out:
        if not p:
            raise ValueError('a prompt is empty; write what to draw, e.g. "a photo of a sneaker"')
    vocab = known_words(tokenizer)
    if vocab is None:
        return out
    for p in out:
        words = re.findall(r"[a-z0-9]+", p.lower())  # hyphens split words, as the tokenizer splits punctuation
        unknown = [w for w in words if w not in vocab]
        if words and len(unknown) == len(words):
            hint = "; ".join(repr(e) for e in examples[:3]) or ", ".join(sorted(vocab, key=lambda w: (-len(w), w))[:8])
            raise ValueError(
                f"none of the words of the prompt {p!r} were in the text model's training captions, so it would "
                f"condition on noise; write it like the training captions, e.g. {hint}"
            )
        if unknown:
            warnings.warn(f"prompt {p!r}: words never seen in training are ignored in meaning: {unknown}", stacklevel=2)
    return out


def check_count(n: int) -> int:
    if n < 1:
        raise ValueError(f"-n must be at least 1 image per prompt, got {n}")
    return n


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit vectors a, b (E,) at fractions t (S,) → (S, E): stays on the sphere the
    text embeddings live on, so every step is a plausible condition."""
    omega = torch.arccos((a * b).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega)[:, None] * a + torch.sin(t * omega)[:, None] * b) / so


class TextToImage(nn.Module):
    """A generator plus the frozen dual encoder (and tokenizer) that turns prompts into its condition."""

    def __init__(self, cfg: GANModelConfig, generator: nn.Module, encoder: nn.Module, tokenizer, meta=None) -> None:
        super().__init__()
        self.cfg, self.generator, self.encoder, self.tokenizer = cfg, generator, encoder, tokenizer
        self.meta = dict(meta or {})
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:

        return model_device(self.generator)  # the CPU for an int8 or ONNX generator, which have no float parameters

    @property
    def sample_prompts(self) -> list[str]:
        return list(self.meta.get("sample_prompts", []))

    @torch.no_grad()
    def embed(self, prompts: Sequence[str], check: bool = True) -> torch.Tensor:
        """Normalised text embeddings (P, E) of the prompts."""
        if check:
            prompts = check_prompts(prompts, self.tokenizer, self.sample_prompts)
        ids = self.tokenizer(list(prompts)).to(self.device)
        return self.encoder.encode_text(ids, normalize=True).float()

    @torch.no_grad()
    def decode(self, cond: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) for conditions (N, E) and noise (N, Z), in chunks."""
        self.generator.eval()
        parts = [
            to_uint8(self.generator(z[s : s + _CHUNK].to(self.device), cond[s : s + _CHUNK])).cpu()
            for s in range(0, len(z), _CHUNK)
        ]
        return torch.cat(parts)

    def noise(self, n: int, seed: int | None) -> torch.Tensor:
        """(n, Z) standard normal noise; a fixed ``seed`` gives the same noise (and images) every time, and the first
        k rows do not depend on n (numpy draws sequentially; torch.randn does not), so -n 4 is a prefix of -n 16."""
        rng = np.random.default_rng(seed)
        return torch.from_numpy(rng.standard_normal((n, self.cfg.z_dim), dtype=np.float32))

    def generate(self, prompts: str | Sequence[str], n: int = 1, seed: int | None = None) -> torch.Tensor:
        """``n`` images per prompt, prompt-major: uint8 (P*n, C, H, W)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_count(n)
        if n * len(prompts) > MAX_IMAGES:
            raise ValueError(
                f"{n * len(prompts)} images asked for; at most {MAX_IMAGES} per call: lower -n, or run again with "
                "another --seed"
            )
        cond = self.embed(prompts).repeat_interleave(n, dim=0)  # (P*n, E)
        return self.decode(cond, self.noise(len(cond), seed))

    def interpolate(self, a: str, b: str, steps: int = 8, seed: int | None = 0) -> torch.Tensor:
        """uint8 (steps, C, H, W): one fixed noise, the condition moving from prompt ``a`` to prompt ``b``."""
        if not 2 <= steps <= 256:
            raise ValueError(f"interpolation needs 2 to 256 steps, got {steps}")
        ea, eb = self.embed([a, b])
        cond = slerp(ea, eb, torch.linspace(0, 1, steps, device=ea.device))  # (S, E)
        z = self.noise(1, seed).repeat(steps, 1)  # (S, Z)
        return self.decode(cond, z)

    # --- model directories ----------------------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | os.PathLike, extra: dict | None = None, state: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Atomic, like ``factory.save_pretrained``: written to a temporary folder that is renamed into place.
        ``state``: the weights to store instead of the generator's state dict (an int8 generator's, see
        :mod:`vislang.compress.generator`)."""

        meta = {
            "model_type": MODEL_TYPE,
            "vislang_version": __version__,
            "model": to_dict(self.cfg),
            **self.meta,
            **(extra or {}),
        }
        with atomic_dir(directory) as tmp:
            write_weights(tmp, meta, self.generator, state)
            save_pretrained(self.encoder, tmp / "text_encoder", self.tokenizer)
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> TextToImage:
        from safetensors.torch import load_file

        d = run_or_model_dir(directory)  # a run directory: its model/ subfolder
        cfg_file = d / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{d} is not a GAN model directory (no config.json); train one: vislang train "
                                    "--config gan")  # fmt: skip
        meta = json.loads(cfg_file.read_text())
        if meta.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"{d} holds a {meta.get('model_type')!r} model, not a text-to-image GAN; train one with "
                "`vislang train --config gan`"
            )
        cfg = from_dict(GANModelConfig, meta.pop("model"), "model")
        state = load_file(str(d / "model.safetensors"))
        comp = meta.get("compression") or {}
        if is_int8(meta, device, f"{d} (a generator)"):  # `vislang compress`: int8 modules rebuilt, then filled
            generator = load_quantized_generator(cfg, state, comp)
        else:
            generator = build_generator(cfg)
            generator.load_state_dict(state)
        encoder = load_pretrained(d / "text_encoder", device)
        tokenizer = load_tokenizer(d / "text_encoder")
        keep = {k: v for k, v in meta.items() if k not in ("model_type", "vislang_version")}
        return cls(cfg, generator.to(device), encoder, tokenizer, keep).eval()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def build_ensemble(sources: Sequence[str | os.PathLike], out: str | os.PathLike):
    """Load the generators in ``sources`` (model or run directories), check that they can be pooled, and write one
    model directory ``out`` (atomically) holding them all with the shared text tower. Returns the TextToImage."""
    if len(sources) < 2:
        raise ValueError("give at least two GAN model or run directories to pool into an ensemble")
    if Path(out).resolve() in {Path(s).resolve() for s in sources}:
        raise ValueError(f"-o {out} is one of the members; write the ensemble to a new directory")
    models = [TextToImage.from_pretrained(s) for s in sources]
    for s, m in zip(sources, models):
        if (m.meta.get("compression") or {}).get("method"):
            raise ValueError(f"{s} is a compressed generator; pool the full-precision ones, then compress the members")
    cfg = ensemble_config([m.cfg for m in models])
    first = models[0]
    for s, m in zip(sources[1:], models[1:]):
        if not _same_weights(first.encoder, m.encoder):
            raise ValueError(
                f"{s} was conditioned on another text tower than {sources[0]}: an ensemble's generators must read the "
                "same prompts the same way; train each with the same text_model"
            )
        if m.meta.get("data") != first.meta.get("data"):
            raise ValueError(f"{s} was trained on {m.meta.get('data')}, {sources[0]} on {first.meta.get('data')}")
    generator = GeneratorEnsemble([m.generator for m in models])
    meta = {k: v for k, v in first.meta.items() if k != "train"}
    meta["ensemble"] = [{"source": str(s), "train": m.meta.get("train")} for s, m in zip(sources, models)]
    model = TextToImage(cfg, generator, first.encoder, first.tokenizer, meta)
    model.save_pretrained(out)
    return model


def save_grid(images: torch.Tensor, path: str | os.PathLike, ncol: int, scale: int = 1) -> Path:
    """Write uint8 images (N, C, H, W) as one PNG grid, ``ncol`` per row, 2-pixel gaps, upscaled ``scale``×."""
    from PIL import Image
    from torchvision.utils import make_grid

    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    grid = make_grid(images, nrow=max(1, ncol), padding=2, pad_value=0)  # (3, H', W') uint8
    if images.shape[1] == 1:
        grid = grid[:1]
    arr = grid.permute(1, 2, 0).numpy()  # (H', W', C)
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def is_gan_dir(path: str | os.PathLike) -> bool:
    """True for a GAN model directory, or a run directory whose model/ is one (what ``vislang eval`` dispatches on)."""
    p = Path(path)
    for d in (p, p / "model"):
        f = d / "config.json"
        if f.is_file():
            try:
                return json.loads(f.read_text()).get("model_type") == MODEL_TYPE
            except (json.JSONDecodeError, AttributeError):
                return False
    return False
