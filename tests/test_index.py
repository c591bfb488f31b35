"""The embedding index: FAISS back end (exact and HNSW), building from every source kind, resume, add/remove, CLI."""

from __future__ import annotations

import json
import sqlite3
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install faiss-cpu)")

from vislang.index import Searcher, build_index, create_index, open_index, remove_from_index  # noqa: E402
from vislang.index import build as build_mod  # noqa: E402


def make_tiny_model(root: Path, decoder=None, name: str = "model") -> Path:
    """An untrained tiny CLIP saved as a model directory (a second to build; rankings are arbitrary but fixed); with
    a ``DecoderConfig``, the tiny CoCa captioner `vislang train` would save."""
    import torch

    from vislang.data import ShapesDataset
    from vislang.factory import build_model, fit_config_to_tokenizer, save_pretrained
    from vislang.models import ModelConfig, TextConfig, VisionConfig
    from vislang.tokenizers import Tokenizer

    torch.manual_seed(0)
    captions = [ShapesDataset("train", n=64).scene_and_caption(i)[1] for i in range(64)]
    tokenizer = Tokenizer.train(captions, vocab_size=120, context_length=16)
    cfg = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=2, mean=(0.5,) * 3, std=(0.5,) * 3),
        text=TextConfig(arch="transformer", context_length=16, width=16, layers=1, heads=2),
        decoder=decoder,
    )
    cfg = fit_config_to_tokenizer(cfg, tokenizer)
    return save_pretrained(build_model(cfg).eval(), root / name, tokenizer)


def write_images(folder: Path, n: int, split: str = "test") -> list[Path]:
    """``n`` distinct PNG scenes with same-named .txt captions."""
    from vislang.data import ShapesDataset

    folder.mkdir(parents=True, exist_ok=True)
    ds = ShapesDataset(split, n=n)
    paths = []
    for i in range(n):
        img, caption, _ = ds[i]
        p = folder / f"scene{i:03d}.png"
        img.save(p)
        p.with_suffix(".txt").write_text(caption)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    model = make_tiny_model(root)
    images = write_images(root / "images", 12)
    return {"root": root, "model": model, "images": images}


def unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def meta(n: int, start: int = 0) -> list[dict]:
    return [{"key": f"k{i}", "path": f"/img/{i}.png", "caption": f"c{i}"} for i in range(start, start + n)]


# --------------------------------------------------------------------------------------------- the FAISS index


def test_flat_search_matches_numpy_and_survives_reopen(tmp_path):
    x = unit(200, 8)
    with create_index(tmp_path / "ix", 8) as ix:
        ids = ix.add(x, meta(200))
        assert len(ix) == 200 and ix.current_kind == "flat"
        q = unit(5, 8, seed=1)
        scores, found = ix.search(q, 10)
        ref = q @ x.T  # (5, 200)
        ref_top = np.argsort(-ref, axis=1)[:, :10]
        assert np.array_equal(found, ids[ref_top])  # exact search = brute force
        np.testing.assert_allclose(scores, np.take_along_axis(ref, ref_top, axis=1), rtol=1e-5, atol=1e-5)
    with open_index(tmp_path / "ix") as ix:  # loaded from the saved FAISS file, same answers
        assert len(ix) == 200
        assert ix.refresh() is False
        assert np.array_equal(ix.search(q, 10)[1], found)
        assert ix.get([int(ids[3])])[0]["caption"] == "c3"
        np.testing.assert_allclose(ix.vectors([int(ids[7])])[0], x[7], atol=1e-6)


def test_ids_are_never_reused_and_remove_works(tmp_path):
    with create_index(tmp_path / "ix", 8) as ix:
        first = ix.add(unit(3, 8), meta(3))
        assert ix.remove([int(first[-1]), 999]) == 1
        second = ix.add(unit(2, 8, 1), meta(2, start=3))
        assert set(second.tolist()).isdisjoint(first.tolist())
        assert ix.get([int(first[-1])]) == [None]
        assert int(first[-1]) not in ix.search(unit(1, 8), 10)[1]
        with pytest.raises(ValueError, match="already in the index"):
            ix.add(unit(1, 8), meta(1))  # key k0 again
        assert len(ix) == 4  # the failed batch left nothing behind


def test_auto_switches_to_hnsw_above_exact_max_with_good_recall(tmp_path):
    x = unit(600, 16)
    with create_index(tmp_path / "ix", 16, kind="auto", exact_max=300) as ix:
        ids = ix.add(x[:300], meta(300))
        assert ix.current_kind == "flat"
        ids = np.concatenate([ids, ix.add(x[300:], meta(300, start=300))])
        assert ix.current_kind == "hnsw"
        q = x[:50]  # each vector's nearest neighbour is itself
        _, found = ix.search(q, 1)
        assert (found[:, 0] == ids[:50]).mean() >= 0.98
        assert ix.remove([int(ids[0])]) == 1  # HNSW cannot delete: rebuilt
        assert ix.search(x[:1], 5)[1][0].tolist().count(int(ids[0])) == 0
    with open_index(tmp_path / "ix") as ix:
        assert ix.current_kind == "hnsw" and len(ix) == 599


