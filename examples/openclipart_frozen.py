"""OpenClipart retrieval with frozen pretrained towers and trained projections, against chance and random towers.

The built-in ``effnet-lite0-minilm`` model is an ImageNet EfficientNet-Lite0 image tower and the all-MiniLM-L6-v2
text tower, both frozen (``lock_image``/``lock_text``), joined by two linear projections into a 256-d space. Only
``image_proj``, ``text_proj`` and ``logit_scale`` train, so the towers' pooled features are computed once per image
and caption, cached under ``.cache/vislang/features/``, and the projections are fitted on the cached features with
the CLIP loss (``vislang.losses.ClipLoss``): an epoch takes about a second instead of minutes. Training stops early
when validation R@10 has not improved for ``--patience`` epochs: on pretrained features the projections overfit the
6.5k pairs within a few epochs, on random features they keep improving for a hundred.

The same pipeline is run twice:

* pretrained towers (the model as the config builds it);
* random towers (``vision.pretrained=None``, ``text.hf_load_weights=False``, fixed seed): the baseline that shows
  how much of the result comes from pretraining rather than from the trained projections.

Projections are trained on 90% of the OpenClipart train split; the other 10% picks the epoch (early stopping on
text→image R@10), so the test split is touched once, at the end. Test retrieval follows ``vislang eval``: identical
captions are merged into one text query whose relevant images are all images carrying that caption, and chance is
the hit rate of a random ranking for those queries (``k/N`` when a caption belongs to one image).

The trained projections are written into the full model, which is saved with ``vislang.save_pretrained`` and loaded
back; the script asserts that the loaded model's ``encode_image``/``encode_text`` on real items equal the
feature-path embeddings, so the directory is a usable model (``vislang eval``, ``vislang embed``, ``vislang serve``).

Usage::

    python examples/openclipart_frozen.py                 # full run: ~8k images through both towers, twice
    python examples/openclipart_frozen.py --max-items 800 # a quicker look (evenly spaced items of each split)
    python examples/openclipart_frozen.py --smoke         # seconds: a few items, nothing cached (used by tests)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import vislang  # noqa: E402
from vislang.data import OpenClipart  # noqa: E402
from vislang.evaluation import dedupe_captions, retrieval_metrics  # noqa: E402
from vislang.losses import ClipLoss  # noqa: E402

MODEL_NAME = "effnet-lite0-minilm"
RANDOM_TOWERS = {"vision.pretrained": None, "text.hf_load_weights": False}
KS = (1, 5, 10)
FEATURE_CACHE = Path(".cache/vislang/features")


@dataclass
class Features:
    """Pooled tower outputs of one split: what the frozen towers produce before the trained projections."""

    image: torch.Tensor  # (N, D_image) float32
    text: torch.Tensor  # (N, D_text) float32
    index: np.ndarray  # (N,) item index in the dataset (unreadable images are left out)
    captions: list[str]

    def subset(self, rows: np.ndarray) -> Features:
        return Features(self.image[rows], self.text[rows], self.index[rows], [self.captions[i] for i in rows])


# ------------------------------------------------------------------------------------------- feature extraction


class Preprocessed(Dataset):
    """Selected OpenClipart items as (model-ready image, caption, item index); None for an unreadable image."""

    def __init__(self, data: OpenClipart, indices: np.ndarray, preprocess) -> None:
        self.data, self.indices, self.preprocess = data, indices, preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = int(self.indices[i])
        item = self.data[idx]
        return None if item is None else (self.preprocess(item[0]), item[1], idx)


def collate(batch: list):
    """Stack the readable items of a batch: images (B, 3, H, W), captions, indices."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    images, captions, indices = zip(*batch)
    return torch.stack(images), list(captions), np.asarray(indices, dtype=np.int64)


