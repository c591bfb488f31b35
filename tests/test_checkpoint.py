"""Checkpoints load without the full unpickler, a resume never runs code a checkpoint carries, and a resumed run's
metrics.jsonl holds each step once."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from _tiny import TINY
from vislang.train import load_train_config, train
from vislang.train import loop as loop_mod
from vislang.train.checkpoint import load_checkpoint, rng_state, set_rng_state


def _cfg(tmp_path, name: str = "run"):
    return load_train_config(None, [*TINY, "task=contrastive", "data.options={n: 64}", "batch_size=16", "epochs=1",
                                    "save_every=2", "log_every=1", "eval_max=16", f"out_dir={tmp_path / name}",
                                    f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip


class _RunsCode:
    """An object whose unpickling runs code (what a hostile checkpoint would carry)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


def test_a_training_checkpoint_loads_with_weights_only(tmp_path):
    train(_cfg(tmp_path))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4 and isinstance(state["rng"]["torch"], torch.Tensor)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    np.random.randn()  # a cached Gaussian is part of NumPy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(1).item())
    assert got == want


def test_a_checkpoint_that_would_run_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _RunsCode(str(marker))}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="not loaded"):
        load_checkpoint(tmp_path / "last.pt")
    assert not marker.exists()


def test_resume_refuses_a_run_directory_whose_checkpoint_runs_code(tmp_path):
    cfg = _cfg(tmp_path)
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**state, "extra": _RunsCode(str(marker))}, ckpt)
    with pytest.raises(ValueError, match="not loaded"):
        train(cfg, resume=True)
    assert not marker.exists()


def test_metrics_hold_each_step_once_after_a_crash_and_resume(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    real_write = loop_mod.MetricsLog.write

    def crash_after_step_3(self, record):  # the checkpoint is at step 2: steps 3 is logged, then the run dies
        real_write(self, record)
        if record.get("step") == 3 and "loss" in record:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop_mod.MetricsLog, "write", crash_after_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    monkeypatch.setattr(loop_mod.MetricsLog, "write", real_write)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # and a line torn by the crash
    train(cfg, resume=True)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 4, steps


SLOW_TRAIN = """
import sys, time
from vislang.train import loop
real = loop.Loop.apply_lr
loop.Loop.apply_lr = lambda self: (time.sleep(0.05), real(self))[1]  # slower steps, same arithmetic: time to kill
from vislang.cli import main
sys.exit(main(sys.argv[1:]))
"""


TINY_VQA = ["--model.vision.width=4", "--model.vision.depth=2", "--model.vision.image_size=16", "--model.text.width=16",
            "--model.text.layers=1", "--model.text.heads=2", "--model.text.tokenizer=bpe", "--vqa.n_train=40",
            "--vqa.n_test=8", "--batch_size=8", "--progress=false", "--threads=1"]  # fmt: skip
DECODER = "--model.decoder={width: 16, layers: 1, heads: 2}"
SHAPES = [*(f"--{o}" for o in TINY), "--data.options={n: 64}", "--batch_size=16", "--eval_max=16"]
KILL_RUNS = {  # every task `vislang train` runs, tiny: (arguments, seed of the step it is killed at)
    "contrastive": ([*SHAPES, "--task=contrastive"], 28),
    "coca": ([*SHAPES, "--task=coca", DECODER], 29),
    "itm": ([*SHAPES, "--task=itm", "--model.itm={fusion: {kind: cross_attention, dim: 16, depth: 1, heads: 2}}"], 30),
    "vqa": (
        [
            *TINY_VQA,
            "--task=vqa",
            "--model.fusion.dim=16",
            "--model.fusion.heads=2",
            "--model.fusion.depth=1",
            "--model.head_hidden=16",
        ],
        31,
    ),  # fmt: skip
    "vqa-gen": (
        [*TINY_VQA, "--task=vqa-gen", "--model.text.context_length=32", "--model.text.vocab_size=100", DECODER],
        32,
    ),  # fmt: skip
    "gan": (
        [
            "--task=gan",
            "--data.train=shapes",
            "--data.options={n: 64}",
            "--batch_size=16",
            "--progress=false",
            "--threads=1",
            "--gan.model={g_width: 4, d_width: 4, z_dim: 4}",
            "--gan.sample_every=2",
            "--gan.sample_per_prompt=2",
            "--gan.standing_stats=2",
            "--gan.mismatch_max_cos=1.5",
            "--gan.d_steps=2",
        ],
        33,
    ),  # fmt: skip
}


@pytest.mark.parametrize("task", list(KILL_RUNS))
def test_a_sigkilled_training_run_resumes_to_the_uninterrupted_weights(task, tmp_path):
    """`vislang train` of each task killed with SIGKILL at a random step (between checkpoints, or while writing one),
    then run again with --resume, ends with exactly the weights of a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    task_args, seed = KILL_RUNS[task]
    args = [*task_args, "--epochs=4", "--save_every=3", "--log_every=1", f"--data.cache_dir={tmp_path / 'cache'}"]
    if task == "gan":
        from test_train_house import _text_model

        args.append(f"--gan.text_model={_text_model(tmp_path)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def train_cmd(name: str, *extra: str) -> list[str]:
        return [sys.executable, "-c", SLOW_TRAIN, "train", *args, f"--out_dir={tmp_path / name}", *extra]

    first = subprocess.run(train_cmd("a"), env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    total = max(json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
    kill_at = random.Random(seed).randint(4, total - 2)  # a step past the first checkpoint, before the end
    proc = subprocess.Popen(train_cmd("b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120

        def reached() -> bool:
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            return any(json.loads(x).get("step", 0) >= kill_at for x in lines if x.endswith("}"))

        while not reached():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert not (tmp_path / "b" / "model").exists()  # it really died mid-run
    subprocess.run(train_cmd("b", "--resume"), env=env, check=True, capture_output=True)
    straight = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "loss" in x]
    assert steps == sorted(set(steps))  # each step logged once


def test_a_checkpoint_of_an_older_vislang_still_resumes(tmp_path):
    """Before RNG states were tensors, they were stored as NumPy arrays and tuples: still data, so still loaded."""
    np.random.randn()
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"step": 3, "rng": old, "losses": [np.float32(0.5)]}, tmp_path / "last.pt")
    want = (random.random(), np.random.randn(), torch.rand(1).item())
    state = load_checkpoint(tmp_path / "last.pt")
    set_rng_state(state["rng"])
    assert (random.random(), np.random.randn(), torch.rand(1).item()) == want and state["losses"] == [0.5]
