"""``compress_model_dir``: one model directory in, one compressed model directory out, with what it cost.

Every output is a model directory (``config.json`` + ``model.safetensors`` + tokenizer) whose config records
``"compression": {"method": ..., "source": ..., ...}``; pruned and distilled ones are plain fp32 models, quantised
ones store int8 values that :func:`vislang.compress.load_quantized` rebuilds (``from_pretrained`` hands them to it).

Families and the methods each supports (``SUPPORTED``): a dual encoder all four; a captioner (CoCa) the two int8
ones, since pruning's fine-tune and distillation train the contrastive objective only and would leave the caption
decoder behind; a VQA model dynamic int8 (its calibration data would be VQA scenes, not a caption data set); a
text-to-image GAN's generator all four, each in its own way (:mod:`vislang.compress.generator`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..factory import get_tokenizer, save_pretrained
from ..model_dir import run_or_model_dir
from ..models.quantized_static import calibration_images as sample
from ..models.quantized_static import quantize_static
from ..models.vqa import GENERATIVE_KEY
from .distill import distill, param_count, student_config
from .finetune import contrastive_loss_fn, run_steps, training_pairs
from .generator import compress_generator
from .prune import check_sparsity, make_permanent, prune_model, sparsity_of
from .quantize import QUANTISED_METHODS, load_model, model_family, quantize_dynamic, read_meta, save_quantized

METHODS = ("dynamic-int8", "static-int8", "prune", "distill")
SUPPORTED = {
    "dual-encoder": METHODS,
    "captioner": ("dynamic-int8", "static-int8"),
    "vqa": ("dynamic-int8",),
    "generator": METHODS,  # a text-to-image GAN's generator: compress/generator.py
}


def compress_model_dir(
    model_dir: str | os.PathLike,
    method: str,
    out_dir: str | os.PathLike,
    data: str | None = None,
    data_options: dict[str, Any] | None = None,
    sparsity: float = 0.5,
    prune_kind: str = "unstructured",
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 256,
    student: list[str] | dict[str, Any] | None = None,
    calibration_images: int = 512,
    keep_fp32: tuple[str, ...] = (),
    max_pairs: int | None = None,
    cache_dir: str = ".cache/vislang/prepared",
    seed: int = 0,
    log_every: int = 0,
    adv_weight: float = 0.1,
) -> dict[str, Any]:
    """Compress ``model_dir`` with ``method`` into ``out_dir``; returns a summary (also stored in the config).

    Args:
        method: ``dynamic-int8``, ``static-int8`` (calibrated on ``calibration_images`` training images), ``prune``
            (to ``sparsity`` of kind ``prune_kind``, then ``steps`` of fine-tuning) or ``distill`` (a student
            configured by ``student`` overrides, trained ``steps`` steps).
        data: the training data of the fine-tune, the distillation and the calibration; default: the data a GAN
            was trained on (its config records it), fashion-mnist for the other families.
        data_options: keyword arguments of its reader (``{"n": 64}`` for a small ``shapes`` set).
        steps: fine-tune / distillation steps (default 200 / 600; 0 = no fine-tune after pruning).
        lr: learning rate (default 2e-4 fine-tune, 2e-3 distillation).
        max_pairs: use only the first N training pairs (smoke runs).
        keep_fp32: static-int8: FX module names of the CNN tower left in fp32 (``"stages.0.0"``: the first block).
        adv_weight: a GAN generator's prune fine-tune: weight of the frozen discriminator's term
            (0 = L1 to the teacher's images only), see :func:`vislang.compress.generator.fit_to_teacher`.
    """

    src, out, meta, family = _check_request(model_dir, method, out_dir, sparsity)
    if family == "generator":
        data = data or (meta.get("data") or {}).get("train") or "fashion-mnist"
        return compress_generator(
            src, method, out, data, data_options=data_options, sparsity=sparsity, prune_kind=prune_kind,
            steps=steps, lr=lr, batch_size=batch_size, student=student, calibration_images=calibration_images,
            max_pairs=max_pairs, cache_dir=cache_dir, seed=seed, log_every=log_every, adv_weight=adv_weight,
            run_dir=Path(model_dir) if src != Path(model_dir) else None,  # the user named the run, checkpoints and all
        )  # fmt: skip
    data = data or "fashion-mnist"
    model = load_model(src)
    tokenizer = get_tokenizer(src)
    answers = json.loads((src / "answers.json").read_text()) if family == "vqa" else None

    # A captioner trained to answer questions says so in its config (the "vqa" entry); the int8 copy must too, or it
    # loads as a plain captioner.
    keep = {GENERATIVE_KEY: meta[GENERATIVE_KEY]} if GENERATIVE_KEY in meta else {}
    info: dict[str, Any] = {"method": method, "family": family, "source": str(src)}
    t0 = time.time()
    if method == "dynamic-int8":
        _dynamic_int8(model, out, tokenizer, info, keep, answers)
    elif method == "static-int8":
        _static_int8(model, out, tokenizer, info, keep, answers, data=data, calibration_images=calibration_images,
                     cache_dir=cache_dir, data_options=data_options, seed=seed, keep_fp32=keep_fp32)  # fmt: skip
    elif method == "prune":
        _prune(model, out, tokenizer, info, sparsity, prune_kind, steps, data=data, cache_dir=cache_dir,
               max_pairs=max_pairs, data_options=data_options, lr=lr, batch_size=batch_size, seed=seed,
               log_every=log_every)  # fmt: skip
    else:
        _distill(model, out, tokenizer, info, student, steps, data=data, cache_dir=cache_dir, max_pairs=max_pairs,
                 data_options=data_options, lr=lr, batch_size=batch_size, seed=seed, log_every=log_every)  # fmt: skip
    info["seconds"] = round(time.time() - t0, 1)
    _record(out / "config.json", info)
    return info


def _check_request(
    model_dir: str | os.PathLike, method: str, out_dir: str | os.PathLike, sparsity: float
) -> tuple[Path, Path, dict[str, Any], str]:
    """(source directory, output directory, source config, family) of a compression the source allows: a known
    method its family supports, an fp32 source, an output that is not the source, a valid sparsity."""

    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    src, out = run_or_model_dir(model_dir), Path(out_dir)
    meta = read_meta(src)
    done = (meta.get("compression") or {}).get("method")
    if done in QUANTISED_METHODS:
        raise ValueError(f"{src} is already {done}-quantised; compress the fp32 model it was made from instead")
    family = model_family(meta)
    if method not in SUPPORTED[family]:
        raise ValueError(
            f"{src} is a {family} model, for which {method} is not supported; use one of {', '.join(SUPPORTED[family])}"
        )
    if out.resolve() == src.resolve():
        raise ValueError(f"the output directory {out} is the input model; choose another -o")
    if method == "prune":
        check_sparsity(sparsity)
    return src, out, meta, family


def _dynamic_int8(model, out: Path, tokenizer, info: dict[str, Any], keep: dict, answers: list[str] | None) -> None:
    """Int8 weights, activations quantised on the fly; saves into ``out`` and adds what it did to ``info``."""

    q = quantize_dynamic(model)
    info["modules"] = q._compression["modules"]
    save_quantized(q, out, tokenizer, extra={**keep, "compression_info": _clean(info)}, answers=answers)


def _static_int8(model, out: Path, tokenizer, info: dict[str, Any], keep: dict, answers: list[str] | None, *,
                 data: str, calibration_images: int, cache_dir: str, data_options: dict[str, Any] | None, seed: int,
                 keep_fp32: tuple[str, ...]) -> None:  # fmt: skip
    """Int8 weights and activations, calibrated on ``calibration_images`` images of ``data``; saves into ``out`` and
    adds what it did to ``info``."""

    calib = sample(data, model.cfg.vision, calibration_images, cache_dir, data_options, seed)
    q = quantize_static(model, calib, keep_fp32=tuple(keep_fp32))
    info.update(
        calibration_data=data,
        calibration_images=int(calib.shape[0]),
        static=q._compression["static"],
        keep_fp32=list(keep_fp32),
        notes=q._compression["notes"],
        modules=q._compression["modules"],
    )
    save_quantized(q, out, tokenizer, extra=keep, answers=answers)


def _prune(model, out: Path, tokenizer, info: dict[str, Any], sparsity: float, prune_kind: str, steps: int | None, *,
           data: str, cache_dir: str, max_pairs: int | None, data_options: dict[str, Any] | None, lr: float | None,
           batch_size: int, seed: int, log_every: int) -> None:  # fmt: skip
    """Prune to ``sparsity``, fine-tune ``steps`` steps (default 200) on the contrastive loss, make the zeros
    permanent; saves into ``out`` and adds what it did to ``info``."""

    prune_model(model, sparsity, prune_kind)
    info.update(kind=prune_kind, target_sparsity=sparsity, sparsity_before_finetune=sparsity_of(model))
    steps = 200 if steps is None else steps
    if steps:
        pairs = training_pairs(data, model, tokenizer, cache_dir, max_pairs, options=data_options)
        losses = run_steps(
            model, contrastive_loss_fn(model), pairs, steps, lr or 2e-4, batch_size, seed, log_every=log_every
        )
        info.update(finetune_steps=steps, finetune_data=data, first_loss=losses[0], last_loss=losses[-1])
    make_permanent(model)
    info["sparsity"] = sparsity_of(model)
    save_pretrained(model.eval(), out, tokenizer, extra={"compression": info})


def _distill(model, out: Path, tokenizer, info: dict[str, Any], student: list[str] | dict[str, Any] | None,
             steps: int | None, *, data: str, cache_dir: str, max_pairs: int | None,
             data_options: dict[str, Any] | None, lr: float | None, batch_size: int, seed: int,
             log_every: int) -> None:  # fmt: skip
    """Train a smaller student (``student`` overrides of the teacher's config) ``steps`` steps (default 600) to match
    the teacher's embeddings; saves it into ``out`` and adds what it did to ``info``."""

    cfg = student_config(model.cfg, student)
    pairs = training_pairs(data, model, tokenizer, cache_dir, max_pairs, options=data_options)
    steps = 600 if steps is None else steps
    st, losses = distill(model, cfg, pairs, steps, lr or 2e-3, batch_size, seed=seed, log_every=log_every)
    info.update(
        steps=steps,
        data=data,
        teacher_params=param_count(model),
        student_params=param_count(st),
        first_loss=sum(losses[:10]) / len(losses[:10]),
        last_loss=sum(losses[-10:]) / len(losses[-10:]),
    )
    save_pretrained(st.eval(), out, tokenizer, extra={"compression": info})


def _record(cfg_file: Path, info: dict[str, Any]) -> None:
    """Write the summary into the output's config.json (``compression``), replacing dynamic-int8's interim copy."""
    stored = json.loads(cfg_file.read_text())
    stored.setdefault("compression", {}).update(_clean(info))
    stored.pop("compression_info", None)
    cfg_file.write_text(json.dumps(stored, indent=2))


def _clean(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if v is not None}
