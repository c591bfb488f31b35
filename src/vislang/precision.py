"""Which precision to compute in: bf16 autocast where this machine does bf16 natively and a measured trial says it
pays, fp32 elsewhere; and the machine's measured peak FLOP/s for each, which model FLOP utilisation (MFU) divides by.

Why measured and not a fixed rule: on AVX2-only CPUs bf16 autocast is emulated and slower than fp32, while on a CPU
with ``avx512_bf16`` or AMX a 2048² matmul runs ~4.5× faster in bf16 (1,036 against 233 GFLOP/s on this project's
quiet 2-core EPYC) and a small CNN + Transformer trains 1.4× faster; yet a tiny ViT gains nothing. So ``auto`` asks
the CPU what it has (``native_bf16``), and where it has bf16 times a few steps of the actual model in both precisions
(``choose``), once per machine and model. The result is cached in ``~/.cache/vislang/precision.json``
(``$XDG_CACHE_HOME`` or ``$VISLANG_PRECISION_CACHE`` move it), keyed by the CPU's name and bf16 flags, the torch
version and threads, and the model's shape signature. Training (``train.loop``) and inference
(``evaluation.embed``, and through it ``index build`` and the server's text embedder) both decide here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of CPUs that compute bf16 natively
MIN_GAIN = 1.10  # auto picks bf16 only when a trial step runs at least this much faster than in fp32
# A trial that says fp32 is run again on the next runs, up to this many, keeping the best speedup seen: load from other
# jobs only ever slows a trial (one under load read 0.92x for a step that runs 1.79x faster in bf16 on the quiet
# machine), and a losing verdict cached for good would keep a model in fp32 on this machine for ever.
TRIALS = 3


def cache_path() -> Path:
    """Where trial results and peak probes are kept: one JSON file per user, or ``$VISLANG_PRECISION_CACHE`` (the
    tests point it at a temporary file). Delete it to measure again, e.g. on a machine that was busy the first time."""
    if os.environ.get("VISLANG_PRECISION_CACHE"):
        return Path(os.environ["VISLANG_PRECISION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vislang" / "precision.json"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    """The CPU's marketing name (for cache keys and reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device, flags: Iterable[str] | None = None) -> bool:
    """Whether ``device`` computes bf16 in hardware: CUDA's own answer; on a CPU the ``avx512_bf16`` / ``amx_bf16``
    flags (``flags`` defaults to this CPU's; tests pass their own to stand for another machine)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(BF16_FLAGS & set(cpu_flags() if flags is None else flags))


def machine_key(device: torch.device) -> str:
    """What makes a timing valid elsewhere: the processor, its bf16 flags, torch and the thread count."""
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"{cpu_name()} [{','.join(sorted(BF16_FLAGS & cpu_flags()))}] threads={torch.get_num_threads()}"
    return f"{hw} | torch {torch.__version__}"


def model_key(modules: Iterable[torch.nn.Module], extra: Any = None) -> str:
    """A short hash of the models' parameter names, shapes and dtypes (plus ``extra``, e.g. the batch shape): the
    same architecture at the same batch gets the same trial result, whatever its weights."""
    h = hashlib.sha1(repr(extra).encode())
    for m in modules:
        for name, p in m.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad};".encode())
    return h.hexdigest()[:16]


def read_cache() -> dict[str, Any]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def write_cache(key: str, value: Any) -> None:
    """Store one entry atomically (write a temporary file, then rename), so a crash never leaves half a file; an
    unwritable cache only costs a repeated trial."""
    path = cache_path()
    data = read_cache()
    data[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        print(f"[vislang] could not write {path} ({e}); the precision trial will run again next time")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (``fp32``: none)."""
    check(precision)
    if precision in ("fp32", "auto"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class Choice:
    """A resolved precision and why: ``reason`` is printed at start; ``speedup`` is the trial's fp32/bf16 time."""

    precision: str
    reason: str
    speedup: float | None = None

    def record(self) -> dict[str, Any]:
        return {f"precision_{k}" if k != "precision" else k: v for k, v in asdict(self).items() if v is not None}


def time_precisions(
    step: Callable[[], Any], device: torch.device, precisions: tuple[str, ...] = ("fp32", "bf16"), repeats: int = 3
) -> dict[str, float]:
    """Median seconds of ``step()`` under each precision's autocast, the precisions interleaved (A B A B ...) so a
    change of load on a shared machine hits both; one untimed warmup call each first."""
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for r in range(repeats + 1):
        for p in precisions:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast(p, device):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r:
                times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(t) for p, t in times.items()}


