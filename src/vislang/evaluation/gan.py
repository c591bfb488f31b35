"""Evaluate a trained text-to-image GAN (``vislang eval`` / ``vislang generate-eval`` on a GAN run).

Fashion-MNIST (a dataset with class names): generate ``n_per_class`` images for "a photo of a {class}." per class and
report class consistency, FID-FM and KID against the test split with the real-vs-real floor (train split against
test split, same size, the mean over disjoint training samples) beside them, the Inception-Score-style score
(generated and real), and the CLIP score of generated and real images against the same class prompts, and a
memorisation check: the mean pixel distance from each generated image to its nearest training image against the same
for held-out test images, and the share of generated images nearer to the training set than 99% of test images are
(1% when nothing is copied). Shapes: single-object prompts judged zero-shot by the dual encoder for colour and shape.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.config import DataConfig
from ..data.fashion_mnist import format_caption
from ..data.loading import load_prepared
from ..data.shapes import (
    COLOR_RGB,
    ShapesConfig,
    ShapesDataset,
    relation,
    render,
    single_object_caption,
    single_object_scene,
)
from ..models.classifier import ImageClassifier
from ..models.gan.networks import to_uint8
from ..models.gan.pipeline import TextToImage, save_grid
from .gan_metrics import (
    attribute_match,
    class_consistency_from_logits,
    clip_score,
    fid_kid_from_features,
    frechet_distance,
    inception_fid,
    inception_style_score_from_logits,
    judge_outputs,
    nearest_distances,
    relation_match,
)

FLOOR_SAMPLES = 5  # disjoint training samples whose mean FID-FM against the test split is the floor
DEFAULT_JUDGE = "runs/gan-judge/model"  # a copy of `vislang finetune --model fmnist-cnn --method scratch`, frozen


def load_judge(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """The fixed classifier whose feature space FID-FM uses."""

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"no judge classifier at {p}; train a fixed Fashion-MNIST judge with `vislang finetune --model fmnist-cnn "
            "--method scratch --out runs/finetune` and pass --judge runs/finetune/scratch/model (or copy it to "
            f"{DEFAULT_JUDGE})"
        )
    return ImageClassifier.from_pretrained(p, device).eval()


def _real_split(data: str, split: str, size: int, channels: int, n: int | None, seed: int = 0):
    """(uint8 images (N, C, H, W), labels, captions) of a prepared split: a fixed random subset of ``n`` items."""

    ds = load_prepared(data, split, size, channels, DataConfig(), progress=False)
    idx = np.arange(len(ds))
    if n is not None and n < len(ds):
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    batch = ds.get_batch(idx)
    return batch["image"], batch["label"], [ds.captions[i] for i in idx], ds.classnames


@dataclass
class RealReference:
    """The real side of a class-conditional evaluation: test images, their judge outputs, the floor, the training set
    for the copy check. It depends on the data, judge, sample size and seed but not on the generator, so comparing
    several generators (``vislang compare``) computes it once instead of pushing 70,000 real images through the
    judge per model."""

    real: torch.Tensor  # (M, C, H, W) uint8 test images
    labels: torch.Tensor  # (M,)
    classnames: list[str]
    pick: torch.Tensor  # (n,) the test images FID is measured on: as many as generated
    feats: torch.Tensor  # (M, D) judge features of ``real``
    logits: torch.Tensor  # (M, K)
    train: torch.Tensor  # (N, C, H, W) the whole training split (copy check)
    floor: dict[str, Any]  # fid_fm_floor, kid_fm_floor, fid_fm_floor_std, fid_fm_floor_samples
    other: torch.Tensor  # (n, C, H, W) the first training sample of the floor (the Inception floor's)
    near_real: torch.Tensor  # (n,) each picked test image's RMS distance to its nearest training image


def real_reference(
    judge: torch.nn.Module,
    data: str,
    image_size: int,
    channels: int,
    n: int | None = None,
    n_per_class: int | None = None,
    split: str = "test",
    train_split: str = "train",
    n_real: int | None = None,
    seed: int = 0,
) -> RealReference:
    """The :class:`RealReference` for ``n`` generated images (or ``n_per_class`` per class)."""
    real, labels, _, classnames = _real_split(data, split, image_size, channels, n_real, seed)
    if not classnames:
        raise ValueError(f"{data} has no class names; class consistency needs a labelled dataset (fashion-mnist)")
    if len(judge.class_names) != len(classnames):
        raise ValueError(f"the judge knows {len(judge.class_names)} classes, {data} has {len(classnames)}")
    n = n if n is not None else (n_per_class or 1000) * len(classnames)
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n]  # as many real as generated
    train, _, _, _ = _real_split(data, train_split, image_size, channels, None, seed)
    feats, logits = judge_outputs(judge, real)
    # The floor: the test images against disjoint training samples of the same size. One sample's value moves a lot
    # with the sample (Fashion-MNIST at 10,000: 0.015-0.037 over twelve samples, more than a generator's FID-FM moves
    # with its noise seed), so the floor is the mean over up to FLOOR_SAMPLES of them, their spread beside it.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    samples = [order[k * n : (k + 1) * n] for k in range(max(1, min(FLOOR_SAMPLES, len(train) // n)))]
    floors = [fid_kid_from_features(feats[pick], judge_outputs(judge, train[s])[0], seed=seed) for s in samples]
    fids = [f["fid"] for f in floors]
    floor = {"fid_fm_floor": float(np.mean(fids)), "kid_fm_floor": float(np.mean([f["kid"] for f in floors]))}
    floor.update({"fid_fm_floor_std": float(np.std(fids)), "fid_fm_floor_samples": len(floors)})
    near_real = nearest_distances(real[pick], train)
    return RealReference(real, labels, classnames, pick, feats, logits, train, floor, train[samples[0]], near_real)


def evaluate_classes(
    model: TextToImage,
    judge: torch.nn.Module,
    data: str = "fashion-mnist",
    split: str = "test",
    train_split: str = "train",
    n_per_class: int = 1000,
    seed: int = 0,
    inception_weights: str | None = None,
    n_real: int | None = None,
    reference: RealReference | None = None,
) -> dict[str, Any]:
    """Class-conditional evaluation (datasets with class names): see the module docstring. ``n_real`` limits the real
    test images (default: the whole split); ``reference`` reuses the real side measured for another generator (same
    data, judge, ``n_per_class`` and seed)."""

    cfg = model.cfg
    ref = reference or real_reference(
        judge, data, cfg.image_size, cfg.channels, n_per_class=n_per_class, split=split, train_split=train_split,
        n_real=n_real, seed=seed,
    )  # fmt: skip
    prompts = [format_caption("a photo of a {}.", c) for c in ref.classnames]
    t0 = time.perf_counter()
    fake = torch.cat([model.generate(p, n=n_per_class, seed=seed + k) for k, p in enumerate(prompts)])  # class-major
    gen_s = time.perf_counter() - t0
    fake_labels = torch.arange(len(prompts)).repeat_interleave(n_per_class)
    n = len(fake)
    if len(ref.pick) != min(n, len(ref.real)):
        raise ValueError(f"the real reference was made for {len(ref.pick)} images, this evaluation draws {n}")
    real, real_labels, pick = ref.real, ref.labels, ref.pick
    out: dict[str, Any] = {"n_generated": n, "n_real": len(pick), "generation_images_per_s": n / gen_s}
    real_f, real_l = ref.feats[pick], ref.logits[pick]
    fake_f, fake_l = judge_outputs(judge, fake)
    gen = fid_kid_from_features(real_f, fake_f, seed=seed)
    out.update({"fid_fm": gen["fid"], "kid_fm": gen["kid"], "kid_fm_std": gen["kid_std"]})
    out.update(ref.floor)
    out["fid_fm_over_floor"] = gen["fid"] / max(out["fid_fm_floor"], 1e-12)
    out.update({f"{k}_generated": v for k, v in inception_style_score_from_logits(fake_l, seed=seed).items()})
    out.update({f"{k}_real": v for k, v in inception_style_score_from_logits(real_l, seed=seed).items()})
    cc = class_consistency_from_logits(fake_l, fake_labels)
    out["class_consistency"] = cc["class_consistency"]
    out["class_consistency_per_class"] = dict(zip(ref.classnames, cc["per_class"]))
    out["judge_accuracy_real"] = class_consistency_from_logits(ref.logits, real_labels)["class_consistency"]
    prompt_emb = model.embed(prompts)  # (K, E)
    out["clip_score_generated"] = clip_score(model.encoder, fake, prompt_emb[fake_labels])
    out["clip_score_real"] = clip_score(model.encoder, real, prompt_emb[real_labels])
    # Memorisation: how near generated images sit to their nearest training image, against held-out real images.
    near_fake, near_real = nearest_distances(fake, ref.train), ref.near_real
    out["nn_train_rms_generated"], out["nn_train_rms_real"] = float(near_fake.mean()), float(near_real.mean())
    out["nn_train_closer_than_real_p1"] = float((near_fake < near_real.quantile(0.01)).float().mean())
    if inception_weights:
        out["fid_inception"] = inception_fid(real[pick], fake, inception_weights)
        out["fid_inception_floor"] = inception_fid(real[pick], ref.other, inception_weights)
    return out


class FIDTracker:
    """FID-FM and class consistency of a generator during training, cheap enough to run every few hundred steps.

    GAN quality does not rise steadily, and the loss values do not show where it stands (the Fashion-MNIST `gan`
    config was still improving at 6,550 steps, then moved up and down by more than the trend for thousands of
    steps). So a run can measure FID-FM as it goes, on ``n`` images, ``n // classes`` per class, against a fixed
    sample of the *training* split (the final
    evaluation uses the test split, so picking the best snapshot does not look at the images it is judged on) and
    with its own noise seed. The real features are computed once. On 5,000 images the numbers sit above the
    10,000-image evaluation's (FID's bias grows as the sample shrinks: two real samples of 5,000 measure 0.045
    against 0.026 at 10,000) and move by about ±0.03 between noise seeds for one Fashion-MNIST generator, so only
    differences larger than that rank snapshots; ``floor`` is the value of two disjoint real samples of this size.
    """

    def __init__(
        self,
        judge: str | Path,
        conds: torch.Tensor,
        data: str,
        split: str,
        image_size: int,
        channels: int,
        n: int = 5000,
        seed: int = 0,
    ) -> None:
        if n < 2 * len(conds):
            raise ValueError(f"gan.fid_images={n} is too few: FID tracking needs at least 2 images per class")
        self.judge = load_judge(judge, "cpu")
        if len(self.judge.class_names) != len(conds):
            raise ValueError(f"the judge {judge} knows {len(self.judge.class_names)} classes, the data {len(conds)}")
        real, _, _, _ = _real_split(data, split, image_size, channels, 2 * n, seed)
        feats, _ = judge_outputs(self.judge, real)
        feats = feats[torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))]  # halves alike
        self.real_f = feats[:n]
        # Two disjoint real samples of this size: the value a perfect generator would get here (FID-FM's bias at n).
        self.floor = frechet_distance(feats[:n], feats[n : 2 * n]) if len(feats) >= 2 * n else None
        self.conds, self.per_class, self.seed = conds, n // len(conds), seed

    @torch.no_grad()
    def __call__(self, generator: torch.nn.Module, z_dim: int) -> dict[str, float]:
        """{"fid_fm", "class_consistency"} of ``generator`` (left in eval mode) on this tracker's prompts."""

        generator.eval()
        dev = self.conds.device
        g = torch.Generator().manual_seed(self.seed + 12345)
        k = len(self.conds)
        labels = torch.arange(k).repeat_interleave(self.per_class)  # (N,) class-major
        fake = torch.cat(
            [
                to_uint8(generator(torch.randn(len(part), z_dim, generator=g).to(dev), self.conds[part.to(dev)])).cpu()
                for part in labels.split(500)
            ]
        )
        fake_f, fake_l = judge_outputs(self.judge, fake)
        fid = frechet_distance(self.real_f, fake_f)
        return {"fid_fm": fid, "class_consistency": class_consistency_from_logits(fake_l, labels)["class_consistency"]}


