"""``vislang compare``: size, parameters, speed and task metrics of several models in one table (markdown + PNG).

Speed is measured in one run, in rounds (A B C, A B C, ...) so that a change of load on the machine reaches every
model, at the same batch size for all; images/s and texts/s are the batch size over the median batch time. Models can
be any model directory (fp32, pruned, distilled, int8) or an ONNX export (run by onnxruntime).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..evaluation.embed import embed_images, to_model_input
from ..models.clip import CLIP


def _load(path: Path):
    from ..export.onnx import OnnxCLIP, is_onnx_dir
    from ..factory import get_tokenizer
    from .quantize import load_model, read_meta

    if is_onnx_dir(path):
        model, kind = OnnxCLIP(path), "onnx"
    else:
        meta = read_meta(path)
        model, kind = load_model(path), (meta.get("compression") or {}).get("method", "fp32")
    return model, get_tokenizer(path), kind


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files (``model.safetensors`` or the ``.onnx`` files), tokenizer and config left out."""
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else list(path.glob("*.onnx*"))
    return sum(f.stat().st_size for f in files)


def param_counts(path: Path, cfg) -> tuple[int, int | None]:
    """(parameters of the architecture, non-zero stored parameter values or None for ONNX)."""
    names = {n for n, _ in CLIP(cfg).named_parameters()}
    total = sum(p.numel() for p in CLIP(cfg).parameters())
    f = path / "model.safetensors"
    if not f.is_file():
        return total, None
    from safetensors import safe_open

    nonzero = 0
    with safe_open(str(f), "pt") as st:
        for k in st.keys():
            if k in names:
                nonzero += int((st.get_tensor(k) != 0).sum())
    return total, nonzero


@torch.inference_mode()
def measure_speed(
    models: list[Any], inputs: list[tuple[torch.Tensor, torch.Tensor]], rounds: int = 5, calls: int = 2
) -> list[dict[str, float]]:
    """images/s and texts/s of each model on its (images, ids) batch, timed in interleaved rounds after a warmup."""
    times: list[dict[str, list[float]]] = [{"image": [], "text": []} for _ in models]
    for m, (x, ids) in zip(models, inputs):  # warmup
        m.eval()
        m.encode_image(x), m.encode_text(ids)
    for _ in range(rounds):
        for m, (x, ids), t in zip(models, inputs, times):
            for key, fn, arg in (("image", m.encode_image, x), ("text", m.encode_text, ids)):
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn(arg)
                    t[key].append(time.perf_counter() - t0)
    return [
        {
            "images_per_s": inp[0].shape[0] / statistics.median(t["image"]),
            "texts_per_s": inp[1].shape[0] / statistics.median(t["text"]),
        }
        for inp, t in zip(inputs, times)
    ]


