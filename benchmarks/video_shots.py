"""Video on synthetic shapes movies: shot boundaries against PySceneDetect, summary coverage, key-frame captions and
text → moment search, all on the same generated files in the same run.

    python benchmarks/video_shots.py --model runs/shapes/model --caption-model runs/caption/model   # 50 movies
    python benchmarks/video_shots.py --model runs/shapes/model --movies 10 --json out.json
    python benchmarks/video_shots.py --smoke --model DIR      # 2 short movies: checks that it runs

Shot boundaries are scored at +-1 sampled frame (2 fps): a true boundary is the first sampled frame at or after the
cut (or a fade's middle); each prediction matches at most one. Recall is reported per kind (hard cut, fade);
"F1 cut"/"F1 fade" charge every false positive to both kinds (a detector does not say which kind it found).
PySceneDetect (ContentDetector, AdaptiveDetector, default settings) reads every frame of the same MP4 files; its cut
frames become times, then sampled-frame indices, the same way. Movies use seeds from 1000 on: the detector's
constants were tuned on seeds 0-9.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vislang.factory import get_tokenizer, load_embedding_model
from vislang.inference import embed_texts
from vislang.video.analyze import analyze
from vislang.video.moments import merge_moments, snap_to_shots, temporal_iou
from vislang.video.shots import detect_boundaries, match_boundaries, prf, select_key_frames, time_to_index
from vislang.video.summary import shots_of
from vislang.video.synthetic import MovieConfig, write_movies

KINDS = ("cut", "fade")


def scenedetect_cuts(path: Path, detector: str) -> list[float]:
    """Cut times (seconds) of PySceneDetect's detector on a file."""
    import scenedetect

    det = scenedetect.ContentDetector() if detector == "content" else scenedetect.AdaptiveDetector()
    scenes = scenedetect.detect(str(path), det)
    return [float(start.seconds) for start, _ in scenes[1:]]


class Tally:
    """Matched true boundaries per kind, predictions and true counts, summed over movies."""

    def __init__(self) -> None:
        self.tp = dict.fromkeys(KINDS, 0)
        self.true = dict.fromkeys(KINDS, 0)
        self.pred = 0

    def add(self, pred: list[int], truth: list[tuple[int, str]]) -> None:
        self.pred += len(pred)
        for _, j in match_boundaries(pred, [t for t, _ in truth]):
            self.tp[truth[j][1]] += 1
        for _, kind in truth:
            self.true[kind] += 1

    def row(self) -> dict[str, float]:
        tp, true = sum(self.tp.values()), sum(self.true.values())
        fp = self.pred - tp
        out = {f"{m}": round(v, 4) for m, v in prf(tp, self.pred, true).items()}
        for k in KINDS:
            out[f"recall_{k}"] = round(self.tp[k] / max(self.true[k], 1), 4)
            out[f"f1_{k}"] = round(prf(self.tp[k], self.tp[k] + fp, self.true[k])["f1"], 4)
        return out


def moment_search(tables, truths, model, tokenizer, fps: float, top_frames: int, rng) -> dict[str, float]:
    """R@1 / R@5 at tIoU >= 0.5 of text → moment search over every movie's frames: queries are the shots' captions,
    the right moment is the shot. Rows: frames merged, merged moments snapped to detected shots, and chance (the same
    pipeline with the frame scores shuffled)."""
    videos = np.concatenate([[i] * len(t) for i, t in enumerate(tables)])
    times = np.concatenate([t.times for t in tables])
    emb = np.concatenate([t.emb for t in tables])  # (F, E)
    detected = {str(i): [(s["start"], s["end"]) for s in shots_of(t)[0]] for i, t in enumerate(tables)}
    queries = [(i, s) for i, gt in enumerate(truths) for s in gt["shots"]]
    text = embed_texts(model, tokenizer, [s["caption"] for _, s in queries])  # (Q, E)
    hits = {"merged": [0, 0], "snapped": [0, 0], "chance": [0, 0], "chance_snapped": [0, 0]}
    for q, (i, shot) in enumerate(queries):
        scores = emb @ text[q]
        for name, sc in (("merged", scores), ("chance", rng.permutation(scores))):
            top = np.argsort(-sc)[:top_frames]
            moments = merge_moments(
                [{"video": str(videos[j]), "t": float(times[j]), "score": float(sc[j])} for j in top], 1.0 / fps
            )
            for label, ms in ((name, moments), (f"{name}_snapped" if name == "chance" else "snapped", None)):
                ms = ms if ms is not None else snap_to_shots(moments, detected)
                ok = [m["video"] == str(i) and temporal_iou((m["start"], m["end"]), (shot["start"], shot["end"])) >= 0.5
                      for m in ms[:5]]  # fmt: skip
                hits[label][0] += bool(ok[:1] and ok[0])
                hits[label][1] += any(ok)
    n = len(queries)
    return {f"{k}_R@{r}": round(v[j] / n, 4) for k, v in hits.items() for j, r in ((0, 1), (1, 5))} | {"queries": n}


