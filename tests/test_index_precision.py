"""Index building and searching follow the precision setting (issue 29): ``index build --precision`` reaches the
image tower, ``auto`` is settled once per build (not again for the last, smaller batch), and search queries, image
and text alike, run in the precision the Searcher was given rather than always in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install faiss-cpu)")

from test_index import make_tiny_model, write_images  # noqa: E402
from vislang.evaluation.embed import embed_images  # noqa: E402
from vislang.index import Searcher, build_index, open_index  # noqa: E402
from vislang.index import build as build_mod  # noqa: E402
from vislang.inference import embed_texts, open_image  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ixprec")
    return {"model": make_tiny_model(root), "images": write_images(root / "images", 5), "root": root}


def stored(index_dir) -> np.ndarray:
    with open_index(index_dir) as ix:
        return ix.vectors(ix.all_ids().tolist())  # (N, E)


def test_build_precision_reaches_the_image_tower(world, tmp_path):
    src = str(world["root"] / "images")
    vecs = {}
    for p in ("fp32", "bf16"):
        build_index(src, tmp_path / p, world["model"], batch_size=2, progress=False, precision=p)
        vecs[p] = stored(tmp_path / p)
    searcher = Searcher(tmp_path / "fp32", precision="fp32")
    model = searcher.model  # loads the model and its preprocessing
    x = torch.stack([searcher._preprocess(open_image(p)) for p in world["images"]])  # (5, C, H, W)
    for p in ("fp32", "bf16"):  # the library's own embedding in that precision, row for row (ids follow file order)
        want = embed_images(model, x, 2, precision=p).numpy()
        assert np.allclose(vecs[p], want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    assert not np.array_equal(vecs["fp32"], vecs["bf16"])  # bf16 did run: the tower's outputs round differently
    assert (vecs["fp32"] * vecs["bf16"]).sum(1).min() > 0.99
    searcher.close()


def test_auto_is_settled_once_per_build(world, tmp_path, monkeypatch):
    """5 images in batches of 2: three batches, two shapes; the precision is resolved on the first batch only."""
    calls = []
    real = build_mod.inference_precision

    def counting(model, device, precision, trial, what):
        calls.append(what)
        return real(model, device, precision, trial, what)

    monkeypatch.setattr(build_mod, "inference_precision", counting)
    build_index(str(world["root"] / "images"), tmp_path / "ix", world["model"], batch_size=2, progress=False)
    assert len(calls) == 1 and calls[0][0] == 2, calls
    assert len(stored(tmp_path / "ix")) == 5


def test_search_queries_follow_the_precision(world, tmp_path):
    build_index(str(world["root"] / "images"), tmp_path / "ix", world["model"], progress=False, precision="fp32")
    img = open_image(world["images"][1])
    texts = ["a red circle", "a small blue square"]
    out = {}
    for p in ("fp32", "bf16"):
        s = Searcher(tmp_path / "ix", precision=p)
        assert s.text_precision == p  # an explicit precision is taken as given
        want = embed_images(s.model, torch.stack([s._preprocess(img)]), 1, precision=p).numpy()
        out[p] = s.embed_images([img])
        assert np.allclose(out[p], want, atol=1e-6)
        assert np.allclose(s.embed_texts(texts), embed_texts(s.model, s.tokenizer, texts, precision=p), atol=1e-6)
        s.close()
    assert not np.array_equal(out["fp32"], out["bf16"])  # image queries no longer run in fp32 whatever was asked
    with pytest.raises(ValueError, match="unknown precision"):
        Searcher(tmp_path / "ix", precision="fp8")


def test_precision_on_a_video_source_is_refused_not_ignored(world, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)  # only its name is looked at before the refusal
    with pytest.raises(ValueError, match="applies to images"):
        build_index(str(tmp_path / "clip.mp4"), tmp_path / "ix", world["model"], progress=False, precision="fp32")
    assert not (tmp_path / "ix").exists()
