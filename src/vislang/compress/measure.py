"""What ``vislang compare`` measures of every family alike: the size of a model's weight files, and its speed, timed
in interleaved rounds with paired ratios to the first model (:mod:`.compare` for encoders, captioners and VQA models,
:mod:`.compare_gan` for generators).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files (``model.safetensors`` or the ``.onnx`` files), tokenizer and config left out."""
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else list(path.glob("*.onnx*"))
    return sum(f.stat().st_size for f in files)


@torch.inference_mode()
def interleaved_times(
    work: list[dict[str, Callable[[], Any]]], rounds: int = 5, calls: int = 2
) -> list[dict[str, list[float]]]:
    """Seconds of each call in ``work`` (per model, {name: a call}), ``calls`` times per round: every call once as
    a warmup, then the models taken in turn, round after round. Why interleaved: on a shared machine the load
    changes over minutes, and timing one model after the other would charge that change to the models."""
    for calls_of in work:
        for fn in calls_of.values():
            fn()
    times: list[dict[str, list[float]]] = [{k: [] for k in calls_of} for calls_of in work]
    for _ in range(rounds):
        for calls_of, t in zip(work, times):
            for key, fn in calls_of.items():
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn()
                    t[key].append(time.perf_counter() - t0)
    return times


def paired_ratios(base_s: list[float], other_s: list[float], base_n: int, other_n: int) -> dict[str, Any]:
    """Throughput ratio other/base per timed call pair (the i-th call of each, made in the same round), as the median
    and the interquartile range [q1, q3] of those ratios: the drift of a shared machine between rounds cancels."""
    ratios = sorted((other_n / o) / (base_n / b) for b, o in zip(base_s, other_s))
    if len(ratios) < 2:
        return {"median": ratios[0], "iqr": [ratios[0], ratios[0]]}
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": statistics.median(ratios), "iqr": [q1, q3]}