def choose(
    precision: str,
    device: torch.device,
    key: str | None = None,
    trial: Callable[[], Any] | None = None,
    flags: Iterable[str] | None = None,
) -> Choice:
    """Resolve ``precision`` (``auto`` or an explicit one) for ``device``.

    ``auto``: ``$VISLANG_PRECISION`` where set (fp32 makes every auto decision reproducible); on CUDA bf16 where
    supported; on a CPU without native bf16 fp32 (emulated bf16 is slower there); on a
    CPU with it, bf16 if ``trial`` (one forward/backward or inference call of the real model, free of side effects)
    runs ``MIN_GAIN`` times faster under bf16 autocast than in fp32. The trial's result is cached under ``key`` (a
    ``model_key``) for this machine: a winning trial decides for good, a losing one is run again by the next runs (at
    most ``TRIALS`` in all, the best speedup kept); without a trial and a cached result it stays fp32.
    """
    check(precision)
    if precision != "auto":
        return Choice(precision, "asked for")
    forced = os.environ.get("VISLANG_PRECISION")
    if forced:  # one switch for every auto decision: reproducible outputs (the test suite sets fp32)
        if forced not in PRECISIONS[1:]:
            raise ValueError(f"VISLANG_PRECISION={forced!r}; set it to one of {', '.join(PRECISIONS[1:])} or unset it")
        return Choice(forced, "auto: set by $VISLANG_PRECISION")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Choice("bf16" if ok else "fp32", "auto: CUDA " + ("with" if ok else "without") + " bf16")
    if not native_bf16(device, flags):
        return Choice("fp32", "auto: this CPU has no native bf16 (avx512_bf16 / amx_bf16), where bf16 is slower")
    entry = f"trial | {machine_key(device)} | {key}"
    speedup, trials = cached_trial(read_cache().get(entry) if key is not None else None)
    source = "cached trial"
    if trial is not None and (speedup is None or (speedup < MIN_GAIN and trials < TRIALS)):
        t = time_precisions(trial, device)
        measured = t["fp32"] / t["bf16"]
        source = f"trial {trials + 1} of at most {TRIALS}: {1000 * t['fp32']:.0f} vs {1000 * t['bf16']:.0f} ms"
        speedup, trials = max(measured, speedup or 0.0), trials + 1
        if key is not None:
            write_cache(entry, {"speedup": speedup, "trials": trials})
    if speedup is None:
        return Choice("fp32", "auto: native bf16, but no trial of this model was possible")
    pick = "bf16" if speedup >= MIN_GAIN else "fp32"
    return Choice(pick, f"auto: native bf16, {source}: bf16 {speedup:.2f}x fp32's speed", round(float(speedup), 3))


def cached_trial(value: Any) -> tuple[float | None, int]:
    """(best fp32/bf16 speedup seen, trials run) from a cache entry; an older cache held the bare speedup."""
    if value is None:
        return None, 0
    if isinstance(value, dict):
        return float(value["speedup"]), int(value.get("trials", 1))
    return float(value), 1


def peak_flops(precision: str, device: torch.device, n: int = 2048, rounds: int = 5) -> float:
    """This machine's peak FLOP/s for an ``n``² matmul in ``precision`` at the current thread count: the denominator
    of MFU.

    One untimed call first (oneDNN builds its kernel on the first call of a shape, which made an earlier probe read
    424 instead of ~1,000 GFLOP/s in bf16 on this project's 2 cores), then the best of ``rounds`` calls (about a
    second in fp32 on one core). Kept as the best ever seen on this machine: one probe on a machine busy with other
    jobs reads far too low (11 instead of ~80 GFLOP/s per core here), and a cached low peak would overstate every
    later MFU. Measured on the quiet 2-core EPYC (load average 0.1, 2 threads): bf16 1,036 GFLOP/s, fp32 233; a
    1,024² bf16 matmul 1,051, 4,096² 865, so 2,048² is as good a peak as larger ones."""
    precision = "fp32" if precision == "auto" else check(precision)
    entry = f"peak | {machine_key(device)} | {precision} | n={n}"
    dtype = DTYPES.get(precision, torch.float32)
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: a run's RNG stream stays untouched
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    best = float("inf")
    for r in range(rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if r:  # the first call builds the kernel
            best = min(best, time.perf_counter() - t0)
    flops = max(2 * n**3 / best, float(read_cache().get(entry) or 0.0))
    write_cache(entry, flops)
    return flops


def count_flops(fn: Callable[[], Any]) -> int:
    """Model FLOPs of one call of ``fn`` (matmuls and convolutions, forward and backward), counted by
    ``torch.utils.flop_counter``: what MFU puts over step time."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
