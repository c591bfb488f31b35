"""Shapes with held-out colour–shape pairs: does text→image retrieval find combinations never seen in training?

Trains the packaged ``shapes`` run config (``src/vislang/configs/shapes.yaml``: a small ``shapes-cnn``, ~5 CPU
minutes) with ``vislang.train.train``, loads the saved model directory and measures text→image R@1/5/10 against
chance on four query sets:

(a) ``test``: the ordinary test split (1,000 scenes of 1–4 objects, held-out pairs never present), each scene's own
    caption as query; identical captions are merged into one query whose relevant images are all images with that
    exact caption (the ``vislang eval`` convention).
(b) ``holdout``: the holdout split (1,000 scenes, every one holding at least one held-out pair; half of them alone,
    half among other objects), same protocol as (a).
(c) ``single seen``: the captions of the test split's single-object scenes ("a large orange star", "one object: a
    green circle", ...), distinct captions only, ranked against a balanced gallery of single-object scenes (20 per
    colour–shape pair of the world, all 24 pairs, 480 images, rendered freshly). An image is relevant when its object
    has the caption's colour and shape, and its size when the caption names one.
(d) ``single held-out``: the same with the captions of the holdout split's single-object scenes, i.e. only the five
    held-out pairs, against the same gallery. (c) and (d) differ only in whether the pair was seen in training;
    the gallery holds, for every held-out "red triangle", red objects of other shapes and triangles of other colours,
    so a query hits at rank 1 only if colour and shape are composed, not matched one at a time.

Chance is the hit rate of a random ranking for each query set (``k/N`` when a query has one relevant image; more when
it has several, as in (c)/(d)). A last pair of rows classifies each gallery image among the 24 "a {colour} {shape}"
captions (image→text top-1, chance 1/24), split into images of seen and of held-out pairs.

Usage::

    python examples/shapes_holdout.py                     # train runs/shapes (≈5 min), then evaluate
    python examples/shapes_holdout.py --threads 1         # one torch thread: much faster on a busy, shared CPU
    python examples/shapes_holdout.py --eval-only         # evaluate an existing runs/shapes/model
    python examples/shapes_holdout.py --epochs=2          # any run-config override, as for `vislang train`
    python examples/shapes_holdout.py --smoke             # seconds: a tiny model on 128 scenes (used by tests)

The table is printed and written to ``<out_dir>/holdout.json`` (``runs/shapes/holdout.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vislang  # noqa: E402
from vislang.data import (  # noqa: E402
    ShapesDataset,
    pil_to_array,
    render,
    single_object_caption,
)
from vislang.data.shapes import single_object_scene  # noqa: E402
from vislang.evaluation import dedupe_captions, embed_images, embed_texts, retrieval_metrics  # noqa: E402
from vislang.train import load_train_config, train  # noqa: E402

CONFIG = Path(vislang.__file__).parent / "configs" / "shapes.yaml"
KS = (1, 5, 10)
SMOKE_OVERRIDES = {
    "model": {
        "embed_dim": 32,
        "vision": {"width": 8, "depth": 2},
        "text": {"width": 32, "layers": 1, "heads": 2, "vocab_size": 300},
    },
    "data": {"max_train": 128, "options": {"n": 128}},
    "epochs": 1,
    "time_budget_min": None,
    "batch_size": 32,
    "log_every": 4,
    "eval_max": 64,
    "progress": False,
}


@dataclass
class QuerySet:
    """Text queries, each with its relevant gallery images, ranked against one gallery of images."""

    name: str
    description: str
    texts: list[str]
    relevant: list[np.ndarray]  # per text, gallery indices of its relevant images
    gallery: str  # key of the gallery (image tensor) it is ranked against


def scenes_and_images(ds: ShapesDataset, size: int, channels: int) -> tuple[list, list[str], torch.Tensor]:
    """Every scene of a split, its caption and its image as the model sees it (uint8 (N, C, H, W))."""
    scenes, captions, images = [], [], []
    for i in range(len(ds)):
        scene, caption = ds.scene_and_caption(i)
        scenes.append(scene)
        captions.append(caption)
        images.append(pil_to_array(render(scene), size, channels))  # the same pixels `vislang prepare` stores
    return scenes, captions, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def own_caption_queries(name: str, description: str, captions: list[str]) -> QuerySet:
    """Each distinct caption of a split as one query; relevant = the images that carry exactly that caption."""
    texts, relevant = dedupe_captions(captions)
    return QuerySet(name, description, texts, relevant, gallery=name)


def single_object_gallery(
    cfg, per_pair: int, size: int, channels: int, seed: int = 1
) -> tuple[list[tuple[str, str, str]], torch.Tensor]:
    """``per_pair`` single-object scenes for every colour–shape pair of the world, held-out pairs included.

    Returns each image's (colour, shape, size) and the uint8 images (N, C, H, W).
    """
    objects, images = [], []
    for p, (color, shape) in enumerate(cfg.combos):
        for j in range(per_pair):
            rng = np.random.default_rng([cfg.seed, 7919, seed, p, j])
            scene = single_object_scene(rng, cfg, color, shape)
            objects.append((color, shape, scene.objects[0].size))
            images.append(pil_to_array(render(scene), size, channels))
    return objects, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def single_object_queries(
    name: str, description: str, scenes: list, captions: list[str], gallery: list[tuple[str, str, str]]
) -> QuerySet:
    """Distinct captions of the single-object scenes; relevant = gallery objects with the same colour and shape (and
    size, when the caption names it)."""
    wanted: dict[str, tuple[str, str, str | None]] = {}
    for scene, caption in zip(scenes, captions):
        if len(scene.objects) != 1:
            continue
        obj = scene.objects[0]
        wanted[caption] = (obj.color, obj.shape, obj.size if f" {obj.size} " in f" {caption} " else None)
    texts = sorted(wanted)
    relevant = []
    for t in texts:
        color, shape, size = wanted[t]
        relevant.append(
            np.asarray(
                [i for i, (c, s, z) in enumerate(gallery) if c == color and s == shape and size in (None, z)],
                dtype=np.int64,
            )
        )
    return QuerySet(name, description, texts, relevant, gallery="single")


def r_precision(image_emb: torch.Tensor, text_emb: torch.Tensor, relevant: list[np.ndarray]) -> tuple[float, float]:
    """Mean over queries of the share of relevant images among the top R, R = the query's number of relevant images.

    Stricter than R@1 when a query has many relevant images (the single-object sets): every red triangle of the
    gallery has to rank above every red square and green triangle. Chance is R / gallery size on average.
    """
    sims = text_emb @ image_emb.T  # (Q, N)
    scores, chance = [], []
    for q, rel in enumerate(relevant):
        if len(rel) == 0:
            continue
        top = sims[q].topk(len(rel)).indices.numpy()  # (R,)
        scores.append(np.isin(top, rel).mean())
        chance.append(len(rel) / image_emb.shape[0])
    return float(np.mean(scores)), float(np.mean(chance))


def pair_classification(
    model, tokenizer, cfg, gallery: list[tuple[str, str, str]], emb: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Image→text top-1 among the 24 "a {colour} {shape}" captions, for images of seen and of held-out pairs."""
    pairs = cfg.combos
    text_emb = embed_texts(model, tokenizer, [single_object_caption(c, s) for c, s in pairs])  # (P, E)
    pred = (emb @ text_emb.T).argmax(dim=1).numpy()  # (N,)
    truth = np.asarray([pairs.index((c, s)) for c, s, _ in gallery])
    held = np.asarray([(c, s) in cfg.holdout_set for c, s, _ in gallery])
    out = {}
    for name, mask in (("seen pairs", ~held), ("held-out pairs", held)):
        out[name] = {
            "top1": float((pred[mask] == truth[mask]).mean()),
            "chance": 1 / len(pairs),
            "n_images": int(mask.sum()),
            # how often the prediction has the right colour / shape, to see which half of the pair fails
            "colour_right": float(np.mean([pairs[p][0] == pairs[t][0] for p, t in zip(pred[mask], truth[mask])])),
            "shape_right": float(np.mean([pairs[p][1] == pairs[t][1] for p, t in zip(pred[mask], truth[mask])])),
        }
    per_pair = {}
    for c, sh in cfg.holdout:
        mask = truth == pairs.index((c, sh))
        guesses = Counter(" ".join(pairs[p]) for p in pred[mask])
        per_pair[f"{c} {sh}"] = {"top1": float(np.mean(pred[mask] == truth[mask])), "predicted": dict(guesses)}
    out["held-out pairs"]["per_pair"] = per_pair
    return out


