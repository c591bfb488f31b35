"""Export a dual encoder's two towers to ONNX and run them with onnxruntime behind ``encode_image``/``encode_text``.

An export directory holds ``image_encoder.onnx`` (images (B, C, H, W) float → unnormalised embeddings (B, E)),
``text_encoder.onnx`` (token ids (B, T) int64 → (B, E)), the model's ``config.json`` with an ``onnx`` section (file
names, logit scale, the parity check's max abs differences) and the tokenizer, so it is self-contained like a model
directory. The batch axis is dynamic; the text length is the model's context length, which the tokenizer pads to.

A captioner (CoCa) adds two files for generation: ``caption_context.onnx`` (images → the decoder's image context
(B, N, D), computed once per image) and ``decoder_step.onnx`` (context (B, N, D) + prefix ids (B, t) → logits of the
next token (B, V)), one decoding step without a key/value cache, dynamic in batch and prefix length, so a greedy or
beam loop around it reproduces ``CoCa.generate(use_cache=False)``.
``onnx``, ``onnxruntime`` and ``onnxscript`` (the ``deploy`` extra) are imported only when used.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..factory import get_tokenizer
from ..model_dir import run_or_model_dir
from ..models.gan.networks import GeneratorMixture, require_single_generator
from ..models.gan.pipeline import MODEL_TYPE as GAN_TYPE
from ..models.gan.pipeline import TextToImage
from ..models.onnx_runtime import (
    CONTEXT_FILE,
    GENERATOR_FILE,
    IMAGE_FILE,
    STEP_FILE,
    TEXT_FILE,
    _require,
)
from ..registry import load as load_model

PARITY_TOL = 1e-4  # fp32 ONNX Runtime vs eager PyTorch, max abs difference of unnormalised embeddings


class _ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, E)
        return self.model.encode_image(images, normalize=False)


class _TextEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, E)
        return self.model.encode_text(ids, normalize=False)


class _CaptionContext(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        return self.model.decoder.encode_image(self.model.visual.forward_tokens(images))


class _DecoderStep(nn.Module):
    """Logits of the token after ``prefix`` given the image context: ``CoCa.next_logits`` without a cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, context: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:  # (B, N, D), (B, t) -> (B, V)
        txt, _ = self.model.text.forward_tokens(prefix)  # (B, t, Dt)
        return self.model.decoder(txt, context)[:, -1]


