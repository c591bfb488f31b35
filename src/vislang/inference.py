"""Using a trained model on files: embed images/texts to .npy/.parquet, rank labels for one image.

Thin functions over the library so the CLI (and later the HTTP service) stay thin too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .data.readers import IMAGE_EXTENSIONS, register_optional_formats
from .data.transforms import upright
from .evaluation.embed import embed_texts as _embed
from .factory import get_tokenizer, load_embedding_model

IMAGE_EXTS = set(IMAGE_EXTENSIONS) | set(register_optional_formats())


def list_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in named folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist; pass image files or folders of images")
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found in {', '.join(map(str, paths))}")
    return out


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image, upright by its EXIF orientation, or raise a ValueError that names the file and the problem."""
    try:
        img = Image.open(path)
        img.load()
        return upright(img)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path} is not a readable image ({e.__class__.__name__}); pass a PNG/JPEG/WebP file") from e


@torch.inference_mode()
def embed_images(model, preprocess, paths: Sequence[Path], batch_size: int = 256, device: str = "cpu"):
    """Normalised embeddings of image files; unreadable files are skipped and reported, never fatal."""
    feats, kept, skipped = [], [], []
    model.eval().to(device)
    for i in range(0, len(paths), batch_size):
        tensors = []
        for p in paths[i : i + batch_size]:
            try:
                tensors.append(preprocess(open_image(p)))
                kept.append(p)
            except ValueError:
                skipped.append(p)
        if tensors:
            feats.append(model.encode_image(torch.stack(tensors).to(device)).float().cpu())
    if skipped:
        print(f"[vislang] skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
    if not feats:
        raise ValueError("none of the images could be read")
    return torch.cat(feats).numpy(), kept


def embed_texts(
    model, tokenizer, texts: Sequence[str], batch_size: int = 1024, device: str = "cpu", precision: str = "auto"
) -> np.ndarray:
    """Normalised text embeddings; empty texts are refused (they would all map to the same vector)."""

    texts = list(texts)
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("empty text given; every text to embed needs at least one word")
    return _embed(model, tokenizer, texts, batch_size, device, precision=precision).numpy()


def embed_to_file(
    model_dir: str,
    out: str,
    images: Sequence[str] | None = None,
    texts: Sequence[str] | None = None,
    texts_file: str | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    backend: str = "auto",
) -> Path:
    """Embed images or texts and write ``.npy`` (embeddings only) or ``.parquet`` (name/text + embedding)."""
    out_path = Path(out)
    if out_path.suffix not in (".npy", ".parquet"):
        raise ValueError(f"output {out} must end in .npy or .parquet")

    model, preprocess = load_embedding_model(model_dir, backend)
    if images:
        paths = list_images(images)
        emb, kept = embed_images(model, preprocess, paths, batch_size, device)
        names = [str(p) for p in kept]
    else:
        if texts_file:
            texts = [ln.strip() for ln in Path(texts_file).read_text().splitlines() if ln.strip()]
        emb = embed_texts(model, get_tokenizer(model_dir), list(texts or []), batch_size, device)
        names = list(texts or [])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".npy":
        np.save(out_path, emb.astype(np.float32))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        col = "path" if images else "text"
        table = pa.table({col: names, "embedding": list(emb.astype(np.float32))})
        pq.write_table(table, out_path)
    return out_path