@torch.inference_mode()
def text_tower_features(model: vislang.CLIP, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Pooled text-tower features (B, D); padding columns past the longest caption are dropped first.

    The tokenizer pads every caption to the 64-token context, and captions here are a few words long. Padding is
    masked out of attention and of the mean pooling, so trimming it changes nothing but the time spent.
    """
    longest = int((ids != pad_id).sum(1).max())
    return model.text(ids[:, :longest]).float()  # (B, D_text)


@torch.inference_mode()
def extract(
    model: vislang.CLIP, tokenizer, preprocess, data: OpenClipart, indices: np.ndarray, args, desc: str
) -> Features:
    """Run both frozen towers over the selected items once (DataLoader workers decode and resize the PNGs)."""
    model.eval()
    visual = copy.deepcopy(model.visual).to(memory_format=torch.channels_last)  # ~2x faster convolutions on CPU
    loader = DataLoader(
        Preprocessed(data, indices, preprocess),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=collate,
    )
    images, texts, kept, captions = [], [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=args.no_progress):
        if batch is None:
            continue
        x, caps, idx = batch
        images.append(visual(x.contiguous(memory_format=torch.channels_last)).float())  # (B, D_image)
        texts.append(text_tower_features(model, tokenizer(caps), tokenizer.pad_id))  # (B, D_text)
        kept.append(idx)
        captions.extend(caps)
    return Features(torch.cat(images), torch.cat(texts), np.concatenate(kept), captions)


def cache_key(tag: str, data: OpenClipart, indices: np.ndarray) -> str:
    """A name that changes when the towers, the items or their captions change."""
    h = hashlib.sha256(f"{MODEL_NAME}|{tag}".encode())
    for i in indices:
        png, caption, _ = data.items[int(i)]
        h.update(f"{png}\0{caption}\n".encode())
    return f"openclipart-{data.split}-{len(indices)}-{tag}-{h.hexdigest()[:12]}"


def load_or_extract(model, tokenizer, preprocess, data: OpenClipart, indices: np.ndarray, tag: str, args) -> Features:
    """Features from ``.cache/vislang/features/<key>/`` when present, else extracted and saved (atomically)."""
    if args.no_cache:
        return extract(model, tokenizer, preprocess, data, indices, args, f"{tag} {data.split}")
    folder = args.cache_dir / cache_key(tag, data, indices)
    if (folder / "captions.json").is_file():
        return Features(
            torch.from_numpy(np.load(folder / "image.npy")),
            torch.from_numpy(np.load(folder / "text.npy")),
            np.load(folder / "index.npy"),
            json.loads((folder / "captions.json").read_text()),
        )
    feats = extract(model, tokenizer, preprocess, data, indices, args, f"{tag} {data.split}")
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "image.npy", feats.image.numpy())
    np.save(tmp / "text.npy", feats.text.numpy())
    np.save(tmp / "index.npy", feats.index)
    (tmp / "captions.json").write_text(json.dumps(feats.captions))  # written last: marks the folder complete
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return feats


# ----------------------------------------------------------------------------------------- projections and eval


def project(model: vislang.CLIP, feats: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings (N, E) of images and captions: ``encode_image``/``encode_text`` minus the towers."""
    return F.normalize(model.image_proj(feats.image), dim=-1), F.normalize(model.text_proj(feats.text), dim=-1)


@torch.no_grad()
def retrieval(model: vislang.CLIP, feats: Features) -> dict[str, float]:
    """R@k both ways, identical captions merged into one query (as ``vislang eval`` does), with chance levels."""
    img, txt = project(model, feats)
    texts, text_to_images = dedupe_captions(feats.captions)
    first = {}
    for i, c in enumerate(feats.captions):
        first.setdefault(c, i)
    out = retrieval_metrics(img, txt[[first[t] for t in texts]], text_to_images, KS)
    for k in KS:
        out[f"k_over_N@{k}"] = min(k, len(feats.captions)) / len(feats.captions)
    return out


def train_projections(model: vislang.CLIP, fit: Features, val: Features, args) -> dict[str, float]:
    """Fit ``image_proj``, ``text_proj`` and ``logit_scale`` on cached features; keep the epoch best on ``val``."""
    torch.manual_seed(args.seed)
    params = [model.image_proj.weight, model.text_proj.weight, model.logit_scale]
    optimizer = torch.optim.AdamW(
        [{"params": params[:2], "weight_decay": args.weight_decay}, {"params": params[2:], "weight_decay": 0.0}],
        lr=args.lr,
    )
    loss_fn = ClipLoss()
    n = len(fit.captions)
    batch = min(args.train_batch, n)
    steps_per_epoch = max(1, n // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    best = {"epoch": 0, "val_R@10": retrieval(model, val)["text_to_image_R@10"]}
    best_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("image_proj", "text_proj"))}
    best_state["logit_scale"] = model.logit_scale.detach().clone()
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n)
        for s in range(steps_per_epoch):
            rows = perm[s * batch : (s + 1) * batch]  # full batches only: the contrastive loss wants them
            img, txt = project(model, Features(fit.image[rows], fit.text[rows], fit.index, []))
            loss = loss_fn(img, txt, model.get_logit_scale())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            r10 = retrieval(model, val)["text_to_image_R@10"]
            if r10 > best["val_R@10"]:
                best = {"epoch": epoch, "val_R@10": r10}
                best_state = {k: v.clone() for k, v in model.state_dict().items() if k in best_state}
            elif epoch - best["epoch"] >= args.patience:
                break
    model.load_state_dict(best_state, strict=False)
    best.update(
        epochs_run=epoch,
        seconds=round(time.perf_counter() - start, 2),
        last_loss=loss.item(),
        steps_per_epoch=steps_per_epoch,
    )
    return best


