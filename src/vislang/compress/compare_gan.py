"""``vislang compare`` of text-to-image generators: size, parameters, images drawn per second and FID-FM in one table.

A generator's task metric is the quality of what it draws, so each one is judged by the same protocol as
``vislang generate-eval`` (``n_per_class`` images per class prompt against the test split, in the feature space of a
fixed judge classifier), with the same noise for every model, so that a compressed generator is compared with its
source on the same draws. Speed is generation alone (noise and text embeddings in, images out), timed in interleaved
rounds with paired ratios as for the other families (:func:`vislang.compress.measure.paired_ratios`). Models can be
GAN model directories (fp32, pruned, distilled, int8) or ONNX exports of one (run by onnxruntime).
"""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from ..config import from_dict
from ..evaluation.gan import DEFAULT_JUDGE, RealReference, evaluate_classes, load_judge, real_reference
from ..factory import get_tokenizer
from ..model_dir import run_or_model_dir
from ..models.gan.build import build_generator
from ..models.gan.networks import GANModelConfig
from ..models.gan.pipeline import TextToImage, is_gan_dir
from ..models.onnx_runtime import OnnxCLIP, OnnxGenerator, is_onnx_generator
from .measure import interleaved_times, paired_ratios, weight_bytes


def load_generator(path: Path):
    """(TextToImage, kind) of a GAN model directory or of its ONNX export (whose generator is then onnxruntime's)."""

    if is_onnx_generator(path):  # the export's own ONNX text tower embeds the prompts: no torch weights needed
        meta = json.loads((path / "config.json").read_text())
        cfg = from_dict(GANModelConfig, meta["model"], "model")
        keep = {k: v for k, v in meta.items() if k not in ("model", "model_type", "vislang_version", "onnx")}
        enc = path / "text_encoder"
        return TextToImage(cfg, OnnxGenerator(path), OnnxCLIP(enc), get_tokenizer(enc), keep), "onnx"
    model = TextToImage.from_pretrained(path)
    return model, (model.meta.get("compression") or {}).get("method", "fp32")


def generator_params(path: Path, cfg: GANModelConfig, quantised: bool) -> tuple[int, int | None]:
    """(parameters of the fp32 architecture, non-zero stored weights; None for int8 or ONNX, whose stored values are
    not the weights)."""
    fp32 = build_generator(cfg)
    total = sum(p.numel() for p in fp32.parameters())
    f = path / "model.safetensors"
    if quantised or not f.is_file():
        return total, None
    from safetensors import safe_open

    names = {n for n, _ in fp32.named_parameters()}
    with safe_open(str(f), "pt") as st:
        nonzero = sum(int((st.get_tensor(k) != 0).sum()) for k in st.keys() if k in names)
    return total, nonzero


@torch.inference_mode()
def measure_generation(
    generators: list[Any], cfgs: list[GANModelConfig], n: int, rounds: int = 5, calls: int = 2, seed: int = 0
) -> list[dict[str, Any]]:
    """Images drawn per second by each generator on batches of ``n`` (same noise and conditions for all), timed in
    interleaved rounds after a warmup, with the paired ratio to the first generator."""

    def draw(cfg: GANModelConfig) -> tuple[torch.Tensor, torch.Tensor]:  # the same draw for the same sizes
        g = torch.Generator().manual_seed(seed)
        z, c = torch.randn(n, cfg.z_dim, generator=g), torch.randn(n, cfg.cond_dim, generator=g)
        return z, torch.nn.functional.normalize(c, dim=1)

    inputs = [draw(c) for c in cfgs]
    for gen in generators:
        gen.eval()
    work = [{"draw": functools.partial(gen, z, c)} for gen, (z, c) in zip(generators, inputs)]
    times = [t["draw"] for t in interleaved_times(work, rounds, calls)]
    rows = []
    for t in times:
        ratio = paired_ratios(times[0], t, n, n)
        rows.append({"images_per_s": n / statistics.median(t), "images_per_s_ratio": ratio["median"],
                     "images_per_s_ratio_iqr": ratio["iqr"]})  # fmt: skip
    return rows


def compare_generators(
    paths: list[Path],
    data: str | None,
    judge: str | None,
    max_images: int | None,
    batch_size: int,
    rounds: int,
    speed_batches: list[int] | None,
) -> list[dict[str, Any]]:
    """Rows of :func:`vislang.compress.compare.compare_models` for GAN generators (see the module docstring)."""
    paths = [run_or_model_dir(p) for p in paths]
    loaded = [load_generator(p) for p in paths]
    judge_model = load_judge(judge or DEFAULT_JUDGE) if data else None
    rows = []
    refs: dict[tuple[int, int], RealReference] = {}  # the real side, measured once per image size
    for p, (model, kind) in zip(paths, loaded):
        params, nonzero = generator_params(p, model.cfg, quantised=kind.endswith("int8"))
        row: dict[str, Any] = {"model": str(p), "kind": kind, "family": "generator", "size_mb": weight_bytes(p) / 1e6}
        row.update(params=params, nonzero_params=nonzero)
        if judge_model is not None:
            n_classes = len(judge_model.class_names)
            per_class = max(2, (max_images or 10_000) // n_classes)
            key = (model.cfg.image_size, model.cfg.channels)
            if key not in refs:
                refs[key] = real_reference(judge_model, data, *key, n_per_class=per_class)
            res = evaluate_classes(model, judge_model, data, n_per_class=per_class, reference=refs[key])
            row.update({k: res[k] for k in ("fid_fm", "fid_fm_floor", "kid_fm", "class_consistency")})
        rows.append(row)
    gens, cfgs = [m.generator for m, _ in loaded], [m.cfg for m, _ in loaded]
    for row, speed in zip(rows, measure_generation(gens, cfgs, batch_size, rounds)):
        row.update(speed, threads=torch.get_num_threads(), batch_size=batch_size)
    for n in sorted(set(speed_batches or ())):
        for row, speed in zip(rows, measure_generation(gens, cfgs, n, rounds)):
            row.setdefault("speed_by_batch", {})[n] = speed
    return rows


def is_generator_path(path: str | Path) -> bool:
    """A GAN model or run directory, or an ONNX export of one."""

    p = Path(path)
    return is_gan_dir(p) or is_onnx_generator(p)
