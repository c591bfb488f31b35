"""`vislang` command line: each subcommand parses its options and calls one plain function."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub call must fail at once, never hang
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ..config import PACKAGED_CONFIGS  # noqa: E402  (after the environment above, like every vislang import)

# Modules that add subcommands (each defines ``register(add)``, ``add(name, help, fn) -> ArgumentParser``).
COMMAND_MODULES = (
    "vislang.cli.index",
    "vislang.cli.serve",
    "vislang.cli.compress",
    "vislang.cli.caption",
    "vislang.cli.vqa",
    "vislang.cli.generate",
    "vislang.cli.finetune",
    "vislang.cli.video",
    "vislang.cli.read",
)


def _config_path(spec: str | None) -> str | None:
    """A config file path, or the name of a packaged one (demo, tiny)."""
    if spec is None or Path(spec).is_file():
        return spec
    packaged = PACKAGED_CONFIGS / f"{spec}.yaml"
    if packaged.is_file():
        return str(packaged)
    raise SystemExit(f"error: config {spec!r} not found; give a YAML path or one of {_packaged_names()}")


def _packaged_names() -> list[str]:
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


OVERRIDE_ALIASES = {"unlock_last": "lit.unlock_last_image"}  # short spellings of long run-config keys


def _overrides(extra: list[str]) -> list[str]:
    """Turn leftover ``--a.b=1``, ``--a.b 1`` and ``a.b=1`` tokens into ``a.b=1`` strings (dashes → underscores;
    ``OVERRIDE_ALIASES`` spelled out: ``--unlock-last 1`` is ``lit.unlock_last_image=1``)."""
    out, i = [], 0
    while i < len(extra):
        tok = extra[i]
        if tok.startswith("--") and "=" not in tok:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise SystemExit(f"error: option {tok} needs a value: {tok}=VALUE")
            tok, i = f"{tok}={extra[i + 1]}", i + 1
        key, _, value = tok.lstrip("-").partition("=")
        if not _:
            raise SystemExit(f"error: unexpected argument {tok!r}; overrides look like --optim.lr=1e-3")
        key = key.replace("-", "_")
        out.append(f"{OVERRIDE_ALIASES.get(key, key)}={value}")
        i += 1
    return out


def train_run_config(config: str | None, extra: list[str]) -> tuple[str, Any]:
    """``(task, run config)`` that ``vislang train --config CONFIG EXTRA...`` would train, without training.

    Apart from ``cmd_train`` so that a command can be checked (unknown config, misspelt ``--a.b=value`` key) without
    running it: tests/test_readme_commands.py checks README's commands this way.
    """
    from ..train import load_train_config  # lazy: `vislang --help` starts without loading torch

    cfg = load_train_config(_config_path(config), _overrides(extra))
    return cfg.task, cfg  # an override may change the task (--task=gan)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from ..train import train  # lazy: `vislang --help` starts without loading torch

    _, cfg = train_run_config(args.config, extra)
    model_dir = train(cfg, resume=args.resume)
    if cfg.task in ("vqa", "vqa-gen"):
        _print_vqa(Path(cfg.out_dir))
    print(f"model: {model_dir}")
    return 0


def _print_vqa(out: Path) -> None:
    """Accuracy per held-out split of a finished VQA run (classifier or generative), from its results.json."""
    results = json.loads((out / "results.json").read_text())
    for split in ("test", "holdout"):
        if split in results:
            per_type = ", ".join(f"{k} {v:.1%}" for k, v in sorted(results[split]["per_type"].items()))
            n_new = results[split].get("new_answers")  # generative: answers outside the training vocabulary
            new = f"; {n_new} answers not in training" if n_new is not None else ""
            print(f"{split} accuracy {results[split]['overall']:.1%} ({per_type}{new})")
    print(f"eval: {out / 'eval' / 'vqa.md'}")


def cmd_export_images(args: argparse.Namespace, extra: list[str]) -> int:
    from ..data.export import export_images  # lazy: `vislang --help` starts without loading torch

    out = export_images(args.src, args.out, split=args.split, n=args.n)
    print(f"wrote {args.n if args.n else 'all'} image(s) with .txt captions to {out}")
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from ..evaluation.run import evaluate_model_dir  # lazy: `vislang --help` starts without loading torch
    from ..models.gan.pipeline import is_gan_dir  # lazy: `vislang --help` starts without loading torch

    if is_gan_dir(args.model):  # a text-to-image GAN: FID-FM, KID, IS-style, class consistency, CLIP score
        from ..evaluation.gan import evaluate_gan  # lazy: `vislang --help` starts without loading torch

        print(json.dumps(evaluate_gan(args.model, judge=args.judge, out_dir=args.out, device=args.device), indent=2))
        return 0

    results = evaluate_model_dir(
        args.model,
        data=args.data,
        split=args.split,
        out_dir=args.out,
        train_split=None if args.no_probe else args.train_split,
        max_images=args.max_images,
        device=args.device,
    )
    print(json.dumps(results.get("headline", results), indent=2))
    return 0


def cmd_rerank_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from ..evaluation.rerank import rerank_model_dir  # lazy: `vislang --help` starts without loading torch

    results = rerank_model_dir(
        args.model,
        data=args.data,
        splits=args.split.split(","),
        k=args.k,
        max_images=args.max_images,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


def cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from ..data.config import DataConfig  # lazy: `vislang --help` starts without loading torch
    from ..data.loading import load_prepared  # lazy: `vislang --help` starts without loading torch

    size, channels = args.image_size, args.channels
    if args.model:
        from ..factory import get_model_config  # lazy: `vislang --help` starts without loading torch

        v = get_model_config(args.model).vision
        size, channels = v.image_size, v.channels
    dc = DataConfig(train=args.src, cache_dir=args.cache_dir, img_key=args.img_key, caption_key=args.caption_key)
    tokenizer = None
    if args.tokenizer:
        from ..tokenizers import load_tokenizer  # lazy: `vislang --help` starts without loading torch

        tokenizer = load_tokenizer(args.tokenizer)
    ds = load_prepared(
        args.src,
        args.split,
        size,
        channels,
        dc,
        tokenizer=tokenizer,
        tokenizer_id=str(Path(args.tokenizer).resolve()) if args.tokenizer else "",
    )
    tokens = f", tokens {ds.tokens.shape[1]} per caption" if ds.tokens is not None else ""
    print(f"prepared {len(ds)} pairs ({size}x{size}x{channels}{tokens}) at {ds.path}")
    return 0


def cmd_embed(args: argparse.Namespace, extra: list[str]) -> int:
    from ..inference import embed_to_file  # lazy: `vislang --help` starts without loading torch

    out = embed_to_file(
        args.model,
        args.out,
        images=args.images,
        texts=args.texts,
        texts_file=args.texts_file,
        batch_size=args.batch_size,
        device=args.device,
        backend=args.backend,
    )
    print(f"wrote {out}")
    return 0


def cmd_zero_shot(args: argparse.Namespace, extra: list[str]) -> int:
    from ..evaluation.run import zero_shot_image  # lazy: `vislang --help` starts without loading torch

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    ranked = zero_shot_image(args.model, args.image, labels, templates=args.template)
    if args.json:
        print(json.dumps([{"label": lab, "probability": p} for lab, p in ranked], indent=2))
    else:
        for lab, p in ranked:
            print(f"{p:7.2%}  {lab}")
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from ..evaluation.report import write_report  # lazy: `vislang --help` starts without loading torch

    print(f"report: {write_report(args.run_dir)}")
    return 0


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from .demo import run_demo  # lazy: `vislang --help` starts without loading torch

    return run_demo(args.out, _overrides(extra), fresh=args.fresh)


def cmd_models(args: argparse.Namespace, extra: list[str]) -> int:
    from ..registry import FAMILIES, named_config, named_configs  # lazy: `vislang --help` starts without loading torch

    for name, kind in named_configs().items():
        c = named_config(name, kind)
        v, t = c.get("vision", {}), c.get("text", {})
        print(f"{name:24s} {FAMILIES[kind].name:26s} image: {v.get('arch')} {v.get('image_size')}px "
              f"x{v.get('channels')}  text: {t.get('arch')}")  # fmt: skip
    return 0


EXAMPLES = {
    "demo": """
        Trains the packaged demo config (fmnist-cnn on Fashion-MNIST), evaluates it and writes OUT/report.html;
        run again, it re-evaluates the saved model. Overrides as in train.
        examples:
          vislang demo                                       # runs/demo
          vislang demo --out runs/demo2 --fresh --epochs=1 --time_budget_min=0""",
    "models": """
        The name goes to --model_name= (train) or --model (finetune, prepare); model_type is the family.
        examples:
          vislang models
          vislang train --config demo --model_name=vit-small-p7 --out_dir=runs/vit""",
    "report": """
        Reads RUN/metrics.jsonl and RUN/eval/ (results.json, PNGs) and writes RUN/report.html.
        examples:
          vislang report runs/demo
          vislang eval --model runs/short/model && vislang report runs/short""",
    "train": """
        examples:
          vislang train --config demo                       # the packaged Fashion-MNIST run
          vislang train --config lit --data.train=photos/   # locked pretrained towers, cached features (LiT)
          vislang train --config lit --unlock-last 1 --epochs=5   # LiT also training the image tower's last block
          vislang train --config my.yaml --epochs=3 --optim.lr=1e-3 --model.vision.width=48
          vislang train --config my.yaml --resume            # continue from runs/.../checkpoints/last.pt
          torchrun --nproc-per-node 2 -m vislang.cli train --config my.yaml
        The config's task picks what is trained: contrastive (CLIP/SigLIP, the default), caption and coca
        (configs caption, caption-text), itm (config itm), vqa (config vqa), vqa-gen (config vqa-gen: answers
        generated by a captioner), gan (configs gan, gan-mlp, gan-shapes), lit (config lit: projections trained on
        cached outputs of locked towers).
        Any field of the run config can be overridden as --a.b=value; see src/vislang/train/config.py
        (VQA runs: its vqa: section, VQATaskConfig; the tasks: src/vislang/train/tasks/vqa.py).""",
    "eval": """
        examples:
          vislang eval --model runs/demo/model --data fashion-mnist
          vislang eval --model runs/x/model --data pairs.csv --split all --no-probe""",
    "rerank-eval": """
        examples:
          vislang train --config itm                         # shapes dual encoder + cross-attention ITM head
          vislang rerank-eval --model runs/itm/model --data shapes --split test,holdout""",
    "export-images": """
        examples:
          vislang export-images shapes runs/scenes --n 8      # runs/scenes/000000.png + 000000.txt, ...
          vislang export-images fashion-mnist runs/fm --n 100 --split train""",
    "prepare": """
        Decodes and resizes a dataset once into memory-mapped arrays (re-used by every run that needs that size).
        examples:
          vislang prepare fashion-mnist --split train --model fmnist-cnn
          vislang prepare my_pairs.csv --img-key path --caption-key text --image-size 64 --channels 3""",
    "embed": """
        examples:
          vislang embed --model runs/demo/model --images photos/ -o image_emb.npy
          vislang embed --model runs/demo/model --texts "a red shoe" "a bag" -o text_emb.parquet""",
    "zero-shot": """
        example:
          vislang zero-shot shoe.png --labels "sneaker,sandal,ankle boot" --model runs/demo/model""",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vislang",
        description="Train, evaluate and use vision-language models on your own images and texts, offline.",
        epilog="Start with `vislang demo` (or `make demo`), then `vislang <command> --help`.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, fn) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=textwrap.dedent(EXAMPLES.get(name, "")),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.set_defaults(fn=fn)
        return sp

    _add_training_commands(add)
    _add_data_commands(add)
    _add_run_commands(add)
    for name in COMMAND_MODULES:  # other homes register their own subcommands: register(add) -> None
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not (e.name and name.startswith(e.name)):
                raise
            continue
        module.register(add)
    return p


def _add_training_commands(add) -> None:
    """train, eval and rerank-eval."""
    sp = add(
        "train", "train any vislang model from a YAML config (its task: key) plus --key=value overrides", cmd_train
    )
    sp.add_argument("--config", help=f"YAML/JSON run config, or a packaged one: {', '.join(_packaged_names())}")
    sp.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last checkpoint")

    sp = add("eval", "zero-shot accuracy, retrieval Recall@K and a linear probe of a trained model", cmd_eval)
    sp.add_argument("--model", required=True, help="model directory (e.g. runs/demo/model)")
    sp.add_argument("--data", default="fashion-mnist", help="dataset name or path (default: fashion-mnist)")
    sp.add_argument("--split", default="test", help="evaluation split (default: test)")
    sp.add_argument("--train-split", default="train", help="split that fits the linear probe (default: train)")
    sp.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    sp.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images only")
    sp.add_argument("--out", default=None, help="where results.json and PNGs go (default: MODEL/../eval)")
    sp.add_argument("--judge", default=None, help="GAN runs: the fixed classifier that scores them (vislang finetune)")
    sp.add_argument("--device", default="cpu")

    sp = add(
        "rerank-eval",
        "Recall@K of an ITM model with and without re-ranking the contrastive top-k by its match head",
        cmd_rerank_eval,
    )
    sp.add_argument("--model", required=True, help="ITM model directory (e.g. runs/itm/model)")
    sp.add_argument("--data", default="shapes", help="dataset name or path (default: shapes)")
    sp.add_argument("--split", default="test", help="comma-separated splits (shapes: test,holdout)")
    sp.add_argument("--k", type=int, default=16, help="candidates re-scored per query (default: 16)")
    sp.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images only")
    sp.add_argument("--out", default=None, help="also write the results JSON here")
    sp.add_argument("--cache-dir", default=".cache/vislang/prepared", help="where prepared images are kept")
    sp.add_argument("--device", default="cpu")


def _add_data_commands(add) -> None:
    """export-images, prepare, embed and zero-shot."""
    sp = add("export-images", "write a dataset's images as PNG files with same-named .txt captions", cmd_export_images)
    sp.add_argument("src", help="fashion-mnist | shapes | openclipart | a file or folder any command reads")
    sp.add_argument("out", help="output folder")
    sp.add_argument("--split", default="test", help="split of a named dataset (default test)")
    sp.add_argument("--n", type=int, default=16, help="how many (default 16; 0 = all)")

    sp = add("prepare", "decode + resize a dataset once into memory-mapped arrays", cmd_prepare)
    sp.add_argument("src", help="fashion-mnist | shapes | openclipart | .csv/.tsv/.jsonl/.json | folder | shards")
    sp.add_argument("--split", default="train")
    sp.add_argument("--model", help="take image size and channels from this model name/directory")
    sp.add_argument("--image-size", type=int, default=64)
    sp.add_argument("--channels", type=int, default=3, choices=[1, 3])
    sp.add_argument("--img-key", default="filepath", help="CSV/JSONL column with image paths")
    sp.add_argument("--caption-key", default="caption", help="CSV/JSONL column with captions")
    sp.add_argument("--cache-dir", default=".cache/vislang/prepared")
    sp.add_argument("--tokenizer", help="also tokenize the captions with this tokenizer (or model) directory")

    sp = add("embed", "embed images or texts with a trained model into .npy or .parquet", cmd_embed)
    sp.add_argument("--model", required=True, help="model directory")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", nargs="+", help="image files or folders")
    g.add_argument("--texts", nargs="+", help="texts to embed")
    g.add_argument("--texts-file", help="a file with one text per line")
    sp.add_argument("-o", "--out", required=True, help="output file: .npy or .parquet (parquet keeps the names)")
    sp.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnx"],
        help="onnx = ONNX Runtime on a `vislang export` directory (auto picks by directory)",
    )
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--device", default="cpu")

    sp = add("zero-shot", "rank candidate labels for one image", cmd_zero_shot)
    sp.add_argument("image", help="an image file")
    sp.add_argument("--labels", required=True, help="comma-separated candidate labels")
    sp.add_argument("--model", required=True, help="model directory")
    sp.add_argument("--template", action="append", help="prompt template(s) with {} (default: a few photo prompts)")
    sp.add_argument("--json", action="store_true", help="print JSON")


def _add_run_commands(add) -> None:
    """report, demo and models."""
    sp = add("report", "write report.html (with PNG plots) for a run directory", cmd_report)
    sp.add_argument("run_dir", help="a run directory (e.g. runs/demo)")

    sp = add("demo", "train + evaluate the default model on Fashion-MNIST and write an HTML report", cmd_demo)
    sp.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    sp.add_argument("--fresh", action="store_true", help="delete an existing run in --out first")

    add("models", "list the built-in model configs", cmd_models)


def parse_command(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parse a command line as ``main`` does, running nothing: ``(args, extra)``; bad input exits with usage (2).

    ``extra`` holds the ``--a.b=value`` overrides that only ``train`` and ``demo`` take.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "demo", "finetune", "compress"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_command(argv)
    try:
        return args.fn(args, extra) or 0
    except KeyboardInterrupt:
        print("interrupted; a run resumes from its last checkpoint with --resume", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        if os.environ.get("VISLANG_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