def split_fit_val(feats: Features, fraction: float, seed: int) -> tuple[Features, Features]:
    """A random ``fraction`` of the train features for early stopping, the rest for fitting."""
    perm = np.random.default_rng(seed).permutation(len(feats.captions))
    n_val = max(2, int(round(fraction * len(perm))))
    return feats.subset(np.sort(perm[n_val:])), feats.subset(np.sort(perm[:n_val]))


def select(data: OpenClipart, limit: int | None) -> np.ndarray:
    """All item indices, or ``limit`` evenly spaced ones (items are sorted by folder, so a prefix is one category)."""
    if not limit or limit >= len(data):
        return np.arange(len(data))
    return np.unique(np.linspace(0, len(data) - 1, limit).round().astype(np.int64))


def run_pipeline(tag: str, overrides: dict, train_data, test_data, args) -> tuple[vislang.CLIP, dict]:
    """Build the model, extract (or load) features, fit the projections, evaluate on the test split."""
    torch.manual_seed(args.seed)  # the random towers and the initial projections depend on the seed alone
    t0 = time.perf_counter()
    model, _, preprocess = vislang.create_model_and_transforms(MODEL_NAME, **overrides)
    tokenizer = vislang.get_tokenizer(MODEL_NAME)
    train_feats = load_or_extract(
        model, tokenizer, preprocess, train_data, select(train_data, args.max_items), tag, args
    )
    test_feats = load_or_extract(model, tokenizer, preprocess, test_data, select(test_data, args.max_items), tag, args)
    t_feat = time.perf_counter() - t0
    fit, val = split_fit_val(train_feats, args.val_fraction, args.seed)
    before = retrieval(model, test_feats)
    # The matrices here are small (128 x 1280 @ 1280 x 256): a second thread gains little on an idle machine and, on a
    # shared one, its synchronisation made steps 5-25x slower in measurements, so this part runs on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fitted = train_projections(model, fit, val, args)
    finally:
        torch.set_num_threads(threads)
    result = {
        "tag": tag,
        "n_fit": len(fit.captions),
        "n_val": len(val.captions),
        "feature_seconds": round(t_feat, 1),
        "training": fitted,
        "test_untrained_projections": before,
        "test": retrieval(model, test_feats),
    }
    return model, {"result": result, "tokenizer": tokenizer, "preprocess": preprocess, "test_feats": test_feats}


def check_saved_model(model_dir: Path, model: vislang.CLIP, aux: dict, test_data: OpenClipart, n: int = 4) -> float:
    """Load the saved directory and compare its full encoders with the feature-path embeddings on real test items."""
    loaded = vislang.from_pretrained(model_dir)
    tokenizer = vislang.get_tokenizer(model_dir)
    feats: Features = aux["test_feats"]
    rows = np.arange(min(n, len(feats.captions)))
    sub = feats.subset(rows)
    images = torch.stack([aux["preprocess"](test_data[int(i)][0]) for i in sub.index])  # (n, 3, 224, 224)
    with torch.inference_mode():
        full_img = loaded.encode_image(images)
        full_txt = loaded.encode_text(tokenizer(sub.captions))
        path_img, path_txt = project(model, sub)
    err = max((full_img - path_img).abs().max().item(), (full_txt - path_txt).abs().max().item())
    assert torch.allclose(full_img, path_img, atol=1e-4), f"encode_image differs from the feature path by {err:.2e}"
    assert torch.allclose(full_txt, path_txt, atol=1e-4), f"encode_text differs from the feature path by {err:.2e}"
    return err


# ---------------------------------------------------------------------------------------------------- reporting


