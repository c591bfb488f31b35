"""Photos as they come: EXIF orientation, odd sizes, CMYK/palette/alpha/16-bit, WebP/AVIF, broken files.

Every image is generated here, written in the format under test, and read back through the function the data readers
use (``readers.decode_image`` via ``FolderDataset``) and the one index building and ``vislang embed`` use
(``inference.open_image``), then turned into the model's input by ``pil_to_array``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from vislang.data.readers import FolderDataset, decode_image
from vislang.data.transforms import pil_to_array
from vislang.inference import open_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), RED)
    img.paste(Image.new("RGB", (width // 2, height), BLUE), (width // 2, 0))
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied_by_readers_and_index(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display turned 90° clockwise
    data = encode(halves(), "PNG", exif=exif)
    (tmp_path / "a.png").write_bytes(data)
    for img in (decode_image(data), open_image(tmp_path / "a.png")):
        assert img.size == (20, 40)  # portrait once upright
        arr = np.asarray(img.convert("RGB"))
        assert tuple(arr[2, 10]) == RED and tuple(arr[-3, 10]) == BLUE  # left half went to the top
    plain = decode_image(encode(halves(), "PNG"))
    assert plain.size == (40, 20)  # no tag, no turn


def test_any_size_and_aspect_become_the_towers_square_by_centre_crop() -> None:
    wide = Image.new("RGB", (1000, 100), (0, 255, 0))
    wide.paste(Image.new("RGB", (100, 100), RED), (450, 0))  # the centre 100 px are red
    arr = pil_to_array(wide, 224, 3)
    assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8
    assert (arr[:, 5:-5] == RED).all()  # the shorter side fills the square; only the centre is kept
    tiny = pil_to_array(Image.new("RGB", (3, 7), BLUE), 224, 3)
    assert tiny.shape == (224, 224, 3) and (tiny == BLUE).all()
    padded = pil_to_array(wide, 224, 3, fit="pad")
    assert (padded[0] == 255).all() and (padded[112, 112] == RED).all()  # whole image letterboxed on white


def test_cmyk_palette_alpha_and_16bit_convert() -> None:
    cmyk = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert cmyk.mode == "CMYK"
    r, g, b = pil_to_array(cmyk, 8, 3)[4, 4]
    assert r > 230 and g < 30 and b < 30  # cyan-free, full magenta + yellow = red

    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0] + list(BLUE) + [0] * 762)
    pal.info["transparency"] = 1  # the only colour used is transparent: the image is empty
    assert (pil_to_array(decode_image(encode(pal, "PNG")), 8, 3) == 255).all()  # composited on white, not black

    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert (pil_to_array(decode_image(encode(rgba, "PNG")), 8, 3) == 255).all()

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))  # (8, 64) 16-bit gradient
    deep = decode_image(encode(Image.fromarray(ramp), "PNG"))
    assert deep.mode.startswith("I")
    row = pil_to_array(deep, 64, 1, fit="pad")[32, :, 0].astype(int)
    assert row[0] < 5 and row[-1] > 250 and 100 < row[32] < 160  # scaled, not clipped to white past 255
    assert (np.diff(row) >= 0).all()


@pytest.mark.parametrize("fmt", ["WEBP", "AVIF"])
def test_webp_and_avif_decode_where_pillow_has_them(fmt: str) -> None:
    if not features.check(fmt.lower()):
        pytest.skip(f"this Pillow has no {fmt} codec")
    img = decode_image(encode(Image.new("RGB", (32, 24), RED), fmt, quality=90))
    assert img.size == (32, 24)
    r, g, b = pil_to_array(img, 16, 3)[8, 8]
    assert r > 200 and g < 60 and b < 60


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "good.png").write_bytes(encode(halves(), "PNG"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "cut.png").write_bytes(encode(halves(400, 400), "PNG")[:300])  # truncated
    for name in ("good", "broken", "cut"):
        (tmp_path / f"{name}.txt").write_text(f"a photo called {name}")
    ds = FolderDataset(tmp_path)
    items = [ds[i] for i in range(len(ds))]
    assert sum(it is not None for it in items) == 1
    assert ds.skips.counts == {"unreadable image": 2}
    with pytest.raises(ValueError, match="not a readable image"):
        open_image(tmp_path / "broken.jpg")