def relation_prompts(n: int, seed: int = 0, split: str = "test") -> list[tuple[str, tuple[str, str, str], Any]]:
    """``n`` (prompt, (colour_a, relation, colour_b), scene) from real two-object scenes of ``split`` whose objects
    differ in colour and stand in a relation: "a red circle to the left of a blue square", as the captions say it."""

    ds = ShapesDataset(split, n=20 * n, seed=seed, min_objects=2, max_objects=2)
    out = []
    for i in range(len(ds)):
        scene = ds.scene(i)
        if len(scene.objects) != 2 or scene.objects[0].color == scene.objects[1].color:
            continue
        a, b = scene.objects
        rels = relation(a, b)
        if not rels:
            continue
        rel = rels[i % len(rels)]
        prompt = f"{single_object_caption(a.color, a.shape)} {rel} {single_object_caption(b.color, b.shape)}"
        out.append((prompt, (a.color, rel, b.color), scene))
        if len(out) == n:
            break
    return out


def evaluate_relations(model: TextToImage, n: int = 400, seed: int = 0) -> dict[str, Any]:
    """Two-object prompts with a spatial relation, one image each, judged by pixel colour (``relation_match``): are
    both colours there, and does the first stand where the prompt says? The same judge on the real scenes the prompts
    were taken from gives its own accuracy."""
    from PIL import Image

    items = relation_prompts(n, seed)
    palette = {c: COLOR_RGB[c] for c in ShapesConfig().colors}
    triples = [t for _, t, _ in items]
    prompts = [p for p, _, _ in items]
    fake = torch.cat([model.generate(prompts[s : s + 256], n=1, seed=seed + s) for s in range(0, len(prompts), 256)])
    size = model.cfg.image_size
    real = np.stack([np.asarray(render(sc).resize((size, size), Image.BILINEAR)) for _, _, sc in items])
    real_t = torch.from_numpy(real).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    out = {f"generated_{k}": v for k, v in relation_match(fake, triples, palette).items()}
    out.update({f"real_{k}": v for k, v in relation_match(real_t, triples, palette).items()})
    out["prompts"] = len(items)
    return out


