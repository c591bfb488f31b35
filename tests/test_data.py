"""Readers, transforms and the packaged datasets (with tiny fixtures built in tmp_path; no network)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vislang.data import openclipart as oc
from vislang.data.fashion_mnist import (
    CAPTION_TEMPLATES,
    FASHION_MNIST_CLASSES,
    ZERO_SHOT_TEMPLATES,
    FashionMNIST,
    format_caption,
)
from vislang.data.readers import (
    CocoCaptions,
    CsvDataset,
    DatasetMissingError,
    FolderDataset,
    JsonlDataset,
    SkipCounter,
    WebDatasetShards,
    drop_none,
    expand_braces,
    expand_urls,
    split_shards,
)
from vislang.data.shapes import ShapesDataset
from vislang.data.sources import open_dataset
from vislang.data.transforms import ImageTransform, normalize, pil_to_array


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (20, 16)) -> Path:
    """A small real image file (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def image_bytes(color: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, format=fmt)
    return buf.getvalue()


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return path


# -------------------------------------------------------------------------------------------------- transforms


def test_pil_to_array_modes_and_shapes():
    for mode in ("L", "RGB", "RGBA", "P", "LA"):
        img = Image.new("RGB", (40, 30), (10, 120, 250)).convert(mode)
        for channels in (1, 3):
            arr = pil_to_array(img, 16, channels)
            assert arr.shape == (16, 16, channels) and arr.dtype == np.uint8


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (5, 5, 15, 15))
    arr = pil_to_array(img, 20, 3)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[10, 10]) == (255, 0, 0)
    assert pil_to_array(img, 20, 1)[0, 0, 0] == 255


def test_center_crop_keeps_middle_of_wide_image():
    img = Image.new("RGB", (90, 30), (0, 0, 255))
    img.paste((0, 255, 0), (30, 0, 60, 30))  # middle third green, sides blue
    arr = pil_to_array(img, 12, 3)
    assert (arr[:, :, 1] > 200).all() and (arr[:, :, 2] < 50).all()


def test_normalize_batched_and_single():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(x, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out, torch.full_like(out, 2.0))
    single = normalize(x[0], [0.5], [0.5])
    assert single.shape == (3, 4, 4) and torch.allclose(single, torch.ones_like(single))
    floats = torch.ones(3, 2, 2)
    normalize(floats, [0.5], [0.5])
    assert torch.equal(floats, torch.ones(3, 2, 2)), "float input must not be modified in place"


def test_image_transform_eval_matches_pil_to_array():
    img = Image.new("RGB", (50, 40), (100, 150, 200))
    tf = ImageTransform(32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    expected = normalize(torch.from_numpy(pil_to_array(img, 32, 3)).permute(2, 0, 1), [0.5] * 3, [0.25] * 3)
    assert torch.equal(tf(img), expected)


def test_image_transform_train_crops_large_but_not_tiny_images():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tf = ImageTransform(64, 3, (0.5,), (0.5,), train=True)
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(4)]
    assert all(o.shape == (3, 64, 64) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    tiny = Image.fromarray(np.random.default_rng(1).integers(0, 255, (28, 28), dtype=np.uint8))
    train28, eval28 = ImageTransform(28, 1, (0.3,), (0.3,), train=True), ImageTransform(28, 1, (0.3,), (0.3,))
    assert torch.equal(train28(tiny), eval28(tiny))


# ------------------------------------------------------------------------------------------------------ readers


def test_skip_counter_summary_and_reset():
    skips = SkipCounter()
    skips.count("unreadable image", "a.jpg")
    skips.count("unreadable image", "b.jpg")
    skips.count("empty caption", "c.jpg")
    assert skips.total == 3
    summary = skips.summary()
    assert "3 items" in summary and "2 unreadable image" in summary and "1 empty caption" in summary
    assert "a.jpg" in summary
    skips.reset()
    assert skips.total == 0
    assert drop_none([1, None, 2]) == [1, 2]


@pytest.fixture
def csv_tree(tmp_path: Path) -> Path:
    write_image(tmp_path / "imgs" / "a.jpg", (255, 0, 0))
    write_image(tmp_path / "imgs" / "b.png", (0, 255, 0))
    write_corrupt(tmp_path / "imgs" / "bad.jpg")
    write_image(tmp_path / "imgs" / "c.jpg", (0, 0, 255))
    rows = [
        ("imgs/a.jpg", "a red square"),
        ("imgs/b.png", "a green square"),
        ("imgs/bad.jpg", "a broken file"),
        ("imgs/c.jpg", "   "),
        ("imgs/missing.jpg", "not there"),
    ]
    lines = ["filepath,caption"] + [f"{p},{c}" for p, c in rows]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "data.tsv").write_text("\n".join(line.replace(",", "\t") for line in lines) + "\n")
    return tmp_path


