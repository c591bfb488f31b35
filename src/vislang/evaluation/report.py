"""Evaluate a trained model into ``results.json`` + PNGs, and turn a run directory into one self-contained HTML page.

``evaluate_run`` is what ``vislang eval`` and ``make demo`` call: one pass over the test images feeds zero-shot
classification, retrieval and the linear probe, so a 10,000-image test set stays within seconds on a laptop CPU.
``write_report`` reads whatever a run left behind (``metrics.jsonl``, ``eval/results.json``, ``eval/*.png``, the
config) and says "not evaluated" for what is missing; figures are embedded as base64, so the page can be mailed.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .caption_metrics import CAPTION_RESULTS, TABLE_METRICS
from .embed import embed_images, embed_images_and_features, embed_texts, image_batch, num_images
from .linear_probe import probe_eval
from .plots import plot_confusion, plot_curves, plot_per_class, read_jsonl, retrieval_gallery
from .relations import relation_flip_eval
from .retrieval import retrieval_eval
from .zero_shot import DEFAULT_TEMPLATES, Template, fill_template, zero_shot_eval

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
GALLERY_QUERIES = 6  # default number of gallery rows
# Headline keys, in display order, with the label shown for each.
HEADLINE_LABELS = {
    "zero_shot_top1": "zero-shot top-1",
    "zero_shot_top5": "zero-shot top-5",
    "text_to_image_R@1": "text→image R@1",
    "image_to_text_R@1": "image→text R@1",
    "text_to_image_R@5": "text→image R@5",
    "linear_probe_accuracy": "linear probe",
}


# --- evaluation -------------------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Arrays, tensors and NumPy scalars → plain lists and numbers, recursively, so ``json.dump`` accepts them."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def labels_of(dataset: Any) -> np.ndarray | None:
    """The dataset's labels as int64, or None when it has none or none is known (all -1)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return None
    labels = np.asarray(labels, dtype=np.int64)
    return labels if (labels >= 0).any() else None


def class_of_query(query: str, classnames: Sequence[str]) -> int | None:
    """The class a free-text query names: the longest class name it contains as whole words ("t-shirt" over "shirt")."""
    found = [
        (len(name), i)
        for i, name in enumerate(classnames)
        if re.search(rf"(?<![\w-]){re.escape(name.lower())}(?![\w-])", query.lower())
    ]
    return max(found)[1] if found else None


