"""Atomic checkpoints with everything needed to resume exactly: weights, optimizer, scaler, step and RNG states.

Checkpoints hold only tensors and plain containers of numbers and strings, so they load with
``torch.load(..., weights_only=True)``: a run directory someone sends you cannot run code on your machine when you
resume it (a full unpickler would execute whatever the file names). The RNG states, which Python and NumPy give as
tuples holding arrays, are stored as tensors for that reason and turned back on load.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model_dir import fsync_dir


def plain(obj: Any) -> Any:
    """``obj`` with NumPy scalars and arrays turned into Python numbers and tensors (what ``weights_only`` reads)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return type(obj)((k, plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync, rename, fsync the folder: a crash never leaves a
    half-written file, and a finished save survives a power cut. NumPy values are stored as numbers and tensors
    (``plain``), so the file loads with ``weights_only=True``."""
    obj = plain(obj)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) generator states, as tensors and ints (``weights_only``-loadable)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,) uint32 words
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded (or the tuples an older vislang stored)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(py["state"].tolist()), py["gauss"])
    random.setstate(py)
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by the loop, read with ``weights_only=True`` (tensors and plain data only).

    A file that needs the full unpickler is refused with a message rather than loaded: it may be an old checkpoint,
    or one crafted to run code.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}; train first, or drop --resume to start fresh")
    try:
        with torch.serialization.safe_globals(_numpy_data()):  # an older vislang's NumPy RNG state: data, no code
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{p} holds objects beyond tensors and plain data, so it is not loaded (unpickling it could run code); "
            "it is either from an older vislang or not a vislang checkpoint: start a new run in another --out_dir"
        ) from e


def _numpy_data() -> list[Any]:
    """The NumPy array and scalar constructors older checkpoints hold (their RNG states): they rebuild data from
    bytes and call nothing else, so the restricted unpickler may allow them."""
    multiarray = getattr(np, "_core", np.core).multiarray
    dtypes = [getattr(np.dtypes, n) for n in np.dtypes.__all__ if n != "ObjectDType"]  # object arrays stay out
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtypes]