def test_csv_dataset_pairs_and_skips(csv_tree: Path):
    ds = CsvDataset(csv_tree / "data.csv")
    assert len(ds) == 5
    img, caption = ds[0]
    assert isinstance(img, Image.Image) and caption == "a red square"
    assert ds[1][1] == "a green square"
    assert ds[2] is None and ds[3] is None and ds[4] is None
    assert ds.skips.total == 3
    summary = ds.skips.summary()
    assert "unreadable image" in summary and "empty caption" in summary and "missing image" in summary


def test_tsv_separator_is_automatic_and_root_is_configurable(csv_tree: Path, tmp_path: Path):
    ds = CsvDataset(csv_tree / "data.tsv")
    assert ds[0][1] == "a red square"
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "x.csv").write_text("filepath,caption\nimgs/a.jpg,red\n")
    assert CsvDataset(other / "x.csv", root=csv_tree)[0][1] == "red"
    assert CsvDataset(other / "x.csv")[0] is None  # resolves next to the CSV by default


def test_csv_missing_column_names_found_columns(tmp_path: Path):
    (tmp_path / "d.csv").write_text("path,text\na.jpg,hello\n")
    with pytest.raises(ValueError) as err:
        CsvDataset(tmp_path / "d.csv")
    message = str(err.value)
    assert "'path'" in message and "'text'" in message and "--csv-img-key" in message
    ds = CsvDataset(tmp_path / "d.csv", img_key="path", caption_key="text")
    assert len(ds) == 1
    (tmp_path / "bom.csv").write_bytes("\ufefffilepath,caption\na.jpg,hi\n".encode())  # spreadsheet export
    assert CsvDataset(tmp_path / "bom.csv").caption(0) == "hi"


def test_jsonl_dataset_skips_bad_lines(tmp_path: Path):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "b.jpg")
    lines = [
        json.dumps({"image": "a.jpg", "caption": "first"}),
        "{not json",
        json.dumps({"image": "b.jpg"}),
        "",
        json.dumps({"image": "b.jpg", "caption": ["second", "third"]}),
        json.dumps({"image": "a.jpg", "caption": ""}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    ds = JsonlDataset(tmp_path / "d.jsonl")
    assert [ds[i][1] for i in range(3)] == ["first", "second", "third"]
    assert ds[3] is None
    assert ds.skips.counts["invalid JSON line"] == 1
    assert ds.skips.total == 3  # bad JSON, missing field, empty caption


def test_folder_dataset_recursive(tmp_path: Path):
    write_image(tmp_path / "x" / "one.jpg")
    (tmp_path / "x" / "one.txt").write_text("first image\n")
    write_image(tmp_path / "x" / "y" / "two.png")
    (tmp_path / "x" / "y" / "two.txt").write_text("second image")
    write_image(tmp_path / "three.webp")  # no caption file
    write_image(tmp_path / "four.jpg")
    (tmp_path / "four.txt").write_text("")
    ds = FolderDataset(tmp_path)
    captions = sorted(item[1] for item in (ds[i] for i in range(len(ds))) if item is not None)
    assert captions == ["first image", "second image"]
    assert ds.skips.counts == {"image without .txt caption": 1, "empty caption": 1}


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    write_shard(
        tmp_path / "shard-000.tar",
        [
            ("000000", {"jpg": image_bytes((255, 0, 0)), "txt": b"red", "json": b"{}"}),
            ("000001", {"png": image_bytes((0, 255, 0), "PNG"), "txt": b"green"}),
            ("000002", {"jpg": b"corrupt bytes", "txt": b"broken"}),
        ],
    )
    write_shard(
        tmp_path / "shard-001.tar",
        [
            ("000003", {"jpg": image_bytes((0, 0, 255)), "caption": b"blue"}),
            ("000004", {"jpg": image_bytes((9, 9, 9))}),
            ("000005", {"jpg": image_bytes((1, 1, 1)), "txt": b"last"}),
        ],
    )
    return tmp_path


def test_brace_expansion():
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_urls("x.tar::y.tar") == ["x.tar", "y.tar"]
    assert expand_urls(["s{8..10}.tar"]) == ["s8.tar", "s9.tar", "s10.tar"]


def test_webdataset_shards_pairs_and_skips(shards: Path):
    ds = WebDatasetShards(str(shards / "shard-{000..001}.tar"))
    items = list(ds)
    assert [c for _, c in items] == ["red", "green", "blue", "last"]
    assert all(isinstance(img, Image.Image) for img, _ in items)
    assert ds.skips.counts == {"unreadable image": 1, "empty caption": 1}


def test_webdataset_unreadable_shard_is_counted(shards: Path):
    (shards / "shard-002.tar").write_bytes(b"this is not a tar file at all" * 20)
    ds = WebDatasetShards([str(shards / "shard-002.tar"), str(shards / "shard-000.tar")])
    assert [c for _, c in ds] == ["red", "green"]
    assert ds.skips.counts["unreadable shard"] == 1


def test_shards_split_over_ranks_and_workers():
    shards = [f"s{i}" for i in range(10)]
    parts = [split_shards(shards, r, 2, w, 3) for r in range(2) for w in range(3)]
    flat = [s for p in parts for s in p]
    assert sorted(flat) == sorted(shards) and len(flat) == len(set(flat))


def test_webdataset_with_dataloader_workers_reads_each_sample_once(shards: Path):
    ds = WebDatasetShards(str(shards / "shard-{000..001}.tar"))
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=drop_none)
    captions = sorted(c for batch in loader for _, c in batch)
    assert captions == ["blue", "green", "last", "red"]


def test_coco_captions(tmp_path: Path):
    write_image(tmp_path / "images" / "1.jpg")
    write_image(tmp_path / "images" / "2.jpg")
    data = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"image_id": 1, "caption": "a cat"},
            {"image_id": 1, "caption": "a small cat"},
            {"image_id": 2, "caption": "a dog"},
            {"image_id": 99, "caption": "orphan"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(data))
    ds = CocoCaptions(tmp_path / "captions.json", tmp_path / "images")
    assert [ds[i][1] for i in range(len(ds))] == ["a cat", "a small cat", "a dog"]
    assert ds.skips.total == 1


