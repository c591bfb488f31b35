"""int8 quantisation of a dual encoder, captioner or VQA model, saved as a model directory that loads back quantised.

Dynamic int8 (``torch.ao.quantization.quantize_dynamic``) converts every ``nn.Linear`` to int8 weights with
activations quantised on the fly: the text Transformer, the projections, a caption decoder, a VQA fusion and head, and
any ViT image tower. Convolutions are not touched, so a CNN image tower (the Fashion-MNIST demo model) stays fp32 and
only its projection gets faster; static int8 (:mod:`vislang.compress.static`) quantises the convolutions too.

On disk a quantised Linear is its int8 weight (``name.weight``, dtype int8), ``name.weight_scale`` and
``name.weight_zero_point`` (per-tensor) and its fp32 ``name.bias``; everything else is stored as in any model
directory, and ``config.json`` records ``"compression": {"method": "dynamic-int8", "modules": [...]}``.
:func:`load_quantized` rebuilds the fp32 model, quantises the same modules and sets the stored int8 weights exactly;
``from_pretrained`` hands int8 directories to it.
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

QUANTISED_METHODS = ("dynamic-int8", "static-int8")
CLIP_TYPE = "vislang-clip"  # factory.MODEL_TYPE: dual encoders and captioners
VQA_TYPE = "vislang-vqa"  # models.vqa.MODEL_TYPE
GAN_TYPE = "vislang-gan"  # generate.sample.MODEL_TYPE


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated on every call; it is still the int8 CPU path in torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range.*", category=UserWarning)
        yield


def _dynamic_linear_cls() -> type[nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def linear_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules dynamic quantisation converts."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def quantize_dynamic(model: nn.Module, modules: list[str] | None = None) -> nn.Module:
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
    """A safetensors-friendly state dict: int8 weights plus scale/zero point for each dynamic int8 Linear, and every
    other quantised tensor (a static int8 tower's) split by :func:`vislang.compress.static.encode_quantized`."""
    from .static import encode_quantized

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


def model_family(meta: dict[str, Any]) -> str:
    """``dual-encoder``, ``captioner`` (a CoCa: the config has a decoder), ``vqa`` or ``generator`` (a text-to-image
    GAN), from a directory's config."""
    kind = meta.get("model_type")
    if kind == VQA_TYPE:
        return "vqa"
    if kind == GAN_TYPE:
        return "generator"
    if kind == CLIP_TYPE:
        return "captioner" if (meta.get("model") or {}).get("decoder") else "dual-encoder"
    raise ValueError(
        f"compression handles dual encoders, captioners, VQA models and GAN generators ({CLIP_TYPE!r}, "
        f"{VQA_TYPE!r}, {GAN_TYPE!r}), not model_type {kind!r}"
    )


def fp32_twin(model: nn.Module) -> nn.Module:
    """A freshly initialised fp32 model of the same family and config (what the saved config describes)."""
    from ..factory import build_model
    from ..models.vqa import VQAModel

    return VQAModel(model.cfg) if isinstance(model, VQAModel) else build_model(model.cfg)


def build_fp32(meta: dict[str, Any], directory: Path) -> nn.Module:
    """The fp32 model a directory's config describes, untrained (its weights are loaded afterwards)."""
    import dataclasses

    from ..config import from_dict
    from ..factory import build_model
    from ..models.clip import ModelConfig
    from ..models.vqa import VQAConfig, VQAModel

    if model_family(meta) == "vqa":
        return VQAModel(from_dict(VQAConfig, meta["model"], "model"))
    cfg = from_dict(ModelConfig, meta["model"], "model")
    if cfg.text.arch == "hf" and cfg.text.hf_path and not Path(cfg.text.hf_path).is_absolute():
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hf_path=str(directory / cfg.text.hf_path)))
    return build_model(cfg)


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    extra: dict | None = None,
    answers: list[str] | None = None,
) -> Path:
    """``save_pretrained`` (``save_vqa`` for a VQA model, with its ``answers``) for a model from
    :func:`quantize_dynamic` or :func:`vislang.compress.static.quantize_static`: the fp32 config, int8 weights."""
    from safetensors.torch import save_file

    from ..factory import save_pretrained
    from ..models.vqa import VQAModel, save_vqa

    comp = getattr(model, "_compression", None)
    if comp is None:
        raise ValueError("not a quantised model: make one with vislang.compress.quantize_dynamic(model)")
    # Write the config and tokenizer with the ordinary writer (from an fp32 twin), then replace the weights file.
    meta = {**(extra or {}), "compression": comp}
    if isinstance(model, VQAModel):
        if answers is None:
            raise ValueError("a VQA model directory needs its answer vocabulary: pass answers=[...]")
        d = save_vqa(fp32_twin(model), directory, tokenizer, answers, extra=meta)
    else:
        d = save_pretrained(fp32_twin(model), directory, tokenizer, extra=meta)
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


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a directory written by :func:`save_quantized` as the quantised model (int8 runs on the CPU only).

    The fp32 model is rebuilt from the config, its fp32 weights loaded, the same modules quantised again (for static
    int8: the same FX prepare/convert, without calibration) and the stored int8 values and scales set exactly.
    """
    from safetensors.torch import load_file

    from .static import decode_quantized, quantize_static

    d = Path(directory)
    meta = read_meta(d)
    comp = meta.get("compression") or {}
    method = comp.get("method")
    if method not in QUANTISED_METHODS:
        raise ValueError(f"{d} is not an int8 model directory (compression: {comp or None})")
    if torch.device(device).type != "cpu":
        raise ValueError(f"int8 models run on the CPU only; load {d} with device='cpu'")
    names = list(comp["modules"])
    static = [f"{s}." for s in comp.get("static", [])]
    state = load_file(str(d / "model.safetensors"))
    model = build_fp32(meta, d).eval()
    qkeys = {f"{n}.{s}" for n in names for s in ("weight", "weight_scale", "weight_zero_point", "bias")}
    plain = {k: v for k, v in state.items() if k not in qkeys and not k.startswith(tuple(static))}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [k for k in missing if k not in qkeys and not k.startswith(tuple(static))]
    if missing or unexpected:
        raise RuntimeError(
            f"{d}/model.safetensors does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
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


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Any model directory compression handles: int8 ones through :func:`load_quantized`, VQA ones through
    ``load_vqa``, all others through ``from_pretrained`` (which itself hands int8 directories to
    :func:`load_quantized`)."""
    from ..factory import from_pretrained

    meta = read_meta(directory)
    method = (meta.get("compression") or {}).get("method")
    if method in QUANTISED_METHODS:
        return load_quantized(directory, device)
    if meta.get("model_type") == VQA_TYPE:
        from ..models.vqa import load_vqa

        return load_vqa(directory, device)[0]
    return from_pretrained(directory, device)
