"""Compression of a text-to-image GAN's generator: each method's output is a GAN model directory that loads with
``TextToImage.from_pretrained`` and draws; int8 stays close to the fp32 generator on fixed inputs, pruning reaches
its sparsity and its fine-tune pulls the pruned generator back towards the original, distillation gives a smaller
student whose loss falls; bad requests fail clearly."""

import importlib.util
import json

import pytest
import torch

from test_compress_tiny import SHAPES, tiny_model_dir
from vislang.compress import compress_model_dir
from vislang.compress.prune import prunable
from vislang.factory import from_pretrained, get_tokenizer
from vislang.models.gan.build import build_generator
from vislang.models.gan.networks import GANModelConfig
from vislang.models.gan.pipeline import TextToImage

INT8_REL_TOL = 0.1  # mean abs pixel difference of an int8 generator from its fp32 source / mean abs deviation of the
# source's pixels (torch 2.14's x86-engine ConvTranspose2d gave about 1)


def tiny_gan_dir(root, mixture: int = 1):
    enc_dir = tiny_model_dir(root / "enc")
    encoder = from_pretrained(enc_dir)
    v = encoder.cfg.vision
    cfg = GANModelConfig(
        cond_dim=encoder.cfg.embed_dim, z_dim=6, g_width=8, image_size=v.image_size, channels=v.channels,
        mixture=mixture,
    )  # fmt: skip
    torch.manual_seed(0)
    gen = build_generator(cfg)
    gen.train()
    with torch.no_grad():
        for _ in range(3):  # BatchNorm statistics that are not the defaults
            gen(torch.randn(32, 6), torch.nn.functional.normalize(torch.randn(32, cfg.cond_dim), dim=1))
        for m in gen.modules():  # conditional BatchNorms that depend on the text (they start at zero)
            if isinstance(m, torch.nn.Linear) and m.out_features < 64:
                torch.nn.init.normal_(m.weight, std=0.3)
    t2i = TextToImage(cfg, gen.eval(), encoder, get_tokenizer(enc_dir), {"sample_prompts": ["a red circle"]})
    return t2i.save_pretrained(root / "gan")


