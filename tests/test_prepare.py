"""prepare → PreparedDataset round trips, skip accounting, atomic writes and the cache key."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from vislang.data.fashion_mnist import FashionMNIST
from vislang.data.prepare import NotPreparedError, PreparedDataset, is_prepared, prepare, prepared_dir_for
from vislang.data.readers import CsvDataset, WebDatasetShards
from vislang.data.shapes import ShapesDataset
from vislang.data.transforms import pil_to_array

CTX = 6


def toy_tokenize(captions: list[str]) -> np.ndarray:
    """Deterministic fake tokenizer: word lengths, padded/truncated to CTX."""
    out = np.zeros((len(captions), CTX), dtype=np.int64)
    for i, caption in enumerate(captions):
        lengths = [len(w) for w in caption.split()][:CTX]
        out[i, : len(lengths)] = lengths
    return out


@pytest.fixture
def csv_dataset(tmp_path: Path) -> CsvDataset:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(7):
        arr = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
        name = f"img{i}.png" if i % 2 else f"img{i}.jpg"
        Image.fromarray(arr).save(tmp_path / name)
        rows.append(f"{name},caption number {i} with {'words ' * i}")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    rows.insert(3, "bad.jpg,a corrupt image")
    rows.insert(5, "img0.jpg,")
    (tmp_path / "d.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    return CsvDataset(tmp_path / "d.csv")


def test_round_trip_images_tokens_and_skips(csv_dataset: CsvDataset, tmp_path: Path):
    out = tmp_path / "prepared"
    info = prepare(csv_dataset, out, image_size=16, channels=3, tokenize=toy_tokenize, batch_size=3, progress=False)
    assert info.n == 7 and info.context_length == CTX
    assert info.skipped == {"unreadable image": 1, "empty caption": 1}
    good = [csv_dataset[i] for i in range(len(csv_dataset))]
    good = [g for g in good if g is not None]
    ds = PreparedDataset(out)
    assert len(ds) == 7 and ds.meta["skipped_total"] == 2 and ds.meta["context_length"] == CTX
    expected_tokens = toy_tokenize([c for _, c in good])
    for i, (img, caption) in enumerate(good):
        item = ds[i]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 16)
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), pil_to_array(img, 16, 3))
        assert item["tokens"].dtype == torch.long and item["tokens"].tolist() == expected_tokens[i].tolist()
        assert item["label"] == -1 and item["index"] == i
        assert ds.captions[i] == caption
    assert ds.labels.tolist() == [-1] * 7 and ds.classnames is None


def test_skip_summary_is_printed(csv_dataset: CsvDataset, tmp_path: Path, capsys):
    prepare(csv_dataset, tmp_path / "p", 8, 1, progress=False)
    err = capsys.readouterr().err
    assert "skipped 2 items" in err and "unreadable image" in err and "empty caption" in err


def test_without_tokenizer_no_tokens(csv_dataset: CsvDataset, tmp_path: Path):
    info = prepare(csv_dataset, tmp_path / "p", 8, 1, progress=False)
    ds = PreparedDataset(info.path)
    assert info.context_length is None and "tokens" not in ds[0] and "tokens" not in ds.get_batch([0, 1])
    assert not (info.path / "tokens.i32").exists()
    assert ds[0]["image"].shape == (1, 8, 8)


def test_get_batch_equals_per_item(tmp_path: Path):
    info = prepare(ShapesDataset("val", n=40), tmp_path / "s", 32, 3, tokenize=toy_tokenize, progress=False)
    ds = PreparedDataset(info.path)
    idx = [5, 0, 39, 5, 17]
    batch = ds.get_batch(idx)
    assert batch["image"].shape == (5, 3, 32, 32) and batch["image"].is_contiguous()
    for row, i in enumerate(idx):
        item = ds[i]
        assert torch.equal(batch["image"][row], item["image"])
        assert torch.equal(batch["tokens"][row], item["tokens"])
        assert batch["label"][row].item() == item["label"] == i  # shapes labels are scene indices
        assert batch["index"][row].item() == i
    assert torch.equal(ds.get_batch(torch.tensor([1, 2]))["image"], ds.get_batch(np.array([1, 2]))["image"])


def write_fake_fmnist(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(1)
    for prefix in ("train", "t10k"):
        for kind, magic, array in (
            ("images-idx3", 2051, rng.integers(0, 255, (n, 28, 28))),
            ("labels-idx1", 2049, np.arange(n) % 10),
        ):
            header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())
    return root


class NoFastPath(Dataset):
    """Wraps a dataset and hides its ``fast_arrays`` so prepare takes the PIL path."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


@pytest.mark.parametrize("channels", [1, 3])
def test_fast_arrays_path_matches_pil_path(tmp_path: Path, channels: int):
    fm = FashionMNIST("train", root=write_fake_fmnist(tmp_path))
    fast = PreparedDataset(prepare(fm, tmp_path / "fast", 28, channels, toy_tokenize, progress=False).path)
    slow = PreparedDataset(prepare(NoFastPath(fm), tmp_path / "slow", 28, channels, toy_tokenize, progress=False).path)
    all_idx = list(range(len(fm)))
    for key in ("image", "tokens", "label"):
        assert torch.equal(fast.get_batch(all_idx)[key], slow.get_batch(all_idx)[key]), key
    assert fast.captions == slow.captions
    assert fast.classnames == fm.classnames
    assert fast.labels.tolist() == fm.labels.tolist()


