"""Choose a LiT recipe on a validation split carved from the training pairs, never on the test split.

Each named config is ``vislang train --config lit`` plus its overrides, with ``--lit.val_fraction`` of the training
pairs held back (seeded; the same pairs for every config; ``lit.val_by`` says whether random pairs or whole captions)
and ``--data.val_split=train``, which leaves the test split out of the run entirely (no test features are even
read). The score is text→image R@10 on the held-back pairs at the run's best epoch (the epoch the run itself would
keep), image→text R@10 beside it; the table also gives the last epoch's R@10 (what a fixed schedule would keep) and
the seconds the run trained.

    python benchmarks/lit_sweep.py --list                     # the configs and their overrides
    python benchmarks/lit_sweep.py                            # all of them (about a minute each, on cached features)
    python benchmarks/lit_sweep.py --only base,r3-none,r3-mem0.2,r3-mem0.4,r3-mem0.5,r3-mem-t0.01,r3-mem-t0.05
    python benchmarks/lit_sweep.py --only base,r3-none,r3-mem-t0.01 --seeds 1,2   # round 3, then its top two
    python benchmarks/lit_sweep.py --only base,positive -- --lit.cache_dir=/work/cache-lit
    python benchmarks/lit_sweep.py --smoke                    # 2 configs, 64 pairs at 64 px: checks that it runs
    python benchmarks/lit_sweep.py --split-stats              # why whole captions: how each split shares captions
    python benchmarks/lit_sweep.py --memory-growth --seeds 0,1,2   # lit.memory_all: do added pairs help unseen ones?

Arguments after ``--`` go to every run (a cache folder, a shorter schedule). Results also go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from vislang.cli.main import main as vislang_main

SIGLIP = ["--loss=siglip", "--model.init_logit_bias=-10", f"--model.init_logit_scale={math.log(10):.4f}"]
# Rounds 1-2 scored configs on random held-back pairs, without the caption memory (lit.yaml before round 3):
OLD = ["--model.memory=null", "--model.embed_dim=512", "--lit.val_by=pair"]
D5 = [*OLD, "--lit.feature_dropout=0.5"]  # round 1 varied one setting of the previous recipe (feature dropout 0.5)
D3 = [*OLD, "--lit.feature_dropout=0.3"]  # round 2 around round 1's best
# Round 3 holds back whole captions (lit.val_by=caption: none occurs in the kept pairs, like most test captions)
# and varies the caption memory (model.memory) around lit.yaml's; "r3-none" is round 2's recipe on these pairs.
NOMEM = ["--model.memory=null", "--model.embed_dim=512"]
R3 = ["--model.memory.class_weight=0", "--model.embed_dim=896"]  # lit.yaml of round 3: the memory, no class view
CONFIGS: dict[str, list[str]] = {
    "base": [],  # lit.yaml as packaged now (round 4's: caption memory 0.3 at temperature 0.02, class view 0.1)
    "dropout0.5": D5,
    "positive": [*D5, "--lit.same_caption=positive"],
    "siglip": [*D5, *SIGLIP],
    "dropout0.3": D3,
    "dropout0.7": [*OLD, "--lit.feature_dropout=0.7"],
    "lr1e-3": [*D5, "--optim.lr=0.001"],
    "lr4e-3": [*D5, "--optim.lr=0.004"],
    "embed256": [*D5, "--model.embed_dim=256"],
    "embed1024": [*D5, "--model.embed_dim=1024"],
    "epochs20": [*D5, "--epochs=20"],
    "epochs80": [*D5, "--epochs=80"],
    "wd0.5": [*D5, "--optim.weight_decay=0.5"],
    "batch512": [*D5, "--batch_size=512"],
    "dropout0.1": [*OLD, "--lit.feature_dropout=0.1"],
    "dropout0.2": [*OLD, "--lit.feature_dropout=0.2"],
    "d0.3-positive": [*D3, "--lit.same_caption=positive"],
    "d0.3-siglip": [*D3, *SIGLIP],
    "d0.3-epochs80": [*D3, "--epochs=80"],
    "d0.3-embed1024": [*D3, "--model.embed_dim=1024"],
    "d0.3-lr1e-3": [*D3, "--optim.lr=0.001"],
    "d0.3-pad": [*D3, "--lit.fit=pad"],  # whole drawings letterboxed on white instead of centre-cropped
    "r3-none": NOMEM,
    "r3-mem": R3,  # round 3's chosen recipe (lit.yaml's "base" then): memory 0.3 at temperature 0.02
    "r3-mem0.2": [*R3, "--model.memory.weight=0.2"],
    "r3-mem0.4": [*R3, "--model.memory.weight=0.4"],
    "r3-mem0.5": [*R3, "--model.memory.weight=0.5"],
    "r3-mem-t0.01": [*R3, "--model.memory.temperature=0.01"],
    "r3-mem-t0.05": [*R3, "--model.memory.temperature=0.05"],
    "r3-mem-d0.5": [*R3, "--lit.feature_dropout=0.5"],  # dropout 0.5 with the memory (round 3b)
    # Round 4: an ImageNet-class view beside the memory (model.memory.class_weight; 384 more dims); 0.1 is lit.yaml's
    "r4-class0.1": ["--model.memory.class_weight=0.1", "--model.embed_dim=1280"],
    "r4-class0.2": ["--model.memory.class_weight=0.2", "--model.embed_dim=1280"],
}
SMOKE = ["--data.max_train=64", "--model.vision.image_size=64", "--epochs=2", "--batch_size=16", "--lit.workers=0"]


def run_one(name: str, overrides: list[str], extra: list[str], out: Path, val_fraction: float) -> dict:
    """Train one config with pairs held back; its held-back R@10 at the kept epoch and at the last one."""
    run_dir = out / name
    args = ["train", "--config", "lit", *overrides, "--data.val_split=train", f"--lit.val_fraction={val_fraction}",
            "--progress=false", f"--out_dir={run_dir}", *extra]  # fmt: skip
    t0 = time.perf_counter()
    if vislang_main(args) != 0:
        raise SystemExit(f"config {name} failed: vislang {' '.join(args)}")
    seconds = time.perf_counter() - t0
    result = json.loads((run_dir / "eval" / "retrieval.json").read_text())
    assert "test" not in result, "the test split must stay out of the sweep"
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    evals = [r for r in lines if "eval/val_text_to_image_R@10" in r]
    best = next(r for r in evals if r["step"] == result["best_step"])
    return {
        "name": name,
        "overrides": overrides,
        "val_t2i_R@10": best["eval/val_text_to_image_R@10"],
        "val_i2t_R@10": best["eval/val_image_to_text_R@10"],
        "best_step": result["best_step"],
        "last_val_t2i_R@10": evals[-1]["eval/val_text_to_image_R@10"],
        "last_step": evals[-1]["step"],
        "seconds": seconds,
    }


def split_stats(seed: int = 0, fraction: float = 0.1) -> dict[str, float]:
    """How much the OpenClipart test split and each kind of held-back pairs share with the pairs trained on: the share
    of pairs whose caption occurs among them, and the share of training images with a same-named twin (one drawing
    filed in two folders: the test split, made by file name, never separates twins; random pairs can). Captions and
    file names only: no features, no scores."""
    import os

    import numpy as np

    from vislang.data.openclipart import OpenClipart
    from vislang.train.tasks.lit import split_rows

    train, test = OpenClipart(split="train"), OpenClipart(split="test")
    caps = [c for _, c, _ in train.items]
    seen = lambda rows, kept: float(np.mean([caps[i] in kept for i in rows]))  # noqa: E731
    names = [os.path.basename(p) for p, _, _ in train.items]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    out = {"test pairs with a training caption": float(np.mean([c in set(caps) for _, c, _ in test.items]))}
    for by in ("pair", "caption"):
        groups = np.unique(caps, return_inverse=True)[1] if by == "caption" else None
        fit, val = split_rows(len(caps), fraction, seed, groups)
        out[f"held-back pairs ({by}) with a kept caption"] = seen(val, {caps[i] for i in fit})
    out["training images with a same-named twin"] = sum(counts[n] > 1 for n in names) / len(names)
    return out


def memory_growth(seed: int, extra: list[str], out: Path, val_fraction: float = 0.2) -> dict:
    """Does a bigger caption memory help captions it does not hold? The held-back-pairs evidence for
    ``lit.memory_all``, whose own effect the held-back pairs cannot show (it puts them in the memory).

    One lit.yaml run holds back ``val_fraction`` of the pairs (whole captions) and keeps its memory to the kept pairs
    (``--lit.memory_all=false``); the held-back pairs are then split in two by caption (seeded): half B is scored
    with the memory as trained (kept pairs) and with half A's pairs added, so B's captions are unseen either way and
    the only difference is A in the memory, as the held-back pairs join it for the test split. The epoch was chosen
    on A and B together, the same for both scores."""
    import numpy as np
    import torch

    import vislang
    from vislang.data.features import load_features, tensors_hash
    from vislang.train.tasks.lit import pair_retrieval, split_rows

    run_dir = out / f"growth@{seed}"
    args = ["train", "--config", "lit", "--data.val_split=train", f"--lit.val_fraction={val_fraction}",
            "--lit.memory_all=false", f"--seed={seed}", "--progress=false", f"--out_dir={run_dir}", *extra]  # fmt: skip
    if vislang_main(args) != 0:
        raise SystemExit(f"memory growth run failed: vislang {' '.join(args)}")
    model = vislang.load(run_dir / "model").eval()
    given = [a.split("=", 1)[1] for a in extra if a.startswith("--lit.cache_dir=")]
    cache = Path(given[-1] if given else ".cache/vislang/features")
    tower, stored = tensors_hash(model.visual), model.memory_image
    for entry in sorted(p for p in cache.iterdir() if (p / "meta.json").is_file()):
        meta = json.loads((entry / "meta.json").read_text())
        if meta["key"]["image_tower"] != tower or not meta["key"]["name"].endswith("-train"):
            continue
        feats = load_features(entry)
        groups = np.unique(feats.captions, return_inverse=True)[1]
        fit, val = split_rows(len(feats), val_fraction, seed, groups)
        image = torch.nn.functional.normalize(torch.from_numpy(np.array(feats.image[fit])), dim=-1)
        if image.shape == stored.shape and torch.allclose(image, stored, atol=1e-6):
            break  # the run's own training features: its memory is their kept rows
    else:
        raise SystemExit(f"no cache entry under {cache} holds this run's training features")
    a_rel, b_rel = split_rows(len(val), 0.5, seed, groups[val])  # (added to the memory, scored): whole captions
    a, b = val[a_rel], val[b_rel]
    assert not set(groups[b]) & set(groups[np.concatenate([fit, a])]), "B's captions must be unseen"

    def score() -> dict[str, float]:
        with torch.no_grad():
            img = model.project_image(torch.from_numpy(np.array(feats.image[b])))
            txt = model.project_text(torch.from_numpy(np.array(feats.text[b])))
        return pair_retrieval(img, txt, [feats.captions[i] for i in b], (10,))

    before = score()
    rows = np.concatenate([fit, a])
    model.fill_memory(torch.from_numpy(np.array(feats.image[rows])), torch.from_numpy(np.array(feats.text[rows])))
    after = score()
    return {"seed": seed, "kept": len(fit), "added": len(a), "scored": len(b),
            "t2i_kept": before["text_to_image_R@10"], "t2i_added": after["text_to_image_R@10"],
            "i2t_kept": before["image_to_text_R@10"], "i2t_added": after["image_to_text_R@10"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated config names (default: all)")
    p.add_argument("--list", action="store_true", help="print the configs and exit")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of training pairs held back (default 0.1)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (each holds back other pairs; default 0)")
    p.add_argument("--out", help="run folders (default: a temporary folder)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--smoke", action="store_true", help="2 configs on 64 pairs at 64 px: checks that it runs")
    p.add_argument("--split-stats", action="store_true", help="how the test split and held-back pairs share captions")
    p.add_argument("--memory-growth", action="store_true", help="held-back evidence for lit.memory_all (0.2 held)")
    args = p.parse_args(argv)
    if args.memory_growth:
        with tempfile.TemporaryDirectory() as tmp:
            rs = [memory_growth(int(s), [*SMOKE, *extra] if args.smoke else extra, Path(args.out or tmp),
                                0.5 if args.smoke else 0.2) for s in args.seeds.split(",")]  # fmt: skip
        for r in rs:
            print(f"[growth] seed {r['seed']}: {r['scored']} held-back pairs scored, text→image R@10 "
                  f"{100 * r['t2i_kept']:.1f}% with the {r['kept']} kept pairs in the memory, "
                  f"{100 * r['t2i_added']:.1f}% with {r['added']} other held-back pairs added; image→text "
                  f"{100 * r['i2t_kept']:.1f}% → {100 * r['i2t_added']:.1f}%", flush=True)  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(rs, indent=2))
        return 0
    if args.split_stats:
        for name, share in split_stats(int(args.seeds.split(",")[0]), args.val_fraction).items():
            print(f"{name:45s} {100 * share:5.1f}%")
        return 0
    if args.list:
        for name, ov in CONFIGS.items():
            print(f"{name:14s} {' '.join(ov) or '(lit.yaml as packaged)'}")
        return 0
    names = args.only.split(",") if args.only else (["base", "positive"] if args.smoke else list(CONFIGS)[1:])
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; --list shows {list(CONFIGS)}")
    extra = [*SMOKE, *extra] if args.smoke else extra
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        for name, seed in [(n, int(s)) for n in names for s in args.seeds.split(",")]:
            r = run_one(f"{name}@{seed}", [*CONFIGS[name], f"--seed={seed}"], extra, out, args.val_fraction)
            r.update(config=name, seed=seed)
            results.append(r)
            print(f"[sweep] {r['name']:16s} held-back text→image R@10 {100 * r['val_t2i_R@10']:.1f}% (step "
                  f"{r['best_step']}), image→text {100 * r['val_i2t_R@10']:.1f}%; last epoch "
                  f"{100 * r['last_val_t2i_R@10']:.1f}% (step {r['last_step']}); {r['seconds']:.0f} s",
                  flush=True)  # fmt: skip
    print(f"\n{'config':16s} {'t→i R@10':>9s} {'i→t R@10':>9s} {'last t→i':>9s} {'s':>5s}  (held-back pairs, mean over "
          f"seeds {args.seeds})")  # fmt: skip
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    by_config = {n: [r for r in results if r["config"] == n] for n in names}
    for n, rs in sorted(by_config.items(), key=lambda kv: -mean(kv[1], "val_t2i_R@10")):
        print(f"{n:16s} {100 * mean(rs, 'val_t2i_R@10'):8.1f}% {100 * mean(rs, 'val_i2t_R@10'):8.1f}% "
              f"{100 * mean(rs, 'last_val_t2i_R@10'):8.1f}% {mean(rs, 'seconds'):5.0f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
