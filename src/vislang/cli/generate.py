"""`vislang generate` (text → image grid or interpolation strip) and `vislang generate-eval`: thin layers over
``generate.sample`` and ``generate.evaluate``."""

from __future__ import annotations

import argparse
import json
import warnings

EXAMPLES = """
    examples:
      vislang generate "a photo of a sneaker" -n 16 -o runs/grid.png --seed 0 --model runs/gan-fm
      vislang generate "a photo of a sneaker" --to "a photo of a sandal" --steps 10 -o strip.png --model runs/gan-fm
      vislang generate "a red circle" "a blue square" -n 8 -o shapes.png --model runs/gan-shapes
    Train a generator first: vislang train --config gan"""


def generate_to_file(
    model_dir: str,
    prompts: list[str],
    out: str,
    n: int = 16,
    seed: int | None = None,
    to: str | None = None,
    steps: int = 8,
    scale: int = 2,
    device: str = "cpu",
) -> str:
    """Write a PNG grid (one row of ``n`` per prompt, ``n`` up to 16 per row), or with ``to`` an interpolation strip
    from ``prompts[0]`` to ``to`` under one fixed noise."""
    # lazy: `vislang --help` starts without loading torch
    from ..models.gan.pipeline import TextToImage, check_count, save_grid

    check_count(n)
    model = TextToImage.from_pretrained(model_dir, device)
    if to is not None:
        if len(prompts) != 1:
            raise ValueError("--to interpolates from one prompt: give exactly one prompt before it")
        images = model.interpolate(prompts[0], to, steps=steps, seed=0 if seed is None else seed)
        return str(save_grid(images, out, ncol=steps, scale=scale))
    images = model.generate(prompts, n=n, seed=seed)
    return str(save_grid(images, out, ncol=min(n, 16), scale=scale))


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model_dir import run_or_model_dir  # lazy: `vislang --help` starts without loading torch

    out = args.out or str(run_or_model_dir(args.model).resolve().parent / "generated" / "grid.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = generate_to_file(
            args.model, args.prompts, out, n=args.n, seed=args.seed, to=args.to, steps=args.steps,
            scale=args.scale, device=args.device,
        )  # fmt: skip
    for w in caught:
        print(f"warning: {w.message}")
    print(f"wrote {path}")
    return 0


def cmd_generate_eval(args: argparse.Namespace, extra: list[str]) -> int:
    # lazy: `vislang --help` starts without loading torch
    from ..evaluation.gan import evaluate_gan_seeds, results_table

    if args.out and len(args.model) > 1:
        raise ValueError("--out takes one model; leave it out to write each run's own eval/ folder")
    from ..config import number_list  # lazy: `vislang --help` starts without loading torch

    seeds = number_list(args.seed, int, "seeds", "0 or 0,1,2")
    results = {
        m: evaluate_gan_seeds(
            m,
            seeds,
            judge=args.judge,
            out_dir=args.out,
            n_per_class=args.n_per_class,
            inception_weights=args.inception_weights,
            device=args.device,
        )
        for m in args.model
    }
    if len(results) == 1:
        print(json.dumps(next(iter(results.values())), indent=2))
    elif all(r.get("data") != "shapes" for r in results.values()):
        print(results_table(results))
    else:
        print(json.dumps(results, indent=2))
    return 0


def cmd_generate_ensemble(args: argparse.Namespace, extra: list[str]) -> int:
    from ..models.gan.pipeline import build_ensemble  # lazy: `vislang --help` starts without loading torch

    model = build_ensemble(args.members, args.out)
    k = len(model.cfg.members)
    print(f"wrote {args.out}: {k} generators, each drawing 1/{k} of the images")
    print(f"measure it: vislang generate-eval --model {args.out} " + " ".join(args.members))
    return 0


def cmd_generate_tune(args: argparse.Namespace, extra: list[str]) -> int:
    # lazy: `vislang --help` starts without loading torch
    from ..evaluation.gan_tune import format_rows, parse_scales, tune_noise_scale

    res = tune_noise_scale(args.model, args.judge, parse_scales(args.scales), n=args.n, seed=args.seed, out=args.out)
    print(format_rows(res))
    print(f"real vs real (two training samples of {res['n']}): {res['floor']:.4f}")
    best = res["best"]["noise_scale"]
    if args.out:
        print(f"wrote {args.out}: samples with noise scale {best:g} (plot: {args.out}/noise_scale.png)")
        print(f"measure it on the test split: vislang generate-eval --model {args.out} {args.model} "
              f"--judge {args.judge}")  # fmt: skip
    else:
        print(f"best noise scale {best:g}; add -o DIR to write a copy that samples with it")
    return 0


