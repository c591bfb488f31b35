"""`torchrun` with 2 CPU processes (gloo, real DistributedDataParallel) trains as one process on the global batch.

Each task trains twice from the same seed for the same steps with `vislang train`: (a) under `torchrun --standalone
--nproc-per-node 2` at B items per process, (b) in one process at 2B. Every module of the two final checkpoints
(weights and buffers: BatchNorm statistics, spectral-norm vectors) must agree to within what float reduction order
allows: ``|a - b| <= 1e-5 · max(1, max |b|)`` per tensor, integers exactly. That holds only if DDP averages the
gradients, each rank takes its own part of the global batch, BatchNorm normalises by the global batch, and losses that
are means over a varying number of terms (VQA questions, the GAN's wrong-text pairs) are scaled to the global mean.

Configs are tiny (seconds per run); random layers are off (dropout draws per rank). The GAN runs with BatchNorm in G,
the matching-aware term with some wrong pairs dropped (so ranks keep different numbers) and the text-matching loss.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is missing"
)

WORLD = 2
RTOL_OF_SCALE = 1e-5  # per tensor: |a - b| <= RTOL_OF_SCALE * max(1, max |b|)

CONTRASTIVE = [
    "--task=contrastive", "--model_name=shapes-cnn", "--model.vision.width=4", "--model.vision.depth=2",
    "--model.vision.image_size=24", "--model.text.width=16", "--model.text.layers=1", "--model.text.heads=2",
    "--model.text.vocab_size=200", "--model.embed_dim=16", "--data.train=shapes", "--data.val_split=val",
    "--data.options={n: 64}", "--epochs=1", "--log_every=1",
]  # fmt: skip

# A tiny answer classifier (CNN with BatchNorm, transformer, cross-attention fusion), written out so the test does
# not depend on a named config; no dropout, which would draw per rank.
VQA_MODEL = {
    "vision": {"arch": "cnn", "image_size": 16, "channels": 3, "width": 4, "depth": 2, "mean": [0.5] * 3,
               "std": [0.25] * 3},
    "text": {"arch": "transformer", "context_length": 20, "width": 16, "layers": 1, "heads": 2, "pool": "eot",
             "tokenizer": "bpe", "vocab_size": 120},
    "fusion": {"kind": "cross_attention", "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0},
    "head_hidden": 16,
    "head_dropout": 0.0,
}  # fmt: skip

VQA_GEN = [
    "--task=vqa-gen", "--model_name=shapes-cnn", "--model.vision.width=4", "--model.vision.depth=2",
    "--model.vision.image_size=16", "--model.text.width=16", "--model.text.layers=1", "--model.text.heads=2",
    "--model.text.tokenizer=bpe", "--model.text.context_length=32", "--model.text.vocab_size=100",
    "--model.decoder={width: 16, layers: 1, heads: 2}", "--model.embed_dim=16", "--vqa.n_train=40",
    "--vqa.n_test=8", "--epochs=1", "--log_every=1",
]  # fmt: skip


def _torchrun() -> str:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun is not on PATH")
    return exe


def _train(args: list[str], out: Path, batch: int, world: int) -> dict[str, Any]:
    """`vislang train args` at ``batch`` per process on ``world`` processes; the final checkpoint."""
    launch = [_torchrun(), "--standalone", "--nproc-per-node", str(world)] if world > 1 else [sys.executable]
    cmd = [*launch, "-m", "vislang.cli", "train", *args, f"--batch_size={batch}", f"--out_dir={out}",
           "--progress=false", "--threads=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def _worst(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest difference of two state dicts' float tensors, each relative to max(1, its largest magnitude)."""
    assert got.keys() == want.keys()
    diffs = [(float((got[k].double() - w.double()).abs().max()) / max(1.0, float(w.abs().max())), k)
             for k, w in want.items() if w.is_floating_point()]  # fmt: skip
    return max(diffs)


def _assert_one_process(ddp: dict[str, Any], one: dict[str, Any], modules: list[str], steps: int) -> None:
    assert ddp["step"] == one["step"] == steps  # each step took B items from each of the 2 ranks
    for m in modules:
        ints = [k for k, w in one[m].items() if not w.is_floating_point()]  # BatchNorm's num_batches_tracked
        assert all(torch.equal(ddp[m][k], one[m][k]) for k in ints), m
        rel, key = _worst(ddp[m], one[m])
        assert rel <= RTOL_OF_SCALE, f"{m}.{key} differs by {rel:.2e} of its scale between torchrun and one process"


