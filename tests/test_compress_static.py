"""Static int8 on a tiny model: the CNN tower's convolutions become int8 (calibrated on training images), the output
loads back exactly through from_pretrained and stays within a stated tolerance of fp32 on fixed inputs; towers it
cannot cover fall back to dynamic int8 with a note."""

import pytest
import torch

from test_compress_tiny import SHAPES, tiny_model_dir
from vislang.compress import compress_model_dir, load_model
from vislang.export.onnx import example_inputs
from vislang.factory import from_pretrained

INT8_TOL = 0.05  # max abs difference of normalised text embeddings (dynamic int8 text tower) vs fp32, fixed inputs
STATIC_COS = 0.99  # least cosine similarity of each int8 image embedding to fp32's, on shapes test images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("static"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _shapes_images(cfg, n: int = 16) -> torch.Tensor:
    """Fixed inputs from the calibration's distribution: the first ``n`` shapes test scenes, normalised."""
    import numpy as np

    from vislang.data import ShapesDataset
    from vislang.data.transforms import normalize, pil_to_array

    v = cfg.vision
    ds = ShapesDataset("test", n=n)
    x = np.stack([pil_to_array(ds[i][0], v.image_size, v.channels) for i in range(n)]).transpose(0, 3, 1, 2)
    return normalize(torch.from_numpy(x.copy()), v.mean, v.std)  # (n, C, H, W)


def test_static_int8_quantises_the_convs_and_loads_back_exactly(tiny, cache, tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    from vislang.models.quantized_static import StaticInt8CNN

    out = tmp_path / "static"
    info = compress_model_dir(tiny, "static-int8", out, calibration_images=48, cache_dir=cache, **SHAPES)
    assert info["static"] == ["visual"] and info["calibration_images"] == 48 and info["notes"] == []
    ref, q = from_pretrained(tiny), from_pretrained(out)  # from_pretrained rebuilds the FX graph, then loads int8
    assert isinstance(q.visual, StaticInt8CNN) and isinstance(q.text_proj, QLinear)
    convs = [m for m in q.visual.modules() if type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized")]
    assert len(convs) == 4  # every conv-BN-ReLU block of the 2-stage tower is one int8 ConvReLU2d
    assert (out / "model.safetensors").stat().st_size < 0.5 * (tiny / "model.safetensors").stat().st_size
    images, (_, ids) = _shapes_images(ref.cfg), example_inputs(ref.cfg, 8)
    with torch.inference_mode():
        a, b = q.encode_image(images), ref.encode_image(images)
        cos = (a * b).sum(-1)
        again = load_model(out).encode_image(images)
        d_txt = (q.encode_text(ids) - ref.encode_text(ids)).abs().max()
    assert torch.equal(again, a)  # the stored integers and scales load back exactly
    assert cos.min() > STATIC_COS and not torch.equal(a, b), cos
    assert d_txt < INT8_TOL


def test_static_int8_can_keep_a_block_in_fp32(tiny, cache, tmp_path):
    out = tmp_path / "keep"
    compress_model_dir(
        tiny, "static-int8", out, calibration_images=16, keep_fp32=("stages.0.0",), cache_dir=cache, **SHAPES
    )
    q = from_pretrained(out)
    first, second = (q.visual.body.get_submodule(f"stages.0.{i}.0") for i in (0, 1))
    assert not type(first).__module__.startswith("torch.ao.nn.intrinsic.quantized")  # fp32 conv (BN folded) + ReLU
    assert type(second).__module__.startswith("torch.ao.nn.intrinsic.quantized")
    images = _shapes_images(q.cfg, 4)
    with torch.inference_mode():
        assert torch.equal(load_model(out).encode_image(images), q.encode_image(images))
    with pytest.raises(ValueError, match=r"keep_fp32 names unknown blocks \['stage.0'\]; .* are \['stages.0.0'"):
        compress_model_dir(
            tiny, "static-int8", tmp_path / "x", calibration_images=4, keep_fp32=("stage.0",), cache_dir=cache, **SHAPES
        )


def test_static_int8_falls_back_to_dynamic_for_a_vit_tower():
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
    from vislang.models.quantized_static import quantize_static

    vit = VisionConfig(
        arch="vit_tiny_patch16_224",
        image_size=16,
        channels=3,
        timm_kwargs={"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
    )
    model = CLIP(ModelConfig(embed_dim=8, vision=vit, text=TextConfig(width=16, layers=1, heads=2))).eval()
    q = quantize_static(model, torch.zeros(2, 3, 16, 16))
    assert q._compression["static"] == [] and "not a compact CNN" in q._compression["notes"][0]
    assert isinstance(q.visual.model.blocks[0].attn.qkv, QLinear)  # per-module fallback: Linear layers dynamic
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert (q.encode_image(x) - model.encode_image(x)).abs().max() < INT8_TOL


def test_static_int8_bad_calibration_is_refused(tiny, cache, tmp_path):
    with pytest.raises(ValueError, match="at least one calibration image"):
        compress_model_dir(tiny, "static-int8", tmp_path / "s", calibration_images=0, cache_dir=cache, **SHAPES)
