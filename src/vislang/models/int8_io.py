"""int8 model directories: how a dynamic or static int8 model is stored and loaded back exactly.

On disk a dynamic int8 Linear is its int8 weight (``name.weight``, dtype int8), ``name.weight_scale`` and
``name.weight_zero_point`` (per-tensor) and its fp32 ``name.bias``; a static int8 tower's quantised tensors are split
into plain ones by :func:`~vislang.models.quantized_static.encode_quantized`; everything else is stored as in any
model directory, and ``config.json`` records ``"compression": {"method": "dynamic-int8", "modules": [...]}``.
:func:`load_int8_state` quantises a rebuilt fp32 model the same way and sets the stored int8 weights exactly;
``vislang.load`` (the registry) hands int8 directories to it.

Why a module of its own: writing and reading the format needs both quantisers, dynamic
(:mod:`vislang.models.quantized`) and static (:mod:`vislang.models.quantized_static`, which builds on the dynamic
one), so it sits above both and the import graph runs one way: int8_io → quantized_static → quantized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .quantized import _quiet, quantize_dynamic
from .quantized_static import decode_quantized, encode_quantized, quantize_static

QUANTISED_METHODS = ("dynamic-int8", "static-int8")


def is_int8(meta: dict[str, Any], device: str | torch.device, what: str) -> bool:
    """Whether a saved directory's config records int8 compression (``vislang compress``), which every family's
    loader then rebuilds and fills; int8 runs on the CPU only, so another ``device`` is refused here, once."""
    if not (meta.get("compression") or {}).get("method", "").endswith("int8"):
        return False
    if torch.device(device).type != "cpu":
        raise ValueError(f"{what} is int8, which runs on the CPU only; load it with device='cpu'")
    return True


def _dynamic_linear_cls() -> type[nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A safetensors-friendly state dict: int8 weights plus scale/zero point for each dynamic int8 Linear, and every
    other quantised tensor (a static int8 tower's) split by :func:`encode_quantized`."""
    qcls = _dynamic_linear_cls()
    qnames = {n for n, m in model.named_modules() if isinstance(m, qcls)}
    rest = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{n}.") for n in qnames)}
    out = encode_quantized(rest)
    for n, m in model.named_modules():
        if isinstance(m, qcls):
            w = m.weight()  # quantised (out, in)
            if w.qscheme() != torch.per_tensor_affine:
                raise ValueError(f"{n}: only per-tensor int8 weights can be saved, got {w.qscheme()}")
            out[f"{n}.weight"] = w.int_repr().contiguous()
            out[f"{n}.weight_scale"] = torch.tensor(w.q_scale(), dtype=torch.float64)
            out[f"{n}.weight_zero_point"] = torch.tensor(w.q_zero_point(), dtype=torch.int64)
            if m.bias() is not None:
                out[f"{n}.bias"] = m.bias().detach().contiguous()
    return out


def set_dynamic_weights(model: nn.Module, names: list[str], state: dict[str, torch.Tensor]) -> None:
    """Set the stored int8 weights (``name.weight``, ``.weight_scale``, ``.weight_zero_point``, ``.bias``) of the
    dynamic int8 Linear layers ``names`` of ``model`` exactly, as :func:`quantized_state_dict` wrote them."""
    modules = dict(model.named_modules())
    with _quiet():
        for n in names:
            w = torch._make_per_tensor_quantized_tensor(
                state[f"{n}.weight"], float(state[f"{n}.weight_scale"]), int(state[f"{n}.weight_zero_point"])
            )
            modules[n].set_weight_bias(w, state.get(f"{n}.bias"))


def load_int8_state(model: nn.Module, state: dict[str, torch.Tensor], comp: dict[str, Any], where: str) -> nn.Module:
    """The quantised form of the fp32 ``model`` (built from the saved config) with the stored int8 ``state`` set
    exactly: fp32 tensors loaded first, the same modules quantised again (for static int8: the same FX
    prepare/convert, without calibration), then the stored integers and scales set. ``comp`` is config.json's
    ``compression`` record; ``where`` names the directory in errors."""
    method = comp.get("method")
    if method not in QUANTISED_METHODS:
        raise ValueError(f"{where} is not an int8 model directory (compression: {comp or None})")
    names = list(comp["modules"])
    static = [f"{s}." for s in comp.get("static", [])]
    model = model.eval()
    qkeys = {f"{n}.{s}" for n in names for s in ("weight", "weight_scale", "weight_zero_point", "bias")}
    plain = {k: v for k, v in state.items() if k not in qkeys and not k.startswith(tuple(static))}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [k for k in missing if k not in qkeys and not k.startswith(tuple(static))]
    if missing or unexpected:
        raise RuntimeError(
            f"{where}/model.safetensors does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if method == "static-int8":
        model = quantize_static(model, None, keep_fp32=tuple(comp.get("keep_fp32", ())))
        for prefix in static:
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            with _quiet():
                model.get_submodule(prefix[:-1]).load_state_dict(decode_quantized(sub), strict=True)
    else:
        model = quantize_dynamic(model, names)
    set_dynamic_weights(model, names, state)
    model._compression = comp
    return model.eval()