def to_uint8(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images for display: uint8 passes through, normalised float is mapped back with the model's mean/std."""
    if images.dtype == torch.uint8:
        return images
    v = model.cfg.vision
    mean = torch.as_tensor(v.mean, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.as_tensor(v.std, dtype=torch.float32).reshape(-1, 1, 1)
    return ((images.float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def gallery_plan(
    test_dataset: Any,
    classnames: Sequence[str] | None,
    templates: Sequence[Template],
    labels: np.ndarray | None,
    queries: Sequence[str] | None,
) -> tuple[list[str], Callable[[int, np.ndarray], np.ndarray | None]]:
    """The gallery's queries and a function (query row, retrieved indices) → correct-match flags (or None).

    Default queries are class prompts (first template) when the data has classes, else the first distinct captions.
    A retrieved image is correct when its label is the class the query names or, for a query that is one of the
    dataset's captions (and names no class), when its caption is exactly the query. Other queries have no notion of
    correct, so the gallery draws no frames rather than misleading red ones.
    """
    captions = list(getattr(test_dataset, "captions", None) or [])
    if queries is None:
        if classnames and labels is not None:
            queries = [fill_template(templates[0], c) for c in list(classnames)[:GALLERY_QUERIES]]
        else:
            queries = list(dict.fromkeys(captions))[:GALLERY_QUERIES]
    queries = list(queries)
    query_class = [class_of_query(q, classnames) if classnames and labels is not None else None for q in queries]

    caption_set = set(captions)

    def flags(row: int, idx: np.ndarray) -> np.ndarray | None:
        if query_class[row] is not None:
            return labels[idx] == query_class[row]
        if queries[row] in caption_set:
            return np.array([captions[i] == queries[row] for i in idx])
        return None

    return queries, flags


def write_gallery(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    test_dataset: Any,
    image_emb: torch.Tensor,
    queries: list[str],
    flag_fn: Callable[[int, np.ndarray], np.ndarray | None],
    path: Path,
    k: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Text→image top-k per query, drawn with :func:`retrieval_gallery`; returns the retrieved indices and flags."""
    text_emb = embed_texts(model, tokenizer, queries, device=device)  # (Q, E)
    k = min(k, image_emb.shape[0])
    scores, idx = (text_emb @ image_emb.T).topk(k, dim=1)  # (Q, k)
    flat = idx.reshape(-1).numpy()
    images = to_uint8(model, image_batch(test_dataset, flat)).cpu()  # (Q*k, C, H, W)
    images = images.reshape(len(queries), k, *images.shape[1:])  # (Q, k, C, H, W)
    rows = [flag_fn(r, idx[r].numpy()) for r in range(len(queries))]
    flags = None if any(f is None for f in rows) else np.stack(rows)
    retrieval_gallery(queries, images, scores, path, flags)
    out: dict[str, Any] = {"queries": queries, "indices": idx.tolist(), "scores": scores.tolist()}
    if flags is not None:
        out["precision_at_k"] = float(flags.mean())
    return out


def headline_of(results: dict[str, Any]) -> dict[str, float]:
    """The few numbers worth reading first, flat, from the sections of a results dict."""
    zs, rt, lp = (results.get(s) or {} for s in ("zero_shot", "retrieval", "linear_probe"))
    pairs = {
        "zero_shot_top1": zs.get("top1"),
        "zero_shot_top5": zs.get("top5"),
        "zero_shot_chance": zs.get("chance"),
        "text_to_image_R@1": rt.get("text_to_image_R@1"),
        "image_to_text_R@1": rt.get("image_to_text_R@1"),
        "text_to_image_R@5": rt.get("text_to_image_R@5"),
        "text_to_image_chance_R@1": rt.get("text_to_image_chance_R@1"),
        "linear_probe_accuracy": lp.get("accuracy"),
        "relation_flip_accuracy": (results.get("relations") or {}).get("accuracy"),
    }
    return {k: v for k, v in pairs.items() if isinstance(v, (int, float))}


def zero_shot_section(zs: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """JSON-ready zero-shot results (per-class table keyed by name) and its two figures."""
    names = zs["classnames"]
    plot_confusion(zs["confusion"], names, out_dir / "confusion.png")
    plot_per_class(
        {"precision": zs["precision"], "recall": zs["recall"], "f1": zs["f1"]},
        out_dir / "per_class.png",
        names,
        title="zero-shot per-class precision / recall / F1",
    )
    per_class = {
        name: {
            "precision": float(zs["precision"][i]),
            "recall": float(zs["recall"][i]),
            "f1": float(zs["f1"][i]),
            "support": int(zs["support"][i]),
        }
        for i, name in enumerate(names)
    }
    keep = ("top1", "top5", "macro_f1", "balanced_accuracy", "n", "templates")
    return {
        **{k: zs[k] for k in keep if k in zs},
        "chance": 1.0 / len(names),
        "per_class": per_class,
        "classnames": names,
        "confusion": to_jsonable(zs["confusion"]),
    }


@contextmanager
def timed(timing: dict[str, float], part: str) -> Iterator[None]:
    """``timing[part]``: the seconds the block took (not set when it raises)."""
    t = time.perf_counter()
    yield
    timing[part] = time.perf_counter() - t


def embed_test_images(
    model: nn.Module, test_dataset: Any, batch_size: int, device, progress: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image embeddings, tower features for the probe) of the test images, in one pass where the model has both;
    features None otherwise (the probe then embeds again)."""
    if hasattr(model, "visual") and hasattr(model, "image_proj"):
        return embed_images_and_features(model, test_dataset, batch_size, device, progress)
    return embed_images(model, test_dataset, batch_size, device, progress), None


def retrieval_sections(
    model: nn.Module, tokenizer: Callable, test_dataset: Any, image_emb: torch.Tensor, device, batch_size: int
) -> dict[str, Any]:
    """``retrieval`` (Recall@K both ways) of a captioned test set and, when some captions state a spatial relation,
    ``relations`` (does each image prefer its caption to the caption with the relation turned round)."""
    out: dict[str, Any] = {
        "retrieval": retrieval_eval(model, tokenizer, test_dataset, device, batch_size, image_emb=image_emb)
    }
    caps = list(test_dataset.captions)  # one per image: each image against its own caption, turned round
    relations = None
    if len(caps) == len(image_emb):
        relations = relation_flip_eval(model, tokenizer, caps, image_emb, device)
    if relations is not None:  # only captions that state a relation have a flipped twin
        out["relations"] = relations
    return out


def probe_skip_reason(train_dataset: Any | None, labels: Any | None) -> str | None:
    """Why the linear probe cannot run on these sets, or None when it can."""
    if train_dataset is None:
        return "no training set given"
    if labels_of(train_dataset) is None or labels is None:
        return "the training or test set has no labels"
    if len(set(np.asarray(labels).tolist())) > len(labels) // 2:
        # e.g. shapes scenes, whose label is the item's index: a probe over thousands of one-image "classes" takes
        # minutes and scores 0%
        return "the labels are per-item ids, not classes"
    return None


def evaluate_run(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    test_dataset: Any,
    out_dir: str | os.PathLike,
    classnames: Sequence[str] | None = None,
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    train_dataset: Any | None = None,
    device: str | torch.device | None = None,
    gallery_queries: list[str] | None = None,
    batch_size: int = 512,
    probe_max_train: int | None = 20000,
    gallery_k: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Zero-shot, retrieval and (with ``train_dataset``) linear-probe evaluation; writes results.json and PNGs.

    Each part runs when the data allows it and is otherwise recorded as skipped with the reason: zero-shot needs
    class names and labels, retrieval needs captions, the probe needs a labelled training set.

    Args:
        model: a trained dual encoder.
        tokenizer: its tokenizer.
        test_dataset: a prepared dataset (``get_batch``, ``labels``, ``classnames``, ``captions``).
        out_dir: where ``results.json``, ``confusion.png``, ``per_class.png`` and ``gallery.png`` go.
        classnames: class names for zero-shot prompts; default ``test_dataset.classnames``.
        templates: zero-shot prompt templates (ensembled).
        train_dataset: labelled training images for the linear probe; None = no probe.
        device: where to run; None = the model's device.
        gallery_queries: texts for the retrieval gallery; default class prompts or the first distinct captions.
        batch_size: images per forward pass.
        probe_max_train: training images used by the probe (random subsample; None = all).
        gallery_k: images per gallery row.
        progress: show progress bars.

    Returns:
        The dict written to results.json: ``headline``, ``zero_shot``, ``retrieval``, ``linear_probe``, ``gallery``,
        ``skipped`` (part → reason), ``n_test`` and ``timing_s``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classnames = list(classnames if classnames is not None else (getattr(test_dataset, "classnames", None) or []))
    labels = labels_of(test_dataset)
    results: dict[str, Any] = {"n_test": num_images(test_dataset), "skipped": {}, "timing_s": {}}
    timing = results["timing_s"]

    with timed(timing, "embed_images"):
        image_emb, test_feats = embed_test_images(model, test_dataset, batch_size, device, progress)
    with timed(timing, "zero_shot"):
        if not classnames or labels is None:
            results["skipped"]["zero_shot"] = "the test set has no class names or labels"
        else:
            zs = zero_shot_eval(
                model, tokenizer, test_dataset, classnames, templates, device, batch_size, labels, image_emb
            )
            results["zero_shot"] = zero_shot_section(zs, out)
    with timed(timing, "retrieval"):
        if not getattr(test_dataset, "captions", None):
            results["skipped"]["retrieval"] = "the test set has no captions"
        else:
            results.update(retrieval_sections(model, tokenizer, test_dataset, image_emb, device, batch_size))
    with timed(timing, "gallery"):
        queries, flag_fn = gallery_plan(test_dataset, classnames, templates, labels, gallery_queries)
        if queries:
            results["gallery"] = write_gallery(
                model, tokenizer, test_dataset, image_emb, queries, flag_fn, out / "gallery.png", gallery_k, device
            )
        else:
            results["skipped"]["gallery"] = "no gallery queries (no class names and no captions)"
    with timed(timing, "linear_probe"):
        if why_not := probe_skip_reason(train_dataset, labels):
            results["skipped"]["linear_probe"] = why_not
        else:
            results["linear_probe"] = probe_eval(
                model, train_dataset, test_dataset, device, batch_size, probe_max_train, test_feats, progress=progress
            )

    results = to_jsonable({"headline": headline_of(results), **results})
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    return results


# --- HTML report ------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.1em} .sub{color:#666;margin-top:0} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #ddd;border-radius:8px;padding:.6em 1em;min-width:9em}
.card .v{font-size:1.7em;font-weight:600} .card .k{color:#555;font-size:.85em} .card .c{color:#888;font-size:.75em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:.25em .6em}
th{background:#f5f5f5;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee} .missing{color:#999;font-style:italic}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:.8em}
.sample{border:1px solid #ddd;border-radius:8px;padding:.5em;font-size:.82em;overflow-wrap:anywhere}
.sample img{width:96px;height:96px;image-rendering:pixelated;float:left;margin:0 .6em .3em 0;border:0}
.sample .m{color:#555} .sample .ref{color:#777;clear:both;padding-top:.2em} .sample .sub{color:#999;font-size:.9em}
"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def fmt(value: Any) -> str:
    """Numbers as read in a table: integers whole, floats to four significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def missing(what: str = "not evaluated") -> str:
    return f'<p class="missing">{esc(what)}</p>'


def img_tag(png: Path, alt: str) -> str:
    """An <img> with the PNG embedded as base64, so the page needs no files beside it."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<p><img alt="{esc(alt)}" src="data:image/png;base64,{data}"></p>'


def cell(value: Any) -> str:
    """A table cell; numbers right-aligned."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="n">{fmt(value)}</td>'
    return f"<td>{esc(value)}</td>"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def flatten_numbers(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, number) for every numeric leaf of a nested dict; lists are skipped (matrices, indices)."""
    if isinstance(obj, dict):
        return [pair for k, v in obj.items() for pair in flatten_numbers(v, f"{prefix}{k}.")]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [(prefix[:-1], obj)]
    return []


def read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(data, None), or (None, why) when the file is missing or unreadable."""
    if not path.is_file():
        return None, f"{path.name} not found"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"could not read {path.name}: {e}"
    return (data, None) if isinstance(data, dict) else (None, f"{path.name} does not hold a JSON object")


def training_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """Last step, last loss, median throughput and final temperature from the training log."""
    train = [r for r in records if isinstance(r.get("loss"), (int, float))]
    if not train:
        return {}
    last = train[-1]
    out = {"steps": last.get("step"), "final loss": last.get("loss"), "epochs": last.get("epoch")}
    speeds = [r["samples_per_s"] for r in train if isinstance(r.get("samples_per_s"), (int, float))]
    if speeds:
        out["samples/s (median)"] = float(np.median(speeds))
    if isinstance(last.get("logit_scale"), (int, float)):
        out["logit scale"] = last["logit_scale"]
    return {k: v for k, v in out.items() if isinstance(v, (int, float))}


def last_eval(records: list[dict[str, Any]]) -> dict[str, float]:
    """The most recent value of each ``eval/...`` metric in the training log (for runs never given ``vislang eval``)."""
    latest: dict[str, float] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("eval/") and isinstance(v, (int, float)):
                latest[k.removeprefix("eval/")] = v
    return latest


def card(value_html: str, label: str, note_html: str = "") -> str:
    return f'<div class="card"><div class="v">{value_html}</div><div class="k">{esc(label)}</div>{note_html}</div>'


CAPTION_SCALE_METRICS = ("CIDEr",)  # caption metrics that are not fractions (CIDEr-D runs 0..10): shown as numbers
CAPTION_CARDS = ("BLEU-4", "CIDEr")  # caption metrics worth a headline card


def caption_cards(captions: dict[str, Any] | None) -> list[str]:
    """Headline cards from ``caption-eval``: BLEU-4 and CIDEr of the first subset's best-CIDEr decoding method."""
    subsets = (captions or {}).get("subsets")
    if not isinstance(subsets, dict) or not subsets:
        return []
    name, first = next(iter(subsets.items()))
    methods = {k: m for k, m in (first.get("methods") or {}).items() if isinstance(m, dict) and k != "nn_baseline"}
    if not methods:
        return []
    best = max(methods, key=lambda k: methods[k].get("CIDEr", float("-inf")))
    cards = []
    for key in CAPTION_CARDS:
        value = methods[best].get(key)
        if isinstance(value, (int, float)):
            base = (first.get("methods") or {}).get("nn_baseline", {}).get(key)
            note = f"{best}, {name}" + (f"; nearest-neighbour {fmt(base)}" if isinstance(base, (int, float)) else "")
            cards.append(card(fmt(value), f"caption {key}", f'<div class="c">{esc(note)}</div>'))
    return cards


def headline_html(
    headline: dict[str, Any], records: list[dict[str, Any]], captions: dict[str, Any] | None = None
) -> str:
    cards = caption_cards(captions)
    for key, label in HEADLINE_LABELS.items():
        if isinstance(headline.get(key), (int, float)):
            chance = None
            if key.startswith("zero_shot") and key.endswith("top1"):
                chance = headline.get("zero_shot_chance")
            elif key == "text_to_image_R@1":
                chance = headline.get("text_to_image_chance_R@1")
            note = f'<div class="c">chance {pct(chance)}</div>' if isinstance(chance, (int, float)) else ""
            cards.append(card(pct(headline[key]), label, note))
    if not cards:
        periodic = last_eval(records)
        for key, value in periodic.items():
            text = pct(value) if 0 <= value <= 1 and key not in CAPTION_SCALE_METRICS else fmt(value)
            cards.append(card(text, key, '<div class="c">last periodic eval</div>'))
    for key, value in training_summary(records).items():
        cards.append(card(fmt(value), key))
    if not cards:
        return missing("not evaluated and no training log")
    evaluated = headline or last_eval(records) or captions
    prefix = "" if evaluated else missing("not evaluated: run `vislang eval` for test numbers")
    return prefix + f'<div class="cards">{"".join(cards)}</div>'


def curves_html(metrics_path: Path) -> str:
    if not metrics_path.is_file():
        return missing("no metrics.jsonl (no training log)")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_curves(metrics_path, Path(tmp) / "curves.png")
        return img_tag(png, "training curves") if png else missing("metrics.jsonl has no loss, lr or GAN loss values")


def zero_shot_html(zs: dict[str, Any] | None, eval_dir: Path, shown: set[str]) -> str:
    if not zs:
        return missing()
    parts = [
        table(
            [[k, zs[k]] for k in ("top1", "top5", "macro_f1", "balanced_accuracy", "chance", "n") if k in zs],
            ["metric", "value"],
        )
    ]
    if zs.get("templates"):
        parts.append(f"<p>prompt templates (ensembled): {esc(' | '.join(map(str, zs['templates'])))}</p>")
    for name, alt in (("confusion.png", "confusion matrix"), ("per_class.png", "per-class scores")):
        if (eval_dir / name).is_file():
            parts.append(img_tag(eval_dir / name, alt))
            shown.add(name)
    per_class = zs.get("per_class")
    if isinstance(per_class, dict) and per_class:
        cols = ("precision", "recall", "f1", "support")
        rows = [[name, *(m.get(k, "") for k in cols)] for name, m in per_class.items() if isinstance(m, dict)]
        parts.append(table(rows, ["class", "precision", "recall", "F1", "support"]))
    return "".join(parts)


def retrieval_html(rt: dict[str, Any] | None, gallery: dict[str, Any] | None, eval_dir: Path, shown: set[str]) -> str:
    parts = []
    if rt:
        ks = sorted({int(m.group(1)) for k in rt if (m := re.fullmatch(r"text_to_image_R@(\d+)", k))})
        rows = [
            [f"{d} R@{k}", rt.get(f"{d}_R@{k}"), rt.get(f"{d}_chance_R@{k}")]
            for d in ("text_to_image", "image_to_text")
            for k in ks
            if f"{d}_R@{k}" in rt
        ]
        parts.append(table(rows, ["metric", "value", "chance"]))
        if rt.get("images_per_caption", 1) > 1.01:
            parts.append(
                f"<p>Captions repeat ({fmt(rt['unique_captions'])} distinct captions, "
                f"{fmt(rt['images_per_caption'])} images each on average): a text query counts as found when an image "
                "with exactly that caption is retrieved, so read these against the chance column.</p>"
            )
    else:
        parts.append(missing())
    if (eval_dir / "gallery.png").is_file():
        if gallery and isinstance(gallery.get("precision_at_k"), (int, float)):
            parts.append(f"<p>gallery precision of the shown images: {pct(gallery['precision_at_k'])}</p>")
        parts.append(img_tag(eval_dir / "gallery.png", "retrieval gallery"))
        shown.add("gallery.png")
    return "".join(parts)


def probe_html(lp: dict[str, Any] | None) -> str:
    if not lp:
        return missing()
    rows = [[k, lp[k]] for k in ("accuracy", "C", "n_train", "n_test", "converged") if k in lp]
    return table(rows, ["metric", "value"])


def caption_html(captions: dict[str, Any] | None, why: str | None, eval_dir: Path, samples: int = 12) -> str:
    """The ``caption-eval`` table (a row per subset and decoding method) and a grid of sample images, each with the
    caption every method wrote and its references."""
    if not captions:
        return missing(f"not evaluated ({why}): run `vislang caption-eval --model RUN_DIR/model`")
    subsets = captions.get("subsets") or {}
    rows = [
        (name, part.get("images"), method, m)
        for name, part in subsets.items()
        if isinstance(part, dict)
        for method, m in (part.get("methods") or {}).items()
        if isinstance(m, dict)
    ]
    cols = [c for c in TABLE_METRICS if any(c in m for *_, m in rows)]
    about = "; ".join(f"{esc(n)}: {esc(p.get('about', ''))}" for n, p in subsets.items() if isinstance(p, dict))
    parts = [f"<p>{about}</p>" if about else ""]
    parts.append(table([[n, k, method, *(m.get(c, "") for c in cols)] for n, k, method, m in rows],
                       ["subset", "images", "method", *cols]))  # fmt: skip
    parts += [f"<p>{esc(note)}</p>" for note in captions.get("notes") or []]
    cards = []
    for sample in (captions.get("samples") or [])[:samples]:
        if not isinstance(sample, dict):
            continue
        png = eval_dir / str(sample.get("image", ""))
        img = (
            f'<img alt="sample" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode("ascii")}">'
            if png.is_file() and png.suffix == ".png"
            else '<span class="missing">image missing</span>'
        )
        gen = "".join(
            f'<div><span class="m">{esc(method)}:</span> {esc(text)}</div>'
            for method, text in (sample.get("captions") or {}).items()
        )
        refs = [str(r) for r in sample.get("references") or []]
        more = f" (+{len(refs) - 2} more)" if len(refs) > 2 else ""
        ref = f'<div class="ref">reference: {esc(" | ".join(refs[:2]))}{esc(more)}</div>' if refs else ""
        cards.append(f'<div class="sample">{img}<div class="sub">{esc(sample.get("subset", ""))}</div>{gen}{ref}</div>')
    if cards:
        parts.append(f'<h3>Sample captions</h3><div class="grid">{"".join(cards)}</div>')
    return "".join(parts)


def config_html(run_dir: Path) -> str:
    for name in ("config.yaml", "config.yml", "config.json", "model/config.json"):
        p = run_dir / name
        if p.is_file():
            return f"<p>{esc(name)}</p><pre>{esc(p.read_text())}</pre>"
    return missing("no config file in the run directory")


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.html`` from what the run directory holds; missing parts are marked, never fatal.

    Reads ``metrics.jsonl`` (training and periodic-eval lines), ``eval/results.json`` (from :func:`evaluate_run`
    or any nested dict of metrics), ``eval/captions.json`` (from ``vislang caption-eval``: metrics per decoding
    method and sample captions), every PNG in ``eval/`` and ``config.yaml``/``config.json``.

    Returns:
        The path of the report.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a directory; pass the run directory (the training out_dir)")
    eval_dir = run / "eval"
    metrics_path = run / "metrics.jsonl"
    records = read_jsonl(metrics_path) if metrics_path.is_file() else []
    results, why = read_json(eval_dir / RESULTS_FILE)
    results = results or {}
    headline = results.get("headline") if isinstance(results.get("headline"), dict) else headline_of(results)
    shown: set[str] = set()
    captions, captions_why = read_json(eval_dir / CAPTION_RESULTS)
    captioning = captions is not None or any("caption_loss" in r for r in records)

    sections = [
        ("Headline", headline_html(headline, records, captions)),
        ("Training curves", curves_html(metrics_path)),
        ("Zero-shot classification", zero_shot_html(results.get("zero_shot"), eval_dir, shown)),
        ("Retrieval", retrieval_html(results.get("retrieval"), results.get("gallery"), eval_dir, shown)),
        ("Linear probe", probe_html(results.get("linear_probe"))),
    ]
    if captioning:  # caption runs only: a dual encoder's report has no use for an empty captioning section
        sections.insert(2, ("Captioning", caption_html(captions, captions_why, eval_dir)))
    if results.get("skipped"):
        sections.append(("Skipped", table(list(results["skipped"].items()), ["part", "reason"])))
    numbers = flatten_numbers({k: v for k, v in results.items() if k not in ("headline", "gallery")})
    sections.append(
        ("All numbers", table(numbers, ["metric", "value"]) if numbers else missing(why or "not evaluated"))
    )
    extra = sorted(p for p in eval_dir.glob("*.png") if p.name not in shown) if eval_dir.is_dir() else []
    if extra:
        sections.append(("More figures", "".join(f"<h3>{esc(p.stem)}</h3>{img_tag(p, p.stem)}" for p in extra)))
    sections.append(("Config", config_html(run)))

    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "".join(f"<h2>{esc(title)}</h2>{content}" for title, content in sections)
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>vislang report: {esc(run.name)}</title>'
        f"<style>{CSS}</style></head><body><h1>vislang report: {esc(run.name)}</h1>"
        f'<p class="sub">{esc(run.resolve())} · generated {stamp}</p>{body}</body></html>\n'
    )
    path = run / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path