def evaluate(model_dir: Path, n_eval: int, per_pair: int) -> dict:
    """All four query sets and the pair classification for a trained model directory."""
    model = vislang.from_pretrained(model_dir)
    tokenizer = vislang.get_tokenizer(model_dir)
    size, channels = model.cfg.vision.image_size, model.cfg.vision.channels
    test = ShapesDataset("test", n=n_eval)
    holdout = ShapesDataset("holdout", n=n_eval)
    world = test.cfg
    t_scenes, t_caps, t_imgs = scenes_and_images(test, size, channels)
    h_scenes, h_caps, h_imgs = scenes_and_images(holdout, size, channels)
    gallery, s_imgs = single_object_gallery(world, per_pair, size, channels)
    images = {"test": t_imgs, "holdout": h_imgs, "single": s_imgs}
    emb = {k: embed_images(model, v, batch_size=256) for k, v in images.items()}
    queries = [
        own_caption_queries("test", "test split, each scene's own caption", t_caps),
        own_caption_queries("holdout", "holdout split, each scene's own caption", h_caps),
        single_object_queries(
            "single seen", "captions of test single-object scenes (seen pairs)", t_scenes, t_caps, gallery
        ),
        single_object_queries(
            "single held-out", "captions of holdout single-object scenes (held-out pairs)", h_scenes, h_caps, gallery
        ),
    ]
    rows = {}
    for q in queries:
        text_emb = embed_texts(model, tokenizer, q.texts)
        m = retrieval_metrics(emb[q.gallery], text_emb, q.relevant, KS)
        r_prec, r_prec_chance = r_precision(emb[q.gallery], text_emb, q.relevant)
        rows[q.name] = {
            "description": q.description,
            "queries": m["n_texts"],  # queries with at least one relevant image in the gallery
            "gallery": int(images[q.gallery].shape[0]),
            "relevant_per_query": float(np.mean([len(r) for r in q.relevant])),
            **{f"R@{k}": m[f"text_to_image_R@{k}"] for k in KS},
            **{f"chance_R@{k}": m[f"text_to_image_chance_R@{k}"] for k in KS},
            "R-precision": r_prec,
            "chance_R-precision": r_prec_chance,
            "image_to_text": {f"R@{k}": m[f"image_to_text_R@{k}"] for k in KS},
        }
    return {
        "queries": rows,
        "pair_classification": pair_classification(model, tokenizer, world, gallery, emb["single"]),
        "holdout_pairs": [list(p) for p in world.holdout],
    }