def register(add) -> None:
    import textwrap

    sp = add("generate", "text → image with a trained GAN: a PNG grid, or an interpolation strip between prompts",
             cmd_generate)  # fmt: skip
    sp.epilog = textwrap.dedent(EXAMPLES)
    sp.add_argument("prompts", nargs="+", help='what to draw, e.g. "a photo of a sneaker" (several: one row each)')
    sp.add_argument("--model", default="runs/gan-fm", help="GAN model or run directory (default: runs/gan-fm)")
    sp.add_argument("-n", type=int, default=16, help="images per prompt (default 16)")
    sp.add_argument("-o", "--out", default=None, help="output PNG (default: RUN/generated/grid.png, beside the model)")
    sp.add_argument("--seed", type=int, default=None, help="fix the noise: the same seed gives the same images")
    sp.add_argument("--to", default=None, help="interpolate from the prompt to this one (a strip PNG)")
    sp.add_argument("--steps", type=int, default=8, help="images in the interpolation strip (default 8)")
    sp.add_argument("--scale", type=int, default=2, help="upscale the PNG this many times (default 2)")
    sp.add_argument("--device", default="cpu")

    sp = add("generate-eval", "FID-FM / KID / IS-style / class consistency / CLIP score of a GAN (shapes: colour and "
             "shape match, and two-object layouts judged by pixel colour)", cmd_generate_eval)  # fmt: skip
    sp.add_argument("--model", required=True, nargs="+", help="GAN model or run directories (several: a table)")
    sp.add_argument("--judge", default=None, help="fixed classifier directory (default runs/gan-judge/model)")
    sp.add_argument("--n-per-class", type=int, default=1000, help="generated images per class prompt (default 1000)")
    sp.add_argument("--inception-weights", default=None, help="local Inception-v3 weights file for the standard FID")
    sp.add_argument("--out", default=None, help="results folder (default: RUN/eval)")
    sp.add_argument("--seed", default="0", help="noise seed, or several (0,1,2): each in OUT/seed-S, their mean and "
                    "spread in OUT/results.json (default 0)")  # fmt: skip
    sp.add_argument("--device", default="cpu")
    sp.epilog = textwrap.dedent("""
        examples:
          vislang finetune --model fmnist-cnn --method scratch --out runs/finetune    # a fixed judge classifier
          vislang generate-eval --model runs/gan-fm --judge runs/finetune/scratch/model
          vislang generate-eval --model runs/gan-fm runs/gan-ens --judge runs/finetune/scratch/model --seed 0,1,2
          vislang generate-eval --model runs/gan-shapes                 # shapes: colour and shape as asked""")

    sp = add("generate-ensemble", "pool separately trained GANs into one model: each image is drawn by one of them, "
             "picked by its noise", cmd_generate_ensemble)  # fmt: skip
    sp.epilog = textwrap.dedent("""
        Generators trained apart (other seeds or configs) cover different parts of each class; pooled they measure
        a lower FID than each alone (docs/gan-fashion-mnist.md). The members must share the text tower (text_model),
        noise size and image size. The result works with generate, generate-eval and serve; export and compress
        take the members one by one.
        example:
          vislang train --config gan --seed=1 --out_dir=runs/gan-s1
          vislang generate-ensemble runs/gan-fm runs/gan-s1 -o runs/gan-ens
          vislang generate "a photo of a sneaker" --model runs/gan-ens -o runs/grid.png""")
    sp.add_argument("members", nargs="+", help="GAN model or run directories (two or more)")
    sp.add_argument("-o", "--out", required=True, help="the ensemble's model directory (written atomically)")

    sp = add("generate-tune", "choose a GAN's sampling noise scale by FID-FM on the training split (BigGAN's "
             "truncation, and its opposite)", cmd_generate_tune)  # fmt: skip
    sp.epilog = textwrap.dedent("""
        Samples with noise × s for each scale s and measures FID-FM against training images (never the test split
        that generate-eval reports on), then writes a copy of the model that samples with the best one. Below 1:
        cleaner, less varied images; above 1: wider classes, which helps a generator whose classes are too narrow.
        example:
          vislang generate-tune runs/gan-fm --judge runs/finetune/scratch/model -o runs/gan-fm-tuned
          vislang generate-eval --model runs/gan-fm-tuned runs/gan-fm --judge runs/finetune/scratch/model""")
    sp.add_argument("model", help="GAN model or run directory (an ensemble too)")
    sp.add_argument("--judge", required=True, help="the fixed classifier whose features FID-FM uses")
    sp.add_argument("--scales", default="0.9,1,1.05,1.1,1.15,1.2,1.3", help="noise scales to try (default %(default)s)")
    sp.add_argument("-n", type=int, default=10_000, help="generated and training images per scale (default 10000)")
    sp.add_argument("--seed", type=int, default=0, help="training sample and noise seed")
    sp.add_argument("-o", "--out", default=None, help="write the tuned copy here (atomically); default: only measure")
