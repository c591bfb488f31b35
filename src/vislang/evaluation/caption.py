"""Captioning image files and scoring a captioner: BLEU, METEOR, ROUGE-L and CIDEr per decoding method, on the
held-out combinations of a dataset, with sample captions to look at. ``vislang caption`` and ``vislang caption-eval``
are thin layers over these.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.config import DataConfig
from ..data.loading import load_prepared
from ..data.rendered_text import RenderedText
from ..data.shapes import ShapesConfig, ShapesDataset
from ..data.sources import NAMED_DATASETS
from ..data.transforms import pil_to_array
from ..decoding import caption
from ..factory import from_pretrained, get_tokenizer, image_transforms
from ..inference import list_images, open_image
from .caption_metrics import (
    CAPTION_RESULTS,
    CAPTION_SAMPLES_DIR,
    DECODING_METHODS,
    NN_BASELINE,
    caption_eval,
    caption_scores,
    markdown_table,
    meteor_unavailable,
    nearest_neighbour_captions,
    reading_scores,
    shapes_references,
)
from .embed import image_batch


def _decoding(beam: int = 1, top_p: float | None = None, top_k: int | None = None, temperature: float = 1.0,
              seed: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Generation keyword arguments from CLI-style options (top-p or top-k turn sampling on)."""
    if beam != 1 and (top_p is not None or top_k is not None):
        raise ValueError("choose --beam or sampling (--top-p / --top-k), not both")
    kw: dict[str, Any] = {"beam": beam, "temperature": temperature}
    if top_p is not None or top_k is not None:
        kw.update(sample=True, top_p=1.0 if top_p is None else top_p, top_k=top_k or 0, seed=seed)
    return kw


def default_max_length(model) -> int:
    """Longest caption the model's text context holds (its begin token takes one place)."""
    return model.cfg.text.context_length - 1


