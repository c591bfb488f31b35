"""`torchrun` with 2 CPU processes (gloo) trains the same tiny config end to end."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch.distributed as dist

import vislang


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed/gloo missing")
def test_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    out = tmp_path / "run"
    cmd = [
        torchrun, "--standalone", "--nproc-per-node", "2", "-m", "vislang.cli", "train",
        "--model_name=shapes-cnn", "--model.vision.width=4", "--model.vision.depth=2", "--model.vision.image_size=24",
        "--model.text.width=16", "--model.text.layers=1", "--model.text.heads=2", "--model.text.vocab_size=200",
        "--model.embed_dim=16", "--data.train=shapes", "--data.val_split=val", "--data.options={n: 64}",
        "--batch_size=8", "--epochs=1", "--progress=false", "--log_every=1",
        f"--out_dir={out}", f"--data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps[-1]["step"] == 64 // (8 * 2)  # each step takes 8 pairs from each of 2 ranks
    assert vislang.factory.is_model_dir(out / "model")
