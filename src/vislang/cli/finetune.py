"""CLI subcommand ``finetune``: train image classifiers from a pretrained tower, or from scratch, and compare them."""

from __future__ import annotations

import argparse

EXAMPLES = """
examples:
  vislang finetune --model runs/demo/model --method probe,full,scratch --out runs/finetune
      # the three methods on Fashion-MNIST; prints and writes runs/finetune/results.md
  vislang finetune --model runs/demo/model --method full --epochs 5 --time-budget 10 --threads 1
  vislang finetune --model fmnist-cnn --method scratch --epochs 10     # a named architecture from random init
  vislang finetune --model runs/shapes/model --data my_photos/ --method probe   # my_photos/<class>/*.jpg
  vislang finetune --model runs/x/model --data train.csv --test-data test.csv --label-key label
  vislang finetune --config ft.yaml --method full --epochs=5 --weight_decay=0.1   # YAML, flags, then a.b=value

Each method writes OUT/<method>/model (load it with vislang.from_pretrained) and OUT/<method>/metrics.json
(test top-1 and accuracy per class). probe: logistic regression on the frozen tower's features; full: probe head,
then tower + head end to end (tower at --tower-lr-scale of --lr); scratch: the same architecture, random init.
"""


# flag → FinetuneConfig field; a flag given on the command line fills its field over the --config file's value
FLAGS = {
    "model": "model", "data": "data", "test_data": "test_data", "img_key": "img_key", "label_key": "label_key",
    "val_fraction": "val_fraction", "max_train": "max_train", "epochs": "epochs", "batch_size": "batch_size",
    "lr": "lr", "tower_lr_scale": "tower_lr_scale", "label_smoothing": "label_smoothing",
    "time_budget": "time_budget_min", "threads": "threads", "device": "device", "seed": "seed", "out": "out_dir",
}  # fmt: skip


def finetune_config(args: argparse.Namespace, extra: list[str]):
    """``FinetuneConfig`` from ``--config`` (YAML/JSON), then the flags given, then ``--a.b=value`` overrides."""
    from ..config import apply_overrides, from_dict, load_file  # lazy: `vislang --help` starts without loading torch
    from ..train.finetune import FinetuneConfig  # lazy: `vislang --help` starts without loading torch
    from .main import _overrides  # lazy: `vislang --help` starts without loading torch

    data = load_file(args.config) if args.config else {}
    data.update({field: getattr(args, flag) for flag, field in FLAGS.items() if getattr(args, flag) is not None})
    if args.no_augment:
        data["augment"] = False
    if args.no_progress:
        data["progress"] = False
    if extra:
        data = apply_overrides(data, _overrides(extra))
    if "probe_cs" in data and isinstance(data["probe_cs"], list):
        data["probe_cs"] = tuple(data["probe_cs"])
    if not data.get("model"):
        raise SystemExit("error: give the model: --model DIR (or model: in the --config file)")
    return from_dict(FinetuneConfig, data)


def cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    from ..train.finetune import comparison_table, finetune  # lazy: `vislang --help` starts without loading torch

    cfg = finetune_config(args, extra)
    results = finetune(cfg, args.method.split(","))
    print(comparison_table(results))
    return 0


def register(add) -> None:
    sp = add("finetune", "image classification: linear probe, full fine-tune or from-scratch baseline", cmd_finetune)
    sp.epilog = EXAMPLES
    sp.add_argument("--config", help="YAML/JSON of FinetuneConfig fields; flags and --a.b=value override it")
    sp.add_argument("--model", help="model directory with an image tower; scratch also: a config name")
    sp.add_argument("--method", default="full", help="probe, full, scratch, or several: probe,full,scratch")
    sp.add_argument("--data", help="fashion-mnist, shapes, a folder of class folders, a CSV")
    sp.add_argument("--test-data", help="test set for a folder/CSV (default: hold out 20%% of --data)")
    sp.add_argument("--img-key", help="CSV column with image paths")
    sp.add_argument("--label-key", help="CSV column with class labels")
    sp.add_argument("--val-fraction", type=float, help="share of training images held out (default 0.1)")
    sp.add_argument("--max-train", type=int, help="use only N training images (quick runs)")
    sp.add_argument("--epochs", type=float, help="full/scratch: passes over the training set")
    sp.add_argument("--batch-size", type=int, help="images per step (default 128)")
    sp.add_argument("--lr", type=float, help="peak lr of the head, scratch: of all (default full 2e-4, scratch 2e-3)")
    sp.add_argument("--tower-lr-scale", type=float, help="full: tower lr = lr * this (default 0.1)")
    sp.add_argument("--no-augment", action="store_true", help="no random shifts / flips")
    sp.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (default 0)")
    sp.add_argument("--time-budget", type=float, help="minutes of training per method (the schedule is fitted)")
    sp.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared machine)")
    sp.add_argument("--device", help="auto, cpu or cuda")
    sp.add_argument("--seed", type=int, help="random seed (default 0)")
    sp.add_argument("--out", help="output directory (default runs/finetune)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
