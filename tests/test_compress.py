"""vislang.compress on a tiny model: every output loads and runs, int8 stays close, pruning hits its sparsity,
distillation lowers its loss, and bad input fails with a clear error."""

import json

import pytest
import torch

from test_compress_tiny import SHAPES, tiny_model_dir
from vislang.cli.main import main
from vislang.compress import compress_model_dir, load_model, sparsity_of
from vislang.compress.prune import prune_model
from vislang.export.onnx import example_inputs
from vislang.factory import from_pretrained

INT8_TOL = 0.05  # max abs difference of normalised embeddings, int8 vs fp32, on fixed inputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("compress"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_dynamic_int8_loads_quantised_and_stays_close(tiny, tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    out = tmp_path / "int8"
    info = compress_model_dir(tiny, "dynamic-int8", out)
    assert "text_proj" in info["modules"]
    ref, q = from_pretrained(tiny), load_model(out)
    assert isinstance(q.text_proj, QLinear) and isinstance(q.text.transformer.blocks[0].mlp.fc1, QLinear)
    assert (out / "model.safetensors").stat().st_size < (tiny / "model.safetensors").stat().st_size
    images, ids = example_inputs(ref.cfg, 8)
    with torch.inference_mode():
        d_img = (q.encode_image(images) - ref.encode_image(images)).abs().max()
        d_txt = (q.encode_text(ids) - ref.encode_text(ids)).abs().max()
        again = load_model(out).encode_text(ids)
        assert isinstance(from_pretrained(out).text_proj, QLinear)  # the generic loader rebuilds int8 too
        assert torch.equal(again, q.encode_text(ids))  # the stored int8 weights load back exactly
    assert 0 < d_txt < INT8_TOL and d_img < INT8_TOL, (d_img, d_txt)


