"""CLI subcommands for multimodal understanding: ``vqa``, ``ablate-fusion``, ``explain``."""

from __future__ import annotations

import argparse
import json


def cmd_vqa(args: argparse.Namespace, extra: list[str]) -> int:
    from ..understand.vqa_train import answer_probability, predict_answer

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


def cmd_ablate_fusion(args: argparse.Namespace, extra: list[str]) -> int:
    from ..understand.ablate import ablate_fusion

    md = ablate_fusion(
        args.out,
        fusions=args.fusions.split(","),
        n_train=args.n_train,
        n_test=args.n_test,
        epochs=args.epochs,
        time_budget_s=args.time_budget,
        data=args.data,
        test_data=args.test_data,
    )
    print(md.read_text())
    return 0


def cmd_explain(args: argparse.Namespace, extra: list[str]) -> int:
    from ..understand.explain import explain

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
    sp.add_argument("--epochs", type=int, default=5)
    sp.add_argument("--time-budget", type=float, default=None, help="seconds of training per fusion")

    sp = add(
        "explain", "write a PNG saliency overlay: Grad-CAM (dual encoder) or cross-attention (VQA model)", cmd_explain
    )
    sp.add_argument("image", help="an image file")
    sp.add_argument("text", help="the text (caption or question) to explain")
    sp.add_argument("--model", required=True, help="a dual-encoder or VQA model directory")
    sp.add_argument("--out", default="explain.png", help="output PNG")
