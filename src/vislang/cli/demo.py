"""`make demo` / `vislang demo`: train the default model on Fashion-MNIST, evaluate it, write the HTML report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..config import PACKAGED_CONFIGS


def export_sample_images(folder: Path, n: int = 500) -> Path:
    """Write the first ``n`` Fashion-MNIST test images as PNGs with same-named .txt captions, so the search commands
    in the README (`vislang index build runs/demo/images ...`) have a folder of real images to work on."""
    from PIL import Image

    from ..data import FashionMNIST  # lazy: `vislang --help` starts without loading torch

    ds = FashionMNIST("test")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(min(n, len(ds))):
        stem = folder / f"test_{i:05d}"
        if not stem.with_suffix(".png").exists():
            Image.fromarray(ds.images[i]).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(ds.caption(i) + "\n")
    return folder


def run_demo(out: str = "runs/demo", overrides: list[str] | None = None, fresh: bool = False) -> int:
    from ..evaluation.report import write_report  # lazy: `vislang --help` starts without loading torch
    from ..evaluation.run import evaluate_model_dir  # lazy: `vislang --help` starts without loading torch
    from ..factory import is_model_dir  # lazy: `vislang --help` starts without loading torch
    from ..train import load_train_config, train  # lazy: `vislang --help` starts without loading torch

    run = Path(out)
    if fresh and run.exists():
        shutil.rmtree(run)
    cfg = load_train_config(PACKAGED_CONFIGS / "demo.yaml", [f"out_dir={out}", *(overrides or [])])
    t0 = time.time()
    model_dir = run / "model"
    if is_model_dir(model_dir):
        print(f"[vislang] {model_dir} exists: evaluating it again (pass --fresh to retrain)")
    else:
        resume = (run / "checkpoints" / "last.pt").is_file()
        model_dir = train(cfg, resume=resume)
    t_train = time.time() - t0
    results = evaluate_model_dir(
        model_dir, data=cfg.data.train, split=cfg.data.val_split, out_dir=run / "eval", train_split=cfg.data.train_split
    )
    export_sample_images(run / "images", n=500)
    report = write_report(run)
    h = results.get("headline", {})
    print("\n== vislang demo: Fashion-MNIST ==")
    for k, v in h.items():
        print(f"  {k:32s} {v:.4f}" if isinstance(v, float) else f"  {k:32s} {v}")
    print(f"  {'training time (s)':32s} {t_train:.0f}")
    print(f"report: {report}")
    return 0
