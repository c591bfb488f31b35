"""`vislang compress`, `vislang export` and `vislang compare`: thin parsers over the compress and export packages."""

from __future__ import annotations

import argparse
import json
import textwrap

from ..compress.api import METHODS

# compress_model_dir keywords a --config file (YAML/JSON) may set; a flag given with another value than its default
# and then leftover --a.b=value overrides win over the file
OPTIONS = ("data", "data_options", "sparsity", "prune_kind", "steps", "lr", "batch_size", "student",
           "calibration_images", "keep_fp32", "max_pairs", "cache_dir", "seed", "log_every", "adv_weight")  # fmt: skip


def compress_options(args: argparse.Namespace, extra: list[str]) -> dict:
    """Keyword arguments of ``compress_model_dir``: the --config file, the flags given, then dotted overrides."""
    from ..config import apply_overrides, load_file  # lazy: `vislang --help` starts without loading torch
    from .main import _overrides  # lazy: `vislang --help` starts without loading torch

    opts = load_file(args.config) if args.config else {}
    for key in OPTIONS:
        if hasattr(args, key) and (key not in opts or getattr(args, key) != args.flag_defaults.get(key)):
            opts[key] = getattr(args, key)
    if extra:
        opts = apply_overrides(opts, _overrides(extra))
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise SystemExit(f"error: unknown compress option(s) {unknown}; valid ones are {list(OPTIONS)}")
    opts["keep_fp32"] = tuple(opts.get("keep_fp32") or ())
    return opts


def cmd_compress(args: argparse.Namespace, extra: list[str]) -> int:
    from ..compress.api import compress_model_dir  # lazy: `vislang --help` starts without loading torch

    info = compress_model_dir(args.model_dir, args.method, args.out, **compress_options(args, extra))
    print(json.dumps({k: v for k, v in info.items() if k != "modules"}, indent=2))
    for note in info.get("notes", []):
        print(f"note: {note}")
    print(f"model: {args.out}")
    return 0


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from ..export.onnx import export_onnx  # lazy: `vislang --help` starts without loading torch

    report = export_onnx(args.model_dir, args.onnx, check=not args.no_check, tol=args.tol)
    if "image_max_abs_diff" in report:
        print(f"image tower: max abs diff vs PyTorch {report['image_max_abs_diff']:.2e}")
        print(f"text tower:  max abs diff vs PyTorch {report['text_max_abs_diff']:.2e}")
    if "step_max_abs_diff" in report:
        print(f"caption context: max abs diff vs PyTorch {report['context_max_abs_diff']:.2e}")
        print(f"decoder step:    max abs diff vs PyTorch {report['step_max_abs_diff']:.2e}")
    if "generator_max_abs_diff" in report:
        print(f"generator:   max abs diff vs PyTorch {report['generator_max_abs_diff']:.2e}")
        print(f"text tower:  max abs diff vs PyTorch {report['text_max_abs_diff']:.2e}")
    print(f"onnx: {report['out_dir']}")
    return 0


def _int_list(text: str) -> list[int]:
    """argparse type for "1,8,256": positive integers, or a usage error that names the bad item."""
    from ..config import number_list  # lazy: `vislang --help` starts without loading torch

    try:
        sizes = number_list(text, int, "batch sizes", "1,8,256")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be positive integers, e.g. 1,8,256")
    return sizes


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    from ..compress.compare import compare_models, markdown_table  # lazy: `vislang --help` starts without loading torch

    out = args.out or str(Path(args.models[0]).parent / "compare")
    rows = compare_models(
        args.models,
        data=None if args.data == "none" else args.data,
        max_images=args.max_images,
        batch_size=args.batch_size,
        rounds=args.rounds,
        out_dir=out,
        cache_dir=args.cache_dir,
        caption_images=args.caption_images,
        speed_batches=args.speed_batches,
        judge=args.judge,
    )
    print(markdown_table(rows))
    print(f"wrote {out}/compare.md, compare.png, compare.json")
    return 0


def register(add) -> None:
    """Add `compress`, `export` and `compare` (``add(name, help, fn) -> ArgumentParser``)."""
    _add_compress(add)
    _add_export_and_compare(add)


