"""int8 quantisation of a dual encoder, captioner or VQA model, saved as a model directory that loads back quantised.

Dynamic int8 (``torch.ao.quantization.quantize_dynamic``) converts every ``nn.Linear`` to int8 weights with
activations quantised on the fly: the text Transformer, the projections, a caption decoder, a VQA fusion and head, and
any ViT image tower. Convolutions are not touched, so a CNN image tower (the Fashion-MNIST demo model) stays fp32 and
only its projection gets faster; static int8 (:mod:`vislang.compress.static`) quantises the convolutions too.

How an int8 model is stored and loaded back (dynamic and static alike) is :mod:`vislang.models.int8_io`, which
imports this module and :mod:`vislang.models.quantized_static`. Making and saving int8 models is ``vislang.compress``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated on every call; it is still the int8 CPU path in torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range.*", category=UserWarning)
        yield


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
