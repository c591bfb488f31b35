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

Each method writes OUT/<method>/model (load it with vislang.from_pretrained) and OUT/<method>/metrics.json
(test top-1 and accuracy per class). probe: logistic regression on the frozen tower's features; full: probe head,
then tower + head end to end (tower at --tower-lr-scale of --lr); scratch: the same architecture, random init.
"""


def cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    from .run import FinetuneConfig, comparison_table, finetune

    cfg = FinetuneConfig(
        model=args.model,
        data=args.data,
        test_data=args.test_data,
        img_key=args.img_key,
        label_key=args.label_key,
        val_fraction=args.val_fraction,
        max_train=args.max_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        tower_lr_scale=args.tower_lr_scale,
        augment=not args.no_augment,
        label_smoothing=args.label_smoothing,
        time_budget_min=args.time_budget,
        threads=args.threads,
        device=args.device,
        seed=args.seed,
        out_dir=args.out,
        progress=not args.no_progress,
    )
    results = finetune(cfg, args.method.split(","))
    print(comparison_table(results))
    return 0


def register(add) -> None:
    sp = add("finetune", "image classification: linear probe, full fine-tune or from-scratch baseline", cmd_finetune)
    sp.epilog = EXAMPLES
    sp.add_argument("--model", required=True, help="model directory with an image tower; scratch also: a config name")
    sp.add_argument("--method", default="full", help="probe, full, scratch, or several: probe,full,scratch")
    sp.add_argument("--data", default="fashion-mnist", help="fashion-mnist, shapes, a folder of class folders, a CSV")
    sp.add_argument("--test-data", help="test set for a folder/CSV (default: hold out 20%% of --data)")
    sp.add_argument("--img-key", default="filepath", help="CSV column with image paths")
    sp.add_argument("--label-key", default="label", help="CSV column with class labels")
    sp.add_argument("--val-fraction", type=float, default=0.1, help="share of training images held out (default 0.1)")
    sp.add_argument("--max-train", type=int, help="use only N training images (quick runs)")
    sp.add_argument("--epochs", type=float, default=3.0, help="full/scratch: passes over the training set")
    sp.add_argument("--batch-size", type=int, default=128)
    sp.add_argument("--lr", type=float, help="peak lr of the head, scratch: of all (default full 2e-4, scratch 2e-3)")
    sp.add_argument("--tower-lr-scale", type=float, default=0.1, help="full: tower lr = lr * this (default 0.1)")
    sp.add_argument("--no-augment", action="store_true", help="no random shifts / flips")
    sp.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (default 0)")
    sp.add_argument("--time-budget", type=float, help="minutes of training per method (the schedule is fitted)")
    sp.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared machine)")
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default="runs/finetune", help="output directory (default runs/finetune)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
