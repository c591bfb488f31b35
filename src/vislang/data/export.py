"""Write any dataset vislang reads back out as a folder of PNG + ``.txt`` pairs.

Why: a folder is the one format every command takes (index build, caption, vqa, explain, train), so exporting a few
synthetic scenes or Fashion-MNIST images gives users real files to point commands at.
"""

from __future__ import annotations

from pathlib import Path

from .sources import open_dataset
from .transforms import to_mode


def export_images(src: str, out: str | Path, split: str = "test", n: int | None = 16) -> Path:
    """Write the first ``n`` items (all when ``n`` is 0/None) of ``src`` as ``000000.png`` + ``000000.txt``."""
    if n is not None and n < 0:
        raise ValueError(f"--n must be 0 (all) or a positive count, got {n}")
    ds = open_dataset(src, split)
    count = len(ds) if not n else min(n, len(ds))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, caption = ds[i][0], ds[i][1]
        to_mode(image, 3).save(folder / f"{i:06d}.png")  # transparent clip-art on white, not on black
        (folder / f"{i:06d}.txt").write_text(str(caption).strip() + "\n", encoding="utf-8")
    return folder