def task_metrics(model, tokenizer, test, templates, batch_size: int = 256) -> dict[str, float]:
    """Zero-shot top-1 (labelled data) and retrieval R@1/R@5 (captioned data) on ``test``."""
    from ..evaluation.retrieval import retrieval_eval
    from ..evaluation.zero_shot import zero_shot_eval

    out: dict[str, float] = {}
    emb = embed_images(model, test, batch_size)
    if getattr(test, "classnames", None) and getattr(test, "labels", None) is not None:
        zs = zero_shot_eval(model, tokenizer, test, templates=templates, image_emb=emb)
        out["zero_shot_top1"] = zs["top1"]
    if getattr(test, "captions", None):
        rt = retrieval_eval(model, tokenizer, test, image_emb=emb)
        out.update({k: rt[k] for k in ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1")})
    return out


def compare_models(
    paths: list[str | os.PathLike],
    data: str | None = "fashion-mnist",
    split: str = "test",
    max_images: int | None = None,
    batch_size: int = 256,
    rounds: int = 5,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str = ".cache/vislang/prepared",
    data_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per model: size, parameters, non-zero parameters, images/s, texts/s and task metrics on ``data``.

    With ``out_dir``, writes ``compare.md``, ``compare.png`` and ``compare.json`` there.
    """
    from ..evaluation.run import templates_for
    from ..train.config import DataConfig
    from ..train.data import load_prepared

    if len(paths) < 1:
        raise ValueError("give at least one model directory to compare")
    rows, models, inputs = [], [], []
    for p in map(Path, paths):
        model, tokenizer, kind = _load(p)
        cfg = model.cfg
        params, nonzero = param_counts(p, cfg)
        test = None
        if data:
            v = cfg.vision
            dc = DataConfig(train=data, cache_dir=cache_dir, options=dict(data_options or {}))
            test = load_prepared(data, split, v.image_size, v.channels, dc, progress=False)
            if max_images:
                test = test.head(max_images)
        if test is not None:
            idx = torch.arange(min(batch_size, len(test))).numpy()
            x = to_model_input(model, test.get_batch(idx)["image"], torch.device("cpu"))  # (B, C, H, W)
            texts = list(test.captions)[: len(idx)] if getattr(test, "captions", None) else None
        else:
            x, texts = torch.randn(batch_size, cfg.vision.channels, cfg.vision.image_size, cfg.vision.image_size), None
        ids = tokenizer(texts or [f"a photo of item {i}" for i in range(x.shape[0])])  # (B, T)
        row: dict[str, Any] = {
            "model": str(p),
            "kind": kind,
            "size_mb": weight_bytes(p) / 1e6,
            "params": params,
            "nonzero_params": nonzero,
        }
        if test is not None:
            row.update(task_metrics(model, tokenizer, test, templates_for(test), batch_size))
        rows.append(row)
        models.append(model)
        inputs.append((x, ids))
    for row, speed in zip(rows, measure_speed(models, inputs, rounds)):
        row.update(speed)
        row["threads"] = torch.get_num_threads()
        row["batch_size"] = inputs[0][0].shape[0]
    base = rows[0]
    for row in rows:
        row["images_per_s_ratio"] = row["images_per_s"] / base["images_per_s"]
        row["texts_per_s_ratio"] = row["texts_per_s"] / base["texts_per_s"]
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(markdown_table(rows))
        (out / "compare.json").write_text(json.dumps(rows, indent=2))
        plot_table(rows, out / "compare.png")
    return rows


COLUMNS = [
    ("model", "model", "{}"),
    ("kind", "kind", "{}"),
    ("size_mb", "size (MB)", "{:.2f}"),
    ("params", "params", "{:,}"),
    ("nonzero_params", "non-zero", "{:,}"),
    ("images_per_s", "images/s", "{:.0f}"),
    ("images_per_s_ratio", "× img/s", "{:.2f}"),
    ("texts_per_s", "texts/s", "{:.0f}"),
    ("texts_per_s_ratio", "× txt/s", "{:.2f}"),
    ("zero_shot_top1", "zero-shot top-1", "{:.2%}"),
    ("text_to_image_R@1", "t→i R@1", "{:.2%}"),
    ("image_to_text_R@1", "i→t R@1", "{:.2%}"),
]


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    body = [[fmt.format(r[k]) if r.get(k) is not None else "–" for k, _, fmt in cols] for r in rows]
    return [h for _, h, _ in cols], body


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head, body = _cells(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    note = (
        f"\nSpeed: batch {rows[0]['batch_size']}, {rows[0]['threads']} torch/onnxruntime thread(s), CPU, one run; "
        "× columns are ratios to the first row.\n"
    )
    return "\n".join(lines) + "\n" + note


def plot_table(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head, body = _cells(rows)
    fig, ax = plt.subplots(figsize=(min(2 + 1.4 * len(head), 22), 0.9 + 0.45 * len(rows)))
    ax.axis("off")
    table = ax.table(cellText=body, colLabels=head, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(head))))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
