"""README.md is a contract: every `vislang` command in its shell blocks (then each inline one) runs, in order, as a
new user would after `make demo`, each made tiny by a few appended overrides (fewer steps, fewer images), so CI fails
the day the README and the code part ways.

`tests/test_readme_commands.py` parses every command; this file runs them. The overrides only shrink work (steps,
images, rounds); they never change what a command reads or writes, so each command finds the folders the commands
before it wrote (`runs/gan-fm` from `train --config gan`, and so on). `make demo` is `vislang demo` made tiny. The
server is started as a real process and asked for `/healthz` and a search, then stopped; torchrun runs for real.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from test_readme_commands import COMMANDS, INLINE, README, Command, command_path
from vislang.cli import main, parse_command, train_run_config

TRAIN = ["--max_steps=2", "--time_budget_min=0", "--progress=false", "--threads=1", "--eval_max=64"]
SHAPES = ["--data.options.n=256", "--data.max_train=256"]  # synthetic scenes: 256 instead of 20,000
VQA = ["--vqa.n_train=128", "--vqa.n_test=32"]

# Appended to a command whose (sub)command words are these: later flags win in argparse and in --a.b=value overrides.
TINY: dict[tuple[str, ...], list[str]] = {
    ("eval",): ["--max-images", "64", "--no-probe"],
    ("caption-eval",): ["--max-images", "8", "--methods", "greedy", "--no-meteor"],
    ("rerank-eval",): ["--max-images", "32"],
    ("ablate-fusion",): ["--time-budget", "0", "--epochs", "1", "--n-train", "64", "--n-test", "32"],
    ("finetune",): ["--epochs", "1", "--max-train", "256", "--no-progress", "--threads", "1"],
    ("generate-eval",): ["--n-per-class", "8"],
    ("generate-tune",): ["-n", "64", "--scales", "1,1.1"],
    ("compress",): ["--steps", "2", "--max-pairs", "256", "--calibration-images", "64"],
    ("compare",): ["--rounds", "1", "--max-images", "64"],
    ("prepare",): [],
    ("render-text",): ["--n", "64"],
    ("read-eval",): ["--n", "16"],
}


def tiny(argv: tuple[str, ...]) -> list[str]:
    """``argv`` with the overrides that make it run in seconds."""
    path = command_path(argv)
    if path == ("train",):
        args, extra = parse_command(list(argv))
        task, cfg = train_run_config(args.config, extra)
        more = list(TRAIN)
        if cfg.data.train == "shapes":
            more += SHAPES
        if task in ("vqa", "vqa-gen"):
            more += VQA
        if task == "lit":  # the locked towers' features: 128 training pairs (64 test images) extracted, not thousands
            more += ["--data.max_train=128", "--data.max_val=64"]
        if task == "gan":
            more += ["--gan.fid_images=100"]
        return [*argv, *more]
    if path == ("demo",):
        return [*argv, *TRAIN]
    return [*argv, *TINY.get(path, [])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(argv: list[str], env: dict[str, str]) -> None:
    """Start `vislang serve` as written (on a free port), wait for /healthz, search once, stop it."""
    port = free_port()
    argv = [a for i, a in enumerate(argv) if a != "--port" and (i == 0 or argv[i - 1] != "--port")]
    argv += ["--port", str(port)]
    proc = subprocess.Popen([sys.executable, "-m", "vislang.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                    assert r.status == 200
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"vislang serve did not come up:\n{proc.stdout.read()}") from None
                time.sleep(0.5)
        body = json.dumps({"text": "a bag", "k": 3}).encode()
        req = urllib.request.Request(f"{base}/v1/search", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and len(json.loads(r.read())["results"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_one(cmd: Command, env: dict[str, str]) -> str | None:
    """Run one README command (tiny); None when it succeeded, else what went wrong."""
    argv = tiny(cmd.argv)
    try:
        if "torchrun" in cmd.line:
            run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "vislang.cli", *argv]
            p = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
            return None if p.returncode == 0 else f"exit {p.returncode}: {p.stderr[-2000:]}"
        if command_path(cmd.argv) == ("serve",):
            run_serve(argv, env)
            return None
        code = main(argv)
        return None if code == 0 else f"exit {code}"
    except SystemExit as e:
        return None if e.code == 0 else f"exit {e.code}"
    except Exception as e:  # noqa: BLE001  (every failure is reported, the walk goes on)
        return f"{type(e).__name__}: {e}"


@pytest.mark.fashion_mnist
def test_every_readme_command_runs_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").symlink_to(README.parent / "docs")  # the clone's files README commands read (pictures)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "HF_HUB_OFFLINE": "1"}
    assert main(["demo", "--out", "runs/demo", *TRAIN]) == 0  # what `make demo` does, tiny
    failures, times = [], []
    block = {c.argv for c in COMMANDS}  # an inline command that repeats a block's (`train --config caption`) ran there
    for cmd in [*COMMANDS, *(c for c in INLINE if c.argv not in block)]:
        t0 = time.time()
        error = run_one(cmd, env)
        times.append((time.time() - t0, str(cmd)))
        if error:
            failures.append(f"{cmd}\n    {error}")
    with capsys.disabled():
        print("\nslowest README commands:", *(f"{t:6.1f}s  {c}" for t, c in sorted(times, reverse=True)[:8]), sep="\n")
    assert not failures, f"{len(failures)} README command(s) fail as written:\n" + "\n".join(failures)
    outside = sorted(p.name for p in tmp_path.iterdir() if p.name not in {"runs", ".cache", "docs"})
    assert not outside, f"README commands wrote outside runs/ (and the cache): {outside}"