@pytest.fixture(scope="module")
def gan(tmp_path_factory):
    return tiny_gan_dir(tmp_path_factory.mktemp("gan"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def fixed_inputs(cfg, n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, cfg.z_dim, generator=g), torch.nn.functional.normalize(
        torch.randn(n, cfg.cond_dim, generator=g), dim=1
    )


@pytest.mark.parametrize("mixture", [1, 2])
@pytest.mark.parametrize("method", ["dynamic-int8", "static-int8"])
def test_int8_generator_loads_and_draws_close_to_fp32(tmp_path, cache, method, mixture):
    src = tiny_gan_dir(tmp_path, mixture)
    info = compress_model_dir(src, method, tmp_path / "q", calibration_images=64, cache_dir=cache, **SHAPES)
    assert info["family"] == "generator" and info["method"] == method
    ref, q = TextToImage.from_pretrained(src), TextToImage.from_pretrained(tmp_path / "q")
    kinds = {type(m).__module__ for m in q.generator.modules()}
    assert any("quantized" in k for k in kinds), kinds  # int8 modules, not the fp32 ones
    z, c = fixed_inputs(ref.cfg)
    with torch.inference_mode():
        a, b = ref.generator(z, c), q.generator(z, c)
    rel = (a - b).abs().mean() / (a - a.mean()).abs().mean()  # error against the spread of what it draws
    assert a.shape == b.shape and 0 < rel < INT8_REL_TOL, rel
    engine = torch.backends.quantized.engine
    images = q.generate(["a red circle"], n=3, seed=0)
    assert torch.backends.quantized.engine == engine  # the generator's own engine is set only while it runs
    assert images.shape == (3, 3, 24, 24) and images.dtype == torch.uint8
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["model_type"] == "vislang-gan" and meta["compression"]["method"] == method
    with pytest.raises(ValueError, match=f"already {method}-quantised"):
        compress_model_dir(tmp_path / "q", "prune", tmp_path / "again", cache_dir=cache, **SHAPES)
    from vislang.export.onnx import export_onnx

    with pytest.raises(ValueError, match="int8-quantised torch model, which ONNX export does not support"):
        export_onnx(tmp_path / "q", tmp_path / "onnx")


def test_int8_generator_refuses_a_gpu(gan, cache, tmp_path):
    compress_model_dir(gan, "dynamic-int8", tmp_path / "q", cache_dir=cache, **SHAPES)
    with pytest.raises(ValueError, match="runs on the CPU only"):
        TextToImage.from_pretrained(tmp_path / "q", device="cuda")


def test_pruned_generator_reaches_sparsity_and_its_finetune_helps(gan, cache, tmp_path):
    info = compress_model_dir(gan, "prune", tmp_path / "p", sparsity=0.6, steps=40, lr=1e-3, batch_size=32,
                              cache_dir=cache, **SHAPES)  # fmt: skip
    pruned = TextToImage.from_pretrained(tmp_path / "p").generator
    weights = [m.weight for _, m in prunable(pruned)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=0.01) and info["sparsity"] == pytest.approx(zeros)
    per_layer = [float((w == 0).float().mean()) for w in weights]
    assert per_layer == pytest.approx([0.6] * len(weights), abs=0.02)  # the same fraction of every layer
    assert info["last_loss"] < info["first_loss"]  # L1 to the unpruned generator's images fell
    assert "ConvTranspose2d" in {type(m).__name__ for _, m in prunable(pruned)}


def test_distilled_generator_is_smaller_and_learns(gan, cache, tmp_path):
    info = compress_model_dir(gan, "distill", tmp_path / "d", steps=60, batch_size=32, cache_dir=cache, **SHAPES)
    st = TextToImage.from_pretrained(tmp_path / "d")
    assert st.cfg.g_width == 4 and info["student_params"] < info["teacher_params"]
    assert info["last_loss"] < 0.8 * info["first_loss"]
    assert st.generate(["a red circle"], n=2, seed=0).shape == (2, 3, 24, 24)
    compress_model_dir(gan, "distill", tmp_path / "d2", steps=2, student=["g_width=2"], cache_dir=cache, **SHAPES)
    assert TextToImage.from_pretrained(tmp_path / "d2").cfg.g_width == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "prune", "prune_kind": "structured"}, "pruned unstructured only"),
        ({"method": "prune", "sparsity": 1.0}, "sparsity must be a fraction in"),
        ({"method": "distill", "student": ["z_dim=3"]}, "must keep the teacher's z_dim"),
    ],
)
def test_bad_generator_requests_fail_clearly(gan, cache, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compress_model_dir(gan, out_dir=tmp_path / "out", steps=1, cache_dir=cache, **SHAPES, **kwargs)
    assert not (tmp_path / "out").exists()


def fm_gan_dir(root):
    """A tiny Fashion-MNIST-shaped GAN (28 px, one channel) whose text tower knows the class captions."""
    from test_generate import fm_text_model_dir

    enc_dir = fm_text_model_dir(root / "enc")
    cfg = GANModelConfig(z_dim=8, cond_dim=16, image_size=28, channels=1, g_width=8)
    gen = build_generator(cfg)
    gen.train()
    with torch.no_grad():
        gen(torch.randn(64, 8), torch.randn(64, 16))
    enc, tok = from_pretrained(enc_dir), get_tokenizer(enc_dir)
    t2i = TextToImage(cfg, gen.eval(), enc, tok, {"sample_prompts": ["a photo of a bag."]})
    return t2i.save_pretrained(root / "gan", {"data": {"train": "fashion-mnist"}})


@pytest.mark.fashion_mnist
def test_compare_generators_fid_speed_and_size(tmp_path, cache):
    from test_generate import _tiny_fm_judge
    from vislang.compress.compare import compare_models

    src = fm_gan_dir(tmp_path)
    fm = {"data": "fashion-mnist", "max_pairs": 512, "cache_dir": cache}
    compress_model_dir(src, "static-int8", tmp_path / "q", calibration_images=64, **fm)
    compress_model_dir(src, "distill", tmp_path / "d", steps=3, batch_size=16, **fm)
    judge = _tiny_fm_judge(tmp_path / "judge")
    paths = [src, tmp_path / "q", tmp_path / "d"]
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")):  # the 'deploy' extra
        from vislang.export.onnx import export_onnx

        export_onnx(src, tmp_path / "onnx")  # compared with its own ONNX text tower
        paths.append(tmp_path / "onnx")
    rows = compare_models(paths, data="fashion-mnist", judge=str(judge), max_images=100, batch_size=16, rounds=1,
                          speed_batches=[1, 4], out_dir=tmp_path / "cmp")  # fmt: skip
    assert [r["kind"] for r in rows] == ["fp32", "static-int8", "distill", "onnx"][: len(paths)]
    if len(paths) == 4:  # the same generator: the same images, so the same FID-FM
        assert rows[3]["fid_fm"] == pytest.approx(rows[0]["fid_fm"], rel=1e-3)
    assert rows[0]["images_per_s_ratio"] == 1.0 and all(r["images_per_s"] > 0 for r in rows)
    assert all(r["fid_fm"] > 0 and 0 <= r["class_consistency"] <= 1 for r in rows)
    assert rows[2]["params"] < rows[0]["params"] and rows[1]["size_mb"] < rows[0]["size_mb"]
    assert rows[1]["nonzero_params"] is None and rows[0]["nonzero_params"] > 0  # int8 values are not the weights
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "FID-FM" in md and "img/s @4" in md and "txt/s" not in md
    assert (tmp_path / "cmp" / "speed_by_batch.png").is_file() and (tmp_path / "cmp" / "compare.png").is_file()
    with pytest.raises(ValueError, match="compare generators with generators"):
        compare_models([src, src / "text_encoder"], data=None)


def test_pruning_uses_the_runs_discriminator_when_it_is_there(tmp_path, cache):
    from vislang.models.gan.build import build_gan

    src = tiny_gan_dir(tmp_path).rename(tmp_path / "model")  # a run directory: tmp_path/{model, checkpoints/last.pt}
    kw = dict(steps=5, batch_size=8, cache_dir=cache, **SHAPES)
    alone = compress_model_dir(tmp_path, "prune", tmp_path / "p0", **kw)
    assert alone["critic"] is None and "L1" in alone["notes"][0]
    cfg = TextToImage.from_pretrained(src).cfg
    torch.manual_seed(1)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"D": build_gan(cfg)[1].state_dict(), "config": {"gan": {"loss": "hinge"}}},
               tmp_path / "checkpoints" / "last.pt")  # fmt: skip
    unnamed = compress_model_dir(src, "prune", tmp_path / "unnamed", **kw)  # the model named, not its run
    assert unnamed["critic"] is None and "name the run" in unnamed["notes"][0]
    with_d = compress_model_dir(tmp_path, "prune", tmp_path / "with-d", **kw)
    no_d = compress_model_dir(tmp_path, "prune", tmp_path / "no-d", adv_weight=0, **kw)
    assert with_d["critic"].endswith("last.pt") and with_d["adv_weight"] == 0.1 and "critic" not in no_d
    a = TextToImage.from_pretrained(tmp_path / "with-d").generator.state_dict()
    b = TextToImage.from_pretrained(tmp_path / "no-d").generator.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the critic's term changed what was learnt
    assert "critic" not in compress_model_dir(src, "distill", tmp_path / "d", **kw)  # a student learns by L1


def test_a_generator_is_compressed_on_the_data_it_was_trained_on(tmp_path, cache):
    src = tiny_gan_dir(tmp_path)
    meta = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**meta, "data": {"train": "shapes"}}))
    info = compress_model_dir(src, "dynamic-int8", tmp_path / "q", data_options={"n": 64}, cache_dir=cache)
    assert info["data"] == "shapes"  # no --data: the GAN's own training data, not fashion-mnist