def test_prune_unstructured_reaches_sparsity_and_is_a_plain_model(tiny, cache, tmp_path):
    out = tmp_path / "pruned"
    info = compress_model_dir(tiny, "prune", out, sparsity=0.5, steps=3, batch_size=16, cache_dir=cache, **SHAPES)
    model = from_pretrained(out)  # no pruning masks or *_orig keys: an ordinary directory
    assert sparsity_of(model) == pytest.approx(0.5, abs=1e-3) and info["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert sparsity_of(from_pretrained(tiny)) < 0.01
    assert json.loads((out / "config.json").read_text())["compression"]["method"] == "prune"
    images, ids = example_inputs(model.cfg, 2)
    assert torch.isfinite(model(images, ids)["image_features"]).all()


def test_prune_structured_zeroes_heads_and_channels(tiny):
    model = prune_model(from_pretrained(tiny), 0.5, "structured")
    attn = model.text.transformer.blocks[0].attn
    hd = attn.q.weight.shape[0] // attn.heads
    zero_heads = sum(bool((attn.out.weight[:, h * hd : (h + 1) * hd] == 0).all()) for h in range(attn.heads))
    assert zero_heads == attn.heads // 2
    conv = model.visual.stages[0][0][0].weight  # (out, in, 3, 3)
    assert int((conv.flatten(1) == 0).all(1).sum()) == conv.shape[0] // 2
    assert sparsity_of(model) == pytest.approx(0.5, abs=0.05)


def test_distill_student_is_smaller_and_its_loss_decreases(tiny, cache, tmp_path):
    out = tmp_path / "student"
    info = compress_model_dir(
        tiny, "distill", out, steps=40, batch_size=16, lr=3e-3, cache_dir=cache, student=["text.layers=1"], **SHAPES
    )
    assert info["last_loss"] < 0.8 * info["first_loss"], info
    student = from_pretrained(out)
    assert sum(p.numel() for p in student.parameters()) == info["student_params"] < info["teacher_params"]
    assert student.cfg.text.width == 16 and student.cfg.embed_dim == 8


@pytest.mark.parametrize("sparsity", [0.0, 1.0, 1.5, -0.2])
def test_sparsity_outside_unit_interval_is_refused(tiny, tmp_path, sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a fraction in \(0, 1\)"):
        compress_model_dir(tiny, "prune", tmp_path / "p", sparsity=sparsity)
    assert not (tmp_path / "p").exists()


def test_not_a_model_dir_and_unknown_method(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="not a vislang model directory"):
        compress_model_dir(tmp_path, "dynamic-int8", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown compression method 'fp16'"):
        compress_model_dir(tiny, "fp16", tmp_path / "out")


def test_methods_a_model_does_not_support(tiny, tmp_path):
    compress_model_dir(tiny, "dynamic-int8", tmp_path / "int8")
    with pytest.raises(ValueError, match="already dynamic-int8-quantised"):
        compress_model_dir(tmp_path / "int8", "prune", tmp_path / "again")
    with pytest.raises(ValueError, match="already dynamic-int8-quantised"):
        compress_model_dir(tmp_path / "int8", "static-int8", tmp_path / "static")
    from vislang.compress.distill import student_config
    from vislang.models import ModelConfig, VisionConfig

    vit = ModelConfig(vision=VisionConfig(arch="vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="no default student"):
        student_config(vit)


def test_cli_compress_and_its_errors(tiny, tmp_path, capsys):
    assert main(["compress", str(tiny), "--method", "dynamic-int8", "-o", str(tmp_path / "q")]) == 0
    assert "model: " in capsys.readouterr().out and load_model(tmp_path / "q") is not None
    # compare takes -o like compress (its short form once made `compare ... -o DIR` a usage error)
    models = [str(tiny), str(tmp_path / "q")]
    assert main(["compare", *models, "--data", "none", "--rounds", "1", "-o", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "compare.md").is_file()
    assert main(["compress", str(tmp_path), "--method", "prune", "-o", str(tmp_path / "x")]) == 2
    assert "not a vislang model directory" in capsys.readouterr().err
    assert main(["compress", str(tiny), "--method", "prune", "--sparsity", "1.2", "-o", str(tmp_path / "x")]) == 2
    assert "sparsity must be a fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", str(tiny), "--method", "zip", "-o", str(tmp_path / "x")])


def test_compare_table(tiny, cache, tmp_path):
    from vislang.compress.compare import compare_models

    compress_model_dir(tiny, "dynamic-int8", tmp_path / "int8")
    rows = compare_models(
        [tiny, tmp_path / "int8"],
        data="shapes",
        data_options={"n": 32},
        cache_dir=cache,
        batch_size=16,
        rounds=1,
        out_dir=tmp_path / "cmp",
    )
    assert [r["kind"] for r in rows] == ["fp32", "dynamic-int8"]
    assert rows[1]["size_mb"] < rows[0]["size_mb"] and rows[0]["params"] == rows[1]["params"]
    assert all(r["images_per_s"] > 0 and r["texts_per_s"] > 0 and "text_to_image_R@1" in r for r in rows)
    assert rows[0]["images_per_s_ratio"] == 1.0 and rows[1]["images_per_s_ratio_iqr"][0] > 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.count("\n| ") == 2 and "dynamic-int8" in md and (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_compare_times_each_batch_size(tiny, tmp_path, capsys):
    from vislang.compress.compare import batch_of

    x, ids = torch.arange(3.0).view(3, 1, 1, 1), torch.arange(6).view(3, 2)
    bx, bids = batch_of(x, ids, 7)
    assert bx.flatten().tolist() == [0, 1, 2, 0, 1, 2, 0] and bids[:, 0].tolist() == [0, 2, 4, 0, 2, 4, 0]
    assert batch_of(x, ids, 2)[0].shape == (2, 1, 1, 1)
    compress_model_dir(tiny, "dynamic-int8", tmp_path / "int8")
    models, out = [str(tiny), str(tmp_path / "int8")], tmp_path / "c"
    args = ["compare", *models, "--data", "none", "--rounds", "1", "--batch-size", "4", "-o", str(out)]
    assert main([*args, "--speed-batches", "1,6"]) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [sorted(r["speed_by_batch"]) for r in rows] == [["1", "6"]] * 2
    assert all(s["images_per_s"] > 0 for r in rows for s in r["speed_by_batch"].values())
    assert rows[0]["speed_by_batch"]["6"]["images_per_s_ratio"] == 1.0  # ratios against the first model
    md = (out / "compare.md").read_text()
    assert "img/s @1" in md and "txt/s @6" in md and (out / "speed_by_batch.png").stat().st_size > 0
    capsys.readouterr()
    for bad in ("0,8", "one"):
        with pytest.raises(SystemExit):
            main([*args, "--speed-batches", bad])
        assert "batch sizes" in capsys.readouterr().err


def test_paired_ratios_cancel_the_machines_drift():
    from vislang.compress.measure import paired_ratios

    # The machine slows down tenfold half-way through; the second model is twice as fast in every round except one.
    base, other = [1.0, 1.0, 1.0, 10.0, 10.0], [0.5, 0.5, 5.0, 5.0, 5.0]
    r = paired_ratios(base, other, 256, 256)
    assert r["median"] == pytest.approx(2.0)  # a ratio of the two medians would say 0.2
    assert r["iqr"] == pytest.approx([2.0, 2.0])
    assert paired_ratios([1.0], [0.25], 10, 5)["median"] == pytest.approx(2.0)  # per item: 10/s against 20/s