def test_open_dataset_dispatch(csv_tree: Path, shards: Path, tmp_path: Path):
    assert isinstance(open_dataset(csv_tree / "data.csv"), CsvDataset)
    assert isinstance(open_dataset(str(csv_tree / "data.tsv")), CsvDataset)
    assert isinstance(open_dataset(csv_tree / "imgs"), FolderDataset)
    assert isinstance(open_dataset(str(shards / "shard-000.tar")), WebDatasetShards)
    assert isinstance(open_dataset(str(shards / "shard-{000..001}.tar")), WebDatasetShards)
    (tmp_path / "d.jsonl").write_text("")
    assert isinstance(open_dataset(tmp_path / "d.jsonl"), JsonlDataset)
    (tmp_path / "c.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="image_dir"):
        open_dataset(tmp_path / "c.json")
    assert isinstance(open_dataset(tmp_path / "c.json", image_dir=tmp_path), CocoCaptions)
    assert isinstance(open_dataset("shapes", split="val", n=5), ShapesDataset)
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_dataset(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="fashion-mnist"):
        open_dataset("imagenet")
    with pytest.raises(FileNotFoundError, match="shard"):
        open_dataset(str(shards / "shard-{000..005}.tar"))


# ------------------------------------------------------------------------------------------------ Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)), 2051)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    return tmp_path


def test_fashion_mnist_fake_files(fake_fmnist: Path):
    ds = FashionMNIST("train", root=fake_fmnist)
    assert len(ds) == 30 and len(FashionMNIST("test", root=fake_fmnist)) == 20
    img, caption, label = ds[13]
    assert img.mode == "L" and img.size == (28, 28) and label == 3
    assert FASHION_MNIST_CLASSES[3] in caption
    assert np.array_equal(np.asarray(img), ds.images[13])
    assert [ds[i][1] for i in range(30)] == [FashionMNIST("train", root=fake_fmnist)[i][1] for i in range(30)]
    other = FashionMNIST("train", root=fake_fmnist, seed=5)
    assert [ds[i][1] for i in range(30)] != [other[i][1] for i in range(30)]
    images, captions, labels = ds.fast_arrays()
    assert images.shape == (30, 28, 28, 1) and captions[13] == caption and labels[13] == 3
    assert ds.classnames == FASHION_MNIST_CLASSES


def test_fashion_mnist_templates():
    assert len(CAPTION_TEMPLATES) >= 8 and len(ZERO_SHOT_TEMPLATES) >= 4
    assert set(ZERO_SHOT_TEMPLATES) - set(CAPTION_TEMPLATES), "zero-shot prompts should include unseen phrasings"
    assert format_caption("a photo of a {}.", "ankle boot") == "a photo of an ankle boot."
    assert format_caption("a {} on a table.", "ankle boot") == "an ankle boot on a table."


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path):
    with pytest.raises(DatasetMissingError) as err:
        FashionMNIST("train", root=tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    assert "sudo apt-get install dataset-fashion-mnist" in str(err.value)


@pytest.mark.fashion_mnist
def test_real_fashion_mnist():
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert len(train) == 60000 and len(test) == 10000
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert train.images.shape == (60000, 28, 28)


# -------------------------------------------------------------------------------------------------- OpenClipart

SVG_TEMPLATE = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        <dc:title>{title}</dc:title>
        <dc:description>{description}</dc:description>
        <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
        <dc:publisher><cc:Agent rdf:about="http://www.openclipart.org/">
          <dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
        <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  <rect width="10" height="10"/>
</svg>
"""


def write_clipart(root: Path, rel: str, title: str, keywords: list[str], creator: str = "Jane Doe") -> None:
    svg = root / "svg" / f"{rel}.svg"
    svg.parent.mkdir(parents=True, exist_ok=True)
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    svg.write_text(SVG_TEMPLATE.format(title=title, description="", keywords=lis, creator=creator))
    png = root / "png" / f"{rel}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    rgba = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (10, 5, 20, 15))
    rgba.save(png)


@pytest.fixture
def fake_openclipart(tmp_path: Path) -> Path:
    root = tmp_path / "openclipart"
    write_clipart(root, "food/red_apple_jane_doe_01", "Red Apple", ["fruit", "hash", "", "food", "jane doe"])
    write_clipart(
        root,
        "computer/icons/flat-theme/folder_open",
        "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)",
        ["hash", "icons", "computer", "theme"],
    )
    write_clipart(root, "animals/ralf_ark.in-berlin.de_01", "Armadillo &amp;amp; friend", ["animal", "Jane Doe"])
    return root


def test_openclipart_captions_and_cache(fake_openclipart: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache" / "meta.json"
    ds = oc.OpenClipart(root=fake_openclipart, split="all", cache_path=cache)
    captions = {Path(png).stem: caption for png, caption, _ in ds.items}
    assert captions["red_apple_jane_doe_01"] == "red apple, fruit, food"
    assert captions["folder_open"] == "folder open, computer"
    assert captions["ralf_ark.in-berlin.de_01"] == "armadillo & friend, animal"
    assert cache.is_file()
    img, caption, category = ds[0]
    assert isinstance(img, Image.Image) and ds.categories[category] in ("animals", "computer", "food")
    assert pil_to_array(img, 8, 3).shape == (8, 8, 3)

    def no_parse(*args, **kwargs):
        raise AssertionError("metadata should come from the cache")

    monkeypatch.setattr(oc, "parse_svg_metadata", no_parse)
    again = oc.OpenClipart(root=fake_openclipart, split="all", cache_path=cache)
    assert [c for _, c, _ in again.items] == [c for _, c, _ in ds.items]


def test_openclipart_splits_are_disjoint(fake_openclipart: Path):
    kw = {"root": fake_openclipart, "cache_path": None, "test_fraction": 0.5}
    train, test = oc.OpenClipart(split="train", **kw), oc.OpenClipart(split="test", **kw)
    every = oc.OpenClipart(split="all", **kw)
    train_paths, test_paths = {p for p, _, _ in train.items}, {p for p, _, _ in test.items}
    assert not train_paths & test_paths and train_paths | test_paths == {p for p, _, _ in every.items}


def test_openclipart_parser_ignores_agent_titles():
    meta = oc.parse_svg_metadata(SVG_TEMPLATE.format(title="", description="", keywords="", creator="Bob"))
    assert meta["title"] == "" and meta["creator"] == "Bob"
    # No title: the subject comes from the file name, up to the (truncated) author name.
    assert oc.build_caption("people/crying_baby_bob_01", meta, set()) == "crying baby"


def test_openclipart_missing_says_how_to_install(tmp_path: Path):
    with pytest.raises(DatasetMissingError, match="apt-get install openclipart-png openclipart-svg"):
        oc.OpenClipart(root=tmp_path)


@pytest.mark.skipif(not Path(oc.DEFAULT_ROOT, "svg").is_dir(), reason="openclipart-png/-svg absent")
def test_real_openclipart_captions_are_clean(tmp_path: Path):
    every = oc.OpenClipart(split="all", cache_path=tmp_path / "meta.json")
    test = oc.OpenClipart(split="test", cache_path=tmp_path / "meta.json")
    assert len(every) > 7500 and 0.07 < len(test) / len(every) < 0.13
    noise_keywords = {"hash", "icons", "theme", "magick", "clipart", "lemon_theme_icon"}
    noise_text = ("openclipart", "clipart by", "part of the", "gramastar", "lemon svg theme", "http", "www.")
    noisy = [c for _, c, _ in every.items if set(c.split(", ")[1:]) & noise_keywords or any(n in c for n in noise_text)]
    assert not noisy
