"""The index under concurrent writers and hostile sources (issue 28): a reader catching up never blocks its other
readers, a build publishes a FAISS file at every commit, a concurrent duplicate add skips instead of aborting, and
a CSV or folder cannot smuggle in files from outside the source's folder."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install faiss-cpu)")

from test_index import make_tiny_model, write_images  # noqa: E402
from vislang.index import build as build_mod  # noqa: E402
from vislang.index import build_index, create_index, open_index  # noqa: E402
from vislang.index.faiss_index import FaissIndex  # noqa: E402

DIM = 8


def _items(n: int, start: int = 0) -> tuple[np.ndarray, list[dict]]:
    vecs = np.random.default_rng(start).normal(size=(n, DIM)).astype(np.float32)
    return vecs, [{"key": f"k{start + i}", "path": f"/img/{start + i}.png"} for i in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ixh"))


def test_a_reader_catching_up_keeps_answering_meanwhile(tmp_path):
    """The server's refresh after another process's commit builds the new FAISS index beside the live one: while it
    builds (held here), lookups, counts and searches on the same object answer at once from the old version."""
    writer = create_index(tmp_path / "ix", DIM)
    writer.add(*_items(20))
    writer.save()
    reader = open_index(tmp_path / "ix")
    writer.add(*_items(5, start=100))  # committed, no FAISS file published: the reader must build
    building, release = threading.Event(), threading.Event()
    real = FaissIndex._new_faiss

    def held_build(self, vecs, ids):
        building.set()
        release.wait(20)
        return real(self, vecs, ids)

    reader._new_faiss = held_build.__get__(reader)
    refresher = threading.Thread(target=reader.refresh)
    refresher.start()
    try:
        assert building.wait(20)
        answers = {}

        def probe():
            answers["get"] = reader.get([1])[0]
            answers["len"] = len(reader)
            answers["search"] = reader.search(np.ones((1, DIM), np.float32), 3)[1]

        t = threading.Thread(target=probe)
        t.start()
        t.join(10)
        assert not t.is_alive(), "a lookup waited for the refresh's rebuild"
        assert answers["get"]["key"] == "k0" and answers["len"] == 25 and answers["search"].shape == (1, 3)
    finally:
        release.set()
        refresher.join(20)
    assert reader.search(np.ones((1, DIM), np.float32), 25)[1].min() >= 1  # the new version swapped in: 25 found
    assert reader._faiss.ntotal == 25
    reader.close()
    writer.close()


def test_a_build_publishes_the_faiss_file_at_every_commit(tmp_path, model, monkeypatch):
    """At each commit the folder holds the FAISS file of the committed version with every committed vector, so a
    server loads it instead of rebuilding 100k+ vectors while a long `index add` runs."""
    write_images(tmp_path / "images", 8)
    seen = []
    real_embed = build_mod.embed_items

    def check_then_embed(*args, **kwargs):  # called before each batch: what would a server find now?
        import json
        import sqlite3

        with sqlite3.connect(tmp_path / "ix" / "meta.sqlite") as db:  # as a reader sees it (opening an index saves)
            row = db.execute("SELECT value FROM state WHERE name = 'version'").fetchone()
            version, n = int(json.loads(row[0])) if row else 0, db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        if n:
            import faiss

            path = tmp_path / "ix" / f"vectors-v{version}.faiss"
            seen.append((n, path.is_file() and faiss.read_index(str(path)).ntotal))
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(build_mod, "embed_items", check_then_embed)
    build_index(str(tmp_path / "images"), tmp_path / "ix", model, batch_size=2, commit_every=1, progress=False)
    assert seen == [(2, 2), (4, 4), (6, 6)]


def test_a_concurrent_duplicate_add_skips_instead_of_aborting(tmp_path, model, monkeypatch):
    """Two `index add` runs over one source: the second finds an item missing, embeds it, and meets the first's
    commit. It must count the item as already indexed and go on, not abort the build."""
    write_images(tmp_path / "images", 6)
    build_index(str(tmp_path / "images"), tmp_path / "ix", model, progress=False)
    real = FaissIndex.ids_for_keys
    calls = {"n": 0}

    def stale_once(self, keys):  # the first look happens before the other writer's commit lands
        calls["n"] += 1
        return {} if calls["n"] == 1 else real(self, keys)

    monkeypatch.setattr(FaissIndex, "ids_for_keys", stale_once)
    write_images(tmp_path / "images2", 2, split="val")
    for p in (tmp_path / "images2").iterdir():
        p.rename(tmp_path / "images" / f"new-{p.name}")
    counts = build_index(str(tmp_path / "images"), tmp_path / "ix", model, progress=False)
    assert counts["added"] == 2 and counts["already"] == 6 and counts["size"] == 8


def test_csv_paths_leaving_its_folder_need_allow_outside_root(tmp_path, model):
    from vislang.index.files import ROOTS_STATE, OutsideRoot

    outside = write_images(tmp_path / "elsewhere", 2)
    inside = write_images(tmp_path / "data" / "imgs", 2)
    table = tmp_path / "data" / "pairs.csv"
    for value in (str(outside[0]), f"../elsewhere/{outside[0].name}", f"~/{outside[0].name}"):
        table.write_text(f"path\nimgs/{inside[0].name}\n{value}\n")
        with pytest.raises(OutsideRoot, match="--allow-outside-root"):
            build_index(str(table), tmp_path / "refused", model, progress=False)
    table.write_text(f"path\nimgs/{inside[0].name}\n{outside[0]}\n")
    counts = build_index(str(table), tmp_path / "ix", model, progress=False, allow_outside_root=True)
    assert counts["added"] == 2
    with open_index(tmp_path / "ix") as ix:  # the allowed folder is recorded as a root, so it is served
        assert set(ix.get_state(ROOTS_STATE)) == {str((tmp_path / "data").resolve()), str(outside[0].parent.resolve())}


def test_a_symlink_out_of_an_indexed_folder_is_refused(tmp_path, model):
    from vislang.index.files import OutsideRoot

    secret = write_images(tmp_path / "private", 1)[0]
    write_images(tmp_path / "photos", 2)
    (tmp_path / "photos" / "link.png").symlink_to(secret)
    with pytest.raises(OutsideRoot, match="link.png"):
        build_index(str(tmp_path / "photos"), tmp_path / "ix", model, progress=False)


def test_served_bytes_refuses_links_big_files_and_unrecorded_indexes(tmp_path):
    from vislang.index.files import served_bytes

    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(b"x" * 100)
    (root / "link.png").symlink_to(root / "a.png")
    roots = [str(root.resolve())]
    assert served_bytes(root / "a.png", None, None, roots) == b"x" * 100
    assert served_bytes(root / "a.png", 10, 5, roots) == b"xxxxx"
    with pytest.raises(PermissionError, match="symlink"):
        served_bytes(root / "link.png", None, None, roots)
    with pytest.raises(ValueError, match="over"):
        served_bytes(root / "a.png", None, None, roots, max_bytes=50)
    with pytest.raises(PermissionError, match="records no folders"):
        served_bytes(root / "a.png", None, None, [])
    with pytest.raises(PermissionError, match="outside"):
        served_bytes(root / "a.png", None, None, [str(tmp_path / "other")])


def test_strip_metadata_drops_exif_and_text_but_keeps_the_pixels(tmp_path):
    import io

    from PIL import Image, PngImagePlugin

    from vislang.index.files import strip_metadata

    img = Image.new("RGB", (16, 12), (10, 200, 30))
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    for fmt, kwargs in [
        ("JPEG", {"exif": exif.tobytes(), "quality": 95}),
        ("WEBP", {"exif": exif.tobytes(), "lossless": True}),
        ("PNG", {"exif": exif.tobytes(), "pnginfo": PngImagePlugin.PngInfo()}),
        ("TIFF", {"exif": exif.tobytes()}),
    ]:
        if fmt == "PNG":
            kwargs["pnginfo"].add_text("Author", "SecretCam")
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kwargs)
        data = buf.getvalue()
        assert b"SecretCam" in data, fmt
        out = strip_metadata(data)
        assert b"SecretCam" not in out, fmt
        clean = Image.open(io.BytesIO(out))
        clean.load()
        assert clean.size == img.size and not clean.getexif(), fmt
        assert clean.convert("RGB").getpixel((5, 5)) == Image.open(io.BytesIO(data)).convert("RGB").getpixel((5, 5))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_a_read_only_reader_shares_the_file_and_still_catches_up(tmp_path, kind):
    """A server process opens the index read-only: same answers as a writer's view, its vectors file memory-mapped
    (N server workers share one copy in the page cache), every write refused, nothing written on close, and a
    writer's later commit still picked up by refresh."""
    with create_index(tmp_path / "ix", DIM, kind=kind) as writer:
        writer.add(*_items(300))
    files = sorted(p.name for p in (tmp_path / "ix").iterdir())
    reader = open_index(tmp_path / "ix", read_only=True)
    queries = _items(4, start=7)[0]
    with open_index(tmp_path / "ix") as own:
        assert np.array_equal(reader.search(queries, 5)[1], own.search(queries, 5)[1])
    maps = Path("/proc/self/maps")
    if kind != "ivf" and maps.is_file():  # IVF keeps its lists in memory; flat and HNSW storage is mapped
        assert "vectors-v1.faiss" in maps.read_text(), "the read-only index did not memory-map its vectors file"
    for write in (lambda: reader.add(*_items(1, start=900)), lambda: reader.remove([1]),
                  lambda: reader.set_state("build", {})):  # fmt: skip
        with pytest.raises(PermissionError, match="read-only"):
            write()
    with open_index(tmp_path / "ix") as writer:
        writer.add(*_items(10, start=500))
    assert reader.refresh() and len(reader) == 310
    new = _items(10, start=500)[0][3:4]
    assert reader.search(new, 1)[1][0, 0] == 304  # the 4th of the new items: ids 301..310
    reader.close()
    assert (tmp_path / "ix" / "vectors-v2.faiss").is_file() and len(files) > 0
