"""`vislang index build|add|remove|info` and `vislang search`: parse options, call the index functions."""

from __future__ import annotations

import argparse
import json
import os
import textwrap


def cmd_index(args: argparse.Namespace, extra: list[str]) -> int:
    from ..index.build import build_index, remove_from_index  # lazy: `vislang --help` starts without loading torch

    if args.action in ("build", "add"):
        if args.action == "add":
            from ..index.base import read_header  # lazy: `vislang --help` starts without loading torch

            read_header(args.index)  # `add` never creates: a typo in --index must not start a new index
        options = {}
        if args.action == "build":
            options = {"backend": args.backend}
            if args.backend == "faiss":
                options.update(kind=args.kind, exact_max=args.exact_max, ann=args.ann, nprobe=args.nprobe)
                if args.nlist is not None:
                    options["nlist"] = args.nlist
        build = build_index
        if args.action == "build" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one share each
            from ..index.sharded import build_index_sharded  # lazy: `vislang --help` starts without loading torch

            build = build_index_sharded
        counts = build(
            args.src,
            args.index,
            model_dir=args.model,
            batch_size=args.batch_size,
            commit_every=args.commit_every,
            device=args.device,
            progress=not args.no_progress,
            img_key=args.img_key,
            caption_key=args.caption_key,
            allow_outside_root=args.allow_outside_root,
            fps=args.fps,
            precision=args.precision,
            **options,
        )
        if "per_rank" in counts and os.environ.get("RANK", "0") != "0":
            return 0  # rank 0 reports for all
        if "per_rank" in counts:
            print(f"{len(counts['per_rank'])} processes embedded {counts['per_rank']} image(s)")
        if "videos" in counts:  # a video source: index/video.py
            print(f"indexed {counts['added']} frame(s) of {counts['videos']} video(s) ({counts['already']} video(s) "
                  f"already there, {counts['unreadable']} unreadable) in {counts['seconds']:.1f} s; "
                  f"{args.index} holds {counts['size']}")  # fmt: skip
            return 0
        print(
            f"indexed {counts['added']} new image(s) ({counts['already']} already there, {counts['duplicates']} "
            f"repeated, {counts['unreadable']} unreadable) in {counts['seconds']:.1f} s "
            f"({counts['added'] / max(counts['seconds'], 1e-9):.1f} images/s); {args.index} holds {counts['size']}"
        )
        return 0
    if args.action == "remove":
        n = remove_from_index(args.index, args.targets)
        print(f"removed {n} item(s) from {args.index}")
        return 0
    if args.action == "duplicates":
        return cmd_duplicates(args)
    from ..index.base import open_index  # lazy: `vislang --help` starts without loading torch

    with open_index(args.index) as index:
        print(json.dumps(index.info(), indent=2))
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    """Print (or write as JSON) the exact and near-duplicate groups of an index."""
    from ..index.base import atomic_write_bytes  # lazy: `vislang --help` starts without loading torch
    from ..index.duplicates import duplicates_report  # lazy: `vislang --help` starts without loading torch

    report = duplicates_report(args.index, args.threshold, args.k, exact=not args.no_exact)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(report, indent=2, ensure_ascii=False).encode())
    print(
        f"{args.index}: {report['size']} images; {report['exact_groups']} exact and {report['near_groups']} "
        f"near-duplicate group(s) (cosine >= {args.threshold}), {report['items_in_groups']} images in them"
    )
    for g in report["groups"][: args.show]:
        score = "identical bytes" if g["kind"] == "exact" else f"cosine >= {g['min_score']:.3f}"
        print(f"  {g['kind']} ({score}):")
        for m in g["items"]:
            print(f"    {m['id']:>6}  {m['key']}")
    if len(report["groups"]) > args.show:
        print(
            f"  ... {len(report['groups']) - args.show} more group(s)" + ("" if args.json else "; --json FILE for all")
        )
    return 0


def cmd_search(args: argparse.Namespace, extra: list[str]) -> int:
    from ..index.search import Searcher  # lazy: `vislang --help` starts without loading torch

    if (args.text is None) == (args.image is None):
        raise ValueError("give a query text or --image PATH (one of the two)")
    if not 1 <= args.k <= 10_000:
        raise ValueError(f"-k must be between 1 and 10000, got {args.k}")
    from ..index.video import moments_of, video_step  # lazy: `vislang --help` starts without loading torch

    searcher = Searcher(args.index, args.model, device=args.device)
    try:
        step = video_step(searcher.index)  # a video index: fetch more frames, merge them into k moments
        n = args.k if step is None else min(max(10 * args.k, 100), 10_000)
        hits = searcher.search_text(args.text, n) if args.text is not None else searcher.search_image(args.image, n)
    finally:
        searcher.close()
    if step is not None:
        moments = moments_of(hits, step, args.k)
        if args.json:
            print(json.dumps(moments, indent=2))
        for m in [] if args.json else moments:
            print(f"{m['score']:.4f}  {m['start']:8.2f}-{m['end']:<8.2f} s  (best {m['t']:.2f} s, shot {m['shot']}, "
                  f"id {m['id']})  {m['video']}")  # fmt: skip
        return 0
    if args.json:
        print(json.dumps([{k: h[k] for k in ("id", "score", "path", "caption", "key")} for h in hits], indent=2))
    else:
        for h in hits:
            caption = f"  {h['caption']}" if h["caption"] else ""
            print(f"{h['score']:.4f}  {h['id']:>6}  {h['key']}{caption}")
    return 0


