"""The benchmarks under benchmarks/ run (in --smoke mode) and compare like with like."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vislang.factory import fit_config_to_tokenizer, get_model_config
from vislang.models import CLIP
from vislang.tokenizers import Tokenizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A benchmark script as a module (benchmarks/ is not a package); registered so its dataclasses resolve."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_openclip_twin_matches_vislang_model() -> None:
    """The OpenCLIP model of train_throughput is the same size, reads 1 channel and pools at vislang's end token."""
    pytest.importorskip("open_clip")
    from open_clip.transformer import text_global_pool

    tt = load_benchmark("train_throughput")
    captions = ["a photo of a sneaker.", "a picture of a pair of trousers, a fashion item.", "a bag."]
    tokenizer = Tokenizer.train(captions, vocab_size=200, context_length=24)
    mcfg = fit_config_to_tokenizer(get_model_config(tt.MODEL_NAME), tokenizer)
    openclip, vislang = tt.build_openclip(mcfg, tokenizer.eos_id), CLIP(mcfg)
    n_oc, n_vl = tt.param_count(openclip), tt.param_count(vislang)
    assert abs(n_vl - n_oc) / n_oc < 0.01, (n_vl, n_oc)

    ids = tokenizer(captions)  # (B, T), [EOS] is not the highest id
    end = (ids != tokenizer.pad_id).sum(1) - 1  # vislang's end-token index
    positions = torch.arange(ids.shape[1], dtype=torch.float32).expand(*ids.shape).unsqueeze(-1)  # (B, T, 1)
    pooled = text_global_pool(positions, ids, openclip.text_pool_type, eos_token_id=openclip.text_eos_id)
    assert pooled.squeeze(-1).long().tolist() == end.tolist()

    images = torch.randn(len(captions), mcfg.vision.channels, mcfg.vision.image_size, mcfg.vision.image_size)
    out = openclip(images, ids)
    assert out["image_features"].shape == out["text_features"].shape == (len(captions), mcfg.embed_dim)


@pytest.mark.fashion_mnist
def test_train_throughput_smoke(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    out_json = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_throughput.py"), "--smoke", "--json", str(out_json)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # ~18 s on an idle machine; the cap only catches a hang (300 s was hit under heavy load)
    )
    assert proc.returncode == 0, f"train_throughput failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert any(re.fullmatch(r"ratio vislang/openclip = \d+\.\d\d", line) for line in lines), proc.stdout
    assert any(line.startswith("params: vislang ") for line in lines), proc.stdout
    report = json.loads(out_json.read_text())
    assert set(report["results"]) == {"vislang", "vislang dedupe_text=False", "openclip"}
    assert report["ratio"] > 0 and report["torch_threads"] == 1
    assert all(r["pairs_per_s"] > 0 for r in report["results"].values())
    assert list(tmp_path.iterdir()) == [out_json]  # the prepared data lived in a temporary folder


def test_time_to_accuracy_twin_is_the_demo_model() -> None:
    """OpenCLIP's twin of the demo CNN model has vislang's parameter count (CNN tower + projection, text Transformer)
    and OpenCLIP's own text initialisation."""
    pytest.importorskip("open_clip")
    tta = load_benchmark("time_to_accuracy")
    captions = ["a photo of a sneaker.", "a picture of a pair of trousers, a fashion item.", "a bag."]
    tokenizer = Tokenizer.train(captions, vocab_size=200, context_length=24)
    mcfg = fit_config_to_tokenizer(get_model_config("fmnist-cnn"), tokenizer)
    openclip, vislang = tta.build_openclip_twin(mcfg, tokenizer.eos_id), CLIP(mcfg)
    n_oc = sum(p.numel() for p in openclip.parameters())
    n_vl = sum(p.numel() for p in vislang.parameters())
    assert abs(n_vl - n_oc) / n_oc < 0.01, (n_vl, n_oc)
    images = torch.randn(3, 1, 28, 28)
    out = openclip(images, tokenizer(captions))
    assert out["image_features"].shape == out["text_features"].shape == (3, mcfg.embed_dim)
    # the image towers start from the same weights: same image features before training
    openclip.eval(), vislang.eval()
    assert not torch.allclose(openclip.encode_image(images), vislang.encode_image(images))
    assert tta.share_image_tower(openclip, vislang)
    torch.testing.assert_close(openclip.encode_image(images, normalize=True), vislang.encode_image(images))


@pytest.mark.fashion_mnist
def test_time_to_accuracy_smoke(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    out_json = tmp_path / "result.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VISLANG_PRECISION_CACHE": str(tmp_path / "precision.json"),
    }
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "time_to_accuracy.py"), "--smoke", "--levels", "0.05,0.1",
         "--openclip-attention", "math", "--json", str(out_json)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"time_to_accuracy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out_json.read_text())
    assert set(report["curves"]) == {"vislang", "openclip"}
    assert report["openclip_attention"] == "math" and "attention kernel: math" in proc.stdout
    assert all(c and all(0 <= p["accuracy"] <= 1 for p in c) for c in report["curves"].values())
    assert report["accuracy"] in (0.05, 0.1, None)
    if report["ratio"] is not None:
        assert report["ratio"] > 0 and re.search(r"ratio openclip/vislang seconds to \d+% = \d", proc.stdout)


def test_precision_speed_smoke(tmp_path: Path) -> None:
    out_json = tmp_path / "result.json"
    env = {**os.environ, "VISLANG_PRECISION_CACHE": str(tmp_path / "precision.json")}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "precision_speed.py"), "--smoke", "--json", str(out_json)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"precision_speed failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert re.search(r"ratio bf16/fp32 training steps/s = \d+\.\d\d", proc.stdout), proc.stdout
    assert re.search(r"explicit attention \d+\.\d\dx its steps/s", proc.stdout), proc.stdout  # --sdpa-row in smoke
    report = json.loads(out_json.read_text())
    assert report["sdpa_attention"]["ms_per_step"] > 0 and report["rows"]["bf16 foreach AdamW"]["mfu_same_rounds"] > 0
    report = json.loads(out_json.read_text())
    assert len(report["rows"]) == 4 and all(r["ms_per_step"] > 0 for r in report["rows"].values())
    assert report["embed"]["min_cosine"] >= 0.999


@pytest.mark.fashion_mnist
def test_index_build_speed_smoke(tmp_path: Path) -> None:
    """fp32 against auto on the demo model: both build the same 64 images, and when auto picks bf16 every stored
    vector agrees with fp32's to the promised cosine (``inference_precision`` checks only its trial batch)."""
    out_json = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "VISLANG_PRECISION"}  # auto decides for itself here
    env.update(HF_HUB_OFFLINE="1", VISLANG_PRECISION_CACHE=str(tmp_path / "precision.json"))
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "index_build_speed.py"), "--smoke", "--json", str(out_json)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"index_build_speed failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert re.search(r"ratio auto/fp32 index build images/s, demo = \d+\.\d\d", proc.stdout), proc.stdout
    (row,) = json.loads(out_json.read_text())["results"]
    assert row["images"] == 64 and all(v > 0 for v in row["images_per_s"].values())
    assert row["auto_chose"] in ("fp32", "bf16")
    assert row["min_cosine_auto_vs_fp32"] >= (0.999 if row["auto_chose"] == "bf16" else 0.999999)
