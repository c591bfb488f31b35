"""`vislang caption IMAGE...`, `vislang caption-eval` and `vislang render-text`: thin layers over library functions."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from ..evaluation.caption import _decoding, caption_files, evaluate_captions

EXAMPLES = """
    examples:
      vislang caption scene.png --model runs/caption/model               # greedy
      vislang caption photos/ --model runs/caption/model --beam 3        # beam search, width 3
      vislang caption scene.png --model runs/caption/model --top-p 0.9 --temperature 0.8 --seed 0
    Train a captioner first: vislang train --config caption"""
EVAL_EXAMPLES = """
    examples:
      vislang caption-eval --model runs/caption/model                      # shapes: test + held-out combinations
      vislang caption-eval --model runs/caption-text/model --data rendered-text
      vislang caption-eval --model runs/oc/model --data openclipart --nn-baseline
    Then `vislang report runs/caption` shows the table and sample captions."""


def cmd_caption(args: argparse.Namespace, extra: list[str]) -> int:
    decoding = _decoding(args.beam, args.top_p, args.top_k, args.temperature, args.seed)
    pairs = caption_files(args.model, args.images, args.max_length, args.batch_size, args.device,
                          use_cache=not args.no_cache, length_penalty=args.length_penalty, **decoding)  # fmt: skip
    if args.json:
        print(json.dumps([{"image": p, "caption": c} for p, c in pairs], indent=2))
    else:
        for p, c in pairs:
            print(f"{p}\t{c}" if len(pairs) > 1 else c)
    return 0


def cmd_caption_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from ..evaluation.caption_metrics import markdown_table  # lazy: `vislang --help` starts without loading torch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    res = evaluate_captions(args.model, args.data, args.split, args.max_images, args.max_length, args.device,
                            args.out, with_meteor=not args.no_meteor, methods=methods, nn_baseline=args.nn_baseline,
                            nn_model=args.nn_model, nn_train=args.nn_train, cache_dir=args.cache_dir)  # fmt: skip
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=2))
    else:
        print(markdown_table(res["subsets"], res["notes"]))
        print(f"\nwrote {res['written']} (+ .md, caption_samples/)")
    return 0


def cmd_render_text(args: argparse.Namespace, extra: list[str]) -> int:
    # lazy: `vislang --help` starts without loading torch
    from ..data.rendered_text import RenderConfig, RenderedText, write_folder
    from ..data.rendered_zh import Interleaved, RenderedChinese, ZhRenderConfig  # lazy: as above

    if not 0.0 <= args.random_fraction < 1.0:
        print(f"error: --random-fraction must be in [0, 1), got {args.random_fraction}", file=sys.stderr)
        return 2
    if not 0.0 <= args.blank_fraction < 1.0:
        print(f"error: --blank-fraction must be in [0, 1), got {args.blank_fraction}", file=sys.stderr)
        return 2
    if args.lang == "en" and args.split == "test-font":
        print("error: --split test-font is for --lang zh (the English renderer holds out words, not fonts)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.caption == "gloss" and args.lang != "zh":
        print("error: --caption gloss is for --lang zh (English glosses of Chinese words)", file=sys.stderr)
        return 2
    gloss = {"caption": "gloss", "random_fraction": 0.0} if args.caption == "gloss" else {}  # words only
    zh = (
        RenderedChinese(args.split, n=args.n, cfg=ZhRenderConfig(image_size=args.image_size, **gloss))
        if args.lang != "en"
        else None
    )
    if args.lang == "zh":
        ds = zh
    else:
        cfg = RenderConfig(image_size=args.image_size, random_fraction=args.random_fraction,
                           blank_fraction=args.blank_fraction)  # fmt: skip
        en_split = "test" if args.split == "test-font" else args.split
        ds = RenderedText(en_split, n=args.n, cfg=cfg)
        ds = Interleaved(zh, ds) if zh is not None else ds
    print(f"wrote {len(ds)} images to {write_folder(ds, args.out, progress=not args.no_progress)}")
    return 0


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def register(add) -> None:
    """Add `caption`, `caption-eval` and `render-text` (``add(name, help, fn) -> ArgumentParser``)."""
    sp = add("caption", "write a caption for each image with a captioning (CoCa) model", cmd_caption)
    sp.epilog = textwrap.dedent(EXAMPLES)
    sp.add_argument("images", nargs="+", help="image files or folders of images")
    sp.add_argument("--model", required=True, help="model directory trained with a caption decoder")
    sp.add_argument("--beam", type=_positive(int), default=1, help="beam width (default 1 = greedy)")
    sp.add_argument("--length-penalty", type=float, default=1.0, help="beam ranking: log p / length**this")
    sp.add_argument("--top-p", type=float, help="nucleus sampling with this probability mass, e.g. 0.9")
    sp.add_argument("--top-k", type=_positive(int), help="sample among the k most likely tokens")
    sp.add_argument("--temperature", type=_positive(float), default=1.0, help="sampling temperature (default 1)")
    sp.add_argument("--seed", type=int, help="makes sampling repeatable")
    sp.add_argument("--max-length", type=_positive(int), default=None,
                    help="most tokens per caption (default: what the model's text context holds)")  # fmt: skip
    sp.add_argument("--batch-size", type=_positive(int), default=64)
    sp.add_argument("--no-cache", action="store_true", help="recompute every position each step (slower, same text)")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add("caption-eval", "BLEU-1..4, METEOR, ROUGE-L, CIDEr per decoding method on a held-out split",
             cmd_caption_eval)  # fmt: skip
    sp.epilog = textwrap.dedent(EVAL_EXAMPLES)
    sp.add_argument("--model", required=True, help="model directory")
    sp.add_argument("--data", default="shapes",
                    help="shapes | rendered-text | openclipart | a dataset file or folder")  # fmt: skip
    sp.add_argument("--split", default="test", help="held-out split (default test)")
    sp.add_argument("--max-images", type=_positive(int), default=1000)
    sp.add_argument("--max-length", type=_positive(int), default=None,
                    help="most tokens per caption (default: what the model's text context holds)")  # fmt: skip
    sp.add_argument("--methods", help="comma-separated decoding methods (default greedy,beam3,top_p0.9)")
    sp.add_argument("--nn-baseline", action="store_true",
                    help="also score the caption of the most similar training image (side by side)")  # fmt: skip
    sp.add_argument("--nn-model", help="model directory whose image embedding picks the neighbour (default --model)")
    sp.add_argument("--nn-train", help="dataset the neighbours come from (default: --data, train split)")
    sp.add_argument("--cache-dir", default=".cache/vislang/prepared", help="prepared-dataset cache")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--out", help="results JSON path (default: eval/captions.json beside the model directory)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    sp.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java process takes ~10 s to start)")

    sp = add("render-text", "write a folder of rendered words (PNG + .txt) for training a text reader",
             cmd_render_text)  # fmt: skip
    sp.add_argument("out", help="output folder")
    sp.add_argument("--lang", default="en", choices=["en", "zh", "mixed"],
                    help="en: English words; zh: Chinese HSK words, across or down; mixed: both in turn")  # fmt: skip
    sp.add_argument("--split", default="train", choices=["train", "val", "test", "test-font"],
                    help="test: held-out words; test-font (zh): training words in the held-out font")  # fmt: skip
    sp.add_argument("--n", type=_positive(int), default=20_000)
    sp.add_argument("--image-size", type=_positive(int), default=64)
    sp.add_argument(
        "--random-fraction",
        type=float,
        default=0.0,
        help="share of English train/val items that are random letter strings rather than words (0.3 trains a "
        "reader that reads letters instead of recalling its word list; test stays real words; zh always mixes in "
        "random character strings)",
    )
    sp.add_argument("--blank-fraction", type=float, default=0.05,
                    help="share of English train/val items without text (a bare background or a picture, captioned "
                         "'∅'), so the reader learns to say 'no text' (zh always mixes in 5%%)")  # fmt: skip
    sp.add_argument("--caption", default="text", choices=["text", "gloss"],
                    help="zh: caption each image with its text (a reader) or with the word's English gloss from "
                    "CC-CEDICT (words only: the end-to-end translator, config read-zh-gloss)")  # fmt: skip
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.epilog = textwrap.dedent("""
        Writes OUT/000000.png + 000000.txt, ...: a folder any command reads (train, caption-eval, index build).
        examples:
          vislang render-text runs/rendered-text/train --split train --n 40000 --random-fraction 0.3
          vislang render-text runs/rendered-text/val --split val --n 1000 --random-fraction 0.3
          vislang train --config caption-text                 # reads runs/rendered-text/{train,val}""")
