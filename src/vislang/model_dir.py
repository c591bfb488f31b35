"""Writing model directories atomically: every model family (dual encoder, classifier, VQA, GAN) saves through here.

Why one place: a model directory is written into a temporary sibling folder and renamed into place only when
complete, so a crash mid-save never leaves half a model and never loses the previous one. Each family used to repeat
that dance; now each only says what goes into the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__version__ = "0.1.0"  # written into every model directory's config.json as vislang_version


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a folder's entries to disk: a rename inside it is durable only then (a power cut can undo it before)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems (and Windows) cannot open a folder: nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_dir(directory: str | os.PathLike) -> None:
    """Finish a replacement that a crash interrupted between its two renames: the complete old directory, moved
    aside as ``.NAME.old``, goes back into place when nothing took its place."""
    d = Path(directory)
    old = d.with_name(f".{d.name}.old")
    if not d.exists() and old.is_dir():
        old.rename(d)
        fsync_dir(d.parent)


def run_or_model_dir(path: str | os.PathLike) -> Path:
    """``path`` itself, or its ``model/`` subfolder when ``path`` is a training run (``runs/NAME``) holding one: the
    commands that read a model take either. A save that a crash cut short is recovered first (``recover_dir``)."""
    p = Path(path)
    recover_dir(p)
    recover_dir(p / "model")
    if (p / "model" / "config.json").is_file() and not (p / "config.json").is_file():
        return p / "model"
    return p


@contextlib.contextmanager
def atomic_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``directory``; on success it replaces ``directory``, on error it is removed.

    The old directory is moved aside first and deleted only once the new one is in place; a crash between the two
    renames leaves it as ``.NAME.old``, which the next save or load puts back (``recover_dir``). The parent folder is
    fsynced after the renames so the new directory survives a power cut.
    """
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(d)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if d.exists():
        old = d.with_name(f".{d.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        d.rename(old)
        tmp.rename(d)
        fsync_dir(d.parent)
        shutil.rmtree(old)
    else:
        tmp.rename(d)
        fsync_dir(d.parent)


def write_weights(
    folder: Path, meta: dict[str, Any], module: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
) -> None:
    """``config.json`` (``meta``) and ``model.safetensors`` (the module's state dict, on the CPU, or ``state`` when
    given: an int8 model's integers and scales) into ``folder``."""
    from safetensors.torch import save_file

    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    state = state if state is not None else module.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"))
    for name in ("config.json", "model.safetensors"):  # on disk before the folder is renamed into place
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
