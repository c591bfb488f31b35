"""CLI subcommands for multimodal understanding: ``vqa``, ``ablate-fusion``, ``explain``."""

from __future__ import annotations

import argparse
import json
import textwrap

from ..evaluation.explain import explain
from ..models.vqa_generative import answer_probability, predict_answer
from ..train import ablate  # the module, so ablate.ablate_fusion is looked up per call (a test replaces it)


def cmd_vqa(args: argparse.Namespace, extra: list[str]) -> int:
    if args.answer:
        ranked = [(args.answer, answer_probability(args.model, args.image, args.question, args.answer))]
    else:
        ranked = predict_answer(args.model, args.image, args.question, top_k=max(args.top_k, 1))
    if args.json:
        print(json.dumps([{"answer": a, "probability": p} for a, p in ranked], indent=2))
    else:
        for a, p in ranked:
            print(f"{a}\t{p:.3f}")
    return 0


# The README's fusion table gave every fusion the same 15 minutes: the slow cross-attention ran 349 steps to gated's
# 999, so a fixed epoch count would compare different amounts of compute instead of the same time.
ABLATE_BUDGET_S = 900.0
# Epochs when a time budget is set: more than any fusion finishes, so the budget alone fits each schedule.
BUDGET_EPOCHS = 1000
NO_BUDGET_EPOCHS = 5


def ablate_epochs(epochs: int | None, time_budget_s: float | None) -> int:
    """The epoch count ablate-fusion trains with: the one given, or enough for the budget to decide, or 5."""
    if time_budget_s is not None and time_budget_s < 0:
        raise ValueError(f"--time-budget {time_budget_s:g} is negative; give seconds per fusion, or 0 for no limit")
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs {epochs} must be at least 1")
    if epochs is not None:
        return epochs
    return BUDGET_EPOCHS if time_budget_s else NO_BUDGET_EPOCHS


def cmd_ablate_fusion(args: argparse.Namespace, extra: list[str]) -> int:
    md = ablate.ablate_fusion(
        args.out,
        fusions=args.fusions.split(","),
        n_train=args.n_train,
        n_test=args.n_test,
        epochs=ablate_epochs(args.epochs, args.time_budget),
        time_budget_s=args.time_budget or None,
        data=args.data,
        test_data=args.test_data,
    )
    print(md.read_text())
    return 0


def cmd_explain(args: argparse.Namespace, extra: list[str]) -> int:
    out = explain(args.model, args.image, args.text, args.out)
    print(f"wrote {out}")
    return 0


def register(add) -> None:
    sp = add("vqa", "answer a question about an image with a trained VQA model (answer and its probability)", cmd_vqa)
    sp.add_argument("image", help="an image file")
    sp.add_argument("question", help='the question, e.g. "what colour is the circle?"')
    sp.add_argument(
        "--model", required=True, help="VQA model directory: runs/vqa/model, or a generative one (runs/vqa-gen/model)"
    )
    sp.add_argument("--top-k", type=int, default=1, help="print the k most probable answers")
    sp.add_argument("--answer", help="print the probability of this answer instead")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.epilog = textwrap.dedent("""
        examples:
          vislang train --config vqa                          # the classifier head: runs/vqa/model
          vislang vqa runs/scenes/000000.png "what colour is the star?" --model runs/vqa/model
          vislang vqa runs/scenes/000000.png "how many shapes are there?" --model runs/vqa/model --top-k 3
          vislang vqa runs/scenes/000000.png "is there a red circle?" --model runs/vqa-gen/model --answer yes""")

    sp = add(
        "ablate-fusion",
        "train a VQA model per fusion on the same data and budget; markdown + PNG table",
        cmd_ablate_fusion,
    )
    sp.add_argument("--out", default="runs/ablate-fusion", help="output directory")
    sp.add_argument("--fusions", default="concat,sum,gated,cross_attention", help="comma-separated fusion names")
    sp.add_argument("--data", default="shapes", help="shapes, or a JSONL/CSV file of image, question, answer")
    sp.add_argument("--test-data", default=None, help="evaluation file (with --data FILE)")
    sp.add_argument("--n-train", type=int, default=3000, help="shapes: training scenes")
    sp.add_argument("--n-test", type=int, default=500, help="shapes: test and holdout scenes")
    sp.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"passes over the training scenes per fusion (default: as many as --time-budget holds; "
        f"{NO_BUDGET_EPOCHS} with --time-budget 0)",
    )
    sp.add_argument(
        "--time-budget",
        type=float,
        default=ABLATE_BUDGET_S,
        help=f"seconds of training per fusion, the same for each (default {ABLATE_BUDGET_S:g}: the README table's "
        "15 min each; 0 = no limit, train --epochs)",
    )
    sp.epilog = textwrap.dedent("""
        Trains one VQA model per fusion (concatenation W[F_I;F_T]+b, sum, gated, cross-attention) on the same
        scenes and the same time budget, then writes OUT/ablation.md and a PNG table.
        examples:
          vislang ablate-fusion --time-budget 900 --out runs/ablate-fusion      # the README table, 15 min each
          vislang ablate-fusion --fusions concat,gated --time-budget 60 --n-train 500 --out runs/ablate-quick""")

    sp = add(
        "explain", "write a PNG saliency overlay: Grad-CAM (dual encoder) or cross-attention (VQA model)", cmd_explain
    )
    sp.add_argument("image", help="an image file")
    sp.add_argument("text", help="the text (caption or question) to explain")
    sp.add_argument("--model", required=True, help="a dual-encoder or VQA model directory")
    sp.add_argument("--out", default=None, help="output PNG (default: RUN/explain/IMAGE-NAME.png, beside the model)")
    sp.epilog = textwrap.dedent("""
        Also writes the raw map as .npy next to the PNG.
        examples:
          vislang explain runs/scenes/000000.png "a blue star" --model runs/vqa/model        # cross-attention
          vislang explain runs/demo/images/test_00000.png "a photo of a bag" --model runs/demo/model \\
            --out runs/bag.png""")
