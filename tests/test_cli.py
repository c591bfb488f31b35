"""Each CLI command on a tiny trained model: the happy path and the clear error for bad input."""

import json

import numpy as np
import pytest

from _tiny import TINY as BASE
from vislang.cli.main import main
from vislang.data import ShapesDataset
from vislang.train import load_train_config, train

TINY = [
    *BASE,
    "data.options={n: 64}",
    "batch_size=16",
    "epochs=1",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = load_train_config(None, [*TINY, f"out_dir={root / 'run'}", f"data.cache_dir={root / 'cache'}"])
    model_dir = train(cfg)
    images = root / "images"
    images.mkdir()
    ds = ShapesDataset("test", n=3)
    for i in range(3):
        ds[i][0].save(images / f"scene{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    return {"root": root, "model": model_dir, "images": images, "cache": root / "cache"}


def test_embed_texts_and_images(run, tmp_path):
    assert (
        main(
            [
                "embed",
                "--model",
                str(run["model"]),
                "--texts",
                "a red circle",
                "a blue square",
                "-o",
                str(tmp_path / "t.npy"),
            ]
        )
        == 0
    )
    emb = np.load(tmp_path / "t.npy")
    assert emb.shape == (2, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert (
        main(["embed", "--model", str(run["model"]), "--images", str(run["images"]), "-o", str(tmp_path / "i.parquet")])
        == 0
    )
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "i.parquet")
    assert table.num_rows == 3  # the broken file is skipped, not fatal
    assert all("scene" in p for p in table.column("path").to_pylist())


def test_embed_bad_output_suffix(run, tmp_path, capsys):
    assert main(["embed", "--model", str(run["model"]), "--texts", "x", "-o", str(tmp_path / "t.txt")]) == 2
    assert ".npy or .parquet" in capsys.readouterr().err


def test_zero_shot_ranks_labels(run, capsys):
    img = run["images"] / "scene0.png"
    assert (
        main(
            [
                "zero-shot",
                str(img),
                "--labels",
                "red circle,blue square,green star",
                "--model",
                str(run["model"]),
                "--json",
            ]
        )
        == 0
    )
    ranked = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in ranked] and abs(sum(r["probability"] for r in ranked) - 1) < 1e-4
    assert ranked[0]["probability"] >= ranked[-1]["probability"]


def test_zero_shot_unreadable_image(run, capsys):
    rc = main(["zero-shot", str(run["images"] / "broken.png"), "--labels", "a,b", "--model", str(run["model"])])
    assert rc == 2 and "not a readable image" in capsys.readouterr().err


def test_eval_and_report(run, capsys):
    rc = main(
        [
            "eval",
            "--model",
            str(run["model"]),
            "--data",
            "shapes",
            "--split",
            "val",
            "--no-probe",
            "--max-images",
            "64",
            "--out",
            str(run["root"] / "run" / "eval"),
        ]
    )
    assert rc == 0
    results = json.loads((run["root"] / "run" / "eval" / "results.json").read_text())
    assert "text_to_image_R@1" in results["retrieval"]
    assert main(["report", str(run["root"] / "run")]) == 0
    html = (run["root"] / "run" / "report.html").read_text()
    assert "<html" in html.lower() and "R@1" in html


def test_eval_not_a_model(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "not a vislang model directory" in capsys.readouterr().err


def test_prepare_and_models(run, capsys):
    assert (
        main(
            [
                "prepare",
                "shapes",
                "--split",
                "val",
                "--image-size",
                "16",
                "--channels",
                "3",
                "--cache-dir",
                str(run["cache"]),
            ]
        )
        == 0
    )
    assert "prepared 1000 pairs" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "fmnist-cnn" in capsys.readouterr().out


def test_missing_dataset_names_the_fix(tmp_path, capsys):
    rc = main(["prepare", str(tmp_path / "nope.csv"), "--cache-dir", str(tmp_path)])
    assert rc == 2 and "not found" in capsys.readouterr().err.lower()


def test_unknown_override_is_named(capsys):
    assert main(["train", "--optim.lrr=1"]) == 2
    assert "lrr" in capsys.readouterr().err


def test_prepare_with_tokenizer(run, capsys):
    args = ["prepare", "shapes", "--split", "val", "--image-size", "16", "--channels", "3"]
    assert main([*args, "--cache-dir", str(run["cache"]), "--tokenizer", str(run["model"])]) == 0
    out = capsys.readouterr().out
    assert "tokens" in out
    from vislang.data import PreparedDataset
    from vislang.tokenizers import load_tokenizer

    ds = PreparedDataset(out.strip().rsplit(" at ", 1)[1])
    tok = load_tokenizer(run["model"])
    assert np.array_equal(ds.tokens[:5], tok(ds.captions[:5]).numpy())
