"""Static int8: the compact CNN image tower's convolutions in int8, calibrated on training images (torch.ao FX).

Dynamic int8 leaves convolutions in fp32, so a CNN image tower gains almost nothing from it. Static quantisation
also fixes the activations' scales in advance: FX graph mode traces the tower's feature map, folds each BatchNorm into
its convolution, fuses the ReLU, and observes a few hundred training images to pick the activation ranges
(``prepare_fx`` → calibration → ``convert_fx``, with the ``x86`` qconfig: per-channel int8 weights, uint8
activations with reduced range, fine on AVX2 machines without VNNI). Images enter as fp32 and the feature map leaves
as fp32, so everything after it (pooling, the projections, a caption decoder) is unchanged; the Linear layers outside
the tower get dynamic int8 as in :func:`vislang.compress.quantize_dynamic`.

Towers FX cannot quantise this way (timm models: ViT attention, arbitrary Python) fall back module by module: their
Linear layers get dynamic int8 and their other layers stay fp32, and the result says so in ``notes``.

On disk the tower's state is stored with every quantised tensor split into plain tensors (``key`` = its integer
values, ``key.__q_scale``, ``key.__q_zero_point`` and ``key.__q_axis`` for per-channel ones), since safetensors holds
no quantised dtypes. Loading rebuilds the same FX graph from the fp32 config (a one-image dummy calibration) and then
loads the stored integers and scales, so the loaded model computes exactly what was saved.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.config import DataConfig
from ..data.loading import load_prepared
from ..data.transforms import normalize
from .quantized import _quiet, linear_names, quantize_dynamic
from .towers import CompactCNN

ENGINE = "x86"  # torch's default quantised engine on x86 CPUs (fbgemm kernels, onednn where it is faster)
Q_SUFFIXES = ("__q_scale", "__q_zero_point", "__q_axis")


class _FeatureMap(nn.Module):
    """``CompactCNN.feature_map`` as a module FX can trace: conv-BN-ReLU stages with 2x max-pooling between them."""

    def __init__(self, cnn: CompactCNN) -> None:
        super().__init__()
        self.stages = cnn.stages

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D, h, w)
        x = images
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                x = F.max_pool2d(x, 2)
        return x


class StaticInt8CNN(CompactCNN):
    """A :class:`CompactCNN` whose feature map is an FX graph of int8 convolutions: fp32 images in, fp32 features out.

    It is a ``CompactCNN`` (same ``forward``, ``forward_tokens`` and ``width``), so code that special-cases the compact
    CNN (CoCa's pooled image feature) treats it the same way.
    """

    def __init__(self, body: nn.Module, width: int) -> None:
        nn.Module.__init__(self)  # not CompactCNN.__init__: the stages live, quantised, inside ``body``
        self.body = body
        self.width = width

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float().contiguous())  # (B, D, h, w) fp32


def check_engine() -> None:
    if ENGINE not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"static int8 needs torch's {ENGINE!r} quantised engine, which this build lacks "
            f"(it has {torch.backends.quantized.supported_engines}); use --method dynamic-int8"
        )
    torch.backends.quantized.engine = ENGINE


def quantize_cnn(
    cnn: CompactCNN, calibration: torch.Tensor, batch_size: int = 64, keep_fp32: tuple[str, ...] = ()
) -> StaticInt8CNN:
    """A static int8 copy of ``cnn`` calibrated on normalised images (N, C, H, W).

    Args:
        keep_fp32: FX module names left in fp32 (``"stages.0.0"``, the first conv block, is the usual candidate).
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if calibration.ndim != 4 or calibration.shape[0] == 0:
        shape = tuple(calibration.shape)
        raise ValueError(f"calibration images must be a non-empty (N, C, H, W) batch, got shape {shape}")
    check_engine()
    body = _FeatureMap(copy.deepcopy(cnn)).eval()
    blocks = [n for n, m in body.named_modules() if n.count(".") == 2]  # stages.<stage>.<block>: conv-BN-ReLU
    unknown = [n for n in keep_fp32 if n not in blocks]
    if unknown:
        raise ValueError(f"keep_fp32 names unknown blocks {unknown}; the tower's conv blocks are {blocks}")
    qmap = get_default_qconfig_mapping(ENGINE)
    for name in keep_fp32:
        qmap = qmap.set_module_name(name, None)
    with _quiet(), torch.inference_mode(False), torch.no_grad():
        prepared = prepare_fx(body, qmap, (calibration[:1].float(),))
        for i in range(0, calibration.shape[0], batch_size):
            prepared(calibration[i : i + batch_size].float())
        quantised = convert_fx(prepared)
    return StaticInt8CNN(quantised, cnn.width).eval()


def calibration_images(
    data: str,
    vision,
    n: int,
    cache_dir: str = ".cache/vislang/prepared",
    options: dict[str, Any] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """``n`` training images of ``data`` drawn at random (seeded), normalised for the model: (n, C, H, W) float."""
    import numpy as np

    if n < 1:
        raise ValueError(f"static int8 needs at least one calibration image, got calibration_images={n}")
    dc = DataConfig(train=data, cache_dir=cache_dir, options=dict(options or {}))
    ds = load_prepared(data, "train", vision.image_size, vision.channels, dc, progress=False)
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[: min(n, len(ds))])
    return normalize(ds.get_batch(idx)["image"], vision.mean, vision.std)  # (n, C, H, W)


def quantize_static(
    model: nn.Module,
    calibration: torch.Tensor | None,
    keep_fp32: tuple[str, ...] = (),
) -> nn.Module:
    """A copy of ``model`` with a static int8 CNN image tower and dynamic int8 Linear layers elsewhere.

    ``calibration`` = normalised training images; ``None`` builds the structure only (one dummy image), for loading
    stored int8 values into. The result carries ``_compression`` (what :func:`save_quantized` records).
    """
    notes: list[str] = []
    static = isinstance(getattr(model, "visual", None), CompactCNN)
    if static:
        names = [n for n in linear_names(model) if not n.startswith("visual.")]
    else:
        arch = getattr(getattr(model.cfg, "vision", None), "arch", "?")
        names = linear_names(model)
        notes.append(
            f"the image tower ({arch}) is not a compact CNN, which is all static int8 covers here: its Linear layers "
            "got dynamic int8 instead and its other layers stay fp32"
        )
        if not names:
            raise ValueError(f"nothing to quantise: the {arch} image tower cannot be statically quantised here")
    q = quantize_dynamic(model, names) if names else copy.deepcopy(model).cpu().eval()
    if static:
        v = model.cfg.vision
        if calibration is None:
            calibration = torch.zeros(1, v.channels, v.image_size, v.image_size)
        q.visual = quantize_cnn(model.visual.cpu().eval(), calibration, keep_fp32=keep_fp32)
    q._compression = {
        "method": "static-int8",
        "modules": names,  # dynamic int8 Linear layers, stored as in dynamic-int8 directories
        "static": ["visual"] if static else [],
        "keep_fp32": list(keep_fp32),
        "engine": ENGINE,
        "notes": notes,
    }
    return q


_DTYPES = (torch.qint8, torch.quint8, torch.qint32, torch.float16, torch.float32)  # stored by index


def encode_quantized(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict with each quantised tensor split into plain tensors safetensors can hold (see module docstring).

    A statically quantised Linear's state also holds its packed parameters as a ``(weight, bias)`` tuple and their
    dtype: a tuple becomes ``key.__item<i>`` entries (each encoded like any tensor, a ``None`` left out) plus
    ``key.__len``, a dtype ``key.__dtype`` (its index in ``_DTYPES``)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, torch.dtype) and v in _DTYPES:
            out[f"{k}.__dtype"] = torch.tensor(_DTYPES.index(v), dtype=torch.int64)
            continue
        if isinstance(v, tuple | list):
            out[f"{k}.__len"] = torch.tensor(len(v), dtype=torch.int64)
            out.update(encode_quantized({f"{k}.__item{i}": x for i, x in enumerate(v) if x is not None}))
            continue
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{k}: cannot store a {type(v).__name__} in a model directory")
        if not v.is_quantized:
            out[k] = v.detach().contiguous().cpu()
            continue
        out[k] = v.int_repr().contiguous()
        if v.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            out[f"{k}.__q_scale"] = torch.tensor(v.q_scale(), dtype=torch.float64)
            out[f"{k}.__q_zero_point"] = torch.tensor(v.q_zero_point(), dtype=torch.int64)
        elif v.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[f"{k}.__q_scale"] = v.q_per_channel_scales().to(torch.float64).contiguous()
            out[f"{k}.__q_zero_point"] = v.q_per_channel_zero_points().to(torch.int64).contiguous()
            out[f"{k}.__q_axis"] = torch.tensor(v.q_per_channel_axis(), dtype=torch.int64)
        else:
            raise ValueError(f"{k}: quantisation scheme {v.qscheme()} cannot be stored")
    return out


_QDTYPES = {torch.int8: torch.qint8, torch.uint8: torch.quint8, torch.int32: torch.qint32}


def decode_quantized(stored: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The inverse of :func:`encode_quantized`: integer values + scales back into quantised tensors, ``__item``
    entries back into tuples and ``__dtype`` entries back into dtypes."""
    out: dict[str, Any] = {}
    for k, v in stored.items():
        if k.endswith(Q_SUFFIXES):
            continue
        if k.endswith(".__dtype"):
            out[k[: -len(".__dtype")]] = _DTYPES[int(v)]
            continue
        if k.endswith(".__len"):
            continue
        scale = stored.get(f"{k}.__q_scale")
        if scale is None:
            out[k] = v
        elif f"{k}.__q_axis" in stored:
            axis = int(stored[f"{k}.__q_axis"])
            out[k] = torch._make_per_channel_quantized_tensor(v, scale, stored[f"{k}.__q_zero_point"], axis)
        else:
            out[k] = torch._make_per_tensor_quantized_tensor(v, float(scale), int(stored[f"{k}.__q_zero_point"]))
        if scale is not None and out[k].dtype != _QDTYPES[v.dtype]:
            raise ValueError(f"{k}: stored as {v.dtype} but decoded as {out[k].dtype}")
    for k, n in stored.items():
        if k.endswith(".__len"):
            base = k[: -len(".__len")]
            out[base] = tuple(out.pop(f"{base}.__item{i}", None) for i in range(int(n)))
    return out
