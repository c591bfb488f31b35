"""``vislang compare``: size, parameters, speed and task metrics of several models in one table (markdown + PNG).

Speed is measured in one run, in rounds (A B C, A B C, ...) so that a change of load on the machine reaches every
model, at the same batch size for all; images/s and texts/s are the batch size over the median batch time. The ratios
to the first model are paired: each round gives one ratio of the models timed back to back, and the table shows
their median with the interquartile range, because on a shared machine the absolute speed drifts between rounds by
more than the differences being measured, while models timed within one round see the same load. Models can be any
model directory (fp32, pruned, distilled, int8) or an ONNX export (run by onnxruntime).

Task metrics follow the model family: zero-shot top-1 and retrieval for dual encoders and captioners, plus CIDEr-D of
greedy captions for captioners (on ``caption_images`` test images, every phrasing of a shapes scene a reference), and
VQA accuracy for VQA models (``data`` = ``shapes`` scenes or a VQA file; images/s and texts/s are then the image and
question towers).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from ..data.config import DataConfig
from ..data.loading import load_prepared
from ..data.shapes import ShapesDataset
from ..data.transforms import normalize, pil_to_array
from ..data.vqa import read_vqa_file, shapes_vqa
from ..evaluation.caption_metrics import caption_scores, generate_captions, shapes_references
from ..evaluation.embed import embed_images, to_model_input
from ..evaluation.retrieval import retrieval_eval
from ..evaluation.run import templates_for
from ..evaluation.vqa import evaluate_vqa
from ..evaluation.zero_shot import zero_shot_eval
from ..factory import get_tokenizer
from ..models.onnx_runtime import OnnxCLIP, is_onnx_dir
from ..registry import build_from_meta
from .compare_gan import compare_generators, is_generator_path
from .measure import interleaved_times, paired_ratios, weight_bytes
from .quantize import load_model, model_family, read_meta


def _load(path: Path):
    """(model, tokenizer, kind, config meta) of a model directory or an ONNX export."""

    if is_onnx_dir(path):
        model, kind = OnnxCLIP(path), "onnx"
        meta = json.loads((path / "config.json").read_text())
    else:
        meta = read_meta(path)
        model, kind = load_model(path), (meta.get("compression") or {}).get("method", "fp32")
    return model, get_tokenizer(path), kind, meta


def param_counts(path: Path, meta: dict[str, Any]) -> tuple[int, int | None]:
    """(parameters of the fp32 architecture, non-zero stored weight values or None for ONNX).

    A static int8 tower stores its convolutions with BatchNorm folded in (weights and biases only), so its non-zero
    count is the folded model's.
    """

    fp32 = build_from_meta(meta, path)
    names = {n for n, _ in fp32.named_parameters()}
    total = sum(p.numel() for p in fp32.parameters())
    f = path / "model.safetensors"
    if not f.is_file():
        return total, None
    from safetensors import safe_open

    static = tuple(f"{s}." for s in (meta.get("compression") or {}).get("static", []))
    nonzero = 0
    with safe_open(str(f), "pt") as st:
        for k in st.keys():
            if k in names or (static and k.startswith(static) and k.endswith((".weight", ".bias"))):
                nonzero += int((st.get_tensor(k) != 0).sum())
    return total, nonzero


@torch.inference_mode()
def measure_speed(
    models: list[Any], inputs: list[tuple[torch.Tensor, torch.Tensor]], rounds: int = 5, calls: int = 2
) -> list[dict[str, float]]:
    """images/s and texts/s of each model on its (images, ids) batch, timed in interleaved rounds after a warmup,
    and the paired ratios to the first model (``paired_ratios``)."""
    for m in models:
        m.eval()
    work = [{"image": functools.partial(m.encode_image, x), "text": functools.partial(m.encode_text, ids)}
            for m, (x, ids) in zip(models, inputs)]  # fmt: skip
    times = interleaved_times(work, rounds, calls)
    rows = []
    for inp, t in zip(inputs, times):
        row = {
            "images_per_s": inp[0].shape[0] / statistics.median(t["image"]),
            "texts_per_s": inp[1].shape[0] / statistics.median(t["text"]),
        }
        for key, col, k in (("image", "images_per_s", 0), ("text", "texts_per_s", 1)):
            ratio = paired_ratios(times[0][key], t[key], inputs[0][k].shape[0], inp[k].shape[0])
            row[f"{col}_ratio"], row[f"{col}_ratio_iqr"] = ratio["median"], ratio["iqr"]
        rows.append(row)
    return rows


def batch_of(x: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images and texts of a timing batch, the batch repeated where ``n`` is larger."""
    if n < 1:
        raise ValueError(f"batch size {n} must be at least 1")
    reps = -(-n // x.shape[0])  # ceil; images and texts of a timing batch are equally many
    return x.repeat(reps, *[1] * (x.dim() - 1))[:n], ids.repeat(reps, 1)[:n]


def speed_by_batch(
    models: list[Any], inputs: list[tuple[torch.Tensor, torch.Tensor]], sizes: list[int], rounds: int = 5
) -> list[dict[int, dict[str, float]]]:
    """:func:`measure_speed` at each batch size in ``sizes``: per model, {size: images/s, texts/s and ratios}.

    Why: what quantisation buys depends on the batch. One image at a time, a Linear layer's time goes to reading its
    weights, which int8 makes 4x smaller; at a few hundred images the arithmetic dominates, where int8 on a CPU
    without VNNI gains less. A server answering single queries and an indexing job see different ratios.
    """
    out: list[dict[int, dict[str, float]]] = [{} for _ in models]
    for n in sizes:
        for per_model, speed in zip(out, measure_speed(models, [batch_of(x, ids, n) for x, ids in inputs], rounds)):
            per_model[n] = speed
    return out


def task_metrics(model, tokenizer, test, templates, batch_size: int = 256) -> dict[str, float]:
    """Zero-shot top-1 (labelled data) and retrieval R@1/R@5 (captioned data) on ``test``."""

    out: dict[str, float] = {}
    emb = embed_images(model, test, batch_size)
    if getattr(test, "classnames", None) and getattr(test, "labels", None) is not None:
        zs = zero_shot_eval(model, tokenizer, test, templates=templates, image_emb=emb)
        out["zero_shot_top1"] = zs["top1"]
    if getattr(test, "captions", None):
        rt = retrieval_eval(model, tokenizer, test, image_emb=emb)
        out.update({k: rt[k] for k in ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1")})
    return out


@torch.inference_mode()
def caption_cider(
    model,
    tokenizer,
    data: str,
    split: str = "test",
    n: int = 200,
    cache_dir: str = ".cache/vislang/prepared",
    data_options: dict[str, Any] | None = None,
    batch_size: int = 256,
) -> float:
    """CIDEr-D of greedy captions of the first ``n`` test images: shapes scenes against all their phrasings, any other
    data set against its own caption."""
    import numpy as np

    v = model.cfg.vision
    if data == "shapes":
        opts = dict(data_options or {})
        ds = ShapesDataset(split, n=min(n, opts.pop("n", n)), **opts)
        refs = shapes_references(ds)
        arrays = np.stack([pil_to_array(ds[i][0], v.image_size, v.channels) for i in range(len(ds))])
        images = torch.from_numpy(arrays.transpose(0, 3, 1, 2).copy())  # (N, C, H, W) uint8
    else:
        dc = DataConfig(train=data, cache_dir=cache_dir, options=dict(data_options or {}))
        test = load_prepared(data, split, v.image_size, v.channels, dc, progress=False).head(n)
        images = test.get_batch(np.arange(len(test)))["image"]
        refs = [[c] for c in test.captions]
    caps = generate_captions(model, tokenizer, images, batch_size, max_length=model.cfg.text.context_length - 1)
    return caption_scores(caps, refs, with_meteor=False)["CIDEr"]


def vqa_rows(model, tokenizer, answers: list[str], data: str, n: int, batch_size: int):
    """(VQA metrics, speed inputs) of a VQA model on ``n`` test scenes of shapes or a VQA file."""

    v = model.cfg.vision
    if data == "shapes":
        test = shapes_vqa("test", n, v.image_size)
    elif Path(data).is_file():
        test = read_vqa_file(data, v.image_size, v.channels)
    else:
        raise ValueError(f"a VQA model is evaluated on --data shapes or a VQA file (JSONL/CSV), got {data!r}")
    acc = evaluate_vqa(model, test, tokenizer, answers)
    k = min(batch_size, len(test.images))
    x = normalize(torch.from_numpy(test.images[:k]).permute(0, 3, 1, 2), v.mean, v.std)  # (B, C, H, W)
    return {"vqa_accuracy": acc["overall"]}, (x, tokenizer(test.questions[:batch_size]))


def model_row(
    p: Path,
    data: str | None,
    split: str,
    max_images: int | None,
    batch_size: int,
    cache_dir: str,
    data_options: dict[str, Any] | None,
    caption_images: int,
) -> tuple[dict[str, Any], Any, tuple[torch.Tensor, torch.Tensor]]:
    """(row, model, speed inputs) of one model directory: its size and parameters, and its task metrics on ``data``
    (none when ``data`` is None); the inputs are a batch of its test images (random ones without data) and texts."""

    model, tokenizer, kind, meta = _load(p)
    family = model_family(meta)
    cfg = model.cfg
    params, nonzero = param_counts(p, meta)
    row: dict[str, Any] = {
        "model": str(p),
        "kind": kind,
        "family": family,
        "size_mb": weight_bytes(p) / 1e6,
        "params": params,
        "nonzero_params": nonzero,
    }
    if family == "vqa":
        answers = json.loads((p / "answers.json").read_text())
        metrics, (x, ids) = vqa_rows(model, tokenizer, answers, data or "shapes", max_images or 300, batch_size)
        row.update(metrics if data else {})
        return row, model, (x, ids)
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
    if test is not None:
        row.update(task_metrics(model, tokenizer, test, templates_for(test), batch_size))
        if family == "captioner" and hasattr(model, "generate"):  # an ONNX export has the towers only
            n = min(caption_images, max_images or caption_images)
            row["cider"] = caption_cider(model, tokenizer, data, split, n, cache_dir, data_options, batch_size)
    return row, model, (x, ids)


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
    caption_images: int = 200,
    speed_batches: list[int] | None = None,
    judge: str | None = None,
) -> list[dict[str, Any]]:
    """One row per model: size, parameters, non-zero parameters, images/s, texts/s and task metrics on ``data``;
    with ``speed_batches``, also images/s and texts/s at each of those batch sizes (``row["speed_by_batch"]``).

    With ``out_dir``, writes ``compare.md``, ``compare.png`` and ``compare.json`` there (and ``speed_by_batch.png``).
    Text-to-image generators are compared with each other only (:mod:`vislang.compress.compare_gan`): images drawn
    per second and FID-FM under the classifier ``judge``.
    """
    if speed_batches and min(speed_batches) < 1:
        raise ValueError(f"--speed-batches {speed_batches}: every batch size must be at least 1")
    if len(paths) < 1:
        raise ValueError("give at least one model directory to compare")
    gans = [is_generator_path(p) for p in paths]
    if any(gans):
        if not all(gans):
            odd = [str(p) for p, g in zip(paths, gans) if not g]
            raise ValueError(f"compare generators with generators: {', '.join(odd)} are not text-to-image GANs")
        rows = compare_generators(list(map(Path, paths)), data, judge, max_images, batch_size, rounds, speed_batches)
        if out_dir:
            write_outputs(rows, Path(out_dir), bool(speed_batches))
        return rows
    rows, models, inputs = [], [], []
    for p in map(Path, paths):
        row, model, x_ids = model_row(p, data, split, max_images, batch_size, cache_dir, data_options, caption_images)
        rows.append(row)
        models.append(model)
        inputs.append(x_ids)
    for row, speed in zip(rows, measure_speed(models, inputs, rounds)):
        row.update(speed)
        row["threads"] = torch.get_num_threads()
        row["batch_size"] = inputs[0][0].shape[0]
    if speed_batches:
        for row, by_batch in zip(rows, speed_by_batch(models, inputs, sorted(set(speed_batches)), rounds)):
            row["speed_by_batch"] = by_batch
    if out_dir:
        write_outputs(rows, Path(out_dir), bool(speed_batches))
    return rows


def write_outputs(rows: list[dict[str, Any]], out: Path, by_batch: bool) -> None:
    """``compare.md``, ``compare.json`` and ``compare.png`` (and ``speed_by_batch.png``) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown_table(rows))
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    plot_table(rows, out / "compare.png")
    if by_batch:
        plot_speed_by_batch(rows, out / "speed_by_batch.png")


COLUMNS = [
    ("model", "model", "{}"),
    ("kind", "kind", "{}"),
    ("size_mb", "size (MB)", "{:.2f}"),
    ("params", "params", "{:,}"),
    ("nonzero_params", "non-zero", "{:,}"),
    ("images_per_s", "images/s", "{:.0f}"),
    ("images_per_s_ratio", "× img/s", "{:.2f}"),
    ("images_per_s_ratio_iqr", "IQR", "{0[0]:.2f}–{0[1]:.2f}"),
    ("texts_per_s", "texts/s", "{:.0f}"),
    ("texts_per_s_ratio", "× txt/s", "{:.2f}"),
    ("texts_per_s_ratio_iqr", "IQR", "{0[0]:.2f}–{0[1]:.2f}"),
    ("zero_shot_top1", "zero-shot top-1", "{:.2%}"),
    ("cider", "CIDEr", "{:.3f}"),
    ("vqa_accuracy", "VQA acc.", "{:.2%}"),
    ("fid_fm", "FID-FM", "{:.3f}"),
    ("kid_fm", "KID-FM", "{:.4f}"),
    ("class_consistency", "class consistency", "{:.1%}"),
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
        "× columns are ratios to the first row, each the median of per-round paired ratios, IQR their quartiles.\n"
    )
    if rows[0].get("family") == "generator":
        note += (
            "Generators: images/s = images drawn from noise and text embeddings; FID-FM and class consistency by "
            "`vislang generate-eval`'s protocol, the same noise for every model.\n"
        )
    return "\n".join(lines) + "\n" + note + batch_table(rows)


def batch_table(rows: list[dict[str, Any]]) -> str:
    """images/s (and the ratio to the first model) at each batch size of ``speed_by_batch``; "" when not measured."""
    sizes = sorted({n for r in rows for n in r.get("speed_by_batch", {})})
    if not sizes:
        return ""
    cols = [c for c in ("images_per_s", "texts_per_s") if c in rows[0]["speed_by_batch"][sizes[0]]]  # GANs: images
    short = {"images_per_s": "img/s", "texts_per_s": "txt/s"}
    head = ["model", *(f"{short[c]} @{n}" for c in cols for n in sizes)]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, r in enumerate(rows):
        cells = [r["model"]]
        for col in cols:
            for n in sizes:
                s = r["speed_by_batch"][n]
                cells.append(f"{s[col]:.0f}" + ("" if i == 0 else f" ({s[col + '_ratio']:.2f}×)"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nBy batch size: (×) is the median paired ratio to the first row at that size.\n"


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


def plot_speed_by_batch(rows: list[dict[str, Any]], path: Path) -> None:
    """images/s and texts/s against batch size (log-log), one line per model: where the ratios change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = rows[0]["speed_by_batch"][min(rows[0]["speed_by_batch"])]
    panels = [(c, t) for c, t in (("images_per_s", "images/s"), ("texts_per_s", "texts/s")) if c in first]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = axes[0]
    for ax, (col, title) in zip(axes, panels):
        for r in rows:
            sizes = sorted(r["speed_by_batch"])
            ax.plot(sizes, [r["speed_by_batch"][n][col] for n in sizes], marker="o", label=Path(r["model"]).name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
