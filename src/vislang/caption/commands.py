"""`vislang caption IMAGE...`, `vislang caption-eval` and `vislang render-text`: thin layers over library functions."""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

EXAMPLES = """
    examples:
      vislang caption scene.png --model runs/caption/model               # greedy
      vislang caption photos/ --model runs/caption/model --beam 3        # beam search, width 3
      vislang caption scene.png --model runs/caption/model --top-p 0.9 --temperature 0.8 --seed 0
    Train a captioner first: vislang train --config caption"""


def _decoding(beam: int = 1, top_p: float | None = None, top_k: int | None = None, temperature: float = 1.0,
              seed: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Generation keyword arguments from CLI-style options (top-p or top-k turn sampling on)."""
    if beam != 1 and (top_p is not None or top_k is not None):
        raise ValueError("choose --beam or sampling (--top-p / --top-k), not both")
    kw: dict[str, Any] = {"beam": beam, "temperature": temperature}
    if top_p is not None or top_k is not None:
        kw.update(sample=True, top_p=1.0 if top_p is None else top_p, top_k=top_k or 0, seed=seed)
    return kw


def caption_files(
    model_dir: str | Path,
    images: Sequence[str | Path],
    max_length: int = 20,
    batch_size: int = 64,
    device: str = "cpu",
    use_cache: bool = True,
    **decoding: Any,
) -> list[tuple[str, str]]:
    """(path, caption) for image files or folders of images, with a model directory trained to caption."""
    from ..factory import from_pretrained, get_tokenizer, image_transforms
    from ..generation import caption
    from ..inference import list_images, open_image

    model = from_pretrained(model_dir, device)
    if getattr(model.cfg, "decoder", None) is None:
        raise ValueError(f"{model_dir} holds a dual encoder without a caption decoder; train one with --config caption")
    tokenizer = get_tokenizer(model_dir)
    _, preprocess = image_transforms(model.cfg)
    paths = list_images(images)
    out: list[tuple[str, str]] = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        x = torch.stack([preprocess(open_image(p)) for p in chunk]).to(device)  # (B, C, H, W) normalised
        caps = caption(model, tokenizer, x, max_length=max_length, use_cache=use_cache, **decoding)
        out.extend((str(p), c) for p, c in zip(chunk, caps))
    return out


def evaluate_captions(
    model_dir: str | Path,
    data: str = "shapes",
    split: str = "test",
    max_images: int | None = 1000,
    max_length: int = 30,
    device: str = "cpu",
    out: str | Path | None = None,
    with_meteor: bool = True,
) -> dict[str, Any]:
    """Caption metrics per decoding method on a held-out split (shapes: every phrasing of a scene is a reference;
    rendered-text: the text, plus exact match and character error rate)."""
    import numpy as np

    from ..data.transforms import pil_to_array
    from ..evaluation.caption_metrics import DECODING_METHODS, caption_eval, generate_captions, reading_scores
    from ..factory import from_pretrained, get_tokenizer

    model = from_pretrained(model_dir, device)
    tokenizer = get_tokenizer(model_dir)
    v = model.cfg.vision
    if data == "shapes":
        from ..data.shapes import ShapesConfig, ShapesDataset
        from ..evaluation.caption_metrics import shapes_references

        ds = ShapesDataset(split, n=max_images, cfg=ShapesConfig())
        refs = shapes_references(ds)
    elif data == "rendered-text":
        from ..data.rendered_text import RenderConfig, RenderedText

        ds = RenderedText(
            split if split != "holdout" else "test", n=max_images, cfg=RenderConfig(image_size=v.image_size)
        )
        refs = [[ds.caption(i)] for i in range(len(ds))]
    else:
        raise ValueError(f"caption-eval knows the datasets 'shapes' and 'rendered-text', got {data!r}")
    arrays = [pil_to_array(ds[i][0], v.image_size, v.channels) for i in range(len(ds))]
    images = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())  # (N, C, H, W) uint8
    methods = {"greedy": DECODING_METHODS["greedy"], "beam3": DECODING_METHODS["beam3"]}
    results: dict[str, Any] = caption_eval(model, tokenizer, images, refs, methods, max_length, device=device,
                                           with_meteor=with_meteor)  # fmt: skip
    if data == "rendered-text":
        for name, kw in methods.items():
            preds = generate_captions(model, tokenizer, images, device=device, max_length=max_length, **kw)
            results[name].update(reading_scores(preds, [r[0] for r in refs]))
    results = {"data": data, "split": split, "images": len(ds), "methods": results}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
    return results


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
    res = evaluate_captions(args.model, args.data, args.split, args.max_images, args.max_length, args.device,
                            args.out, with_meteor=not args.no_meteor)  # fmt: skip
    print(json.dumps({k: {m: v for m, v in r.items() if m != "examples"} for k, r in res["methods"].items()}, indent=2))
    return 0


def cmd_render_text(args: argparse.Namespace, extra: list[str]) -> int:
    from ..data.rendered_text import RenderConfig, RenderedText, write_folder

    ds = RenderedText(args.split, n=args.n, cfg=RenderConfig(image_size=args.image_size))
    print(f"wrote {len(ds)} images to {write_folder(ds, args.out)}")
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
    sp.add_argument("--max-length", type=_positive(int), default=20, help="most tokens per caption (default 20)")
    sp.add_argument("--batch-size", type=_positive(int), default=64)
    sp.add_argument("--no-cache", action="store_true", help="recompute every position each step (slower, same text)")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add("caption-eval", "BLEU-1..4, METEOR, ROUGE-L, CIDEr per decoding method on a held-out split",
             cmd_caption_eval)  # fmt: skip
    sp.add_argument("--model", required=True, help="model directory")
    sp.add_argument("--data", default="shapes", choices=["shapes", "rendered-text"])
    sp.add_argument("--split", default="test")
    sp.add_argument("--max-images", type=_positive(int), default=1000)
    sp.add_argument("--max-length", type=_positive(int), default=30)
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--out", help="also write the results here as JSON")
    sp.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process)")

    sp = add("render-text", "write a folder of rendered words (PNG + .txt) for training a text reader",
             cmd_render_text)  # fmt: skip
    sp.add_argument("out", help="output folder")
    sp.add_argument("--split", default="train", choices=["train", "val", "test"])
    sp.add_argument("--n", type=_positive(int), default=20_000)
    sp.add_argument("--image-size", type=_positive(int), default=64)