def table(results: dict[str, dict]) -> list[str]:
    """Rows of R@k (%) for each model and for chance, both directions."""
    head = f"{'':42s}{'text→image R@1/5/10 (%)':>26s}   {'image→text R@1/5/10 (%)':>26s}"
    lines = [head]

    def cells(r: dict, direction: str, chance: bool) -> str:
        key = f"{direction}_chance_R@" if chance else f"{direction}_R@"
        return "".join(f"{100 * r[key + str(k)]:8.1f}" for k in KS)

    for name, r in results.items():
        lines.append(f"{name:42s}  {cells(r, 'text_to_image', False)}   {cells(r, 'image_to_text', False)}")
    any_r = next(iter(results.values()))
    lines.append(
        f"{'chance (random ranking)':42s}  {cells(any_r, 'text_to_image', True)}   "
        f"{cells(any_r, 'image_to_text', True)}"
    )
    lines.append(f"{'k/N':42s}  " + "".join(f"{100 * any_r[f'k_over_N@{k}']:8.1f}" for k in KS))
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max-items", type=int, default=None, help="use at most this many items of each split")
    p.add_argument("--smoke", action="store_true", help="a few items, a few epochs, no cache: checks that it runs")
    p.add_argument("--out-dir", type=Path, default=Path("runs/openclipart-frozen"), help="model/ and results.json")
    p.add_argument("--cache-dir", type=Path, default=FEATURE_CACHE, help="where tower features are cached")
    p.add_argument("--no-cache", action="store_true", help="always extract features, never read or write the cache")
    p.add_argument("--root", default="/usr/share/openclipart", help="OpenClipart folder (png/ and svg/)")
    p.add_argument("--epochs", type=int, default=150, help="epochs of projection training on the cached features")
    p.add_argument("--eval-every", type=int, default=4, help="epochs between early-stopping evaluations")
    p.add_argument("--train-batch", type=int, default=128, help="pairs per contrastive batch")
    p.add_argument("--patience", type=int, default=20, help="stop after this many epochs without a better val R@10")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the train split used for early stopping")
    p.add_argument("--batch-size", type=int, default=64, help="images per tower forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the towers (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_items = args.max_items or 8
        args.epochs, args.eval_every, args.train_batch, args.workers, args.no_cache = 3, 1, 8, 0, True
        args.no_progress = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(tempfile.mkdtemp(prefix="openclipart-smoke-")) if args.smoke else args.out_dir
    train_data = OpenClipart(args.root, split="train")
    test_data = OpenClipart(args.root, split="test")
    print(
        f"OpenClipart: {len(train_data)} train / {len(test_data)} test items; model {MODEL_NAME} "
        f"(frozen towers, trained projections); max_items={args.max_items}"
    )

    results, models = {}, {}
    for tag, name, overrides in (
        ("pretrained", "pretrained towers (frozen)", {}),
        (f"random-seed{args.seed}", "random towers (frozen, same seed)", RANDOM_TOWERS),
    ):
        model, aux = run_pipeline(tag, overrides, train_data, test_data, args)
        r = aux["result"]
        print(
            f"[{tag}] features {r['feature_seconds']} s; projections fitted on {r['n_fit']} pairs in "
            f"{r['training']['seconds']} s, best epoch {r['training']['epoch']} of {r['training']['epochs_run']} "
            f"(val text→image R@10 {100 * r['training']['val_R@10']:.1f}%)"
        )
        results[name] = r
        models[tag] = (model, aux)

    model, aux = models["pretrained"]
    model_dir = vislang.save_pretrained(model, out_dir / "model", aux["tokenizer"])
    err = check_saved_model(model_dir, model, aux, test_data)
    print(f"saved {model_dir}; its encode_image/encode_text match the feature path (max |diff| {err:.1e})")

    test = results["pretrained towers (frozen)"]["test"]
    print(f"\nOpenClipart test split: {test['n_images']} images, {test['n_texts']} distinct captions as text queries")
    rows = {name: r["test"] for name, r in results.items()}
    rows["pretrained towers, untrained projections"] = results["pretrained towers (frozen)"][
        "test_untrained_projections"
    ]
    lines = table(rows)
    print("\n".join(lines))
    summary = {
        "model": MODEL_NAME,
        "max_items": args.max_items,
        "n_test_images": test["n_images"],
        "n_test_texts": test["n_texts"],
        "results": results,
        "model_dir": str(model_dir),
        "saved_model_max_abs_diff": err,
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"results written to {out_dir / 'results.json'}")
    if args.smoke:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