INDEX_EPILOG = """
    examples:
      vislang index build photos/ --model runs/demo/model --index photos.index
      vislang index build photos/ --model runs/demo/model --index big.index --exact-max 50000 --ann ivf
      vislang index build pairs.csv --model runs/demo/model --index pairs.index --img-key path
      vislang index build 'shards/{00000..00009}.tar' --model runs/demo/model --index web.index
      vislang index build runs/movies --model runs/shapes/model --index runs/movies.index --fps 2   # videos
      vislang index add more_photos/ --index photos.index
      VISLANG_PG_URI=postgresql://host/db torchrun --nproc-per-node 4 -m vislang.cli index build photos/ \
          --model runs/demo/model --index shared.index --backend pgvector    # each process embeds a share
      vislang index remove --index photos.index 17 photos/old/
      vislang index info --index photos.index
      vislang index duplicates --index photos.index --threshold 0.9 --json dups.json
    An interrupted build continues where it stopped when run again."""

SEARCH_EPILOG = """
    examples:
      vislang search "a red circle" --index photos.index -k 5
      vislang search --image query.png --index photos.index --json
      vislang search "a red circle" --index runs/movies.index -k 5   # a video index: moments (time ranges)"""


def register(add) -> None:
    """Add the `index` and `search` subcommands (``add(name, help, fn) -> ArgumentParser``)."""
    sp = add("index", "build, extend, shrink or describe an embedding index of images", cmd_index)
    sp.epilog = textwrap.dedent(INDEX_EPILOG)
    actions = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
    each = dict(epilog=sp.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)  # the examples, on every action
    for name, help_ in (
        ("build", "embed a folder / CSV / JSONL / tar shards into a new (or interrupted) index"),
        ("add", "embed more images into an existing index"),
    ):
        a = actions.add_parser(name, help=help_, description=help_, **each)
        a.add_argument(
            "src", help="folder of images, .csv/.tsv/.jsonl of paths (+ captions), .tar shard pattern, or videos"
        )
        a.add_argument("--index", required=True, help="index directory")
        a.add_argument("--model", required=(name == "build"), help="model directory (add: the index's own)")
        a.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
        a.add_argument("--commit-every", type=int, default=8, help="batches per committed transaction (default 8)")
        a.add_argument("--img-key", help="CSV/JSONL column of image paths (default: filepath, path, image, ...)")
        a.add_argument("--caption-key", help="CSV/JSONL column of captions (default: caption, text, title)")
        a.add_argument("--device", default="cpu")
        a.add_argument("--no-progress", action="store_true", help="no progress bar")
        a.add_argument("--allow-outside-root", action="store_true",
                       help="index CSV/JSONL paths that leave the file's folder (absolute, ~, ..) or symlinks out of "
                            "the source folder; `vislang serve` will send those files to its clients")  # fmt: skip
        a.add_argument("--fps", type=float, default=2.0, help="videos: frames indexed per second (default 2)")
        a.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="embedding precision (auto: bf16 where it pays and agrees with fp32; default)")  # fmt: skip
        if name == "build":
            a.add_argument("--backend", default="faiss", choices=["faiss", "pgvector"], help="default: faiss")
            kinds = ["auto", "flat", "hnsw", "ivf"]
            a.add_argument("--kind", default="auto", choices=kinds, help="FAISS index type (default auto)")
            a.add_argument("--exact-max", type=int, default=100_000, help="auto: exact search up to this many")
            a.add_argument("--ann", default="hnsw", choices=["hnsw", "ivf"], help="auto: approximate index above it")
            a.add_argument("--nprobe", type=int, default=16, help="IVF lists scanned per query (default 16)")
            a.add_argument("--nlist", type=int, help="IVF lists (default round(4*sqrt(N)), retrained as N grows)")
    a = actions.add_parser("remove", help="remove items by id, image file or folder", **each)
    a.add_argument("targets", nargs="+", help="ids, image files, folders, videos (all frames), or a CSV/JSONL/shards")
    a.add_argument("--index", required=True, help="index directory")
    a = actions.add_parser(
        "duplicates", help="groups of exact (same bytes) and near-duplicate (similar) images", **each
    )
    a.add_argument("--index", required=True, help="index directory")
    a.add_argument("--threshold", type=float, default=0.9, help="cosine similarity for near-duplicates (default 0.9)")
    a.add_argument("-k", type=int, default=10, help="neighbours compared per image (default 10)")
    a.add_argument("--no-exact", action="store_true", help="skip hashing the image files")
    a.add_argument("--json", help="write the whole report to this JSON file")
    a.add_argument("--show", type=int, default=20, help="groups printed (default 20)")
    a = actions.add_parser("info", help="size, embedding size, back end and build state as JSON", **each)
    a.add_argument("--index", required=True, help="index directory")

    sp = add("search", "search an index by text or by image", cmd_search)
    sp.epilog = textwrap.dedent(SEARCH_EPILOG)
    sp.add_argument("text", nargs="?", help="query text")
    sp.add_argument("--image", help="query image file instead of a text")
    sp.add_argument("--index", required=True, help="index directory")
    sp.add_argument("--model", help="model directory (default: the one that built the index)")
    sp.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--device", default="cpu")