def exact_top(q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k ids (Q, k): the reference an approximate index is measured against."""
    return ids[np.argsort(-(q @ x.T), axis=1)[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def test_ivf_trains_4_sqrt_n_lists_deletes_in_place_and_reloads(tmp_path):
    x = unit(2000, 16)
    with create_index(tmp_path / "ix", 16, kind="ivf", nprobe=24) as ix:
        ids = ix.add(x, meta(2000))
        info = ix.info()
        assert ix.current_kind == "ivf" and info["nlist"] == round(4 * 2000**0.5) == 179 and info["nprobe"] == 24
        _, found = ix.search(x[:100], 10)
        assert (found[:, 0] == ids[:100]).all()  # a stored vector lies in the list of its nearest centroid
        assert recall(found, exact_top(x[:100], x, ids, 10)) >= 0.8
        faiss_before = ix._faiss
        assert ix.remove([int(ids[0]), int(ids[1])]) == 2
        assert ix._faiss is faiss_before and ix.current_kind == "ivf"  # IVF deletes in place: no retraining
        assert not {int(ids[0]), int(ids[1])} & set(ix.search(x[:2], 10)[1].ravel().tolist())
    with open_index(tmp_path / "ix") as ix:  # the saved IVF file is loaded as is, options from index.json
        assert ix.refresh() is False and ix.current_kind == "ivf" and ix.nprobe == 24 and len(ix) == 1998
        assert ix.info()["nlist"] == 179
        assert np.array_equal(ix.search(x[2:50], 1)[1][:, 0], ids[2:50])


def test_ivf_is_retrained_when_the_index_outgrows_its_lists(tmp_path):
    x = unit(10_000, 16)
    with create_index(tmp_path / "ix", 16, kind="ivf") as ix:
        ids = ix.add(x[:2000], meta(2000))
        first = ix._faiss
        ids = np.concatenate([ids, ix.add(x[2000:3000], meta(1000, start=2000))])
        assert ix._faiss is first and ix.info()["nlist"] == 179  # 4·sqrt(3000) = 219 < 2·179: added in place
        ids = np.concatenate([ids, ix.add(x[3000:], meta(7000, start=3000))])
        assert ix.info()["nlist"] == 400  # 4·sqrt(10000) = 400 > 2·179: retrained on the stored vectors
        _, found = ix.search(x[:50], 1)
        assert np.array_equal(found[:, 0], ids[:50])
    files = list((tmp_path / "ix").glob("vectors-v*.faiss"))
    assert len(files) == 1  # saved once, older versions gone


def test_auto_switches_to_ivf_when_asked_and_back_to_exact_when_it_shrinks(tmp_path):
    x = unit(1500, 16)
    with create_index(tmp_path / "ix", 16, exact_max=1000, ann="ivf") as ix:
        ids = ix.add(x[:1000], meta(1000))
        assert ix.current_kind == "flat"
        ids = np.concatenate([ids, ix.add(x[1000:], meta(500, start=1000))])
        assert ix.current_kind == "ivf" and ix.info()["nlist"] == round(4 * 1500**0.5)
        assert ix.remove(ids[:600].tolist()) == 600
        assert ix.current_kind == "flat"  # 900 left: exact again
        q = unit(20, 16, seed=3)
        assert np.array_equal(ix.search(q, 5)[1], exact_top(q, x[600:], ids[600:], 5))


def test_bad_faiss_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown approximate index 'lsh'"):
        create_index(tmp_path / "a", 8, ann="lsh")
    with pytest.raises(ValueError, match="nprobe and nlist must be at least 1"):
        create_index(tmp_path / "b", 8, kind="ivf", nprobe=0)
    with pytest.raises(ValueError, match="unknown FAISS index kind 'ivfpq'"):
        create_index(tmp_path / "c", 8, kind="ivfpq")


def test_stale_faiss_file_is_rebuilt_from_sqlite(tmp_path):
    with create_index(tmp_path / "ix", 8) as ix:
        ids = ix.add(unit(10, 8), meta(10))
    for f in tmp_path.glob("ix/vectors-v*.faiss"):
        f.unlink()  # as if the process died before saving
    with open_index(tmp_path / "ix") as ix:
        assert len(ix) == 10
        assert ix.search(unit(10, 8)[:1], 1)[1][0, 0] == ids[0]


def test_bad_arguments_say_what_to_do(tmp_path):
    with create_index(tmp_path / "ix", 8) as ix:
        with pytest.raises(ValueError, match=r"\(N, 8\)"):
            ix.add(unit(2, 4), meta(2))
        with pytest.raises(ValueError, match="'key' and a 'path'"):
            ix.add(unit(1, 8), [{"path": "x"}])
        with pytest.raises(ValueError, match="k must be at least 1"):
            ix.search(unit(1, 8), 0)
    with pytest.raises(FileExistsError):
        create_index(tmp_path / "ix", 8)
    with pytest.raises(FileNotFoundError, match="vislang index build"):
        open_index(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------- building


def test_build_folder_then_search_finds_each_image_first(world, tmp_path):
    counts = build_index(str(world["root"] / "images"), tmp_path / "ix", world["model"], batch_size=5, progress=False)
    assert counts["added"] == 12 and counts["size"] == 12
    s = Searcher(tmp_path / "ix")
    try:
        for p in world["images"][:4]:
            hits = s.search_image(p, k=3)
            assert hits[0]["path"] == str(p.resolve()) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
            assert hits[0]["caption"] == p.with_suffix(".txt").read_text()
        text_hits = s.search_text("a red circle", k=20)
        assert len(text_hits) == 12 and all(-1.0001 <= h["score"] <= 1.0001 for h in text_hits)
        assert [h["score"] for h in text_hits] == sorted((h["score"] for h in text_hits), reverse=True)
    finally:
        s.close()
    # a second build of the same source adds nothing
    again = build_index(str(world["root"] / "images"), tmp_path / "ix", world["model"], progress=False)
    assert again["added"] == 0 and again["already"] == 12


def test_interrupted_build_resumes_without_loss_or_duplicates(world, tmp_path, monkeypatch):
    calls = {"n": 0}

    def flaky_embed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third batch dies mid-build, after the first commit
            raise KeyboardInterrupt
        return real_embed(*args, **kwargs)

    real_embed = build_mod.embed_items
    monkeypatch.setattr(build_mod, "embed_items", flaky_embed)
    with pytest.raises(KeyboardInterrupt):
        build_index(
            str(world["root"] / "images"), tmp_path / "ix", world["model"], batch_size=2, commit_every=1, progress=False
        )
    with open_index(tmp_path / "ix") as ix:
        assert len(ix) == 4  # two committed batches
        assert ix.get_state("build")["status"] == "running"
    monkeypatch.setattr(build_mod, "embed_items", real_embed)
    counts = build_index(str(world["root"] / "images"), tmp_path / "ix", progress=False)  # model from the index
    assert counts["already"] == 4 and counts["added"] == 8
    db = sqlite3.connect(tmp_path / "ix" / "meta.sqlite")
    keys = [r[0] for r in db.execute("SELECT key FROM items")]
    assert sorted(keys) == sorted(str(p.resolve()) for p in world["images"])  # each image exactly once


def test_build_from_csv_jsonl_and_shards(world, tmp_path):
    imgs = world["images"]
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("path,text\n" + "".join(f"{p},caption {i}\n" for i, p in enumerate(imgs[:3])))
    # absolute paths outside the CSV's folder: indexed only when asked for (a server would send those files)
    c = build_index(str(csv_file), tmp_path / "a", world["model"], progress=False, allow_outside_root=True)
    assert c["added"] == 3
    with open_index(tmp_path / "a") as ix:
        assert sorted(m["caption"] for m in ix.get([1, 2, 3])) == ["caption 0", "caption 1", "caption 2"]

    rows = [{"image": str(p.relative_to(world["root"])), "caption": ["x", "y"]} for p in imgs[:2]]
    rows.append({"image": str(imgs[0].relative_to(world["root"]))})  # repeated, no caption
    jsonl_target = world["root"] / "pairs.jsonl"  # relative paths resolve against the file's folder
    jsonl_target.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    c = build_index(str(jsonl_target), tmp_path / "b", world["model"], progress=False)
    assert c["added"] == 2 and c["duplicates"] == 1

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(imgs[:3]):
            tar.add(p, arcname=f"s{i}.png")
            tar.add(p.with_suffix(".txt"), arcname=f"s{i}.txt")
        tar.add(imgs[3].with_suffix(".txt"), arcname="orphan.txt")  # a sample without an image
    c = build_index(str(shard), tmp_path / "c", world["model"], progress=False)
    assert c["added"] == 3
    with open_index(tmp_path / "c") as ix:
        m = ix.get([1])[0]
        assert m["key"].endswith("shard-000.tar#s0") and m["offset"] is not None
        data = build_mod.read_item_bytes(m["path"], m["offset"], m["size"])
        assert data == imgs[0].read_bytes()  # served straight from the shard


def test_unreadable_images_are_skipped_and_model_mismatch_refused(world, tmp_path):
    folder = tmp_path / "mixed"
    write_images(folder, 2)
    (folder / "broken.png").write_bytes(b"not a png")
    c = build_index(str(folder), tmp_path / "ix", world["model"], progress=False)
    assert c["added"] == 2 and c["unreadable"] == 1
    other = make_tiny_model(tmp_path / "other")
    with pytest.raises(ValueError, match="cannot be mixed"):
        build_index(str(folder), tmp_path / "ix", other, progress=False)
    with pytest.raises(ValueError, match="holds no images"):
        (tmp_path / "empty.csv").write_text("path,caption\n")
        build_index(str(tmp_path / "empty.csv"), tmp_path / "iy", world["model"], progress=False)
    assert not (tmp_path / "iy").exists()  # nothing created for a bad source


def test_remove_by_id_file_and_folder(world, tmp_path):
    build_index(str(world["root"] / "images"), tmp_path / "ix", world["model"], progress=False)
    assert remove_from_index(tmp_path / "ix", ["1", str(world["images"][5])]) == 2
    assert remove_from_index(tmp_path / "ix", ["1"]) == 0
    assert remove_from_index(tmp_path / "ix", [str(world["root"] / "images")]) == 10
    with open_index(tmp_path / "ix") as ix:
        assert len(ix) == 0
        assert ix.search(unit(1, 16), 3)[1].tolist() == [[-1, -1, -1]]


# --------------------------------------------------------------------------------------------- CLI


def test_cli_index_build_add_info_search_remove(world, tmp_path, capsys):
    from vislang.cli.main import main

    ix = str(tmp_path / "ix")
    first, rest = tmp_path / "first", world["root"] / "images"
    first.mkdir()
    (first / "a.png").write_bytes(world["images"][0].read_bytes())
    assert main(["index", "build", str(first), "--model", str(world["model"]), "--index", ix, "--no-progress"]) == 0
    assert main(["index", "add", str(rest), "--index", ix, "--no-progress", "--batch-size", "4"]) == 0
    assert "holds 13" in capsys.readouterr().out
    assert main(["index", "info", "--index", ix]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size"] == 13 and info["dim"] == 16 and info["kind"] == "flat" and info["build"]["status"] == "complete"

    assert main(["search", "--image", str(world["images"][2]), "--index", ix, "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and hits[0]["path"] == str(world["images"][2].resolve())
    assert main(["search", "a blue square", "--index", ix, "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(".png" in ln for ln in lines)

    assert main(["index", "remove", "--index", ix, str(first / "a.png")]) == 0
    assert "removed 1" in capsys.readouterr().out


def test_cli_build_with_ivf_options_prints_throughput(world, tmp_path, capsys):
    from vislang.cli.main import main

    ix = str(tmp_path / "ix")
    argv = ["index", "build", str(world["root"] / "images"), "--model", str(world["model"]), "--index", ix]
    assert main([*argv, "--no-progress", "--kind", "ivf", "--nprobe", "3"]) == 0
    out = capsys.readouterr().out
    assert "indexed 12 new image(s)" in out and "images/s)" in out
    assert main(["index", "info", "--index", ix]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "ivf" and info["nprobe"] == 3 and info["nlist"] == 12  # round(4·sqrt(12)) capped at N
    assert main(["search", "--image", str(world["images"][5]), "--index", ix, "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == str(world["images"][5].resolve())


def test_cli_errors(world, tmp_path, capsys):
    from vislang.cli.main import main

    assert main(["index", "add", str(world["root"] / "images"), "--index", str(tmp_path / "none")]) == 2
    assert "vislang index build" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert main(["search", "x", "--index", str(tmp_path / "none")]) == 2
    build_index(str(world["root"] / "images"), tmp_path / "ix", world["model"], progress=False)
    assert main(["search", "x", "--index", str(tmp_path / "ix"), "-k", "0"]) == 2
    assert "-k must be" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "ix")]) == 2
    assert "query text or --image" in capsys.readouterr().err
    assert (
        main(
            [
                "index",
                "build",
                str(tmp_path / "missing"),
                "--model",
                str(world["model"]),
                "--index",
                str(tmp_path / "iz"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_exact_search_of_a_batch_equals_one_query_at_a_time(tmp_path):
    import faiss

    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(400, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    default = faiss.cvar.distance_compute_blas_threshold
    with create_index(tmp_path / "ix", 16) as ix:
        ix.add(vecs, [{"key": f"k{i}", "path": f"p{i}.png"} for i in range(400)])
        queries = vecs[:9] + 0.01
        batched = ix.search(queries, 5)  # 9 queries: one matrix product
        single = [ix.search(q[None], 5) for q in queries]
    np.testing.assert_array_equal(batched[1], np.concatenate([s[1] for s in single]))
    np.testing.assert_allclose(batched[0], np.concatenate([s[0] for s in single]), rtol=1e-5)
    assert faiss.cvar.distance_compute_blas_threshold == default  # FAISS's global is restored