def _add_compress(add) -> None:
    sp = add("compress", "int8-quantise, prune or distil a model directory into a smaller one", cmd_compress)
    sp.add_argument("model_dir", help="a model or run directory (e.g. runs/demo/model, or a GAN run runs/gan-fm)")
    sp.add_argument("--config", help="YAML/JSON of options (data, steps, lr, ...); flags and --a.b=value override it")
    sp.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help="dual encoders and GAN generators: all four; captioners: the int8 ones; VQA models: dynamic-int8",
    )
    sp.add_argument("-o", "--out", required=True, help="output model directory")
    sp.add_argument(
        "--data",
        default=None,
        help="training data for fine-tune / distillation / calibration (default: a GAN's own, else fashion-mnist)",
    )
    sp.add_argument("--sparsity", type=float, default=0.5, help="prune: fraction of weights set to zero, in (0, 1)")
    sp.add_argument("--prune-kind", default="unstructured", choices=["unstructured", "structured"])
    sp.add_argument(
        "--steps",
        type=int,
        default=None,
        help="fine-tune (prune, default 200; generators 300) or distillation steps (600; generators 3000)",
    )
    sp.add_argument("--lr", type=float, default=None)
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument(
        "--student",
        action="append",
        metavar="KEY=VALUE",
        help="distill: student config overrides (text.layers=1; a generator: g_width=4)",
    )
    sp.add_argument("--calibration-images", type=int, default=512, help="static-int8: training images to calibrate")
    sp.add_argument(
        "--keep-fp32",
        action="append",
        metavar="MODULE",
        help="static-int8: a CNN block left in fp32 (stages.0.0 = the first conv block); repeatable",
    )
    sp.add_argument(
        "--adv-weight",
        type=float,
        default=0.1,
        help="generators (prune): weight of the training run's frozen discriminator beside L1 to the "
        "original's images; pass the run directory so it is found (0 = L1 only, which blurs; 0.3 and more let the "
        "student fool the frozen discriminator instead)",
    )
    sp.add_argument("--max-pairs", type=int, default=None, help="use only the first N training pairs")
    sp.add_argument("--cache-dir", default=".cache/vislang/prepared")
    sp.add_argument("--log-every", type=int, default=50)
    sp.set_defaults(flag_defaults={a.dest: a.default for a in sp._actions})
    sp.epilog = textwrap.dedent("""
        examples:
          vislang compress runs/demo/model --method static-int8 -o runs/demo/int8
          vislang compress runs/demo/model --method prune --sparsity 0.5 -o runs/demo/prune50
          vislang compress runs/demo/model --method distill --student text.layers=1 -o runs/demo/student
          vislang compress runs/gan-fm --method dynamic-int8 -o runs/gan-fm-c/dyn8     # a GAN run's generator
          vislang compress runs/demo/model --method prune --config my-prune.yaml --steps=400 -o runs/demo/p""")


def _add_export_and_compare(add) -> None:
    sp = add("export", "export a model's image and text towers to ONNX, checked against PyTorch", cmd_export)
    sp.add_argument("model_dir", help="a model directory")
    sp.add_argument("--onnx", required=True, metavar="OUT_DIR", help="where the .onnx files, config and tokenizer go")
    sp.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")
    sp.add_argument("--tol", type=float, default=1e-4, help="max abs difference allowed by the check")
    sp.epilog = textwrap.dedent("""
        The export directory loads with vislang.load and runs through onnxruntime in embed, index build, search
        and serve (--backend onnx, or picked by the directory).
        examples:
          vislang export runs/demo/model --onnx runs/demo/onnx
          vislang embed --model runs/demo/onnx --texts "a bag" -o runs/bag.npy
          vislang export runs/gan-fm --onnx runs/gan-fm/onnx           # a GAN: generator.onnx + its text tower""")

    sp = add("compare", "size, parameters, images/s, texts/s and accuracy of several models in one table", cmd_compare)
    sp.add_argument("models", nargs="+", help="model directories or ONNX exports; ratios are against the first")
    sp.add_argument("--data", default="fashion-mnist", help="evaluation data ('none' = speed and size only)")
    sp.add_argument("--max-images", type=int, default=None)
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    sp.add_argument("--caption-images", type=int, default=200, help="captioners: test images for CIDEr (greedy)")
    sp.add_argument(
        "--speed-batches",
        type=_int_list,
        default=None,
        metavar="N,N,...",
        help="also time each model at these batch sizes (e.g. 1,8,64,256): int8 gains most on small batches",
    )
    sp.add_argument(
        "--judge",
        default=None,
        help="generators: the fixed classifier FID-FM is measured with (default runs/gan-judge/model); "
        "--max-images = images generated, 1,000 per class by default",
    )
    sp.add_argument("-o", "--out", default=None, help="where compare.md/.png/.json go (default: FIRST/../compare)")
    sp.epilog = textwrap.dedent("""
        Each ratio is the median of per-round paired ratios against the first model, with its interquartile range.
        examples:
          vislang compare runs/demo/model runs/demo/int8 runs/demo/onnx
          vislang compare runs/demo/model runs/demo/int8 --data none --rounds 9 --speed-batches 1,8,256
          vislang compare runs/gan-fm/model runs/gan-fm-c/static --judge runs/finetune/scratch/model""")
    sp.add_argument("--cache-dir", default=".cache/vislang/prepared")
