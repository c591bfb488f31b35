"""Caption training through `vislang train`, the `caption` / `caption-eval` / `render-text` commands, bad input."""

import json

import pytest

import vislang
from _tiny import TINY as BASE
from vislang.cli.main import main
from vislang.models.captioner import CoCa

TINY = [
    *BASE,
    "data.options={n: 64}",
    "batch_size=16",
    "epochs=1",
    "log_every=2",
    "eval_max=16",
    "model.text.context_length=40",
    "model.decoder.width=16",
    "model.decoder.layers=1",
    "model.decoder.heads=2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cap")
    rc = main(["train", "--config", "caption", *[f"--{o}" for o in TINY], f"--out_dir={tmp / 'run'}",
               f"--data.cache_dir={tmp / 'c'}"])  # fmt: skip
    assert rc == 0
    return tmp / "run"


def test_train_with_the_caption_config_logs_both_losses_and_saves_coca(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert steps and all({"caption_loss", "contrastive_loss"} <= set(r) for r in steps)
    assert isinstance(vislang.from_pretrained(run / "model"), CoCa)


def test_caption_task_alone_trains(tmp_path):
    rc = main(["train", "--config", "caption", *[f"--{o}" for o in TINY], "--task=caption",
               f"--out_dir={tmp_path / 'r'}", f"--data.cache_dir={tmp_path / 'c'}"])  # fmt: skip
    assert rc == 0
    rec = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rec and all("caption_loss" in r and "contrastive_loss" not in r for r in rec)


def test_cli_caption_greedy_beam_and_top_p(run, tmp_path, capsys):
    from vislang.data.shapes import ShapesDataset

    img = tmp_path / "scene.png"
    ShapesDataset("val", n=1)[0][0].save(img)
    for opts in ([], ["--beam", "3"], ["--top-p", "0.9", "--seed", "0"], ["--beam", "2", "--no-cache"]):
        assert main(["caption", str(img), "--model", str(run / "model"), "--json", *opts]) == 0
        out = json.loads(capsys.readouterr().out)
        assert len(out) == 1 and out[0]["image"] == str(img) and isinstance(out[0]["caption"], str)


@pytest.mark.parametrize("opts", [["--beam", "0"], ["--beam", "-2"], ["--max-length", "0"], ["--max-length", "-1"]])
def test_cli_rejects_zero_or_negative_lengths_and_beams(run, tmp_path, opts, capsys):
    with pytest.raises(SystemExit):
        main(["caption", str(tmp_path / "x.png"), "--model", str(run / "model"), *opts])
    assert "must be positive" in capsys.readouterr().err


def test_cli_bad_images_are_clear_errors(run, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad in (text, empty):
        assert main(["caption", str(bad), "--model", str(run / "model")]) == 2
        assert "not a readable image" in capsys.readouterr().err
    folder = tmp_path / "nothing"
    folder.mkdir()
    assert main(["caption", str(folder), "--model", str(run / "model")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["caption", str(text), "--model", str(run / "model"), "--beam", "2", "--top-p", "0.9"]) == 2
    assert "not both" in capsys.readouterr().err


def test_cli_caption_needs_a_decoder(tmp_path, tiny_model_cfg, capsys):
    vislang.factory.build_model(tiny_model_cfg).save_pretrained(tmp_path / "clip")
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(img)
    assert main(["caption", str(img), "--model", str(tmp_path / "clip")]) == 2
    assert "caption decoder" in capsys.readouterr().err


def test_periodic_eval_logs_greedy_bleu4_and_cider(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval/CIDEr" in r]
    assert evals and all(0 <= r["eval/BLEU-4"] <= 1 and r["eval/CIDEr"] >= 0 for r in evals)
    assert "eval/text_to_image_R@1" in evals[-1]  # the contrastive look is still there


def test_cli_caption_eval_one_table_per_method_and_held_out_combinations(run, capsys):
    out = run / "eval" / "captions.json"  # where `vislang report RUN_DIR` looks (the default without --out)
    assert main(["caption-eval", "--model", str(run / "model"), "--split", "val", "--max-images", "6",
                 "--no-meteor", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert list(res["subsets"]) == ["val", "holdout"]  # shapes: the held-out colour-shape combinations separately
    for sub in res["subsets"].values():
        assert sub["images"] == 6 and list(sub["methods"]) == ["greedy", "beam3", "top_p0.9"]
        for scores in sub["methods"].values():
            assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(scores) and "METEOR" not in scores
    assert "| val | 6 | beam3 |" in printed and "| holdout | 6 | top_p0.9 |" in printed
    assert out.with_suffix(".md").read_text().startswith("| subset | images | method | BLEU-1")
    samples = res["samples"]
    assert [s["subset"] for s in samples] == ["val"] * 6 + ["holdout"] * 4
    for s in samples:
        assert (out.parent / s["image"]).read_bytes()[:4] == b"\x89PNG" and s["references"]
        assert set(s["captions"]) == {"greedy", "beam3", "top_p0.9"}

    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<h2>Captioning</h2>" in page and "held-out colour-shape combinations" in page
    assert page.count('class="sample"') == 10 and "caption CIDEr" in page


def test_cli_caption_eval_nn_baseline_side_by_side(run, tmp_path, capsys):
    from vislang.data.shapes import ShapesDataset

    folder = tmp_path / "train"
    folder.mkdir()
    train = ShapesDataset("train", n=24)
    for i in range(len(train)):
        img, cap, _ = train[i]
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(cap)
    out = tmp_path / "nn" / "res.json"
    assert main(["caption-eval", "--model", str(run / "model"), "--split", "val", "--max-images", "4", "--no-meteor",
                 "--methods", "greedy", "--nn-baseline", "--nn-train", str(folder), "--cache-dir", str(tmp_path / "c"),
                 "--out", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    for sub in res["subsets"].values():
        assert list(sub["methods"]) == ["greedy", "nn_baseline"]
        assert sub["methods"]["nn_baseline"]["BLEU-1"] > 0  # a real shapes caption shares words with the references
    assert any("most similar of 24 training images" in n for n in res["notes"])
    train_caps = {train.caption(i) for i in range(len(train))}
    assert all(s["captions"]["nn_baseline"] in train_caps for s in res["samples"])
    assert "| val | 4 | nn_baseline |" in capsys.readouterr().out


def test_cli_caption_eval_bad_input_is_a_clear_error(run, tmp_path, tiny_model_cfg, capsys):
    model = str(run / "model")
    assert main(["caption-eval", "--model", model, "--methods", "greedy,beam9", "--no-meteor"]) == 2
    assert "unknown decoding method" in capsys.readouterr().err
    folder = tmp_path / "imgs"
    folder.mkdir()
    assert main(["caption-eval", "--model", model, "--data", str(folder), "--nn-baseline", "--no-meteor"]) == 2
    assert "needs --nn-train" in capsys.readouterr().err
    assert main(["caption-eval", "--model", model, "--data", str(tmp_path / "missing.csv"), "--no-meteor",
                 "--cache-dir", str(tmp_path / "c")]) == 2  # fmt: skip
    assert "missing.csv" in capsys.readouterr().err
    vislang.factory.build_model(tiny_model_cfg).save_pretrained(tmp_path / "clip")
    assert main(["caption-eval", "--model", str(tmp_path / "clip"), "--no-meteor"]) == 2
    assert "caption decoder" in capsys.readouterr().err


def test_render_text_writes_a_folder_dataset(tmp_path):
    from vislang.data import open_dataset
    from vislang.data.rendered_text import RenderConfig, RenderedText

    assert main(["render-text", str(tmp_path / "rt"), "--split", "val", "--n", "6", "--image-size", "32"]) == 0
    ds = open_dataset(str(tmp_path / "rt"))
    cli_default = RenderedText("val", n=6, cfg=RenderConfig(blank_fraction=0.05))  # the CLI mixes in 5% without text
    assert len(ds) == 6 and [ds.caption(i) for i in range(6)] == cli_default.captions
    img, text, _ = RenderedText("val", n=6)[3]
    assert img.size == (64, 64) and text and all(w.isalpha() for w in text.split())