class ExplodingTokenizer:
    """Fails on its second call, as an interrupted run would."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, captions: list[str]) -> np.ndarray:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("simulated crash mid-write")
        return toy_tokenize(captions)


def test_interrupted_prepare_leaves_no_dataset(tmp_path: Path):
    out = tmp_path / "cache" / "shapes"
    with pytest.raises(RuntimeError, match="simulated"):
        prepare(ShapesDataset("val", n=20), out, 16, 3, ExplodingTokenizer(), batch_size=8, progress=False)
    assert not out.exists() and not is_prepared(out)
    assert list((tmp_path / "cache").iterdir()) == []  # the partial folder was removed too
    with pytest.raises(NotPreparedError, match="vislang prepare"):
        PreparedDataset(out)


def test_failed_rebuild_keeps_previous_dataset(tmp_path: Path):
    out = tmp_path / "p"
    prepare(ShapesDataset("val", n=12), out, 16, 3, toy_tokenize, progress=False)
    before = PreparedDataset(out).get_batch(range(12))["image"]
    with pytest.raises(RuntimeError):
        prepare(ShapesDataset("test", n=20), out, 16, 3, ExplodingTokenizer(), batch_size=8, progress=False)
    assert torch.equal(PreparedDataset(out).get_batch(range(12))["image"], before)
    info = prepare(ShapesDataset("test", n=20), out, 16, 3, toy_tokenize, progress=False)  # replaces it
    assert len(PreparedDataset(out)) == 20 == info.n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


class Stream(IterableDataset):
    """An iterable dataset of unknown length, with a None in the middle."""

    def __iter__(self):
        for i in range(11):
            if i == 4:
                yield None
                continue
            yield Image.new("RGB", (10, 10), (i * 20, 0, 0)), f"item {i}", i


def test_iterable_dataset_input(tmp_path: Path):
    info = prepare(Stream(), tmp_path / "it", 8, 3, toy_tokenize, batch_size=4, progress=False)
    ds = PreparedDataset(info.path)
    assert len(ds) == 10 and info.skipped == {"unreadable item": 1}
    assert ds.labels.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert ds.captions[4] == "item 5"
    assert ds[4]["image"][0, 0, 0].item() == 100


def test_webdataset_shards_with_workers(tmp_path: Path):
    for s in range(2):
        with tarfile.open(tmp_path / f"s{s}.tar", "w") as tar:
            for k in range(3):
                buf = io.BytesIO()
                Image.new("RGB", (9, 9), (s * 100, k * 50, 0)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"shard {s} sample {k}".encode())):
                    info = tarfile.TarInfo(f"{s}{k:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    shards = WebDatasetShards(str(tmp_path / "s{0..1}.tar"))
    info = prepare(shards, tmp_path / "wds", 8, 3, toy_tokenize, num_workers=2, batch_size=2, progress=False)
    ds = PreparedDataset(info.path)
    assert sorted(ds.captions) == sorted(f"shard {s} sample {k}" for s in range(2) for k in range(3))


def test_workers_report_reader_skip_reasons(csv_dataset: CsvDataset, tmp_path: Path):
    info = prepare(csv_dataset, tmp_path / "w", 8, 3, num_workers=2, batch_size=2, progress=False)
    assert info.n == 7 and info.skipped == {"unreadable image": 1, "empty caption": 1}


def test_pickling_does_not_copy_arrays(tmp_path: Path):
    info = prepare(ShapesDataset("val", n=64), tmp_path / "p", 32, 3, toy_tokenize, progress=False)
    ds = PreparedDataset(info.path)
    blob = pickle.dumps(ds)
    assert len(blob) < 64 * 32 * 32 * 3 // 4
    clone = pickle.loads(blob)
    assert torch.equal(clone.get_batch([3, 9])["image"], ds.get_batch([3, 9])["image"])


def test_meta_and_missing_dir(tmp_path: Path):
    info = prepare(ShapesDataset("val", n=5), tmp_path / "p", 16, 3, progress=False, tokenizer_id="bpe-1000")
    meta = json.loads((info.path / "meta.json").read_text())
    assert meta["n"] == 5 and meta["image_size"] == 16 and meta["channels"] == 3
    assert meta["tokenizer_id"] == "bpe-1000" and "ShapesDataset" in meta["source"]
    with pytest.raises(FileNotFoundError, match="vislang prepare"):
        PreparedDataset(tmp_path / "nothing")


def test_prepared_dir_for_is_stable_and_distinct(tmp_path: Path):
    args = (tmp_path, "shapes", "train", 64, 3, "bpe")
    first = prepared_dir_for(*args)
    assert first == prepared_dir_for(*args) and first.parent == tmp_path
    assert first.name.startswith("shapes-train-64px3c-")
    variants = [
        (tmp_path, "fashion-mnist", "train", 64, 3, "bpe"),
        (tmp_path, "shapes", "val", 64, 3, "bpe"),
        (tmp_path, "shapes", "train", 32, 3, "bpe"),
        (tmp_path, "shapes", "train", 64, 1, "bpe"),
        (tmp_path, "shapes", "train", 64, 3, None),
    ]
    names = {prepared_dir_for(*v).name for v in variants} | {first.name}
    assert len(names) == 6
    data = tmp_path / "d.csv"
    data.write_text("filepath,caption\n")
    assert prepared_dir_for(tmp_path, str(data), "train", 8, 3, None).name.startswith("d.csv-train-")