def table(result: dict) -> list[str]:
    """The printed table: text→image R@k (%) and chance per query set, then the pair classification."""
    head = f"{'query set':18s}{'queries':>8s}{'gallery':>8s}{'rel/q':>7s}" + "".join(f"{f'R@{k}':>8s}" for k in KS)
    head += "".join(f"{f'chance@{k}':>11s}" for k in KS) + f"{'R-prec':>8s}{'chance':>8s}"
    lines = [head]
    for name, r in result["queries"].items():
        line = f"{name:18s}{r['queries']:8d}{r['gallery']:8d}{r['relevant_per_query']:7.1f}"
        line += "".join(f"{100 * r[f'R@{k}']:8.1f}" for k in KS)
        line += "".join(f"{100 * r[f'chance_R@{k}']:11.1f}" for k in KS)
        line += f"{100 * r['R-precision']:8.1f}{100 * r['chance_R-precision']:8.1f}"
        lines.append(line)
    for name, r in result["pair_classification"].items():
        lines.append(
            f"pair top-1, {name}: {100 * r['top1']:.1f}% of {r['n_images']} images (chance {100 * r['chance']:.1f}%; "
            f"colour right {100 * r['colour_right']:.1f}%, shape right {100 * r['shape_right']:.1f}%)"
        )
    for pair, r in result["pair_classification"]["held-out pairs"]["per_pair"].items():
        guesses = ", ".join(f"{g} {n}" for g, n in sorted(r["predicted"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  {pair}: top-1 {100 * r['top1']:.0f}% (predicted: {guesses})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG), help="run config (default: the packaged shapes.yaml)")
    p.add_argument("--eval-only", action="store_true", help="evaluate <out_dir>/model without training")
    p.add_argument("--smoke", action="store_true", help="a tiny model on 128 scenes in a temporary folder")
    p.add_argument("--n-eval", type=int, default=1000, help="scenes of the test and holdout splits evaluated")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 can be faster on a busy machine)")
    p.add_argument("--per-pair", type=int, default=20, help="single-object gallery images per colour–shape pair")
    args, extra = p.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bad = [tok for tok in extra if not (tok.startswith("--") and "=" in tok)]
    if bad:
        raise SystemExit(f"unexpected arguments {bad}: run-config overrides look like --optim.lr=1e-3")
    overrides = [tok[2:] for tok in extra]
    smoke_dir = None
    if args.smoke:
        smoke_dir = Path(tempfile.mkdtemp(prefix="shapes-smoke-"))
        cfg = load_train_config(
            args.config,
            {
                **SMOKE_OVERRIDES,
                "out_dir": str(smoke_dir / "run"),
                "data": {**SMOKE_OVERRIDES["data"], "cache_dir": str(smoke_dir / "cache")},
            },
        )
        args.n_eval, args.per_pair = 48, 3
    else:
        cfg = load_train_config(args.config, overrides)
    out = Path(cfg.out_dir)
    model_dir = out / "model"
    train_s = None
    if not args.eval_only:
        if (out / "checkpoints" / "last.pt").exists():
            raise SystemExit(f"{out} already holds a run: pass --eval-only to evaluate it, or --out_dir=another/dir")
        start = time.perf_counter()
        model_dir = train(cfg)
        train_s = time.perf_counter() - start
    elif not model_dir.is_dir():
        raise SystemExit(f"no model at {model_dir}: run without --eval-only first")

    result = evaluate(model_dir, args.n_eval, args.per_pair)
    result["run"] = {
        "out_dir": str(out),
        "config": args.config,
        "overrides": overrides,
        "train_seconds": train_s,
        "threads": torch.get_num_threads(),
    }
    print(f"\nShapes, held-out pairs {', '.join(' '.join(p) for p in result['holdout_pairs'])}; text→image (%):")
    print("\n".join(table(result)))
    (out / "holdout.json").write_text(json.dumps(result, indent=2))
    print(f"written to {out / 'holdout.json'}")
    if smoke_dir is not None:
        shutil.rmtree(smoke_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
