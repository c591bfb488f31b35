"""int8 quantisation of a dual encoder, saved as a model directory that loads back quantised.

Dynamic int8 (``torch.ao.quantization.quantize_dynamic``) converts every ``nn.Linear`` to int8 weights with
activations quantised on the fly: the text Transformer, the projections and any ViT image tower. Convolutions are not
touched, so a CNN image tower (the Fashion-MNIST demo model) stays fp32 and only its projection gets faster.

On disk a quantised Linear is its int8 weight (``name.weight``, dtype int8), ``name.weight_scale`` and
``name.weight_zero_point`` (per-tensor) and its fp32 ``name.bias``; everything else is stored as in any model
directory, and ``config.json`` records ``"compression": {"method": "dynamic-int8", "modules": [...]}``.
:func:`load_quantized` rebuilds the fp32 model, quantises the same modules and sets the stored int8 weights exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.clip import CLIP

QUANTISED_METHODS = ("dynamic-int8", "static-int8")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated on every call; it is still the int8 CPU path in torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
        yield


def _dynamic_linear_cls() -> type[nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def linear_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules dynamic quantisation converts."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def quantize_dynamic(model: CLIP, modules: list[str] | None = None) -> CLIP:
    """A copy of ``model`` with its Linear layers (or the named ones) in dynamic int8; eval mode, CPU."""
    import copy

    from torch.ao.quantization import default_dynamic_qconfig
    from torch.ao.quantization import quantize_dynamic as _qd

    names = linear_names(model) if modules is None else modules
    if not names:
        raise ValueError("the model has no nn.Linear layers, so dynamic int8 quantisation would change nothing")
    model = copy.deepcopy(model).cpu().eval()
    with _quiet():
        q = _qd(model, {n: default_dynamic_qconfig for n in names}, dtype=torch.qint8)
    q._compression = {"method": "dynamic-int8", "modules": names}
    return q


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A safetensors-friendly state dict: int8 weights plus scale/zero point for each quantised Linear."""
    qcls = _dynamic_linear_cls()
    qnames = {n for n, m in model.named_modules() if isinstance(m, qcls)}
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor) and not any(k.startswith(f"{n}.") for n in qnames):
            out[k] = v.detach().contiguous().cpu()
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


def save_quantized(model: CLIP, directory: str | os.PathLike, tokenizer=None, extra: dict | None = None) -> Path:
    """``save_pretrained`` for a model from :func:`quantize_dynamic`: same files, int8 Linear weights."""
    from safetensors.torch import save_file

    from ..factory import save_pretrained

    comp = getattr(model, "_compression", None)
    if comp is None:
        raise ValueError("not a quantised model: make one with vislang.compress.quantize_dynamic(model)")
    # Write the config and tokenizer with the ordinary writer (from an fp32 twin), then replace the weights file.
    twin = CLIP(model.cfg)
    d = save_pretrained(twin, directory, tokenizer, extra={**(extra or {}), "compression": comp})
    save_file(quantized_state_dict(model), str(d / "model.safetensors"))
    return d


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    from ..factory import is_model_dir

    d = Path(directory)
    if not is_model_dir(d):
        raise FileNotFoundError(
            f"{d} is not a vislang model directory (needs config.json and model.safetensors); "
            "train one with `vislang train` or pass the model/ folder of a run"
        )
    return json.loads((d / "config.json").read_text())


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu") -> CLIP:
    """Load a directory written by :func:`save_quantized` as the quantised model (int8 runs on the CPU only)."""
    from safetensors.torch import load_file

    from ..config import from_dict
    from ..models.clip import ModelConfig

    d = Path(directory)
    meta = read_meta(d)
    comp = meta.get("compression") or {}
    if comp.get("method") != "dynamic-int8":
        raise ValueError(f"{d} is not a dynamic-int8 model directory (compression: {comp or None})")
    if torch.device(device).type != "cpu":
        raise ValueError(f"int8 models run on the CPU only; load {d} with device='cpu'")
    cfg = from_dict(ModelConfig, meta["model"], "model")
    names = list(comp["modules"])
    state = load_file(str(d / "model.safetensors"))
    model = CLIP(cfg).eval()
    qkeys = {f"{n}.{s}" for n in names for s in ("weight", "weight_scale", "weight_zero_point", "bias")}
    plain = {k: v for k, v in state.items() if k not in qkeys}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [k for k in missing if k not in qkeys]
    if missing or unexpected:
        raise RuntimeError(
            f"{d}/model.safetensors does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model = quantize_dynamic(model, names)
    modules = dict(model.named_modules())
    with _quiet():
        for n in names:
            w = torch._make_per_tensor_quantized_tensor(
                state[f"{n}.weight"], float(state[f"{n}.weight_scale"]), int(state[f"{n}.weight_zero_point"])
            )
            modules[n].set_weight_bias(w, state.get(f"{n}.bias"))
    return model.eval()


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> CLIP:
    """Any model directory: quantised ones through :func:`load_quantized`, all others through ``from_pretrained``.

    ``from_pretrained`` itself can call :func:`load_quantized` for directories whose config records an int8
    ``compression`` (see the package docstring); until it does, use this.
    """
    from ..factory import from_pretrained

    meta = read_meta(directory)
    method = (meta.get("compression") or {}).get("method")
    if method == "dynamic-int8":
        return load_quantized(directory, device)
    return from_pretrained(directory, device)
