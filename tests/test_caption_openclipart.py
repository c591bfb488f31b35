"""OpenClipart for caption evaluation: decompression-bomb PNGs are skipped from their header, large ones reduced."""

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vislang.data import openclipart as oc
from vislang.data.prepare import PreparedDataset, prepare

SVG = """<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
  xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><metadata><rdf:RDF>
  <cc:Work><dc:title>{title}</dc:title><dc:subject><rdf:Bag><rdf:li>{kw}</rdf:li></rdf:Bag></dc:subject></cc:Work>
  </rdf:RDF></metadata></svg>"""


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is cut short: only a header check survives it
    quickly; decoding would fail (or, for a real file of that size, take seconds and gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def add(root: Path, rel: str, title: str, png: bytes | Image.Image) -> None:
    for sub in ("svg", "png"):
        (root / sub / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / "svg" / f"{rel}.svg").write_text(SVG.format(title=title, kw="thing"))
    if isinstance(png, Image.Image):
        png.save(root / "png" / f"{rel}.png")
    else:
        (root / "png" / f"{rel}.png").write_bytes(png)


@pytest.fixture
def clipart(tmp_path: Path) -> Path:
    root = tmp_path / "oc"
    add(root, "food/giant_salami", "Giant Salami", bomb_png(20_990, 29_700))  # the size of the real stop signs
    add(root, "food/big_apple", "Big Apple", bomb_png(10_000, 9_000))  # 90 Mpx: PIL would only warn, then decode
    wide = Image.new("RGBA", (300, 120), (0, 0, 0, 0))
    wide.paste((200, 0, 0, 255), (100, 0, 200, 120))
    add(root, "food/wide_pear", "Wide Pear", wide)
    add(root, "food/blue_plum", "Blue Plum", Image.new("RGB", (20, 20), (0, 0, 200)))
    return root


def test_png_size_reads_only_the_header(tmp_path: Path):
    p = tmp_path / "b.png"
    p.write_bytes(bomb_png(20_990, 29_700))
    assert oc.png_size(p) == (20_990, 29_700)
    (tmp_path / "x.png").write_bytes(b"GIF89a not a png at all....")
    assert oc.png_size(tmp_path / "x.png") is None


def test_bombs_are_skipped_from_the_header_and_large_images_reduced(clipart: Path):
    ds = oc.OpenClipart(root=clipart, split="all", cache_path=None, max_side=64)
    by_name = {Path(p).stem: i for i, (p, _, _) in enumerate(ds.items)}
    t = time.perf_counter()
    assert ds[by_name["giant_salami"]] is None and ds[by_name["big_apple"]] is None
    assert time.perf_counter() - t < 0.5  # header reads, no decoding
    reason = "image over 89 megapixels (decompression-bomb guard)"
    assert ds.skips.counts == {reason: 2}
    img, caption, _ = ds[by_name["wide_pear"]]
    assert img.size == (64, 26) and caption.startswith("wide pear")  # aspect kept, longest side = max_side
    assert img.getpixel((32, 13))[:3] == (200, 0, 0)  # reduced, not garbled
    small, _, _ = ds[by_name["blue_plum"]]
    assert small.size == (20, 20)  # small images pass untouched


def test_prepare_counts_the_bombs_and_keeps_the_rest(clipart: Path, tmp_path: Path):
    ds = oc.OpenClipart(root=clipart, split="all", cache_path=None)
    out = tmp_path / "prep"
    prepare(ds, out, image_size=16, channels=3, progress=False)
    prep = PreparedDataset(out)
    assert len(prep) == 2 and sorted(c.split(",")[0] for c in prep.captions) == ["blue plum", "wide pear"]
    assert sum(prep.meta["skipped"].values()) == 2
    assert np.asarray(prep.get_batch([0, 1])["image"]).shape == (2, 3, 16, 16)


@pytest.mark.skipif(not Path(oc.DEFAULT_ROOT, "png").is_dir(), reason="openclipart-png/-svg absent")
def test_real_openclipart_bombs_are_skipped_in_well_under_a_second(tmp_path: Path):
    ds = oc.OpenClipart(split="all", cache_path=tmp_path / "meta.json")
    bombs = [i for i, (p, _, _) in enumerate(ds.items) if (s := oc.png_size(p)) and s[0] * s[1] > oc.MAX_PIXELS]
    assert len(bombs) >= 10  # 16 in the Debian packages (the largest 20,990 x 29,700)
    t = time.perf_counter()
    assert all(ds[i] is None for i in bombs)
    assert time.perf_counter() - t < 1.0  # decoding them took ~3.5 s each and ~2 GB