def coverage_and_captions(tables, truths, caption_model: str | None) -> dict[str, float]:
    """Share of true shots holding a key frame at a budget of one per true shot; CIDEr-D of key-frame captions
    against the reference captions of the true shot they fall in."""
    covered = total = 0
    cands, refs, images = [], [], []
    from vislang.video.reader import frame_at

    for table, gt in zip(tables, truths):
        shots, _ = shots_of(table)
        keys = select_key_frames(table.emb, [s["medoid"] for s in shots], len(gt["shots"]))
        spans = [(s["start"], s["end"]) for s in gt["shots"]]
        hit = {j for k in keys for j, (a, b) in enumerate(spans) if a <= table.times[k] < b}
        covered += len(hit)
        total += len(spans)
        if caption_model:
            for k in keys:
                j = next(j for j, (a, b) in enumerate(spans) if a <= table.times[k] < b or j == len(spans) - 1)
                refs.append(gt["shots"][j]["references"])
                images.append(frame_at(gt["video"], float(table.times[k]), max_side=128))
    out = {"coverage": round(covered / total, 4), "true_shots": total}
    if caption_model:
        from PIL import Image

        from vislang.evaluation.caption_metrics import cider_d
        from vislang.video.summary import load_captioner_fn

        captioner = load_captioner_fn(caption_model)
        cands = [
            c for i in range(0, len(images), 64) for c in captioner([Image.fromarray(x) for x in images[i : i + 64]])
        ]
        out["cider_d"] = round(cider_d(cands, refs), 4)
        out["captioned_key_frames"] = len(cands)
        out["example"] = {"caption": cands[0], "references": refs[0]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="embedding model directory (a shapes model: vislang train --config shapes)"
    )
    p.add_argument("--caption-model", help="captioner for the key frames (vislang train --config caption)")
    p.add_argument("--movies", type=int, default=50)
    p.add_argument("--data", default=".cache/vislang/video-bench", help="where the movies are written (kept)")
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--top-frames", type=int, default=50, help="frames retrieved per query before merging")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="2 movies of 4 shots: checks that it runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = MovieConfig(shots=4) if args.smoke else MovieConfig()
    n = 2 if args.smoke else args.movies
    data = Path(args.data) / ("smoke" if args.smoke else "full")
    t0 = time.perf_counter()
    paths = write_movies(data, n, seed=1000, cfg=cfg)
    truths = [json.loads(p.with_suffix(".json").read_text()) for p in paths]
    print(f"{n} movies, {sum(len(t['boundaries']) for t in truths)} boundaries "
          f"({sum(b['kind'] == 'fade' for t in truths for b in t['boundaries'])} fades), "
          f"written/found in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    model, _ = load_embedding_model(args.model)
    model.eval()
    tallies = {name: Tally() for name in ("vislang", "pyscenedetect_content", "pyscenedetect_adaptive")}
    tables = []
    for path, gt in zip(paths, truths):
        truth = [(time_to_index(b["t"], args.fps), b["kind"]) for b in gt["boundaries"]]
        table = analyze(path, model, fps=args.fps)
        tables.append(table)
        tallies["vislang"].add(detect_boundaries(table.emb, table.grid).index.tolist(), truth)
        for det in ("content", "adaptive"):
            pred = [time_to_index(t, args.fps) for t in scenedetect_cuts(path, det)]
            tallies[f"pyscenedetect_{det}"].add(pred, truth)
    results = {"shots": {name: t.row() for name, t in tallies.items()}}
    print(f"{'shot boundaries (+-1 frame at 2 fps)':40s} {'P':>6s} {'R':>6s} {'F1':>6s} {'R cut':>6s} {'R fade':>6s} "
          f"{'F1 cut':>6s} {'F1 fade':>7s}")  # fmt: skip
    for name, r in results["shots"].items():
        print(f"{name:40s} {r['precision']:6.3f} {r['recall']:6.3f} {r['f1']:6.3f} {r['recall_cut']:6.3f} "
              f"{r['recall_fade']:6.3f} {r['f1_cut']:6.3f} {r['f1_fade']:7.3f}")  # fmt: skip
    for peer in ("pyscenedetect_content", "pyscenedetect_adaptive"):
        for k in KINDS:
            print(f"F1 {k} vislang / {peer}: {results['shots']['vislang'][f'f1_{k}']:.3f} / "
                  f"{results['shots'][peer][f'f1_{k}']:.3f}")  # fmt: skip
    results["summary"] = coverage_and_captions(tables, truths, args.caption_model)
    print(f"summary coverage at one key frame per true shot: {results['summary']['coverage']:.3f} "
          f"({results['summary']['true_shots']} shots)")  # fmt: skip
    if "cider_d" in results["summary"]:
        cap = results["summary"]
        print(f"key-frame caption CIDEr-D vs the shot's references: {cap['cider_d']:.3f} "
              f"({cap['captioned_key_frames']} key frames; e.g. {cap['example']})")  # fmt: skip
    tokenizer = get_tokenizer(args.model)
    results["moments"] = moment_search(tables, truths, model, tokenizer, args.fps, args.top_frames,
                                       np.random.default_rng(0))  # fmt: skip
    m = results["moments"]
    print(f"text -> moment, tIoU >= 0.5, {m['queries']} queries: merged R@1 {m['merged_R@1']:.3f} R@5 "
          f"{m['merged_R@5']:.3f} | snapped to shots R@1 {m['snapped_R@1']:.3f} R@5 {m['snapped_R@5']:.3f} | "
          f"chance (shuffled scores) R@1 {m['chance_R@1']:.3f} R@5 {m['chance_R@5']:.3f}, snapped "
          f"{m['chance_snapped_R@1']:.3f} / {m['chance_snapped_R@5']:.3f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