def evaluate_shapes(model: TextToImage, n_per_prompt: int = 50, seed: int = 0) -> dict[str, Any]:
    """Single-object prompts ("a red circle") for every colour–shape pair of the shapes world, judged zero-shot by
    the dual encoder over all pairs; real single-object scenes of the same pairs give the judge's own accuracy."""
    from PIL import Image

    world = ShapesConfig()
    held = world.holdout_set
    out: dict[str, Any] = {}
    for name, pairs in (("seen", world.allowed_combos), ("holdout", sorted(held))):
        prompts = [single_object_caption(c, s) for c, s in pairs]
        targets = [p for p in pairs for _ in range(n_per_prompt)]
        fake = torch.cat([model.generate(p, n=n_per_prompt, seed=seed + k) for k, p in enumerate(prompts)])
        res = attribute_match(model.encoder, model.tokenizer, fake, world.colors, world.shapes, targets)
        out[name] = {f"generated_{k}": v for k, v in res.items()}
        rng = np.random.default_rng(seed)
        size = model.cfg.image_size
        real = [
            np.asarray(render(single_object_scene(rng, world, c, s)).resize((size, size), Image.BILINEAR))
            for c, s in targets
        ]
        real_t = torch.from_numpy(np.stack(real)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        res = attribute_match(model.encoder, model.tokenizer, real_t, world.colors, world.shapes, targets)
        out[name].update({f"real_{k}": v for k, v in res.items()})
        out[name]["prompts"] = len(prompts)
        out[name]["images"] = len(targets)
    return out


def _eval_dir(model_dir: str | Path) -> Path:
    """Where results go by default: RUN/eval for a run directory, next to the model folder otherwise."""
    if Path(model_dir).name != "model" and (Path(model_dir) / "model").is_dir():
        return Path(model_dir) / "eval"
    return Path(model_dir).resolve().parent / "eval"


def evaluate_gan(
    model_dir: str | Path,
    judge: str | Path | None = None,
    out_dir: str | Path | None = None,
    n_per_class: int = 1000,
    seed: int = 0,
    inception_weights: str | None = None,
    device: str = "cpu",
    n_real: int | None = None,
) -> dict[str, Any]:
    """Evaluate a GAN model (or run) directory as its training data calls for; writes ``eval/results.json``."""
    model = TextToImage.from_pretrained(model_dir, device)
    data = model.meta.get("data", {}).get("train", "fashion-mnist")
    out = Path(out_dir) if out_dir else _eval_dir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data == "shapes":
        results = {"data": "shapes", **evaluate_shapes(model, n_per_prompt=max(1, n_per_class // 20), seed=seed)}
        results["relations"] = evaluate_relations(model, n=max(1, n_per_class // 2), seed=seed)
    else:
        results = {"data": data, "judge": str(judge or DEFAULT_JUDGE)}
        results.update(
            evaluate_classes(
                model,
                load_judge(judge or DEFAULT_JUDGE, device),
                data,
                n_per_class=n_per_class,
                seed=seed,
                inception_weights=inception_weights,
                n_real=n_real,
            )
        )
    prompts = model.sample_prompts or ["a photo of a sneaker."]
    save_grid(model.generate(prompts, n=8, seed=seed), out / "samples.png", ncol=8, scale=2)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def evaluate_gan_seeds(
    model_dir: str | Path, seeds: Sequence[int], out_dir: str | Path | None = None, **kwargs: Any
) -> dict[str, Any]:
    """:func:`evaluate_gan` once per noise seed (each in ``OUT/seed-S``) and their summary in ``OUT/results.json``:
    the mean of every number, its spread across seeds (``KEY_sd``) and each seed's FID-FM, floor and ratio.

    Why: a GAN's FID-FM moves with the noise it is drawn from and its floor with the training sample, so a claim
    like "at most 3x the floor" should rest on several seeds. The summary's ratio is mean FID-FM over mean floor."""
    from tqdm import tqdm

    if len(seeds) == 1:
        return evaluate_gan(model_dir, out_dir=out_dir, seed=seeds[0], **kwargs)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seed lists a seed twice: {list(seeds)}")
    out = Path(out_dir) if out_dir else _eval_dir(model_dir)
    runs = {s: evaluate_gan(model_dir, out_dir=out / f"seed-{s}", seed=s, **kwargs)
            for s in tqdm(seeds, desc="seeds", unit="seed")}  # fmt: skip
    first = runs[seeds[0]]
    numbers = [k for k, v in first.items() if isinstance(v, float)]  # counts and nested tables: the first seed's
    summary: dict[str, Any] = {k: v for k, v in first.items() if k not in numbers}
    for k in numbers:
        vals = [float(r[k]) for r in runs.values()]
        summary[k], summary[f"{k}_sd"] = float(np.mean(vals)), float(np.std(vals))
    if "fid_fm" in numbers:
        summary["fid_fm_over_floor"] = summary["fid_fm"] / max(summary["fid_fm_floor"], 1e-12)
        summary["per_seed"] = {str(s): {k: r[k] for k in ("fid_fm", "fid_fm_floor", "fid_fm_over_floor")}
                               for s, r in runs.items()}  # fmt: skip
    summary["seeds"] = list(seeds)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


TABLE_COLUMNS = (  # (key in results.json, column title, format)
    ("class_consistency", "class consistency", "{:.1%}"),
    ("fid_fm", "FID-FM", "{:.3f}"),
    ("fid_fm_floor", "FID-FM floor (train vs test)", "{:.4f}"),
    ("fid_fm_floor_std", "floor spread", "{:.4f}"),
    ("fid_fm_over_floor", "FID-FM / floor", "{:.1f}x"),
    ("kid_fm", "KID-FM", "{:.4f}"),
    ("kid_fm_floor", "KID-FM floor", "{:.4f}"),
    ("is_generated", "IS-style (gen)", "{:.2f}"),
    ("is_real", "IS-style (real)", "{:.2f}"),
    ("clip_score_generated", "CLIP score (gen)", "{:.3f}"),
    ("clip_score_real", "CLIP score (real)", "{:.3f}"),
    ("judge_accuracy_real", "judge acc. (real)", "{:.1%}"),
    ("nn_train_rms_generated", "nearest train image (gen)", "{:.3f}"),
    ("nn_train_rms_real", "nearest train image (test)", "{:.3f}"),
    ("nn_train_closer_than_real_p1", "gen nearer than 99% of test", "{:.1%}"),
)


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one row per run, of the class-conditional metrics."""
    head = "| run | " + " | ".join(t for _, t, _ in TABLE_COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for name, r in results.items():
        cells = [fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "—" for k, _, fmt in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