def load_captioner(model_dir: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a model directory trained to caption; a dual encoder without a decoder is refused."""

    model = from_pretrained(model_dir, device)
    if getattr(model.cfg, "decoder", None) is None:
        raise ValueError(f"{model_dir} holds a dual encoder without a caption decoder; train one with --config caption")
    return model, get_tokenizer(model_dir)


def caption_files(
    model_dir: str | Path,
    images: Sequence[str | Path],
    max_length: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    use_cache: bool = True,
    **decoding: Any,
) -> list[tuple[str, str]]:
    """(path, caption) for image files or folders of images, with a model directory trained to caption."""

    model, tokenizer = load_captioner(model_dir, device)
    max_length = max_length or default_max_length(model)
    _, preprocess = image_transforms(model.cfg)
    paths = list_images(images)
    out: list[tuple[str, str]] = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        x = torch.stack([preprocess(open_image(p)) for p in chunk]).to(device)  # (B, C, H, W) normalised
        caps = caption(model, tokenizer, x, max_length=max_length, use_cache=use_cache, **decoding)
        out.extend((str(p), c) for p, c in zip(chunk, caps))
    return out


class _Subset:
    """One evaluated set of images: references per image, and its uint8 images at any (size, channels)."""

    def __init__(self, name: str, about: str, references: list[list[str]], images: Callable[[int, int], Any]):
        self.name, self.about, self.references = name, about, references
        self._images, self._cache = images, {}

    def images(self, size: int, channels: int):
        if (size, channels) not in self._cache:
            self._cache[size, channels] = self._images(size, channels)
        return self._cache[size, channels]


def _pil_images(ds) -> Callable[[int, int], torch.Tensor]:
    def convert(size: int, channels: int) -> torch.Tensor:
        import numpy as np

        arrays = [pil_to_array(ds[i][0], size, channels) for i in range(len(ds))]
        return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())  # (N, C, H, W) uint8

    return convert


def _prepared(spec: str, split: str, cache_dir: str, limit: int | None = None) -> Callable[[int, int], Any]:
    """A prepared (memory-mapped, cached) copy of ``spec``'s ``split`` at the asked size: what training reads."""

    def load(size: int, channels: int):

        ds = load_prepared(spec, split, size, channels, DataConfig(train=spec, cache_dir=cache_dir), progress=False)
        return ds.head(limit) if limit else ds

    return load


def caption_subsets(data: str, split: str, max_images: int | None, size: int, channels: int,
                    cache_dir: str) -> list[_Subset]:  # fmt: skip
    """What ``caption-eval`` scores for a dataset: for shapes the held-out images and, separately, the held-out
    colour–shape combinations (every phrasing of a scene is a reference); for rendered text the text (test words are
    never seen in training); for anything else (openclipart, a folder, a CSV...) its own caption of each image."""
    if data == "shapes":
        about = {"test": "held-out images", "val": "validation images", "train": "training images",
                 "holdout": "held-out colour-shape combinations"}  # fmt: skip
        splits = [split] + (["holdout"] if split != "holdout" else [])
        subsets = []
        for sp in splits:
            ds = ShapesDataset(sp, n=max_images, cfg=ShapesConfig())
            subsets.append(_Subset(sp, about.get(sp, sp), shapes_references(ds), _pil_images(ds)))
        return subsets
    if data == "rendered-text":
        ds = RenderedText(split if split != "holdout" else "test", n=max_images)  # rendered as `render-text` writes
        return [_Subset(ds.split, "rendered words", [[ds.caption(i)] for i in range(len(ds))], _pil_images(ds))]
    load = _prepared(data, split, cache_dir, max_images)
    first = load(size, channels)
    sub = _Subset(split, f"{data} {split} split", [[c] for c in first.captions], load)
    sub._cache[size, channels] = first
    return [sub]


def decoding_methods(methods: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """Name → ``generate`` keyword arguments of the decoding methods asked for (default all of
    ``DECODING_METHODS``), each checked to be one of them."""

    names = list(methods or DECODING_METHODS)
    unknown = [m for m in names if m not in DECODING_METHODS]
    if unknown:
        raise ValueError(f"unknown decoding method(s) {unknown}; choose from {list(DECODING_METHODS)}")
    return {m: DECODING_METHODS[m] for m in names}


def _neighbour_source(model, data: str, nn_model: str | Path | None, nn_train: str | None, cache_dir: str,
                      device: str) -> tuple[tuple[Any, Any, list[str]], str]:  # fmt: skip
    """The nearest-neighbour baseline's (embedding model, training images, their captions) and the report's note on
    it: ``nn_model`` (default the captioner) embeds ``nn_train``'s (default ``data``'s) train split."""

    nn = from_pretrained(nn_model, device) if nn_model else model
    if nn_train is None and data not in NAMED_DATASETS:  # a file or folder has no train split of its own
        raise ValueError(f"--nn-baseline on {data} needs --nn-train SPEC: the dataset the neighbours come from "
                         "(e.g. a folder written by `render-text --split train`)")  # fmt: skip
    train_spec = nn_train or data
    train = _prepared(train_spec, "train", cache_dir)(nn.cfg.vision.image_size, nn.cfg.vision.channels)
    by = "the captioner" if nn is model else nn_model
    note = (f"{NN_BASELINE}: the caption of the most similar of {len(train)} training images ({train_spec}), "
            f"by {by}'s image embedding")  # fmt: skip
    return (nn, train, list(train.captions)), note


def _score_neighbours(neighbours: tuple[Any, Any, list[str]], sub: _Subset, scores: dict[str, Any],
                      captions: dict[str, list[str]], with_meteor: bool, reading: bool,
                      device: str) -> None:  # fmt: skip
    """Add the nearest-neighbour baseline to a subset's ``scores`` and ``captions``: each image gets the caption of
    its most similar training image."""

    nn, train, train_caps = neighbours
    test = sub.images(nn.cfg.vision.image_size, nn.cfg.vision.channels)
    borrowed, _ = nearest_neighbour_captions(nn, train, train_caps, test, device=device)
    scores[NN_BASELINE] = caption_scores(borrowed, sub.references, with_meteor)
    if reading:
        scores[NN_BASELINE].update(reading_scores(borrowed, [r[0] for r in sub.references]))
    captions[NN_BASELINE] = borrowed


def evaluate_captions(
    model_dir: str | Path,
    data: str = "shapes",
    split: str = "test",
    max_images: int | None = 1000,
    max_length: int | None = None,
    device: str = "cpu",
    out: str | Path | None = None,
    with_meteor: bool = True,
    methods: Sequence[str] | None = None,
    nn_baseline: bool = False,
    nn_model: str | Path | None = None,
    nn_train: str | None = None,
    cache_dir: str = ".cache/vislang/prepared",
    samples: int = 12,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Caption metrics per decoding method (and the nearest-neighbour baseline) on held-out data, in one table.

    Writes ``captions.json``, ``captions.md`` and ``caption_samples/`` (images with their generated and reference
    captions, which ``vislang report`` shows) into ``out`` (default: ``eval/`` beside the model directory).

    Args:
        model_dir: a captioning (CoCa) model directory.
        data: ``shapes``, ``rendered-text``, ``openclipart``, or a dataset file/folder ``vislang train`` reads.
        split: the held-out split (shapes also scores its ``holdout`` split of unseen colour–shape combinations).
        methods: names from ``DECODING_METHODS`` (default all: greedy, beam3, top_p0.9).
        nn_baseline: also score the caption of each image's most similar training image.
        nn_model: the model whose image embeddings pick that neighbour (default: the captioner itself).
        nn_train: the dataset the neighbours come from (default: ``data``'s train split).
        samples: images shown with their captions in the report.
    """

    decoding = decoding_methods(methods)
    model, tokenizer = load_captioner(model_dir, device)
    max_length = max_length or default_max_length(model)
    v = model.cfg.vision
    reading = data == "rendered-text"
    subsets = caption_subsets(data, split, max_images, v.image_size, v.channels, cache_dir)
    notes = []
    if with_meteor and meteor_unavailable():
        notes.append(meteor_unavailable())

    neighbours = None
    if nn_baseline:
        neighbours, note = _neighbour_source(model, data, nn_model, nn_train, cache_dir, device)
        notes.append(note)

    table: dict[str, Any] = {}
    shown: list[dict[str, Any]] = []
    out_dir = Path(out).parent if out else Path(model_dir).resolve().parent / "eval"
    out_json = Path(out) if out else out_dir / CAPTION_RESULTS
    sample_dir = out_dir / CAPTION_SAMPLES_DIR
    for sub in subsets:
        images = sub.images(v.image_size, v.channels)
        scores, captions = caption_eval(model, tokenizer, images, sub.references, decoding, max_length, batch_size,
                                        device, with_meteor, reading)  # fmt: skip
        if neighbours is not None:
            _score_neighbours(neighbours, sub, scores, captions, with_meteor, reading, device)
        table[sub.name] = {"about": sub.about, "images": len(sub.references), "methods": scores}
        k = min(samples, len(sub.references)) if sub is subsets[0] else min(samples // 3, len(sub.references))
        shown += _write_samples(sub, images, captions, k, sample_dir, out_dir)

    results = {
        "model": str(model_dir),
        "data": data,
        "decoding": decoding,
        "max_length": max_length,
        "subsets": table,
        "notes": notes,
        "samples": shown,
    }
    write_caption_results(results, out_json)
    results["written"] = str(out_json)
    return results


def write_caption_results(results: dict[str, Any], out_json: Path) -> None:
    """``captions.json`` and, beside it, ``captions.md``: the table of every subset and method, with the notes."""

    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2))
    out_json.with_suffix(".md").write_text(markdown_table(results["subsets"], results["notes"]) + "\n")


def _write_samples(sub: _Subset, images, captions: dict[str, list[str]], k: int, sample_dir: Path,
                   out_dir: Path) -> list[dict[str, Any]]:  # fmt: skip
    """The first ``k`` images of a subset as PNGs, with every method's caption and the references."""
    from PIL import Image

    if k <= 0:
        return []
    sample_dir.mkdir(parents=True, exist_ok=True)
    pixels = image_batch(images, list(range(k))).permute(0, 2, 3, 1).numpy()  # (k, H, W, C) uint8
    rows = []
    for i in range(k):
        path = sample_dir / f"{sub.name}_{i:02d}.png"
        Image.fromarray(pixels[i].squeeze(-1) if pixels.shape[-1] == 1 else pixels[i]).save(path)
        rows.append({
            "subset": sub.name,
            "image": path.relative_to(out_dir).as_posix(),
            "references": sub.references[i],
            "captions": {m: caps[i] for m, caps in captions.items()},
        })  # fmt: skip
    return rows