def step_inputs(model: nn.Module, batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed images (B, C, H, W) and caption prefixes (B, t) that start with the begin token."""
    g = torch.Generator().manual_seed(seed)
    images, _ = example_inputs(model.cfg, batch, seed)
    prefix = torch.randint(4, model.cfg.text.vocab_size, (batch, length), generator=g)
    prefix[:, 0] = model.cfg.decoder.bos_id
    return images, prefix


def example_inputs(cfg, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random images (B, C, H, W) and token ids (B, T) with end tokens and padding at varied positions."""
    g = torch.Generator().manual_seed(seed)
    v, t = cfg.vision, cfg.text
    images = torch.randn(batch, v.channels, v.image_size, v.image_size, generator=g)
    ids = torch.randint(1, t.vocab_size, (batch, t.context_length), generator=g)
    ids[ids == t.pad_id] = (t.pad_id + 1) % t.vocab_size
    lengths = torch.randint(2, t.context_length + 1, (batch,), generator=g)
    ids[torch.arange(t.context_length)[None, :] >= lengths[:, None]] = t.pad_id  # (B, T) padded after each text
    return images, ids


def _export(
    module: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: Path,
    input_name: str | list[str],
    output_name: str,
    dynamic_shapes: tuple | None = None,
) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = example if isinstance(example, tuple) else (example,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=[input_name] if isinstance(input_name, str) else input_name,
            output_names=[output_name],
            dynamic_shapes=dynamic_shapes or ({0: batch},),
            dynamo=True,
            verbose=False,
            external_data=False,
        )


def export_decoder(model: nn.Module, out: Path) -> None:
    """``caption_context.onnx`` and ``decoder_step.onnx`` of a CoCa (see the module docstring)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("length", min=1, max=model.cfg.text.context_length)
    images, prefix = step_inputs(model, 2, 3)
    with torch.no_grad():
        context = _CaptionContext(model)(images)  # (B, N, D)
    _export(_CaptionContext(model), images, out / CONTEXT_FILE, "images", "context")
    _export(
        _DecoderStep(model),
        (context, prefix),
        out / STEP_FILE,
        ["context", "prefix"],
        "logits",
        dynamic_shapes=({0: batch}, {0: batch, 1: length}),
    )


def export_onnx(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, check: bool = True, tol: float = PARITY_TOL
) -> dict[str, Any]:
    """Write both towers of a model directory as ONNX to ``out_dir`` and check them against PyTorch.

    The check runs onnxruntime and the eager model on the same fixed inputs at two batch sizes (so the dynamic batch
    axis is exercised) and fails if the max abs difference exceeds ``tol``.

    A captioner also gets its decoder step (``decoder_step.onnx``, with ``caption_context.onnx``), checked the same
    way at two batch sizes and two prefix lengths.

    Returns:
        ``{"out_dir", "image_max_abs_diff", "text_max_abs_diff", "batch_sizes"}``, plus ``"context_max_abs_diff"``
        and ``"step_max_abs_diff"`` for a captioner.
    """
    _require("onnx"), _require("onnxscript")

    src, out = run_or_model_dir(model_dir), Path(out_dir)
    meta = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    if meta.get("compression", {}).get("method", "").endswith("int8"):
        raise ValueError(
            f"{src} is an int8-quantised torch model, which ONNX export does not support; export the fp32 model "
            "it came from (quantise the ONNX model with onnxruntime.quantization if needed)"
        )
    if meta.get("model_type") == GAN_TYPE:
        return export_generator(src, out, check, tol)
    if meta.get("model_type") not in (None, "vislang-clip"):
        raise ValueError(
            f"{src} holds a {meta.get('model_type')!r} model; ONNX export covers dual encoders, captioners "
            "(vislang-clip directories) and text-to-image generators (vislang-gan)"
        )
    model = load_model(src)
    captioner = getattr(model, "decoder", None) is not None
    out.mkdir(parents=True, exist_ok=True)
    images, ids = example_inputs(model.cfg, 2)
    try:
        _export(_ImageEncoder(model), images, out / IMAGE_FILE, "images", "image_embeds")
        _export(_TextEncoder(model), ids, out / TEXT_FILE, "input_ids", "text_embeds")
        if captioner:
            export_decoder(model, out)
    except Exception as e:  # the exporter's own errors are long; say which model could not be exported first
        raise RuntimeError(f"ONNX export of {src} failed ({type(e).__name__}: {str(e)[:300]})") from e
    get_tokenizer(src).save(out)
    meta["onnx"] = {
        "image": IMAGE_FILE,
        "text": TEXT_FILE,
        "logit_scale": float(model.get_logit_scale().detach()),
        "logit_bias": float(model.logit_bias.detach()) if model.logit_bias is not None else None,
        "source": str(src),
    }
    if captioner:
        meta["onnx"].update(context=CONTEXT_FILE, decoder_step=STEP_FILE)
    report: dict[str, Any] = {"out_dir": str(out)}
    if check:
        report.update(check_parity(model, out, tol))
        meta["onnx"]["max_abs_diff"] = {"image": report["image_max_abs_diff"], "text": report["text_max_abs_diff"]}
        if captioner:
            report.update(check_decoder_parity(model, out, tol))
            meta["onnx"]["max_abs_diff"].update(
                context=report["context_max_abs_diff"], decoder_step=report["step_max_abs_diff"]
            )
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return report


@torch.inference_mode()
def check_parity(
    model: nn.Module, onnx_dir: str | os.PathLike, tol: float = PARITY_TOL, batch_sizes: tuple[int, ...] = (1, 7)
) -> dict[str, Any]:
    """Max abs difference between onnxruntime and eager PyTorch (unnormalised embeddings); raises above ``tol``."""
    ort = _require("onnxruntime")
    d = Path(onnx_dir)
    sessions = {
        k: ort.InferenceSession(str(d / f), providers=["CPUExecutionProvider"])
        for k, f in (("image", IMAGE_FILE), ("text", TEXT_FILE))
    }
    diffs = {"image": 0.0, "text": 0.0}
    model.eval()
    for i, b in enumerate(batch_sizes):
        images, ids = example_inputs(model.cfg, b, seed=100 + i)
        for key, x, ref in (
            ("image", images, model.encode_image(images, normalize=False)),
            ("text", ids, model.encode_text(ids, normalize=False)),
        ):
            sess = sessions[key]
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]  # (B, E)
            diffs[key] = max(diffs[key], float(np.abs(got - ref.numpy()).max()))
    for key, diff in diffs.items():
        if not diff <= tol:
            raise RuntimeError(f"the ONNX {key} tower differs from PyTorch by {diff:.2e} (> {tol:.0e}); do not use it")
    return {"image_max_abs_diff": diffs["image"], "text_max_abs_diff": diffs["text"], "batch_sizes": batch_sizes}


class _AllComponents(nn.Module):
    """A mixture generator for export: every component draws every image, and each image keeps its own component's
    output. K times the work of picking, but no data-dependent shapes, which the exporter cannot trace."""

    def __init__(self, mixture: nn.Module) -> None:
        super().__init__()
        self.mixture = mixture

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([g(z, c) for g in self.mixture.parts], dim=1)  # (B, K, C, H, W)
        pick = torch.nn.functional.one_hot(self.mixture.component(z), outs.shape[1]).to(outs.dtype)  # (B, K)
        return (outs * pick[:, :, None, None, None]).sum(dim=1)  # a mask, not indexing: the batch stays dynamic


def export_generator(src: Path, out: Path, check: bool = True, tol: float = PARITY_TOL) -> dict[str, Any]:
    """A text-to-image GAN: ``generator.onnx`` (noise (B, Z), text embeddings (B, E) → images (B, C, H, W) in
    [-1, 1], dynamic batch) and its frozen text tower exported as a dual encoder under ``text_encoder/``, each
    checked against PyTorch at two batch sizes. Sampling needs only these two: embed the prompt, draw noise, decode.
    """

    t2i = TextToImage.from_pretrained(src)
    require_single_generator(t2i.cfg, src, "exporting")
    gen = t2i.generator.eval()
    module = _AllComponents(gen) if isinstance(gen, GeneratorMixture) else gen
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(2, t2i.cfg.z_dim, generator=g), torch.randn(2, t2i.cfg.cond_dim, generator=g)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        _export(module, (z, c), out / GENERATOR_FILE, ["noise", "text_embeds"], "images", ({0: batch}, {0: batch}))
    except Exception as e:
        raise RuntimeError(f"ONNX export of the generator in {src} failed ({type(e).__name__}: {str(e)[:300]})") from e
    text = export_onnx(src / "text_encoder", out / "text_encoder", check, tol)
    meta = json.loads((src / "config.json").read_text())
    meta["onnx"] = {"generator": GENERATOR_FILE, "text_encoder": "text_encoder", "source": str(src)}
    report: dict[str, Any] = {"out_dir": str(out), "text_max_abs_diff": text.get("text_max_abs_diff")}
    if check:
        ort = _require("onnxruntime")
        sess = ort.InferenceSession(str(out / GENERATOR_FILE), providers=["CPUExecutionProvider"])
        diff = 0.0
        for b in (1, 7):
            zb, cb = torch.randn(b, t2i.cfg.z_dim, generator=g), torch.randn(b, t2i.cfg.cond_dim, generator=g)
            with torch.inference_mode():
                ref = gen(zb, cb).numpy()
            got = sess.run(None, {"noise": zb.numpy(), "text_embeds": cb.numpy()})[0]
            diff = max(diff, float(np.abs(got - ref).max()))
        if not diff <= tol:
            raise RuntimeError(f"the ONNX generator differs from PyTorch by {diff:.2e} (> {tol:.0e}); do not use it")
        report.update(generator_max_abs_diff=diff, batch_sizes=(1, 7))
        meta["onnx"]["max_abs_diff"] = {"generator": diff, "text": report["text_max_abs_diff"]}
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return report


@torch.inference_mode()
def check_decoder_parity(
    model: nn.Module,
    onnx_dir: str | os.PathLike,
    tol: float = PARITY_TOL,
    shapes: tuple[tuple[int, int], ...] = ((1, 1), (5, 7)),
) -> dict[str, Any]:
    """Max abs difference of the image context and the next-token logits, onnxruntime vs PyTorch, at (batch, prefix
    length) ``shapes``; the reference is ``CoCa.next_logits`` without a cache, the path generation takes."""
    ort = _require("onnxruntime")
    d = Path(onnx_dir)
    ctx_sess = ort.InferenceSession(str(d / CONTEXT_FILE), providers=["CPUExecutionProvider"])
    step_sess = ort.InferenceSession(str(d / STEP_FILE), providers=["CPUExecutionProvider"])
    diffs = {"context": 0.0, "step": 0.0}
    model.eval()
    for i, (b, t) in enumerate(shapes):
        images, prefix = step_inputs(model, b, t, seed=200 + i)
        state = model.start_decoding(images, use_cache=False)
        ref = model.next_logits(state, prefix)  # (B, V)
        context = ctx_sess.run(None, {"images": images.numpy()})[0]  # (B, N, D)
        got = step_sess.run(None, {"context": context, "prefix": prefix.numpy()})[0]  # (B, V)
        diffs["context"] = max(diffs["context"], float(np.abs(context - state.context.numpy()).max()))
        diffs["step"] = max(diffs["step"], float(np.abs(got - ref.numpy()).max()))
    for key, diff in diffs.items():
        if not diff <= tol:
            raise RuntimeError(
                f"the ONNX caption {key} differs from PyTorch by {diff:.2e} (> {tol:.0e}); do not use it"
            )
    return {"context_max_abs_diff": diffs["context"], "step_max_abs_diff": diffs["step"], "step_shapes": shapes}
