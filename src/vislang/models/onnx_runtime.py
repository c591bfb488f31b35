"""ONNX export directories run by onnxruntime behind the same names as the torch models, so every loader
(``vislang.load``), evaluation, index and server takes them as models.

Writing exports is ``vislang.export``; running them is here, below the registry, so loading never reaches up into the
exporter. ``onnxruntime`` (the ``deploy`` extra) is imported only when an export is opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import from_dict
from .clip import ModelConfig, dual_encoder_outputs

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
CONTEXT_FILE = "caption_context.onnx"
STEP_FILE = "decoder_step.onnx"
GENERATOR_FILE = "generator.onnx"


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise RuntimeError(
            f"ONNX export needs {module!r}: pip install onnx onnxruntime onnxscript (the vislang 'deploy' extra)"
        ) from e


def is_onnx_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in ("config.json", IMAGE_FILE, TEXT_FILE))


def is_onnx_generator(path: Path) -> bool:
    """A directory written by :func:`export_generator`."""
    return (path / GENERATOR_FILE).is_file() and (path / "config.json").is_file()


def session_options(threads: int | None = None):
    """onnxruntime options: ``threads`` intra-op threads (default ``torch.get_num_threads()``, so both back ends use
    the same) that sleep when idle.

    Why not spin: by default onnxruntime's idle threads spin for a while after each call, which took half the CPU
    from whatever ran next: torch code right after an ONNX call ran 2x slower (a Fashion-MNIST generator: 0.09-0.10 s
    per batch of 256 instead of 0.045-0.05 s), so an interleaved comparison flattered every model timed after the
    ONNX one against the one timed right after it, and a service that searches its index after the text tower lost
    the same time. Without spinning the ONNX call itself is no slower here (0.040-0.060 s either way)."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


class OnnxCLIP(nn.Module):
    """An ONNX export directory run by onnxruntime, with the dual encoder's names (``encode_image``, ``encode_text``,
    ``get_logit_scale``, ``forward``, ``cfg``), so ``vislang.evaluation.embed`` and zero-shot code take it as a model.

    It has no parameters (its device is the CPU); inputs are moved to the CPU and outputs come back as float tensors.

    Args:
        directory: written by :func:`export_onnx`.
        threads: onnxruntime intra-op threads; default ``torch.get_num_threads()`` so both back ends use the same.
        providers: onnxruntime execution providers; default the CPU.
    """

    def __init__(self, directory: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None):
        super().__init__()
        ort = _require("onnxruntime")
        d = Path(directory)
        if not is_onnx_dir(d):
            raise FileNotFoundError(
                f"{d} is not an ONNX export (needs config.json, {IMAGE_FILE}, {TEXT_FILE}); "
                "make one with `vislang export MODEL_DIR --onnx OUT_DIR`"
            )
        self.meta = json.loads((d / "config.json").read_text())
        self.cfg = from_dict(ModelConfig, self.meta["model"], "model")
        opts = session_options(threads)
        providers = providers or ["CPUExecutionProvider"]
        self.image_session = ort.InferenceSession(str(d / IMAGE_FILE), opts, providers=providers)
        self.text_session = ort.InferenceSession(str(d / TEXT_FILE), opts, providers=providers)
        self.logit_scale = torch.tensor(self.meta["onnx"]["logit_scale"])
        bias = self.meta["onnx"].get("logit_bias")
        self.logit_bias = torch.tensor(bias) if bias is not None else None

    @staticmethod
    def _run(session, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})[0])
        return F.normalize(out, dim=-1) if normalize else out  # (B, E)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._run(self.image_session, images.float(), normalize)

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._run(self.text_session, ids.long(), normalize)

    def get_logit_scale(self) -> torch.Tensor:
        return self.logit_scale

    def forward(self, images: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return dual_encoder_outputs(self, images, text)


class OnnxGenerator(nn.Module):
    """``generator.onnx`` of ``vislang export`` as a (noise, text embeddings) → images module, run by onnxruntime
    (no parameters: it runs on the CPU)."""

    def __init__(self, directory: Path, threads: int | None = None) -> None:
        ort = _require("onnxruntime")
        super().__init__()
        opts = session_options(threads)
        self.session = ort.InferenceSession(str(directory / GENERATOR_FILE), opts, providers=["CPUExecutionProvider"])

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        feed = {"noise": z.float().cpu().numpy(), "text_embeds": c.float().cpu().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])
