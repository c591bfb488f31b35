"""int8 generators: the structure a static or dynamic int8 GAN generator has, so a saved one loads back exactly.

Making one (calibration, choosing the method) is ``vislang.compress.generator``; this module holds what loading needs
as well: the FX quantisation of a generator (conds None builds the structure without calibration) and the loader of
stored integers and scales, which ``TextToImage.from_pretrained`` calls for a compressed GAN directory.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..int8_io import set_dynamic_weights
from ..quantized import _quiet, quantize_dynamic
from ..quantized_static import decode_quantized
from .build import build_generator
from .networks import GANModelConfig, GeneratorMixture


def sample_inputs(conds: torch.Tensor, z_dim: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (n, Z), conditions (n, E) drawn from ``conds``)."""
    return torch.randn(n, z_dim, generator=gen), conds[torch.randint(len(conds), (n,), generator=gen)]


def _affine_batchnorms(module: nn.Module) -> nn.Module:
    """``module`` with every non-affine BatchNorm2d replaced by an affine one of scale 1, shift 0 and the same running
    statistics: the same function in eval mode, in a form FX's quantised BatchNorm accepts."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and not child.affine:
                bn = nn.BatchNorm2d(child.num_features, eps=child.eps)
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
                setattr(parent, name, bn.eval())
    return module


def _routing_noise(cfg: GANModelConfig) -> torch.Tensor:
    """One noise row per mixture component that the mixture routes to that component (a single zero row otherwise):
    the smallest batch that passes through every quantised part."""
    z = torch.zeros(max(cfg.mixture, 1), cfg.z_dim)
    if cfg.mixture > 1:
        z[torch.arange(cfg.mixture), torch.arange(cfg.mixture)] = 1.0
    return z


def output_layer(generator: nn.Module) -> str:
    """Name of the generator's last Linear/convolution: the layer before the output ``tanh`` (registered last in
    every generator class)."""
    layers = [n for n, m in generator.named_modules() if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)]
    return layers[-1]


# The quantised engine int8 generators are built, loaded and run with. Not torch's default "x86": its quantised
# ConvTranspose2d computes wrong values in torch 2.14 (a 64→32, 4×4, stride-2 layer alone: mean error 1.42× the
# output's mean magnitude, against 0.02× with "fbgemm"), and the Fashion-MNIST generator drew noise with it.
ENGINE = "fbgemm"


@contextlib.contextmanager
def on_engine() -> Iterator[None]:
    """Switch torch's quantised engine to :data:`ENGINE` for the block (packing and running int8 weights), then back."""
    if ENGINE not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"static int8 generators need torch's {ENGINE!r} quantised engine, which this build lacks "
            f"(it has {torch.backends.quantized.supported_engines}); use --method dynamic-int8"
        )
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = ENGINE
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


class OnEngine(nn.Module):
    """An int8 generator graph that always runs under :data:`ENGINE`, whatever engine the process uses elsewhere
    (a static int8 dual encoder in the same process keeps torch's default)."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with on_engine():
            return self.graph(z, c)


def generator_qconfig(generator: nn.Module):
    """torch's default qconfig mapping for :data:`ENGINE` with two parts of the generator left in fp32:

    * the output layer and its ``tanh``: a trained generator drives background pixels deep into the tanh's
      saturation (pre-activations of -50 and more), so one int8 scale over the output layer's range has steps of
      about 1 and every mid-grey pixel rounds to the same value. It holds about 1% of the multiply-adds.
    * the conditional BatchNorm's multiply and add (``x * (1 + gamma(c)) + beta(c)``): int8 kernels broadcast the
      per-image scale and shift slowly (the shift's ``add_relu`` took 36% of the int8 generator's time, more than
      its transposed convolutions), and in fp32 they also lose less (mean pixel error 0.028 against 0.032).
    """
    from torch.ao.quantization import get_default_qconfig_mapping

    qmap = get_default_qconfig_mapping(ENGINE).set_module_name(output_layer(generator), None)
    for op in (torch.tanh, F.tanh, operator.mul, operator.add, torch.mul, torch.add):
        qmap = qmap.set_object_type(op, None)
    return qmap


def quantize_generator_static(
    generator: nn.Module, cfg: GANModelConfig, conds: torch.Tensor | None, n: int = 2048, seed: int = 0
) -> nn.Module:
    """A static int8 copy of ``generator`` (see the module docstring), calibrated on ``n`` generated images with
    conditions drawn from ``conds``; ``conds`` None builds the structure only (for loading stored int8 values)."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    g = _affine_batchnorms(copy.deepcopy(generator).cpu().eval())
    parts = list(g.parts) if isinstance(g, GeneratorMixture) else [g]
    z0 = _routing_noise(cfg)
    c0 = torch.zeros(len(z0), cfg.cond_dim)
    if conds is None:
        batches = [(z0, c0)]
    else:
        gen = torch.Generator().manual_seed(seed)
        batches = [sample_inputs(conds, cfg.z_dim, min(256, n - s), gen) for s in range(0, n, 256)]
    with on_engine(), _quiet(), torch.inference_mode(False), torch.no_grad():
        prepared = [prepare_fx(p, generator_qconfig(p), (z0[:1], c0[:1])) for p in parts]
        holder = g if isinstance(g, GeneratorMixture) else None
        if holder is not None:
            holder.parts = nn.ModuleList(prepared)
        run = holder if holder is not None else prepared[0]
        for z, c in [(z0, c0), *batches]:  # the routing batch first: every component observes something
            run(z, c)
        converted = [OnEngine(convert_fx(p)) for p in prepared]
    if holder is not None:
        holder.parts = nn.ModuleList(converted)
        q = holder
    else:
        q = converted[0]
    q._compression = {"method": "static-int8", "modules": [], "static": ["generator"], "engine": ENGINE}
    return q.eval()


def load_quantized_generator(cfg: GANModelConfig, state: dict[str, torch.Tensor], comp: dict[str, Any]) -> nn.Module:
    """The int8 generator a directory written by :func:`save_generator` holds: the same structure rebuilt from the
    fp32 config, then the stored integers and scales set exactly."""
    method = comp.get("method")
    fp32 = build_generator(cfg).eval()
    if method == "static-int8":
        q = quantize_generator_static(fp32, cfg, None)
        stored = OrderedDict(decode_quantized(state))
        stored._metadata = q.state_dict()._metadata  # module versions: a quantised Linear reads its packed weights
        with on_engine(), _quiet():  # packed weights are packed for the engine they will run on
            q.load_state_dict(stored, strict=True)
        return q.eval()
    if method != "dynamic-int8":
        raise ValueError(f"not an int8 generator (compression method {method!r})")
    names = list(comp["modules"])
    qkeys = {f"{n}.{s}" for n in names for s in ("weight", "weight_scale", "weight_zero_point", "bias")}
    missing, unexpected = fp32.load_state_dict({k: v for k, v in state.items() if k not in qkeys}, strict=False)
    missing = [k for k in missing if k not in qkeys]
    if missing or unexpected:
        raise RuntimeError(f"stored int8 generator does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")  # fmt: skip
    q = quantize_dynamic(fp32, names)
    set_dynamic_weights(q, names, state)
    return q.eval()