def test_contrastive_under_torchrun_equals_one_process_on_the_global_batch(tmp_path):
    args = [*CONTRASTIVE, f"--data.cache_dir={tmp_path / 'cache'}"]
    ddp = _train(args, tmp_path / "ddp", 8, WORLD)
    one = _train(args, tmp_path / "one", 8 * WORLD, 1)
    _assert_one_process(ddp, one, ["model"], steps=64 // 16)
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()
    # The comparison sees the batch: one process on one rank's share (B) ends far outside the tolerance.
    half = _train([*args, "--max_steps=4"], tmp_path / "half", 8, 1)
    assert _worst(ddp["model"], half["model"])[0] > 100 * RTOL_OF_SCALE


def test_vqa_classifier_under_torchrun_equals_one_process_on_the_global_batch(tmp_path):
    """Shapes scenes carry different numbers of questions, so the two ranks' shares of a step differ."""
    model = tmp_path / "vqa.json"
    model.write_text(json.dumps(VQA_MODEL))
    args = ["--task=vqa", f"--model_name={model}", "--vqa.n_train=40", "--vqa.n_test=8", "--epochs=1", "--log_every=1"]
    ddp = _train(args, tmp_path / "ddp", 4, WORLD)
    one = _train(args, tmp_path / "one", 4 * WORLD, 1)
    _assert_one_process(ddp, one, ["model"], steps=40 // 8)


def _text_model(d: Path) -> Path:
    """An untrained tiny dual encoder whose frozen text tower conditions the GAN."""
    from vislang.factory import fit_config_to_tokenizer, save_pretrained
    from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
    from vislang.tokenizers import Tokenizer

    tok = Tokenizer.train(["a red circle", "a blue square", "a green star"] * 4, vocab_size=60, context_length=16)
    mcfg = ModelConfig(
        embed_dim=8,
        vision=VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=2),
        text=TextConfig(arch="transformer", vocab_size=60, context_length=16, width=16, layers=1, heads=2),
    )
    torch.manual_seed(0)
    save_pretrained(CLIP(fit_config_to_tokenizer(mcfg, tok)).eval(), d, tok)
    return d


def test_gan_under_torchrun_equals_one_process_on_the_global_batch(tmp_path):
    """dcgan (G with conditional BatchNorm), matching-aware term and text matching on. An untrained tower embeds the
    captions alike (cosines 0.98-1.0): mismatch_max_cos 0.998 drops about half the wrong pairs, unevenly per rank.
    (resnet's G agrees as well except the biases that feed a BatchNorm: their true gradient is 0, and Adam turns the
    float noise around it into steps of the learning rate's size, different in the two runs.)"""
    args = [
        "--task=gan", "--data.train=shapes", "--data.options={n: 64}", "--epochs=1", "--log_every=1",
        f"--data.cache_dir={tmp_path / 'cache'}", f"--gan.text_model={_text_model(tmp_path / 'text')}",
        "--gan.model={g_width: 4, d_width: 4, z_dim: 4}", "--gan.sample_every=0", "--gan.sample_per_prompt=2",
        "--gan.standing_stats=0", "--gan.mismatch_max_cos=0.998", "--gan.text_match=1.0",
    ]  # fmt: skip
    ddp = _train(args, tmp_path / "ddp", 8, WORLD)
    one = _train(args, tmp_path / "one", 8 * WORLD, 1)
    _assert_one_process(ddp, one, ["G", "D", "G_ema"], steps=64 // 16)


@pytest.mark.slow  # a fourth pair of runs (~15 s): kept out of the default run to hold the file near 45 s
def test_generative_vqa_under_torchrun_equals_one_process_on_the_global_batch(tmp_path):
    """vqa-gen trains through caption_logits (inside DDP by way of Calls); its loss is a mean over answer tokens."""
    ddp = _train(VQA_GEN, tmp_path / "ddp", 4, WORLD)
    one = _train(VQA_GEN, tmp_path / "one", 4 * WORLD, 1)
    _assert_one_process(ddp, one, ["model"], steps=40 // 8)
